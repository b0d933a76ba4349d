"""plugins/pbs on a real OpenPBS 23.06 (tests/testbed/pbs.py): server, scheduler,
comm, mom and PostgreSQL on this host, the hooks installed by install.sh --run,
jobs submitted by a real unprivileged user with qsub, outcomes read back with
qstat -x -f, tracejob and the jobs' own output files.
"""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

import imagetools
from testbed import pbs as testbed
from testbed import pbs_demo

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="the PBS test bed runs PBS's daemons: root")

CONFIG = os.path.join(testbed.REPO, "plugins", "pbs", "hpcrun_pbs.json")
ONLY_IN_IMAGE = "/opt/solver/input.txt"


@pytest.fixture(scope="module")
def pbs(hpcrun_bin, shared_dir):
    site = testbed.start()
    with open(testbed.HOSTS_SAVED) as f:      # the original, a crashed run's change undone
        hosts_before = f.read()
    # PBS refuses a host name that resolves only to loopback: for the run it is this machine's address
    assert socket.gethostbyname(site.host) == testbed.host_address()
    site.config_dir = tempfile.mkdtemp(prefix="pbs-config-", dir=shared_dir)
    site.hpcrun_bin = hpcrun_bin
    try:
        r = site.install_hooks(config=write_config(site))
        assert r.returncode == 0, r.stdout + r.stderr
        yield site
    finally:
        testbed.stop(site)
    with open(testbed.HOSTS) as f:
        assert f.read() == hosts_before
    assert not os.path.exists(testbed.HOSTS_SAVED)
    assert testbed.running_daemons() == []
    assert [f for f in testbed.RUN_FILES + [testbed.HOME] if os.path.lexists(f)] == []


