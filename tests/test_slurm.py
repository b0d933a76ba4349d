"""Slurm integration on real daemons: munged, slurmctld and two slurmd "nodes"
on loopback (tests/testbed/cluster.py), the SPANK plugin built from
plugins/slurm/, the cli_filter.lua, and the real hpcrun.  Jobs run as the
unprivileged test user, as users' jobs do."""
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

import imagetools
from testbed import slurm
from testbed.cluster import Cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_DIR = os.path.join(ROOT, "plugins", "slurm")
OMPI_DIRS = ["/usr/lib/x86_64-linux-gnu/openmpi", "/usr/lib/x86_64-linux-gnu/pmix2",
             "/usr/share/openmpi", "/etc/openmpi"]
IMAGE_OS = "hpcrun test image (busybox)"
T = 120   # seconds any one Slurm command may take on a loaded 2-core machine

pytestmark = pytest.mark.skipif(
    not (shutil.which("slurmctld") and shutil.which("munged") and os.path.exists("/usr/include/slurm/spank.h")
         and os.getuid() == 0),
    reason="needs root, slurmctld, slurmd, munge and libslurm-dev")

HELLO_C = r"""#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    int rank, size;
    char os[128] = "?", line[256];
    FILE *f = fopen("/etc/os-release", "r");
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "ID=", 3) == 0) { strncpy(os, line + 3, sizeof os - 1); os[strcspn(os, "\n")] = 0; }
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Barrier(MPI_COMM_WORLD);
    printf("hello rank %d of %d os=%s\n", rank, size, os);
    MPI_Finalize();
    return 0;
}
"""


@pytest.fixture(scope="session")
def spank_plugin():
    subprocess.run(["make", "-s", "-C", PLUGIN_DIR], check=True, capture_output=True, timeout=120)
    return os.path.join(PLUGIN_DIR, "spank_hpcrun.so")


@pytest.fixture(scope="session")
def hpcrun_path(hpcrun_bin):
    # HPCRUN_SLURM_TEST_HPCRUN: test another hpcrun install through the same plugin.
    return os.environ.get("HPCRUN_SLURM_TEST_HPCRUN") or hpcrun_bin


@pytest.fixture(scope="session")
def cluster(spank_plugin, hpcrun_path, shared_dir):
    hpcrun = hpcrun_path
    # Nodes have their own /tmp (testbed/nodens.py): shared_dir is the shared file system.
    with Cluster(nodes=2, cpus=4, plugin=spank_plugin, plugin_args=["hpcrun=" + hpcrun],
                 cli_filter=os.path.join(PLUGIN_DIR, "cli_filter.lua"), shared=[shared_dir]) as c:
        yield c


@pytest.fixture(scope="session")
def jobdir(shared_dir, test_user, busybox_image):
    """The test user's working directory: images (relative paths), scripts, outputs."""
    d = os.path.join(shared_dir, "slurm-jobs")
    os.makedirs(d, exist_ok=True)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    shutil.copy2(busybox_image, os.path.join(d, "busybox.img"))
    with open(os.path.join(d, "notanimage.img"), "w") as f:
        f.write("just text\n")
    return d


@pytest.fixture(scope="session")
def mpi_image(shared_dir, jobdir):
    """busybox + an Open MPI hello compiled here + the host's Open MPI and PMIx runtime."""
    build = os.path.join(shared_dir, "slurm-mpi")
    root = os.path.join(build, "root")
    os.makedirs(build, exist_ok=True)
    with open(os.path.join(build, "hello.c"), "w") as f:
        f.write(HELLO_C)
    subprocess.run(["mpicc", "-O2", "-o", os.path.join(build, "hello"), os.path.join(build, "hello.c")],
                   check=True, timeout=120)
    imagetools.make_busybox_root(root)
    imagetools.add_host_program(root, os.path.join(build, "hello"))
    for d in OMPI_DIRS:
        if os.path.isdir(d):
            shutil.copytree(d, root + d, symlinks=True, dirs_exist_ok=True)
    for d in OMPI_DIRS[:2]:   # components are dlopen()ed: their libraries too
        for dirpath, _, files in os.walk(d):
            for name in files:
                if ".so" in name:
                    imagetools.add_host_program(root, os.path.join(dirpath, name))
    os.makedirs(os.path.join(root, "app"), exist_ok=True)
    shutil.copy2(os.path.join(build, "hello"), os.path.join(root, "app/hello"))
    return imagetools.make_image(root, os.path.join(jobdir, "mpi.img"))


