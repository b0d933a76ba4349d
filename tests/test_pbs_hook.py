"""plugins/pbs/hpcrun_pbs_hook.py under the PBS emulation.

Submissions go through qsub/qalter of the emulated server with the hooks that
install.sh installs; launches through the emulated mom.  Access is checked for
the submitting user (the real unprivileged test user), while the hook runs as root.
"""
import ast
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from pbs_emulation import harness
from pbs_emulation.fixtures import *  # noqa: F401,F403

HOOK = harness.HOOK


@pytest.fixture
def site(pbs_server, pub_dir, test_user):
    """An emulated PBS with the hpcrun hooks installed by install.sh, and a
    submission directory owned by the test user."""
    install_hooks(pbs_server)
    workdir = os.path.join(pub_dir, "work")
    os.mkdir(workdir)
    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    return pbs_server, workdir


def reconfigure(srv, **cfg):
    base = json.load(open(harness.CONFIG))
    base.update(cfg)
    for hook in srv.hooks.values():
        hook["config"] = json.dumps(base)


def qsub(srv, workdir, user, image, script_tail="true\n", args=()):
    script = "#!/bin/sh\n#PBS -l select=1:ncpus=1\n#PBS -l container_image=%s\n%s" % (image, script_tail)
    return submit_job(srv, script, user, workdir, args=args)


def stored_image(srv, r):
    return srv.jobs[r.jobid]["attrs"]["Resource_List"].get("container_image")