def write_config(site, **changes):
    cfg = json.load(open(CONFIG))
    cfg["hpcrun"] = site.hpcrun_bin
    cfg.update(changes)
    path = os.path.join(site.config_dir, "hpcrun_pbs.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


@pytest.fixture
def configure(pbs):
    """configure(**keys): import a changed hook configuration; the default comes back after."""
    def apply(**changes):
        path = write_config(pbs, **changes)
        for hook in testbed.HOOK_NAMES:
            pbs.qmgr("import hook %s application/x-config default %s" % (hook, path))
        # qmgr returns before the mom has the new config: a job started in between
        # ran with the previous test's (seen: variable=CONTAINER_IMAGE left over,
        # "image argument is empty"; a refused hpcrun path left over)
        pbs.wait_for_mom_hooks()
    yield apply
    apply()


@pytest.fixture(scope="module")
def app(shared_dir):
    """The MPI program and its image (with /opt/solver/input.txt, which the host lacks)."""
    return pbs_demo.build_mpi_app(os.path.join(shared_dir, "pbs-app"))


@pytest.fixture(scope="module")
def image_fs():
    """Images on a file system of their own, as on a cluster's shared storage (a tmpfs)."""
    mnt = tempfile.mkdtemp(prefix="hpcrun-pbs-imgfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        # the last jobs' containers linger (config `linger`, 10 s) before they let go of it
        deadline = time.monotonic() + 60
        while subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "image file system still busy after 60 s"
            time.sleep(1)
        os.rmdir(mnt)


@pytest.fixture
def work(image_fs, test_user, app):
    """The user's submission directory on the image file system, holding the program and
    the image (SquashFS: hpcrun mounts it in place; this tests paths, not staging)."""
    d = tempfile.mkdtemp(prefix="job-", dir=image_fs)
    shutil.copy(app[0], d)
    shutil.copy(app[2], os.path.join(d, "hello.img"))
    own(d, test_user)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def own(path, user):
    for dirpath, dirnames, filenames in os.walk(path):
        for n in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            os.lchown(n, user.pw_uid, user.pw_gid)


def script(image_line, body, extra=""):
    return ("#!/bin/sh\n#PBS -l select=1:ncpus=1\n%s%s"
            'cd "$PBS_O_WORKDIR"\n%s' % (image_line, extra, body))


def run_job(pbs, user, work, text, args=(), timeout=120):
    """qsub as `user`, wait until finished: (attrs, output of the job)."""
    out = os.path.join(work, "job.out")
    p, jobid = pbs.qsub(user, work, text, args=["-j", "oe", "-o", out] + list(args))
    assert jobid, p.stderr
    attrs = pbs.wait(jobid, timeout=timeout)
    try:
        with open(out) as f:
            output = f.read()
        os.unlink(out)
    except FileNotFoundError:
        output = None
    attrs["id"] = jobid
    return attrs, output


def launch_body(pbs):
    return ('PATH="%s:$PATH"\necho "image=$HPCRUN_IMAGE"\nhpcrun "$HPCRUN_IMAGE" cat %s\n'
            % (os.path.dirname(pbs.hpcrun_bin), ONLY_IN_IMAGE))


def jobs_of(pbs, user):
    return pbs.cmd(["qselect", "-x", "-u", user.pw_name]).stdout.split()


# --- the installation -------------------------------------------------------------------------
def test_install_creates_the_resource_with_flag_m(pbs):
    out = pbs.qmgr("list resource container_image").stdout
    assert "type = string" in out and "flag = m" in out, out
    hooks = pbs.qmgr("list hook hpcrun_launch").stdout
    assert "execjob_launch" in hooks and "enabled = true" in hooks


def test_install_adds_flag_m_to_an_existing_resource(pbs, test_user, work):
    pbs.purge_jobs()
    pbs.remove_hooks()
    pbs.qmgr("delete resource container_image")
    pbs.qmgr("create resource container_image type=string")        # an earlier install's
    # a job (finished: in the history) uses it: PBS refuses a type change then, but takes the flag
    attrs, _ = run_job(pbs, test_user, work, script("#PBS -l container_image=hello.img\n", "true\n"))
    assert attrs["Resource_List"]["container_image"] == "hello.img"     # no hooks yet
    r = pbs.install_hooks(config=write_config(pbs))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "already there, keeping it (create resource container_image" in r.stderr
    assert "+ qmgr -c 'set resource container_image flag=m'" in r.stdout
    assert "flag = m" in pbs.qmgr("list resource container_image").stdout
    # installed again: nothing to fix
    r = pbs.install_hooks(config=write_config(pbs))
    assert r.returncode == 0 and "set resource" not in r.stdout, r.stdout + r.stderr


def test_install_refuses_when_the_flag_cannot_be_added(pbs, tmp_path):
    """A qmgr that lists the resource without flag=m and refuses to change it."""
    fake = tmp_path / "qmgr"
    fake.write_text('#!/bin/sh\ncase "$2" in\n"list resource"*) printf "Resource container_image\\n'
                    '    type = string\\n" ;;\n"set resource"*) echo "Resource busy on job" >&2; exit 70 ;;\n'
                    'create*) exit 1 ;;\nesac\nexit 0\n')
    fake.chmod(0o755)
    r = subprocess.run([os.path.join(testbed.REPO, "plugins", "pbs", "install.sh"), "--run", "--qmgr",
                        str(fake)], capture_output=True, text=True)
    assert r.returncode == 71
    assert r.stderr.splitlines()[-1] == ("install.sh: error: resource container_image exists without "
                                         "flag=m (the launch hook never sees it) and qmgr could not add "
                                         "the flag: run qmgr -c 'set resource container_image flag=m'")


def test_install_from_a_path_with_blanks(pbs, tmp_path):
    """An admin's unpacked tree, e.g. "hpcrun 0.1/": qmgr must get each file name whole.
    A non-ASCII path, which qmgr refuses however it is quoted, stops install.sh before any change."""
    bad = tmp_path / "données"
    shutil.copytree(os.path.join(testbed.REPO, "plugins", "pbs"), bad)
    d = tmp_path / "hpcrun 0.1 (site)"
    shutil.copytree(os.path.join(testbed.REPO, "plugins", "pbs"), d)
    shutil.copy(write_config(pbs), d / "site config.json")
    try:
        pbs.remove_hooks()
        r = subprocess.run([str(bad / "install.sh"), "--run", "--config", write_config(pbs)],
                           capture_output=True, text=True, env=testbed.pbs_env())
        assert r.returncode == 64 and r.stdout == "" and "qmgr cannot import" in r.stderr, r.stdout + r.stderr
        assert "hpcrun_submit" not in pbs.qmgr("list hook").stdout
        r = subprocess.run([str(d / "install.sh"), "--run", "--config", str(d / "site config.json")],
                           capture_output=True, text=True, env=testbed.pbs_env())
        assert r.returncode == 0, r.stdout + r.stderr
        for hook in testbed.HOOK_NAMES:
            got = pbs.qmgr("export hook %s application/x-python default" % hook).stdout
            assert got.strip() == (d / "hpcrun_pbs_hook.py").read_text().strip()
            got = pbs.qmgr("export hook %s application/x-config default" % hook).stdout
            assert json.loads(got)["hpcrun"] == pbs.hpcrun_bin
    finally:
        r = pbs.install_hooks(config=write_config(pbs))
        assert r.returncode == 0, r.stdout + r.stderr


# --- jobs that run in the image ---------------------------------------------------------------
def test_mpi_ranks_read_a_file_only_the_image_has(pbs, test_user, work, app):
    """hpcrun's single-file image format (staged by each node's first rank)."""
    image = app[1]
    body = ('echo "image=$HPCRUN_IMAGE"\nPATH="%s:$PATH"\nmpirun -np 2 hpcrun "$HPCRUN_IMAGE" ./hello\n'
            % os.path.dirname(pbs.hpcrun_bin))
    text = ("#!/bin/sh\n#PBS -l select=1:ncpus=2:mpiprocs=2\n#PBS -l container_image=%s\n"
            'cd "$PBS_O_WORKDIR"\n' % image + body)
    attrs, output = run_job(pbs, test_user, work, text, timeout=300)
    assert attrs["Exit_status"] == 0, (output, pbs.tracejob(attrs["id"]))
    assert attrs["Resource_List"]["container_image"] == image
    assert "image=%s\n" % image in output
    ranks = sorted(l for l in output.splitlines() if l.startswith("hello rank"))
    assert ranks == ["hello rank %d of 2 sum 1: %s" % (r, pbs_demo.IMAGE_DATA) for r in (0, 1)], output
    assert not os.path.exists(ONLY_IN_IMAGE)


def test_broadcast_inside_a_job(pbs, test_user, work, app):
    """docs/broadcast.md's PBS path: mpirun hpcrun broadcast in the job, into job-$PBS_JOBID/;
    the job's launch mounts that copy; --clean removes it."""
    image = app[1]
    body = ('PATH="%s:$PATH"\nmpirun -np 2 hpcrun broadcast %s\n'
            'HPCRUN_LINGER=0 hpcrun -v %s true 2>&1\nhpcrun broadcast --clean\n'
            'echo "left: $(ls /tmp/hpcrun-$(id -u)/bcast)"\n' % (os.path.dirname(pbs.hpcrun_bin), image, image))
    text = "#!/bin/sh\n#PBS -l select=1:ncpus=2:mpiprocs=2\n" + 'cd "$PBS_O_WORKDIR"\n' + body
    attrs, output = run_job(pbs, test_user, work, text, timeout=300)
    assert attrs["Exit_status"] == 0, (output, pbs.tracejob(attrs["id"]))
    assert "on 1 node(s): 1 copied" in output, output
    assert "broadcast copy /tmp/hpcrun-%d/bcast/job-%s/sha256_" % (test_user.pw_uid, attrs["id"]) in output, output
    assert "left: \n" in output, output


# Where users keep images, as they ask for them in a job script (a directive) and on qsub's
# command line (argv), and where the test puts the image ("->x": a symlink to x).  PBS's own
# rules: a value with spaces or quotes goes in double quotes inside the -l value; -l takes no
# non-ASCII characters at all (qsub: "illegal character"), so those paths go through the
# hook's `variable` (-v), or a symlink with an ASCII name.
PATHS = {
    "absolute": ("-l container_image={w}/hello.img", ["-l", "container_image={w}/hello.img"], None),
    "relative": ("-l container_image=hello.img", ["-l", "container_image=hello.img"], None),
    "relative with directories": ("-l container_image=imgs/v1/hello.img",
                                  ["-l", "container_image=imgs/v1/hello.img"], "imgs/v1/hello.img"),
    "dot-dot": ("-l container_image=imgs/../hello.img", ["-l", "container_image=./imgs/../hello.img"], None),
    "spaces": ("-l 'container_image=\"{w}/my images/solver v2.img\"'",
               ["-l", 'container_image="{w}/my images/solver v2.img"'], "my images/solver v2.img"),
    "quotes": ("-l 'container_image=\"{w}/it'\\''s/o'\\''brien v2.img\"'",
               ["-l", "container_image=\"{w}/it's/o'brien v2.img\""], "it's/o'brien v2.img"),
    "non-ASCII": ("-v CONTAINER_IMAGE={w}/données/modèle-λ.img",
                  ["-v", "CONTAINER_IMAGE={w}/données/modèle-λ.img"], "données/modèle-λ.img"),
    "symlink": ("-l container_image={w}/current.img", ["-l", "container_image={w}/current.img"],
                "->hello.img"),
    "symlink to non-ASCII": ("-l container_image=current.img", ["-l", "container_image=current.img"],
                             "->données/modèle-λ.img"),
}


def place_image(work, user, where):
    """Put (a copy of, or a symlink to) hello.img at `where`; return its absolute path."""
    if where is None:
        return os.path.join(work, "hello.img")
    if where.startswith("->"):
        target = place_image(work, user, None if where == "->hello.img" else where[2:])
        link = os.path.join(work, "current.img")
        os.symlink(target, link)
        os.lchown(link, user.pw_uid, user.pw_gid)
        return link
    dst = os.path.join(work, where)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy(os.path.join(work, "hello.img"), dst)
    own(work, user)
    return dst


@pytest.mark.parametrize("form", ["script", "command line"])
@pytest.mark.parametrize("kind", list(PATHS))
def test_image_paths(pbs, test_user, work, configure, kind, form):
    directive, argv, where = PATHS[kind]
    expected = os.path.normpath(place_image(work, test_user, where))
    if directive.startswith("-v"):
        configure(variable="CONTAINER_IMAGE")
    if form == "script":
        text, args = script("#PBS %s\n" % directive.format(w=work), launch_body(pbs)), []
    else:
        text, args = script("", launch_body(pbs)), [a.format(w=work) for a in argv]
    attrs, output = run_job(pbs, test_user, work, text, args=args)
    assert attrs["Exit_status"] == 0, (output, pbs.tracejob(attrs["id"]))
    if directive.startswith("-l"):
        assert attrs["Resource_List"]["container_image"] == expected
    else:
        assert attrs["Variable_List"]["CONTAINER_IMAGE"] == expected
    assert output == "image=%s\n%s\n" % (expected, pbs_demo.IMAGE_DATA)


def test_non_ascii_resource_value_is_refused_by_qsub_itself(pbs, test_user, work):
    p, jobid = pbs.qsub(test_user, work, script("", "true\n"),
                        args=["-l", "container_image=%s/données.img" % work])
    assert jobid is None and "illegal character" in p.stderr


@pytest.mark.parametrize("kind", ["hpcrun", "squashfs", "directory", "sif"])
def test_image_kinds_are_accepted(pbs, test_user, work, app, busybox_root, kind):
    image = {"hpcrun": app[1], "squashfs": os.path.join(work, "hello.img"), "directory": busybox_root,
             "sif": os.path.join(work, "x.sif")}[kind]
    if kind == "sif":      # the hook checks the signature only (SIF_MAGIC at byte 32)
        with open(image, "wb") as f:
            f.write(b"#!/usr/bin/env run-singularity\n\0" + b"SIF_MAGIC\0" + b"\0" * 200)
    p, jobid = pbs.qsub(test_user, work, script("#PBS -l container_image=%s\n" % image, "true\n"),
                        args=["-h"])
    assert jobid, p.stderr
    assert pbs.job(jobid)["Resource_List"]["container_image"] == image
    pbs.cmd(["qdel", jobid])


def test_qsub_l_overrides_the_script(pbs, test_user, work):
    text = script("#PBS -l container_image=missing.img\n", launch_body(pbs))
    attrs, output = run_job(pbs, test_user, work, text, args=["-l", "container_image=hello.img"])
    assert attrs["Exit_status"] == 0, output
    assert output.startswith("image=%s/hello.img\n" % work)


def test_qalter_is_checked_for_the_owner_and_made_absolute(pbs, test_user, work):
    place_image(work, test_user, "other/hello.img")
    p, jobid = pbs.qsub(test_user, work, script("#PBS -l container_image=hello.img\n", launch_body(pbs)),
                        args=["-h", "-j", "oe", "-o", os.path.join(work, "job.out")])
    assert jobid, p.stderr
    q = pbs.as_user(test_user, [os.path.join(pbs.bin, "qalter"), "-l", "container_image=nope.img", jobid],
                    work)
    assert q.returncode != 0
    assert q.stderr == ("qalter: container image not found: %s/nope.img (container_image=nope.img) %s\n"
                        % (work, jobid))
    # root alters it: the image is still checked for the job's owner, who cannot read this one
    private = os.path.join(work, "private.img")
    shutil.copy(os.path.join(work, "hello.img"), private)
    os.chmod(private, 0o600)
    q = pbs.cmd(["qalter", "-l", "container_image=" + private, jobid])
    assert q.returncode != 0 and "not readable by user %s" % test_user.pw_name in q.stderr
    q = pbs.as_user(test_user, [os.path.join(pbs.bin, "qalter"), "-l", "container_image=other/hello.img",
                                jobid], work)
    assert q.returncode == 0, q.stderr
    assert pbs.job(jobid)["Resource_List"]["container_image"] == os.path.join(work, "other/hello.img")
    pbs.as_user(test_user, [os.path.join(pbs.bin, "qrls"), jobid], work)
    attrs = pbs.wait(jobid)
    with open(os.path.join(work, "job.out")) as f:
        output = f.read()
    assert attrs["Exit_status"] == 0, output
    assert output == "image=%s/other/hello.img\n%s\n" % (work, pbs_demo.IMAGE_DATA)


def test_job_array_subjobs_get_the_image(pbs, test_user, work):
    body = 'echo "$PBS_ARRAY_INDEX $HPCRUN_IMAGE" > "out.$PBS_ARRAY_INDEX"\n'
    p, jobid = pbs.qsub(test_user, work, script("#PBS -l container_image=hello.img\n", body),
                        args=["-J", "1-3", "-o", "/dev/null", "-e", "/dev/null"])
    assert jobid and jobid.split(".")[0].endswith("[]"), p.stderr
    attrs = pbs.wait(jobid, timeout=180)
    assert attrs["job_state"] == "F"
    for i in (1, 2, 3):
        with open(os.path.join(work, "out.%d" % i)) as f:
            assert f.read() == "%d %s/hello.img\n" % (i, work)


def test_wrap_job_shell_runs_the_script_in_the_image(pbs, test_user, work, configure):
    configure(wrap_job_shell=True)
    # -S: the job's shell must exist in the image as well
    text = script("#PBS -l container_image=hello.img\n#PBS -S /bin/sh\n",
                  "cat %s\nhead -1 /etc/os-release\n" % ONLY_IN_IMAGE)
    attrs, output = run_job(pbs, test_user, work, text)
    assert attrs["Exit_status"] == 0, (output, pbs.tracejob(attrs["id"]))
    assert output == '%s\nPRETTY_NAME="hpcrun test image (busybox)"\n' % pbs_demo.IMAGE_DATA


def test_tm_tasks_are_left_alone(pbs, test_user, work):
    """pbsdsh starts a task through PBS's task manager: execjob_launch fires for it too (hex
    PBS_TASKNUM), and the hook must not check it again: the image is gone by then."""
    doomed = os.path.join(work, "mine.img")
    shutil.copy(os.path.join(work, "hello.img"), doomed)
    os.chown(doomed, test_user.pw_uid, test_user.pw_gid)
    body = 'rm "$HPCRUN_IMAGE"\n%s -- /bin/sh -c \'echo "tm task $PBS_TASKNUM"\'\n' % os.path.join(
        pbs.bin, "pbsdsh")
    attrs, output = run_job(pbs, test_user, work, script("#PBS -l container_image=mine.img\n", body))
    assert attrs["Exit_status"] == 0, (output, pbs.tracejob(attrs["id"]))
    assert output.startswith("tm task 0000000"), output


def test_job_without_image_is_untouched(pbs, test_user, work):
    text = script("", 'echo "image=${HPCRUN_IMAGE-unset}"\n')
    attrs, output = run_job(pbs, test_user, work, text)
    assert attrs["Exit_status"] == 0 and output == "image=unset\n"


def test_unset_image_variable_is_one_line_naming_it(pbs, test_user, work):
    """docs/pbs.md's job scripts use "${HPCRUN_IMAGE:?...}": the shell names the variable."""
    body = ('PATH="%s:$PATH"\nhpcrun "${HPCRUN_IMAGE:?no image: request one with '
            '#PBS -l container_image=IMAGE}" true\n' % os.path.dirname(pbs.hpcrun_bin))
    attrs, output = run_job(pbs, test_user, work, script("", body))
    assert attrs["Exit_status"] != 0
    lines = output.splitlines()
    assert len(lines) == 1 and "HPCRUN_IMAGE: no image: request one with" in lines[0], output
    # without the :? form hpcrun itself gets "" and says so in one line
    body = 'PATH="%s:$PATH"\nhpcrun "$HPCRUN_IMAGE" true\n' % os.path.dirname(pbs.hpcrun_bin)
    attrs, output = run_job(pbs, test_user, work, script("", body))
    assert attrs["Exit_status"] != 0
    assert len(output.splitlines()) == 1 and output.startswith("hpcrun: error: "), output


# --- refusals at submission -------------------------------------------------------------------
def refusal_cases(work, pub):
    notes = os.path.join(work, "notes.txt")
    with open(notes, "w") as f:
        f.write("not an image\n")
    private = os.path.join(pub, "private.img")
    shutil.copy(os.path.join(work, "hello.img"), private)
    os.chmod(private, 0o600)
    fifo = os.path.join(work, "fifo.img")
    os.mkfifo(fifo)
    return {
        "missing": ("missing.img", "container image not found: %s/missing.img (container_image=missing.img)"
                    % work),
        "unreadable": (private, "container image not readable by user hpcrun-test: %s (mode 600, owner "
                       "uid 0 gid 0)" % private),
        "not an image": ("notes.txt", "not a container image (no hpcrun header, SquashFS or SIF "
                         "signature): %s" % notes),
        "fifo": ("fifo.img", "not a container image: not a regular file or directory (%s)" % fifo),
        "tilde": ("~/x.img", "container_image=~/x.img: '~' is not expanded; give an absolute path or "
                  "one relative to the submission directory"),
    }


@pytest.mark.parametrize("case", ["missing", "unreadable", "not an image", "fifo", "tilde"])
def test_refused_at_qsub(pbs, test_user, work, shared_dir, case):
    pub = tempfile.mkdtemp(dir=shared_dir)
    os.chmod(pub, 0o755)
    try:
        value, message = refusal_cases(work, pub)[case]
        before = jobs_of(pbs, test_user)
        p, jobid = pbs.qsub(test_user, work, script("#PBS -l container_image=%s\n" % value, "true\n"))
        assert jobid is None and p.returncode != 0
        assert p.stderr == "qsub: %s\n" % message
        assert jobs_of(pbs, test_user) == before
    finally:
        shutil.rmtree(pub)


def test_empty_image_is_refused_naming_the_resource_or_variable(pbs, test_user, work, configure):
    configure(variable="CONTAINER_IMAGE")
    for args, what in [(["-v", "CONTAINER_IMAGE="], "CONTAINER_IMAGE"),
                       (["-l", 'container_image=" "'], "container_image")]:
        p, jobid = pbs.qsub(test_user, work, script("", "true\n"), args=args)
        assert jobid is None
        assert p.stderr == ("qsub: %s is empty: give the path of an image, e.g. %s=/apps/img/solver.img\n"
                            % (what, what)), args


def test_outside_allowed_dirs_is_refused(pbs, test_user, work, configure, shared_dir):
    allowed = tempfile.mkdtemp(prefix="site-images-", dir=shared_dir)
    os.chmod(allowed, 0o755)
    try:
        configure(allowed_dirs=[allowed])
        p, jobid = pbs.qsub(test_user, work, script("#PBS -l container_image=hello.img\n", "true\n"))
        assert jobid is None
        assert p.stderr == ("qsub: container image %s/hello.img is outside the allowed directories (%s)\n"
                            % (work, allowed))
        # a symlink into the allowed directory does not get out of it either way
        shutil.copy(os.path.join(work, "hello.img"), os.path.join(allowed, "ok.img"))
        os.symlink(os.path.join(allowed, "ok.img"), os.path.join(work, "ok.img"))
        p, jobid = pbs.qsub(test_user, work, script("#PBS -l container_image=ok.img\n", "true\n"),
                            args=["-h"])
        assert jobid, p.stderr
        pbs.cmd(["qdel", jobid])
    finally:
        shutil.rmtree(allowed)


def test_custom_resource_and_variable(pbs, test_user, work, configure):
    cfg = os.path.join(pbs.config_dir, "site.conf.txt")       # any suffix: PBS keeps it as <hook>.CF
    with open(cfg, "w") as f:
        json.dump({"resource": "hpcrun_image", "variable": "CONTAINER_IMAGE", "hpcrun": pbs.hpcrun_bin}, f)
    r = pbs.install_hooks(config=cfg, resource="hpcrun_image")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "flag = m" in pbs.qmgr("list resource hpcrun_image").stdout
    p, jobid = pbs.qsub(test_user, work, script("#PBS -l hpcrun_image=nope.img\n", "true\n"))
    assert p.stderr == "qsub: container image not found: %s/nope.img (hpcrun_image=nope.img)\n" % work
    p, jobid = pbs.qsub(test_user, work, script("", "true\n"), args=["-v", "CONTAINER_IMAGE=nope.img"])
    assert p.stderr == "qsub: container image not found: %s/nope.img (CONTAINER_IMAGE=nope.img)\n" % work
    text = script("#PBS -l hpcrun_image=hello.img\n", launch_body(pbs))
    attrs, output = run_job(pbs, test_user, work, text)
    assert output == "image=%s/hello.img\n%s\n" % (work, pbs_demo.IMAGE_DATA)


@pytest.mark.parametrize("text,message", [
    ("{not json", "hpcrun hook configuration is not valid JSON"),
    ('{"resoruce": "x"}', "hpcrun hook configuration has unknown keys resoruce"),
    ('{"wrap_job_shell": true, "hpcrun": "hpcrun"}',
     "hpcrun hook configuration: hpcrun must be an absolute path (hpcrun)"),
])
def test_bad_configuration_refuses_jobs_for_the_admin(pbs, test_user, work, configure, text, message):
    path = os.path.join(pbs.config_dir, "bad.txt")
    with open(path, "w") as f:
        f.write(text)
    for hook in testbed.HOOK_NAMES:
        pbs.qmgr("import hook %s application/x-config default %s" % (hook, path))
    p, jobid = pbs.qsub(test_user, work, script("#PBS -l container_image=hello.img\n", "true\n"))
    assert jobid is None
    assert p.stderr.startswith("qsub: " + message) and p.stderr.endswith(". Please inform Admin\n")
    assert p.stderr.count("\n") == 1


# --- at launch ----------------------------------------------------------------------------------
def submit_held_then_remove_image(pbs, user, work):
    doomed = os.path.join(work, "doomed.img")
    shutil.copy(os.path.join(work, "hello.img"), doomed)
    p, jobid = pbs.qsub(user, work, script("#PBS -l container_image=doomed.img\n", "true\n"),
                        args=["-h", "-o", "/dev/null", "-e", "/dev/null"])
    assert jobid, p.stderr
    os.unlink(doomed)
    pbs.cmd(["qrls", jobid], check=True)
    return jobid, doomed


def test_image_vanished_before_launch_deletes_the_job(pbs, test_user, work):
    jobid, doomed = submit_held_then_remove_image(pbs, test_user, work)
    attrs = pbs.wait(jobid)
    assert attrs.get("Exit_status", 0) != 0
    trace = pbs.tracejob(jobid)
    assert "hpcrun: container image not found: %s" % doomed in trace, trace
    assert int(attrs.get("run_count", 1)) <= 1


def test_image_vanished_requeues_once_then_deletes(pbs, test_user, work, configure):
    configure(launch_failure="requeue")
    jobid, doomed = submit_held_then_remove_image(pbs, test_user, work)
    attrs = pbs.wait(jobid, timeout=180)
    trace = pbs.tracejob(jobid)
    assert attrs["job_state"] == "F", trace
    # (each hook message is in the trace twice: the job's own log line and the mom's error line)
    assert "(requeuing the job once)" in trace and "(requeued once already: deleting the job)" in trace
    assert trace.count("hook rejected request, requiring job to be rerun") == 1, trace
    assert trace.count("hook rejected request, requiring job to be deleted") == 1, trace
    assert int(attrs["run_count"]) == 2
    assert "Hold_Types" not in attrs or attrs["Hold_Types"] == "n"


# --- logging ------------------------------------------------------------------------------------
def test_accepted_images_are_logged_only_at_debug_level(pbs, test_user, work):
    marker = os.path.join(work, "hello.img")
    p, jobid = pbs.qsub(test_user, work, script("#PBS -l container_image=hello.img\n", "true\n"),
                        args=["-h"])
    assert jobid, p.stderr
    assert "image %s accepted" % marker not in pbs.log("server")
    pbs.qmgr("set server log_events = 2047")
    try:
        p, jobid2 = pbs.qsub(test_user, work, script("#PBS -l container_image=hello.img\n", "true\n"),
                             args=["-h"])
        assert "hpcrun: squashfs image %s accepted for %s" % (marker, test_user.pw_name) in pbs.log("server")
    finally:
        pbs.qmgr("unset server log_events")
        pbs.cmd(["qdel", jobid, jobid2])


def _pinned_job(pbs, user, work, busybox_root, pin_line):
    """qsub -h a job on pin.img (marker "first"), rebuild the image ("second") while it
    is held, qrls it: (attrs, output, digest at submission, digest now)."""
    root = os.path.join(work, "pin-root")
    if not os.path.isdir(root):
        shutil.copytree(busybox_root, root, symlinks=True)
    img = os.path.join(work, "pin.img")

    def build(marker):
        os.makedirs(os.path.join(root, "etc"), exist_ok=True)
        with open(os.path.join(root, "etc", "build-marker"), "w") as f:
            f.write(marker + "\n")
        imagetools.make_image(root, img)
        from hpcrun import image
        return image.open_image(img).pin
    submitted = build("first")
    out = os.path.join(work, "job.out")
    body = 'PATH="%s:$PATH"\nhpcrun "$HPCRUN_IMAGE" cat /etc/build-marker\n' % os.path.dirname(pbs.hpcrun_bin)
    p, jobid = pbs.qsub(user, work, script("#PBS -l container_image=pin.img\n" + pin_line, body),
                        args=["-h", "-j", "oe", "-o", out])
    assert jobid, p.stderr
    assert pbs.job(jobid)["job_state"] == "H"
    now = build("second")                              # the user rebuilds while the job waits
    r = pbs.as_user(user, [os.path.join(pbs.bin, "qrls"), jobid], work)
    assert r.returncode == 0, r.stderr
    attrs = pbs.wait(jobid)
    with open(out) as f:
        output = f.read()
    return attrs, output, submitted, now


def test_a_job_whose_image_is_rebuilt_while_held_fails_naming_both(pbs, test_user, work, busybox_root):
    attrs, output, submitted, now = _pinned_job(pbs, test_user, work, busybox_root, "")
    assert submitted != now and submitted.startswith("sha256:")
    variables = attrs["Variable_List"]
    assert variables["HPCRUN_IMAGE_DIGEST"] == submitted, variables
    assert variables["HPCRUN_IMAGE_DIGEST_PATH"] == os.path.join(work, "pin.img")
    assert attrs["Exit_status"] == 65, output
    assert output == ("hpcrun: error: image is not the one pinned at submission: pinned %s, image now %s (%s)\n"
                      % (submitted, now, os.path.join(work, "pin.img"))), output


def test_container_pin_no_runs_the_rebuilt_image(pbs, test_user, work, busybox_root):
    attrs, output, submitted, now = _pinned_job(pbs, test_user, work, busybox_root,
                                                "#PBS -l container_pin=no\n")
    assert "HPCRUN_IMAGE_DIGEST" not in attrs["Variable_List"]
    assert attrs["Exit_status"] == 0, output
    assert output == "second\n"


def test_container_pin_takes_yes_or_no(pbs, test_user, work):
    p, jobid = pbs.qsub(test_user, work, script("#PBS -l container_image=hello.img\n", "true\n"),
                        args=["-l", "container_pin=maybe"])
    assert not jobid
    assert p.stderr == "qsub: container_pin must be yes or no (container_pin=maybe)\n"


def test_qalter_pins_the_new_image(pbs, test_user, work, busybox_root):
    root = os.path.join(work, "pin-root")
    shutil.copytree(busybox_root, root, symlinks=True)
    os.makedirs(os.path.join(root, "etc"), exist_ok=True)
    pins = {}
    for name in ("a.img", "b.img"):
        with open(os.path.join(root, "etc", "build-marker"), "w") as f:
            f.write(name + "\n")
        imagetools.make_image(root, os.path.join(work, name))
        from hpcrun import image
        pins[name] = image.open_image(os.path.join(work, name)).pin
    body = 'PATH="%s:$PATH"\nhpcrun "$HPCRUN_IMAGE" cat /etc/build-marker\n' % os.path.dirname(pbs.hpcrun_bin)
    out = os.path.join(work, "job.out")
    p, jobid = pbs.qsub(test_user, work, script("#PBS -l container_image=a.img\n", body),
                        args=["-h", "-j", "oe", "-o", out])
    assert jobid, p.stderr
    assert pbs.job(jobid)["Variable_List"]["HPCRUN_IMAGE_DIGEST"] == pins["a.img"]
    q = pbs.as_user(test_user, [os.path.join(pbs.bin, "qalter"), "-l", "container_image=b.img", jobid], work)
    assert q.returncode == 0, q.stderr
    variables = pbs.job(jobid)["Variable_List"]
    assert (variables["HPCRUN_IMAGE_DIGEST"], variables["HPCRUN_IMAGE_DIGEST_PATH"]) == (
        pins["b.img"], os.path.join(work, "b.img"))
    pbs.as_user(test_user, [os.path.join(pbs.bin, "qrls"), jobid], work)
    attrs = pbs.wait(jobid)
    with open(out) as f:
        output = f.read()
    assert (attrs["Exit_status"], output) == (0, "b.img\n"), output