@pytest.fixture(scope="session")
def job_user(test_user, as_user, hpcrun_bin, busybox_image):
    """Who submits: the unprivileged test user where it can launch images on this
    host (user namespaces, FUSE), else root; docs/slurm.md covers both."""
    r = as_user([hpcrun_bin, busybox_image, "true"], cwd="/")
    if r.returncode == 0:
        return test_user
    import pwd
    print("slurm tests run jobs as root: unprivileged hpcrun fails here: %s" % r.stderr.strip())
    return pwd.getpwuid(0)


@pytest.fixture(scope="session")
def as_job_user(job_user, cluster, jobdir):
    """run(argv, env=None, **kw) as the job user, in jobdir, against the test cluster."""
    from conftest import user_cmd

    def go(argv, env=None, popen=False, cwd=None, **kw):
        e = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": job_user.pw_dir, "USER": job_user.pw_name,
             "LANG": "C.UTF-8", "SLURM_CONF": cluster.conf}
        e.update(env or {})
        argv = user_cmd(job_user, ["env"] + ["%s=%s" % kv for kv in e.items()] + list(argv))
        if popen:
            return subprocess.Popen(argv, cwd=cwd or jobdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", T)
        return subprocess.run(argv, cwd=cwd or jobdir, **kw)
    return go


@pytest.fixture
def run(as_job_user):
    return as_job_user


def submit(cluster, as_job_user, jobdir, script, name):
    """sbatch a script as the job user; wait; return (job facts, output text)."""
    path = os.path.join(jobdir, name + ".sh")
    with open(path, "w") as f:
        f.write(script)
    os.chmod(path, 0o755)
    r = as_job_user(["sbatch", "--parsable", "-o", name + ".out", path])
    assert r.returncode == 0, r.stderr
    info = slurm.wait(int(r.stdout.strip().split(";")[0]), timeout=T, env=cluster.env())
    with open(os.path.join(jobdir, name + ".out")) as f:
        return info, f.read()


def sbatch_quote(value):
    """value as one argument of an #SBATCH line: sbatch groups with double quotes
    and takes a backslash as an escape (single quotes are plain characters)."""
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"')


def test_srun_container_runs_every_task_inside(run):
    r = run(["srun", "-N2", "-n4", "-l", "--container=busybox.img", "cat", "/etc/os-release"])
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "PRETTY_NAME" in line]
    assert sorted(line.split(":")[0].strip() for line in lines) == ["0", "1", "2", "3"]
    assert all(IMAGE_OS in line for line in lines), r.stdout


def test_tasks_keep_identity_and_lose_the_handshake(run, job_user, jobdir):
    r = run(["srun", "-N2", "-n2", "-l", "--container=busybox.img", "sh", "-c",
             'echo "id=$(id -u) rank=$SLURM_PROCID pmix=$PMIX_RANK cwd=$(pwd) c=$HPCRUN_CONTAINER";'
             ' env | grep -c ^HPCRUN_TASK_'])
    assert r.returncode == 1, r.stderr   # grep -c found nothing: the plugin's variables are gone
    for rank in (0, 1):
        assert "id=%d rank=%d pmix=%d cwd=%s c=%s" % (
            job_user.pw_uid, rank, rank, jobdir, os.path.join(jobdir, "busybox.img")) in r.stdout