# --- the file itself: what PBS's interpreter allows ------------------------------------
def test_hook_source_is_self_contained():
    tree = ast.parse(open(HOOK).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
        assert not isinstance(node, ast.Assert), "asserts vanish under -OO"
        if isinstance(node, ast.ExceptHandler):
            assert node.type is not None, "a bare except swallows accept()/reject()"
            assert "BaseException" not in ast.dump(node.type) and "SystemExit" not in ast.dump(node.type)
        if isinstance(node, ast.Attribute):
            assert node.attr != "get_hook_config_file", "pbs.get_hook_config_file() does not exist"
        if isinstance(node, ast.Constant) and node.value == "__main__":
            pytest.fail("__name__ is 'builtins' in a PBS hook")
    assert imported - set(sys.stdlib_module_names) == {"pbs"}


# --- queuejob -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hpcrun", "squashfs", "sif", "dir"])
def test_good_images_are_accepted(site, test_user, busybox_image, busybox_squashfs, busybox_root,
                                  pub_dir, kind):
    srv, workdir = site
    image = {"hpcrun": busybox_image, "squashfs": busybox_squashfs, "dir": busybox_root,
             "sif": make_sif_stub(os.path.join(pub_dir, "x.sif"))}[kind]
    r = qsub(srv, workdir, test_user, image)
    assert r.rc == 0, r.err
    assert stored_image(srv, r) == image
    assert r.hook_results[0].accepted


def test_no_image_requested_is_accepted_untouched(site, test_user):
    srv, workdir = site
    r = submit_job(srv, "#PBS -l ncpus=2\ntrue\n", test_user, workdir)
    assert r.rc == 0 and srv.jobs[r.jobid]["attrs"]["Resource_List"] == {"ncpus": "2"}


def test_missing_image(site, test_user):
    srv, workdir = site
    r = qsub(srv, workdir, test_user, "/nonexistent/solver.img")
    assert r.rc != 0 and r.jobid is None and not srv.jobs
    assert r.err == ("qsub: container image not found: /nonexistent/solver.img "
                     "(container_image=/nonexistent/solver.img)\n")


def test_relative_image_made_absolute_against_workdir(site, test_user, busybox_image):
    srv, workdir = site
    shutil.copy(busybox_image, os.path.join(workdir, "solver.img"))
    r = qsub(srv, workdir, test_user, "solver.img")
    assert r.rc == 0, r.err
    assert stored_image(srv, r) == os.path.join(workdir, "solver.img")
    r = qsub(srv, workdir, test_user, "../work/./missing.img")
    assert r.err == "qsub: container image not found: %s/missing.img (container_image=../work/./missing.img)\n" % workdir


def test_relative_image_without_workdir(test_user):
    job = {"id": "", "attrs": {"Resource_List": {"container_image": "x.img"}, "Variable_List": "A=1"}}
    r = harness.run_hook("queuejob", job=job, requestor=test_user.pw_name)
    assert r.rejected and "relative path and the job has no PBS_O_WORKDIR" in r.user_message


def test_unreadable_for_the_submitting_user(site, test_user, busybox_image, pub_dir):
    srv, workdir = site
    private = shutil.copy(busybox_image, os.path.join(pub_dir, "private.img"))
    os.chmod(private, 0o600)                        # root's: root could read it, the user cannot
    r = qsub(srv, workdir, test_user, private)
    assert r.rc != 0
    assert r.err.startswith("qsub: container image not readable by user %s: %s (mode 600"
                            % (test_user.pw_name, private))
    # the same file is fine for a user allowed by group
    os.chown(private, 0, test_user.pw_gid)
    os.chmod(private, 0o640)
    assert qsub(srv, workdir, test_user, private).rc == 0
    # and by ownership
    os.chown(private, test_user.pw_uid, 0)
    os.chmod(private, 0o400)
    assert qsub(srv, workdir, test_user, private).rc == 0


def test_unsearchable_directory(site, test_user, busybox_image, pub_dir):
    srv, workdir = site
    locked = os.path.join(pub_dir, "locked")
    os.mkdir(locked, 0o700)
    image = shutil.copy(busybox_image, os.path.join(locked, "a.img"))
    os.chmod(image, 0o644)
    r = qsub(srv, workdir, test_user, image)
    assert r.err == ("qsub: container image not accessible to user %s: directory %s is not searchable (%s)\n"
                     % (test_user.pw_name, locked, image))


@pytest.mark.parametrize("value,message", [
    ("' '", "container_image is empty"),
    ("''", "container_image is empty"),
    ("~/x.img", "'~' is not expanded"),
    ("a\x01b", "malformed"),
])
def test_malformed_values(site, test_user, value, message):
    srv, workdir = site
    r = qsub(srv, workdir, test_user, value)
    assert r.rc != 0 and r.err.startswith("qsub: ") and message in r.err, r.err


def test_not_an_image(site, test_user, pub_dir):
    srv, workdir = site
    text = write_file(os.path.join(pub_dir, "notes.txt"), "just text\n")
    empty = write_file(os.path.join(pub_dir, "empty.img"))
    assert "not a container image (no hpcrun header, SquashFS or SIF signature)" in \
        qsub(srv, workdir, test_user, text).err
    assert "not a container image: empty file" in qsub(srv, workdir, test_user, empty).err


def test_fifo_does_not_block_the_server(site, test_user, pub_dir):
    srv, workdir = site
    fifo = os.path.join(pub_dir, "pipe.img")
    os.mkfifo(fifo, 0o666)
    start = time.monotonic()
    r = qsub(srv, workdir, test_user, fifo)
    assert "not a regular file or directory" in r.err
    assert not r.hook_results[0].alarm and time.monotonic() - start < 20


def test_allowed_dirs(site, test_user, busybox_image, pub_dir):
    srv, workdir = site
    allowed = os.path.join(pub_dir, "apps")
    os.mkdir(allowed, 0o755)
    inside = shutil.copy(busybox_image, os.path.join(allowed, "ok.img"))
    os.symlink(busybox_image, os.path.join(allowed, "escape.img"))
    reconfigure(srv, allowed_dirs=[allowed + "/"])
    assert qsub(srv, workdir, test_user, inside).rc == 0
    r = qsub(srv, workdir, test_user, os.path.join(allowed, "escape.img"))
    assert r.rc != 0 and "is outside the allowed directories (%s)" % allowed in r.err
    assert "outside the allowed" in qsub(srv, workdir, test_user, busybox_image).err


def test_custom_resource_and_variable(pbs_server, test_user, busybox_image, pub_dir):
    cfg = os.path.join(pub_dir, "site.conf.txt")          # any suffix: stored as <hook>.CF
    write_file(cfg, json.dumps({"resource": "hpcrun_image", "variable": "CONTAINER_IMAGE"}))
    subprocess.run([os.path.join(harness.REPO, "plugins/pbs/install.sh"), "--run", "--resource",
                    "hpcrun_image", "--config", cfg, "--qmgr", "/bin/true"], check=True,
                   capture_output=True)
    install_hooks(pbs_server, config=cfg)
    pbs_server.qmgr("create resource hpcrun_image type=string")
    r = submit_job(pbs_server, "#PBS -l hpcrun_image=/nope.img\ntrue\n", test_user, pub_dir)
    assert "hpcrun_image=/nope.img" in r.err
    r = submit_job(pbs_server, "#PBS -v CONTAINER_IMAGE=/nope.img\ntrue\n", test_user, pub_dir)
    assert r.err == "qsub: container image not found: /nope.img (CONTAINER_IMAGE=/nope.img)\n"
    r = submit_job(pbs_server, "true\n", test_user, pub_dir, args=["-v", "CONTAINER_IMAGE=" + busybox_image])
    assert r.rc == 0, r.err


@pytest.mark.parametrize("config,message", [
    ("{not json", "not valid JSON"),
    ('{"resoruce": "x"}', "unknown keys resoruce"),
    ('{"wrap_job_shell": true, "hpcrun": "hpcrun"}', "hpcrun must be an absolute path"),
])
def test_bad_config_rejects_with_admin_message(site, test_user, busybox_image, config, message):
    srv, workdir = site
    for hook in srv.hooks.values():
        hook["config"] = config
    r = qsub(srv, workdir, test_user, busybox_image)
    assert r.rc != 0 and message in r.err and r.err.rstrip().endswith("Please inform Admin")


def test_without_config_file_defaults_apply(test_user, busybox_image):
    job = {"id": "", "attrs": {"Resource_List": {"container_image": busybox_image},
                               "Variable_List": "PBS_O_WORKDIR=/"}}
    assert harness.run_hook("queuejob", job=job, config=None, requestor=test_user.pw_name).accepted


def test_defined_but_unset_resource_is_no_request(test_user):
    job = {"id": "", "attrs": {"Resource_List": {"ncpus": "1"}, "Variable_List": "PBS_O_WORKDIR=/"}}
    r = harness.run_hook("queuejob", job=job, requestor=test_user.pw_name)
    assert r.accepted and r.job["Resource_List"] == {"ncpus": "1"}


def test_unknown_user(busybox_image):
    job = {"id": "", "attrs": {"Resource_List": {"container_image": busybox_image},
                               "Variable_List": "PBS_O_WORKDIR=/"}}
    r = harness.run_hook("queuejob", job=job, requestor="no-such-user-xyz")
    assert r.rejected and "unknown user 'no-such-user-xyz'" in r.user_message


# --- modifyjob ---------------------------------------------------------------------------
def test_qalter_checks_for_the_job_owner(site, test_user, busybox_image, pub_dir):
    srv, workdir = site
    r = qsub(srv, workdir, test_user, busybox_image)
    private = shutil.copy(busybox_image, os.path.join(pub_dir, "root-only.img"))
    os.chmod(private, 0o600)
    # root (a manager) alters the job: the owner still has to be able to read the image
    alter = srv.qalter(r.jobid, ["-l", "container_image=" + private])
    assert alter.rc != 0 and alter.err.startswith(
        "qalter: container image not readable by user %s" % test_user.pw_name)
    assert stored_image(srv, r) == busybox_image
    shutil.copy(busybox_image, os.path.join(workdir, "rel.img"))
    alter = srv.qalter(r.jobid, ["-l", "container_image=rel.img"])
    assert alter.rc == 0, alter.err
    assert stored_image(srv, r) == os.path.join(workdir, "rel.img")


# --- execjob_launch ------------------------------------------------------------------------
ENV_DUMP = 'env | sort > "$PBS_O_WORKDIR/env.out"\n'


def read_env(workdir):
    with open(os.path.join(workdir, "env.out")) as f:
        return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)


