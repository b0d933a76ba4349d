"""plugins/pbs/torque_submitfilter, run as Torque's qsub runs it: as the user,
from the submission directory, qsub's arguments single-quoted on the command
line, the script on stdin, the new script on stdout, exit 255 to reject."""
import os
import shutil
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILTER = os.path.join(REPO, "plugins", "pbs", "torque_submitfilter")


@pytest.fixture
def pub_dir(shared_dir):
    """A fresh world-traversable directory (the test user must reach files in it)."""
    d = tempfile.mkdtemp(prefix="torque-", dir=shared_dir)
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def workdir(pub_dir, test_user):
    d = os.path.join(pub_dir, "work")
    os.mkdir(d)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    return d


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def run_filter(as_user, workdir, script, args=(), env=None):
    # qsub: popen("<filter> '<arg1>' '<arg2>' ... >tmpfile"), through /bin/sh
    cmd = FILTER + "".join(" '%s'" % a for a in args)
    return as_user(["/bin/sh", "-c", cmd], input=script, cwd=workdir, env=env)


def test_directive_becomes_absolute_variable(as_user, workdir, busybox_image):
    shutil.copy(busybox_image, os.path.join(workdir, "solver.img"))
    script = ("#!/bin/bash\n#PBS -N job\n  #PBS -l nodes=1:ppn=2,container_image=solver.img,walltime=1:00\n"
              "cd $PBS_O_WORKDIR\nmpiexec hpcrun \"$HPCRUN_IMAGE\" ./app\n")
    p = run_filter(as_user, workdir, script, ["-q", "batch"])
    assert p.returncode == 0, p.stderr
    assert p.stdout == ("#!/bin/bash\n#PBS -N job\n  #PBS -l nodes=1:ppn=2,walltime=1:00\n"
                        "  #PBS -v HPCRUN_IMAGE=%s/solver.img\n"
                        "cd $PBS_O_WORKDIR\nmpiexec hpcrun \"$HPCRUN_IMAGE\" ./app\n" % workdir)


def test_directives_after_the_first_executable_line_are_ignored(as_user, workdir, busybox_image):
    script = ("#PBS -l container_image=%s\necho start\n#PBS -l container_image=missing.img\n"
              % busybox_image)
    p = run_filter(as_user, workdir, script)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "#PBS -v HPCRUN_IMAGE=%s\necho start\n#PBS -l container_image=missing.img\n" % busybox_image


@pytest.mark.parametrize("value,message", [
    ("missing.img", "container image not found: {w}/missing.img (container_image=missing.img)"),
    ("", "container_image is empty"),
    ("~/a.img", "'~' is not expanded"),
    ("notes.txt", "not a container image (no hpcrun header, SquashFS or SIF signature): {w}/notes.txt"),
])
def test_rejections(as_user, workdir, value, message):
    write_file(os.path.join(workdir, "notes.txt"), "text\n")
    p = run_filter(as_user, workdir, "#!/bin/sh\n#PBS -l container_image=%s\ntrue\n" % value)
    assert p.returncode == 255 and p.stdout == ""
    assert p.stderr.startswith("hpcrun: ") and p.stderr.count("\n") == 1
    assert message.format(w=workdir) in p.stderr


def test_unreadable_for_the_user(as_user, workdir, busybox_image, pub_dir):
    private = shutil.copy(busybox_image, os.path.join(pub_dir, "private.img"))
    os.chmod(private, 0o600)
    p = run_filter(as_user, workdir, "#PBS -l container_image=%s\ntrue\n" % private)
    assert p.returncode == 255 and p.stderr == "hpcrun: container image not readable: %s\n" % private


def test_command_line_forms(as_user, workdir, busybox_image):
    script = "#PBS -l container_image=%s\ntrue\n" % busybox_image
    p = run_filter(as_user, workdir, script, ["-l", "container_image=" + busybox_image])
    assert p.returncode == 255 and "Torque has no container_image resource" in p.stderr
    # a command-line -v drops every '#PBS -v': refuse rather than lose the image
    p = run_filter(as_user, workdir, script, ["-v", "A=1"])
    assert p.returncode == 255 and "add HPCRUN_IMAGE=%s to your -v list" % busybox_image in p.stderr
    p = run_filter(as_user, workdir, "true\n", ["-v", "A=1,HPCRUN_IMAGE=missing.img"])
    assert p.returncode == 255 and "container image not found" in p.stderr


def test_prefix_and_untouched_scripts(as_user, workdir, busybox_image):
    plain = "#!/bin/sh\n#PBS -l ncpus=1\necho hi\n"
    p = run_filter(as_user, workdir, plain)
    assert p.returncode == 0 and p.stdout == plain
    script = "#XX -l container_image=%s\ntrue\n" % busybox_image
    p = run_filter(as_user, workdir, script, ["-C", "#XX"])
    assert p.stdout == "#XX -v HPCRUN_IMAGE=%s\ntrue\n" % busybox_image
    p = run_filter(as_user, workdir, "#PBS -l container_image=missing\ntrue\n", ["-C", ""])
    assert p.returncode == 0