def test_a_steps_tasks_are_served_by_the_compiled_front(run, hpcrun_path):
    """A Slurm task is a rank like an mpirun rank: the step's first task on the node runs the Python
    path and writes the join ticket; the others wait for it and the compiled front serves them from
    it (docs/install.md "The compiled front"), with the handshake gone and each its own rank."""
    from imagetools import is_elf
    if not is_elf(hpcrun_path):
        pytest.skip("%s is not the compiled front (install-entry without a compiler)" % hpcrun_path)
    r = run(["srun", "-N1", "-n4", "-l", "--container=busybox.img", "--export=ALL,HPCRUN_FRONT_DEBUG=1",
             "sh", "-c", 'echo "rank=$SLURM_PROCID handshake=$(env | grep -c ^HPCRUN_TASK_)"'])
    assert r.returncode == 0, r.stderr
    assert sorted(ln.split(":", 1)[1].strip() for ln in r.stdout.splitlines()) == [
        "rank=%d handshake=0" % i for i in range(4)], r.stdout + r.stderr
    last = {}                                  # each task's last word from the front
    for ln in r.stderr.splitlines():
        task, _, said = ln.partition(": ")
        if said.startswith("hpcrun: front: "):
            last[task.strip()] = said
    python = [t for t, said in last.items() if "python path:" in said]
    served = [t for t in map(str, range(4)) if t not in python]
    # Slurm 22.05 sets TMPDIR for a node's first task only (measured): its K differs from the
    # others', so it is a first rank of its own.  The other three share one K and one Python path.
    assert 1 <= len(python) <= 2 and len(served) >= 2, r.stderr


def test_sbatch_container_wraps_plain_srun(cluster, as_job_user, jobdir):
    info, out = submit(cluster, as_job_user, jobdir, """#!/bin/sh
#SBATCH -N2 --ntasks-per-node=2
#SBATCH --container=busybox.img
grep -h ^ID= /etc/os-release | sed 's/^/batch /'
srun grep -h ^PRETTY_NAME /etc/os-release
""", "sbatch-container")
    assert info["state"] == "COMPLETED", out
    host_id = open("/etc/os-release").read().split("\nID=")[1].split()[0]
    assert "batch ID=%s" % host_id in out     # the batch script itself stays on the host
    assert out.count(IMAGE_OS) == 4, out


def test_container_batch_runs_the_script_inside(cluster, as_job_user, jobdir):
    info, out = submit(cluster, as_job_user, jobdir, """#!/bin/sh
#SBATCH -N1
#SBATCH --container-image=busybox.img
#SBATCH --container-batch
grep -h ^PRETTY_NAME /etc/os-release
""", "container-batch")
    assert info["state"] == "COMPLETED", out
    assert IMAGE_OS in out