def test_launch_exports_image_and_keeps_the_environment(site, pbs_mom, test_user, busybox_image):
    srv, workdir = site
    reconfigure(srv, job_env={"HPCRUN_BIND": "/scratch,/projects"})
    r = qsub(srv, workdir, test_user, busybox_image, ENV_DUMP, args=["-v", "KEEP=a,OTHER=b"])
    assert r.rc == 0, r.err
    run = pbs_mom.run_job(r.jobid)
    assert run.exit_status == 0, run.stderr
    env = read_env(workdir)
    assert env["HPCRUN_IMAGE"] == busybox_image
    assert env["HPCRUN_BIND"] == "/scratch,/projects"
    for name in ("PBS_JOBID", "PBS_JOBCOOKIE", "PBS_NODEFILE", "PBS_MOMPORT", "PBS_O_WORKDIR",
                 "KEEP", "OTHER", "HOME", "TMPDIR"):
        assert name in env, name
    assert env["KEEP"] == "a" and env["PBS_TASKNUM"] == "1"


def test_no_image_no_change_at_launch(site, pbs_mom, test_user):
    srv, workdir = site
    r = submit_job(srv, "#PBS -l ncpus=1\n" + ENV_DUMP, test_user, workdir)
    run = pbs_mom.run_job(r.jobid)
    assert run.exit_status == 0 and "HPCRUN_IMAGE" not in read_env(workdir)


