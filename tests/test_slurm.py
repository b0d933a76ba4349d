"""Slurm integration on real daemons: munged, slurmctld and two slurmd "nodes"
on loopback (tests/testbed/cluster.py), the SPANK plugin built from
plugins/slurm/, the cli_filter.lua, and the real hpcrun.  Jobs run as the
unprivileged test user, as users' jobs do."""
import os
import shutil
import signal
import subprocess
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
def cluster(spank_plugin, hpcrun_path):
    hpcrun = hpcrun_path
    with Cluster(nodes=2, cpus=4, plugin=spank_plugin, plugin_args=["hpcrun=" + hpcrun],
                 cli_filter=os.path.join(PLUGIN_DIR, "cli_filter.lua")) as c:
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

    def go(argv, env=None, popen=False, **kw):
        e = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": job_user.pw_dir, "USER": job_user.pw_name,
             "LANG": "C.UTF-8", "SLURM_CONF": cluster.conf}
        e.update(env or {})
        argv = user_cmd(job_user, ["env"] + ["%s=%s" % kv for kv in e.items()] + list(argv))
        if popen:
            return subprocess.Popen(argv, cwd=jobdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", T)
        return subprocess.run(argv, cwd=jobdir, **kw)
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
    assert "hpcrun: error:" in r.stderr and os.path.join(jobdir, "gone.img") in r.stderr


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
