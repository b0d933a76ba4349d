"""The hpcrun side of the SPANK handshake, without daemons: the original argv and
HPCRUN_TASK_* variables become an ordinary hpcrun command line; a task entry
without the plugin's variables is a usage error; the real path runs a program."""
import importlib.metadata
import os
import subprocess

import pytest

from hpcrun import cmd_task_entry, errors

HANDSHAKE = {"HPCRUN_TASK_ARGV0": "cat", "HPCRUN_TASK_IMAGE": "img.img"}


def test_launch_argv_rebuilds_the_command_line(tmp_path):
    env = dict(HANDSHAKE, HPCRUN_TASK_BIND="/a:/b:ro,/c", HPCRUN_TASK_PWD="/work",
               HPCRUN_TASK_ENV="FOO,BAR=2,MISSING", FOO="1")
    argv = cmd_task_entry.launch_argv(["-n", "x y"], env, str(tmp_path))
    assert argv == ["--bind", "/a:/b:ro", "--bind", "/c", "--pwd", "/work", "--env", "FOO=1",
                    "--env", "BAR=2", str(tmp_path / "img.img"), "cat", "-n", "x y"]


def test_relative_image_falls_back_to_the_submit_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "img.img").write_text("")
    env = dict(HANDSHAKE, SLURM_SUBMIT_DIR=str(tmp_path))
    assert cmd_task_entry.launch_argv([], env, str(tmp_path / "sub"))[0] == str(tmp_path / "img.img")


def test_batch_script_directory_is_bound_read_only():
    env = dict(HANDSHAKE, HPCRUN_TASK_ARGV0="/spool/n1/job00007/slurm_script", HPCRUN_TASK_BATCH="1")
    argv = cmd_task_entry.launch_argv([], env, "/")
    assert argv[:2] == ["--bind", "/spool/n1/job00007:/spool/n1/job00007:ro"]


def test_task_entry_without_image_is_a_usage_error(hpcrun_bin):
    env = dict(os.environ, HPCRUN_TASK_ARGV0="cat")
    env.pop("HPCRUN_TASK_IMAGE", None)
    r = subprocess.run([hpcrun_bin, "/etc/hostname"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == errors.USAGE
    assert r.stderr.startswith("hpcrun: error: Slurm task entry without") and "Traceback" not in r.stderr


def test_task_entry_runs_the_original_program_inside(hpcrun_bin, busybox_image, tmp_path):
    # What a wrapped task looks like to hpcrun: argv[0] replaced, the rest in the environment.
    env = dict(os.environ, HPCRUN_TASK_ARGV0="sh", HPCRUN_TASK_IMAGE=busybox_image)
    r = subprocess.run([hpcrun_bin, "-c", "grep ^ID= /etc/os-release; env | grep -c ^HPCRUN_TASK_"],
                       env=env, capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert r.stdout.split() == ["ID=hpcrun-test", "0"], r.stderr
    assert r.returncode == 1      # grep -c found no HPCRUN_TASK_* inside


@pytest.mark.parametrize("source,subject", [
    ("HPCRUN_IMAGE", "HPCRUN_IMAGE, set but empty in the task's environment"),
    ("--container", "--container / SLURM_CONTAINER, set but empty"),
])
def test_empty_image_names_its_source(hpcrun_bin, tmp_path, source, subject):
    # The plugin wraps a task whose image source is set but empty, so that it
    # fails by name (usage error) instead of running on the host.
    env = dict(os.environ, HPCRUN_TASK_ARGV0="true", HPCRUN_TASK_IMAGE_FROM=source)
    env.pop("HPCRUN_TASK_IMAGE", None)
    r = subprocess.run([hpcrun_bin], env=env, capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert (r.returncode, r.stderr) == (errors.USAGE, "hpcrun: error: image argument is empty (%s)\n" % subject)
    assert list(tmp_path.iterdir()) == []


def test_the_wheel_carries_no_test_bed():
    # tests/testbed/ (Slurm on loopback, job submission) is for tests and demos only.
    import hpcrun
    files = [str(f) for f in importlib.metadata.files("hpcrun")]
    assert [f for f in files if "testbed" in f or f.endswith("hpcrun/slurm.py")] == []
    pkg = os.path.dirname(hpcrun.__file__)
    assert not os.path.exists(os.path.join(pkg, "testbed")) and not os.path.exists(os.path.join(pkg, "slurm.py"))
    assert "cmd_task_entry.py" in os.listdir(pkg)    # the plugin's hpcrun side does ship


def test_relative_mount_sources_and_workdir_are_the_tasks_cwds():
    env = dict(HANDSHAKE, HPCRUN_TASK_BIND="my data:/d:ro,sub/x,/abs", HPCRUN_TASK_PWD="w dir/ü")
    argv = cmd_task_entry.launch_argv([], env, "/home/u/run 1")
    assert argv[:8] == ["--bind", "/home/u/run 1/my data:/d:ro", "--bind", "/home/u/run 1/sub/x",
                        "--bind", "/abs", "--pwd", "/home/u/run 1/w dir/ü"]


def test_missing_image_names_its_source(tmp_path):
    env = dict(HANDSHAKE, HPCRUN_TASK_IMAGE="gone.img", HPCRUN_TASK_IMAGE_FROM="HPCRUN_IMAGE")
    with pytest.raises(errors.Error) as e:
        cmd_task_entry.launch_argv([], env, str(tmp_path))
    assert (e.value.code, e.value.line()) == (
        errors.NOINPUT, "hpcrun: error: image not found (%s, from HPCRUN_IMAGE)" % (tmp_path / "gone.img"))
    (tmp_path / "dangling.img").symlink_to("nowhere")
    env["HPCRUN_TASK_IMAGE"] = "dangling.img"
    with pytest.raises(errors.Error, match="image not found"):
        cmd_task_entry.launch_argv([], env, str(tmp_path))