def test_image_gone_at_launch_deletes_the_job(site, pbs_mom, test_user, busybox_image):
    srv, workdir = site
    image = shutil.copy(busybox_image, os.path.join(workdir, "gone.img"))
    r = qsub(srv, workdir, test_user, image, ENV_DUMP)
    os.unlink(image)
    run = pbs_mom.run_job(r.jobid)
    assert run.deleted and not run.requeued and run.exit_status is None
    assert not os.path.exists(os.path.join(workdir, "env.out"))
    assert any("hpcrun: container image not found: %s" % image in m for m in run.mom_log)
    assert run.hook_results[-1].joblog[0][0] == r.jobid


def test_image_gone_at_launch_requeues_when_configured(site, pbs_mom, test_user, busybox_image):
    srv, workdir = site
    reconfigure(srv, launch_failure="requeue")
    image = shutil.copy(busybox_image, os.path.join(workdir, "gone.img"))
    r = qsub(srv, workdir, test_user, image)
    os.unlink(image)
    run = pbs_mom.run_job(r.jobid)
    assert run.requeued and not run.deleted


def test_tm_tasks_are_left_alone(site, pbs_mom, test_user, busybox_image):
    srv, workdir = site
    r = qsub(srv, workdir, test_user, busybox_image)
    for tasknum in (2, 10, 255):                      # "0000000A" is not decimal: never int()
        run = pbs_mom.launch_tm_task(r.jobid, ["/bin/sh", "-c", "echo orted $PBS_TASKNUM"],
                                     tasknum=tasknum)
        assert run.hook_results[-1].accepted, run.hook_results[-1].exception
        assert run.argv == ["/bin/sh", "-c", "echo orted $PBS_TASKNUM"]
        assert run.stdout == "orted %8.8X\n" % tasknum
        assert "HPCRUN_IMAGE" not in run.env


def test_wrap_job_shell(site, pbs_mom, test_user, busybox_image, pub_dir):
    """With wrap_job_shell the mom execs hpcrun, which runs the user's shell in the image.
    A stand-in executable records what hpcrun would be given (the real run is in test_pbs_e2e)."""
    srv, workdir = site
    fake = write_file(os.path.join(pub_dir, "hpcrun"),
                      '#!/bin/sh\necho "argv: $*" > "$PBS_O_WORKDIR/wrap.out"\n', mode=0o755)
    reconfigure(srv, wrap_job_shell=True, hpcrun=fake, wrap_options=["--no-home"])
    r = qsub(srv, workdir, test_user, busybox_image)
    run = pbs_mom.run_job(r.jobid)
    assert run.exit_status == 0, run.stderr
    assert run.progname == fake and run.argv[0] == "-hpcrun"
    jobs_dir = os.path.join(pbs_mom.pbs_home, "mom_priv", "jobs")
    expected = ["--bind", jobs_dir, "--no-home", busybox_image, test_user.pw_shell]
    assert run.argv[1:] == expected
    with open(os.path.join(workdir, "wrap.out")) as f:
        assert f.read().split()[1:] == expected


def test_execjob_launch_sees_only_the_job_shell(site, pbs_mom, test_user, busybox_image):
    """mpiexec inside the job starts ranks without PBS: one execjob_launch, N ranks."""
    srv, workdir = site
    r = qsub(srv, workdir, test_user, busybox_image,
             "mpirun -np 2 --oversubscribe sh -c 'echo rank $OMPI_COMM_WORLD_RANK'\n")
    run = pbs_mom.run_job(r.jobid)
    assert run.exit_status == 0, run.stderr
    assert sorted(run.stdout.split("\n")[:2]) == ["rank 0", "rank 1"]
    assert len(run.hook_results) == 1


def test_other_events_accept(busybox_image):
    job = {"id": "1.s", "attrs": {"Resource_List": {"container_image": "/nope"}}}
    assert harness.run_hook("execjob_begin", job=job).accepted