def test_container_image_and_pyxis_style_options(run, jobdir):
    marker = os.path.join(jobdir, "mountme")
    os.makedirs(marker, exist_ok=True)
    with open(os.path.join(marker, "file"), "w") as f:
        f.write("bound\n")
    script = 'pwd; cat /mnt/data/file; echo "var=$IMAGE_VAR"'
    r = run(["srun", "-N1", "--container-image=busybox.img", "--container-workdir=/etc",
             "--container-mounts=%s:/mnt/data:ro" % marker, "--container-env=IMAGE_VAR",
             "sh", "-c", script], env={"IMAGE_VAR": "from-host"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["/etc", "bound", "var=from-host"]
    r = run(["srun", "-N1", "--container-image=busybox.img", "sh", "-c", 'echo "var=$IMAGE_VAR"'],
            env={"IMAGE_VAR": "from-host"})
    assert r.stdout.split() == ["var=from-image"], r.stderr


def test_mpi_hello_under_srun_pmix(run, mpi_image):
    r = run(["srun", "--mpi=pmix", "-N2", "-n4", "--container=mpi.img", "/app/hello"])
    assert r.returncode == 0, r.stdout + r.stderr
    lines = sorted(line for line in r.stdout.splitlines() if line.startswith("hello rank"))
    assert lines == ["hello rank %d of 4 os=hpcrun-test" % i for i in range(4)], r.stdout + r.stderr


@pytest.mark.parametrize("image,why", [("missing.img", "image not found"),
                                       ("notanimage.img", "not an image")])
def test_bad_image_refused_at_submit(run, jobdir, image, why):
    for cmd in (["srun", "--container=" + image, "true"], ["sbatch", "--container=" + image, "--wrap=true"],
                ["srun", "--container-image=" + image, "true"]):
        r = run(cmd)
        assert r.returncode != 0
        assert why in r.stderr and os.path.join(jobdir, image) in r.stderr, r.stderr


def test_bad_image_without_cli_filter_fails_the_task_clearly(run, jobdir):
    # HPCRUN_IMAGE bypasses the cli_filter: the task itself must fail, with hpcrun's code.
    r = run(["srun", "-N2", "-n2", "true"], env={"HPCRUN_IMAGE": "gone.img"})
    assert r.returncode == 66, r.stdout + r.stderr     # errors.NOINPUT
    assert "hpcrun: error: image not found (%s, from HPCRUN_IMAGE)" % os.path.join(jobdir, "gone.img") in r.stderr


def test_exit_codes_reach_srun_and_the_job(cluster, run, as_job_user, jobdir):
    r = run(["srun", "-N1", "--container=busybox.img", "sh", "-c", "exit 3"])
    assert r.returncode == 3
    info, out = submit(cluster, as_job_user, jobdir, """#!/bin/sh
#SBATCH -N1
#SBATCH --container=busybox.img
srun sh -c 'exit 5'
""", "exit-code")
    assert (info["state"], info["exit_code"]) == ("FAILED", 5), out


def test_mpirun_inside_an_allocation_keeps_orted_on_the_host(cluster, as_job_user, jobdir, hpcrun_path):
    # mpirun starts its orted daemons through srun: they must not be wrapped (skip=).
    info, out = submit(cluster, as_job_user, jobdir, """#!/bin/sh
#SBATCH -N2 --ntasks-per-node=2
#SBATCH --container=busybox.img
mpirun --allow-run-as-root -np 4 %s busybox.img sh -c 'echo "rank $OMPI_COMM_WORLD_RANK $(grep ^ID= /etc/os-release)"'
""" % hpcrun_path, "mpirun-in-allocation")
    assert info["state"] == "COMPLETED", out
    assert sorted(line for line in out.splitlines() if line.startswith("rank")) == [
        "rank %d ID=hpcrun-test" % i for i in range(4)], out


def _running_job(cluster, name):
    end = time.monotonic() + T
    while time.monotonic() < end:
        for j in slurm.queue(env=cluster.env()):
            if j["name"] == name and j["state"] == "RUNNING":
                return j["job_id"]
        time.sleep(0.2)
    raise AssertionError("job %s never ran" % name)


def test_scancel_signals_reach_the_wrapped_program(cluster, run):
    prog = 'trap "echo got-usr1; exit 7" USR1; echo ready; while :; do sleep 1; done'
    p = run(["srun", "-J", "sigtest", "-N1", "--container=busybox.img", "sh", "-c", prog], popen=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        jid = _running_job(cluster, "sigtest")
        subprocess.run(["scancel", "--signal=USR1", str(jid)], env=cluster.env(), check=True, timeout=T)
        out, err = p.communicate(timeout=T)
        assert "got-usr1" in out and p.returncode == 7, out + err
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.communicate()

    p = run(["srun", "-J", "canceltest", "-N1", "--container=busybox.img", "sh", "-c",
             "echo ready; sleep 300"], popen=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        jid = _running_job(cluster, "canceltest")
        subprocess.run(["scancel", str(jid)], env=cluster.env(), check=True, timeout=T)
        p.communicate(timeout=60)       # KillWait=5: gone long before the sleep ends
        info = slurm.wait(jid, timeout=T, env=cluster.env())
        assert info["state"] == "CANCELLED" and p.returncode != 0
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.communicate()


# -- image paths as users write them, with the images on a file system of their own ----------

# Images under the submit directory, by case: given as written (relative) and as an absolute path.
IMAGE_PATHS = {
    "subdir": "sub/x.img",
    "spaces": "my images/solver v2.img",
    "quotes": "q\"uo'te.img",
    "non-ascii": "Bäume/€ λ.sqfs",
    "tab": "tab\tname.img",            # Slurm's JSON writes it as \t
    "comma": "run,1/a,b.img",          # cannot travel in --export: the plugin resolves it
    "hash": "#1/x#y.img",              # a comment character on #SBATCH lines
}
# Symlinks in the submit directory: (link, target; None = the absolute image outside it).
SYMLINKS = {"symlink-relative": ("link.img", "my images/solver v2.img"),
            "symlink-absolute": ("abs link.img", None)}
DATA_DIR, DATA_SUB, WORK_DIR = "my data", "Bäume q\"'", "w dir/ü"
CASES = (["absolute"] + sorted(IMAGE_PATHS) + ["%s-abs" % c for c in sorted(IMAGE_PATHS)]
         + sorted(SYMLINKS))


class ImageFS:
    """A tmpfs of its own (as shared storage is on a cluster): one image per case,
    each with its case name in /etc/image-name, and a submit directory."""

    def __init__(self, mountpoint):
        self.mountpoint = mountpoint
        self.project = os.path.join(mountpoint, "project")
        self.top = os.path.join(mountpoint, "top.img")

    def case(self, name):
        """(path as the user writes it, the image name that must answer)."""
        if name == "absolute":
            return self.top, "absolute"
        if name in SYMLINKS:
            link, target = SYMLINKS[name]
            return link, "absolute" if target is None else [
                c for c, p in IMAGE_PATHS.items() if p == target][0]
        if name.endswith("-abs"):
            return os.path.join(self.project, IMAGE_PATHS[name[:-4]]), name[:-4]
        return IMAGE_PATHS[name], name


@pytest.fixture(scope="session")
def image_fs(shared_dir, busybox_root, job_user, cluster):
    """*.img are hpcrun single-file images (staged across file systems on an
    unprivileged launch), *.sqfs plain SquashFS."""
    mnt = tempfile.mkdtemp(prefix="hpcrun-slurm-imgfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", mnt], check=True)
    try:
        cluster.share(mnt)    # mounted after the nodes started: bind it into their views
        fs = ImageFS(mnt)
        os.makedirs(fs.project)
        root = os.path.join(shared_dir, "slurm-paths-root")
        shutil.copytree(busybox_root, root, symlinks=True)
        for case, path in [("absolute", fs.top)] + [(c, os.path.join(fs.project, p))
                                                    for c, p in IMAGE_PATHS.items()]:
            with open(os.path.join(root, "etc", "image-name"), "w") as f:
                f.write(case + "\n")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if path.endswith(".sqfs"):
                imagetools.mksquashfs(root, path)
            else:
                imagetools.make_image(root, path)
        for link, target in SYMLINKS.values():
            os.symlink(target or fs.top, os.path.join(fs.project, link))
        # Data for --container-mounts and --container-workdir.
        os.makedirs(os.path.join(fs.project, DATA_DIR, DATA_SUB))
        with open(os.path.join(fs.project, DATA_DIR, DATA_SUB, "f"), "w") as f:
            f.write("data\n")
        os.symlink(DATA_DIR, os.path.join(fs.project, "data link"))
        os.makedirs(os.path.join(fs.project, WORK_DIR))
        for dirpath, dirnames, filenames in os.walk(fs.project):
            for name in dirnames + filenames + ["."]:
                os.lchown(os.path.join(dirpath, name), job_user.pw_uid, job_user.pw_gid)
        yield fs
    finally:
        subprocess.run(["umount", mnt], check=True)
        os.rmdir(mnt)


@pytest.mark.parametrize("option", ["--container", "--container-image"])
@pytest.mark.parametrize("case", CASES)
def test_srun_image_paths(run, image_fs, option, case):
    path, name = image_fs.case(case)
    shape = ["-N2", "-n4"] if case == "absolute" else ["-N1", "-n1"]   # issue 18's own example: -N2 -n4
    r = run(["srun"] + shape + ["%s=%s" % (option, path), "cat", "/etc/image-name"], cwd=image_fs.project)
    assert (r.returncode, r.stdout.split()) == (0, [name] * int(shape[1][2:])), r.stderr


def test_sbatch_image_paths(cluster, run, image_fs):
    """#SBATCH --container / --container-image for every case, and both options on
    sbatch's command line for a few, submitted at once; every job's srun task
    must run in the image the path names."""
    jobs = []   # (label, #SBATCH line, sbatch arguments, the image name that must answer)
    for case in CASES:
        path, name = image_fs.case(case)
        for option in ("--container", "--container-image"):
            jobs.append(("#SBATCH %s %s" % (option, case), "#SBATCH %s=%s" % (option, sbatch_quote(path)), [],
                         name))
        if case in ("subdir", "quotes", "non-ascii", "comma-abs", "symlink-relative"):
            for option in ("--container", "--container-image"):
                jobs.append(("sbatch %s %s" % (option, case), "", ["%s=%s" % (option, path)], name))
    submitted = []
    for i, (label, line, args, name) in enumerate(jobs):
        script = os.path.join(image_fs.project, "paths-%d.sh" % i)
        with open(script, "w") as f:
            f.write("#!/bin/sh\n#SBATCH -N1 -n1\n%s\nsrun cat /etc/image-name\n" % line)
        r = run(["sbatch", "--parsable", "-o", "paths-%d.out" % i] + args + [script], cwd=image_fs.project)
        assert r.returncode == 0, "%s: %s" % (label, r.stderr)
        submitted.append((label, int(r.stdout.strip().split(";")[0]), i, name))
    wrong = []
    for label, jid, i, name in submitted:
        info = slurm.wait(jid, timeout=T, env=cluster.env())
        with open(os.path.join(image_fs.project, "paths-%d.out" % i), errors="replace") as f:
            out = f.read()
        if info["state"] != "COMPLETED" or out.strip() != name:
            wrong.append("%s: %s %r" % (label, info["state"], out))
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("argv,why", [
    (["srun", "--container-image=", "true"], "hpcrun: --container-image is empty"),
    (["srun", "--container=", "true"], "hpcrun: image argument is empty (--container=)"),
    (["sbatch", "--container-image=", "--wrap=true"], "hpcrun: --container-image is empty"),
    (["sbatch", "--container=", "--wrap=true"], "hpcrun: image argument is empty (--container=)"),
    (["sbatch", "empty-container-image.sh"], "hpcrun: --container-image is empty"),
    (["sbatch", "empty-container.sh"], "hpcrun: image argument is empty (--container=)"),
])
def test_empty_image_option_is_refused_by_name(run, jobdir, argv, why):
    # What `--container-image=$IMG` gives when IMG is unset: one line naming the option.
    for option in ("container-image", "container"):
        with open(os.path.join(jobdir, "empty-%s.sh" % option), "w") as f:
            f.write("#!/bin/sh\n#SBATCH --%s=\nsrun true\n" % option)
    r = run(argv)
    assert r.returncode != 0 and "Submitted" not in r.stdout, r.stdout
    ours = [line for line in r.stderr.splitlines() if "hpcrun:" in line]
    assert len(ours) == 1 and why in ours[0], r.stderr


def test_empty_hpcrun_image_fails_the_task_by_name(run):
    # HPCRUN_IMAGE set but empty in the job (export HPCRUN_IMAGE=$UNSET): the task
    # is not run on the host unnoticed; hpcrun says which variable, usage error.
    r = run(["srun", "-N1", "-n1", "true"], env={"HPCRUN_IMAGE": ""})
    assert r.returncode == 64, r.stdout + r.stderr     # errors.USAGE
    assert [line for line in r.stderr.splitlines() if line.startswith("hpcrun:")] == [
        "hpcrun: error: image argument is empty (HPCRUN_IMAGE, set but empty in the task's environment)"]


def test_mounts_and_workdir_paths(run, image_fs):
    p = image_fs.project
    data = os.path.join(p, DATA_DIR)
    cases = [  # (options, command, expected output)
        (["--container-mounts=%s:/mnt/d a:ro" % data], ["cat", "/mnt/d a/%s/f" % DATA_SUB], "data"),
        (["--container-mounts=" + DATA_DIR], ["cat", os.path.join(data, DATA_SUB, "f")], "data"),
        (["--container-mounts=data link:/d"], ["cat", "/d/%s/f" % DATA_SUB], "data"),
        (["--container-workdir=" + WORK_DIR], ["pwd"], os.path.join(p, WORK_DIR)),
        (["--container-workdir=" + os.path.join(p, WORK_DIR)], ["pwd"], os.path.join(p, WORK_DIR)),
    ]
    for opts, cmd, want in cases:
        r = run(["srun", "-N1", "-n1", "--container-image=" + IMAGE_PATHS["spaces"]] + opts + cmd, cwd=p)
        assert (r.returncode, r.stdout.strip()) == (0, want), "%s: %s" % (opts, r.stderr)


def test_sbatch_lines_with_real_world_paths_and_container_batch(cluster, run, image_fs):
    p = image_fs.project
    q = sbatch_quote
    with open(os.path.join(p, "batch-paths.sh"), "w") as f:
        f.write("#!/bin/sh\n#SBATCH -N1 -n1 -o batch-paths.out\n"
                "#SBATCH --container-image=%s\n#SBATCH --container-batch\n"
                "#SBATCH --container-mounts=%s\n#SBATCH --container-workdir=%s\n"
                "cat /etc/image-name; pwd; cat %s\n"
                % (q(IMAGE_PATHS["non-ascii"]), q("data link:/d:ro"), q(WORK_DIR),
                   shlex.quote("/d/%s/f" % DATA_SUB)))
    r = run(["sbatch", "--parsable", "batch-paths.sh"], cwd=p)
    assert r.returncode == 0, r.stderr
    info = slurm.wait(int(r.stdout.strip().split(";")[0]), timeout=T, env=cluster.env())
    with open(os.path.join(p, "batch-paths.out")) as f:
        out = f.read()
    assert info["state"] == "COMPLETED", out
    assert out.split("\n")[:3] == ["non-ascii", os.path.join(p, WORK_DIR), "data"], out


def test_salloc_container_image(run, image_fs):
    # salloc takes the plugin's option (Slurm 22.05 refuses salloc --container
    # without LaunchParameters=use_interactive_step); its sruns are wrapped.
    path, name = image_fs.case("non-ascii")
    r = run(["salloc", "-N1", "--container-image=" + path, "srun", "cat", "/etc/image-name"], cwd=image_fs.project)
    assert (r.returncode, r.stdout.split()) == (0, [name]), r.stderr


def _pinned_job(cluster, as_job_user, jobdir, root, name, options):
    """sbatch a held job on pin.img (marker "first"), rebuild the image ("second")
    while it waits, release it: (job facts, output, digest at submission, digest now)."""
    img = os.path.join(jobdir, "pin.img")

    def build(marker):
        with open(os.path.join(root, "etc", "build-marker"), "w") as f:
            f.write(marker + "\n")
        imagetools.make_image(root, img)
        from hpcrun import image
        return image.open_image(img).pin
    submitted = build("first")
    path = os.path.join(jobdir, name + ".sh")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n#SBATCH -N1 -n1\n#SBATCH --container-image=pin.img %s\n"
                "srun cat /etc/build-marker\n" % options)
    r = as_job_user(["sbatch", "--hold", "--parsable", "-o", name + ".out", path])
    assert r.returncode == 0, r.stderr
    job_id = int(r.stdout.strip().split(";")[0])
    assert slurm.job(job_id, env=cluster.env())["state"] == "PENDING"
    now = build("second")                              # the user rebuilds while the job waits
    r = as_job_user(["scontrol", "release", str(job_id)])
    assert r.returncode == 0, r.stderr
    info = slurm.wait(job_id, timeout=T, env=cluster.env())
    with open(os.path.join(jobdir, name + ".out")) as f:
        return info, f.read(), submitted, now


@pytest.fixture
def pin_root(jobdir, busybox_root):
    root = os.path.join(jobdir, "pin-root")
    shutil.copytree(busybox_root, root, symlinks=True)
    os.makedirs(os.path.join(root, "etc"), exist_ok=True)
    yield root
    shutil.rmtree(root)
    for name in ("pin.img", "pin-held.sh", "pin-held.out", "pin-latest.sh", "pin-latest.out"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(jobdir, name))


def test_a_job_whose_image_is_rebuilt_while_pending_fails_naming_both(cluster, as_job_user, jobdir, pin_root):
    info, out, submitted, now = _pinned_job(cluster, as_job_user, jobdir, pin_root, "pin-held", "")
    assert submitted != now and submitted.startswith("sha256:")
    assert (info["state"], info["exit_code"]) == ("FAILED", 65), out
    assert ("hpcrun: error: image is not the one pinned at submission: pinned %s, image now %s (%s)"
            % (submitted, now, os.path.join(jobdir, "pin.img"))) in out, out
    assert "first" not in out and "second" not in out


def test_container_pin_no_runs_the_rebuilt_image(cluster, as_job_user, jobdir, pin_root):
    info, out, submitted, now = _pinned_job(cluster, as_job_user, jobdir, pin_root, "pin-latest",
                                            "--container-pin=no")
    assert info["state"] == "COMPLETED", out
    assert out.strip() == "second", out


def test_container_pin_takes_yes_or_no(run):
    r = run(["srun", "-N1", "--container-image=busybox.img", "--container-pin=maybe", "true"])
    assert r.returncode != 0
    assert "--container-pin must be yes or no" in r.stderr, r.stderr
