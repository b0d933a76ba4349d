"""End to end under the PBS emulation: qsub with `#PBS -l container_image=`,
the hooks installed by install.sh, the mom starting the real job shell as the
test user, and the job running `mpirun -np 2 hpcrun "$HPCRUN_IMAGE" ./hello`
for real: a C MPI program inside an image built from host files.
"""
import glob
import os
import pwd
import shutil
import subprocess

import pytest

import imagetools
from pbs_emulation.fixtures import *  # noqa: F401,F403

HELLO_C = r"""
#include <mpi.h>
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    int rank, size, sum = 0;
    char os[256] = "?";
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    FILE *f = fopen("/etc/os-release", "r");     /* the image's, not the host's */
    if (f) { if (fgets(os, sizeof os, f)) os[strcspn(os, "\n")] = 0; fclose(f); }
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("hello rank %d of %d sum %d %s\n", rank, size, sum, os);
    MPI_Finalize();
    return 0;
}
"""
# Open MPI's run-time pieces that ldd cannot see (dlopened components, help texts, params).
OMPI_RUNTIME = ["/usr/lib/x86_64-linux-gnu/openmpi", "/usr/lib/x86_64-linux-gnu/pmix2",
                "/usr/share/openmpi", "/etc/openmpi"]
IMAGE_OS = 'PRETTY_NAME="hpcrun test image (busybox)"'


@pytest.fixture(scope="module")
def mpi_app(shared_dir):
    """<dir>/hello (host build) and <dir>/hello.img holding it, its libraries and Open MPI."""
    d = os.path.join(shared_dir, "pbs-mpi")
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o755)
    src = os.path.join(d, "hello.c")
    with open(src, "w") as f:
        f.write(HELLO_C)
    hello = os.path.join(d, "hello")
    subprocess.run(["mpicc", "-O1", "-o", hello, src], check=True)
    root = os.path.join(d, "root")
    imagetools.make_busybox_root(root)
    imagetools.add_host_program(root, hello)
    for path in OMPI_RUNTIME:
        if not os.path.isdir(path):
            continue
        shutil.copytree(path, os.path.join(root, path.lstrip("/")), symlinks=True, dirs_exist_ok=True)
        for so in glob.glob(os.path.join(path, "**", "*.so*"), recursive=True):
            if os.path.isfile(so) and not os.path.islink(so):
                imagetools.add_host_program(root, so)
    image = imagetools.make_image(root, os.path.join(d, "hello.img"))
    shutil.rmtree(root)
    return d, image


def job_user(as_user, test_user, hpcrun_bin, image, workdir):
    """Who can run the job: the test user where `hpcrun IMAGE ./cmd` works for it, else
    root (hosts where /dev/fuse is root-only).  Skipped, with the launcher's own
    error, where it works for nobody (the launcher is built alongside this plugin)."""
    probe = write_file(os.path.join(workdir, "probe"), "#!/bin/sh\necho launcher-ok\n", mode=0o755)
    os.chown(probe, test_user.pw_uid, test_user.pw_gid)
    argv = [hpcrun_bin, image, "./probe"]
    errors = []
    for user in [test_user] + ([pwd.getpwuid(0)] if os.getuid() == 0 else []):
        try:
            if user is test_user:
                p = as_user(argv, cwd=workdir, timeout=30)
            else:
                p = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            errors.append("as %s: hung for 30 s" % user.pw_name)
            continue
        if p.returncode == 0 and p.stdout.strip() == "launcher-ok":
            os.unlink(probe)
            return user
        errors.append("as %s: rc %d: %s" % (user.pw_name, p.returncode,
                                             (p.stderr.strip().splitlines() or ["?"])[-1]))
    pytest.skip("hpcrun launcher not working on this host yet: `hpcrun IMAGE ./probe` "
                + "; ".join(errors))


def own(path, user):
    for dirpath, dirnames, filenames in os.walk(path):
        for n in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            os.chown(n, user.pw_uid, user.pw_gid)


@pytest.fixture
def job_dir(mpi_app, pub_dir, test_user):
    """The user's submission directory, holding the app and a copy of the image."""
    app_dir, image = mpi_app
    work = os.path.join(pub_dir, "job")
    os.mkdir(work)
    shutil.copy(os.path.join(app_dir, "hello"), work)
    shutil.copy(image, os.path.join(work, "hello.img"))
    own(work, test_user)
    return work


def test_mpi_job_runs_ranks_inside_the_image(pbs_server, pbs_mom, test_user, as_user, hpcrun_bin,
                                             mpi_app, job_dir):
    user = job_user(as_user, test_user, hpcrun_bin, mpi_app[1], job_dir)
    own(job_dir, user)
    install_hooks(pbs_server)
    as_root = "--allow-run-as-root " if user.pw_uid == 0 else ""
    bindir = os.path.dirname(hpcrun_bin)
    script = ("#!/bin/sh\n"
              "#PBS -N hello\n"
              "#PBS -l select=1:ncpus=2:mpiprocs=2\n"
              "#PBS -l container_image=hello.img\n"
              'cd "$PBS_O_WORKDIR"\n'
              'export PATH="%s:$PATH"\n'            # a site would have hpcrun in /usr/local/bin
              'mpirun %s-np 2 --oversubscribe hpcrun "$HPCRUN_IMAGE" ./hello\n' % (bindir, as_root))
    r = submit_job(pbs_server, script, user, job_dir)
    assert r.rc == 0, r.err
    image = os.path.join(job_dir, "hello.img")
    assert pbs_server.jobs[r.jobid]["attrs"]["Resource_List"]["container_image"] == image
    run = pbs_mom.run_job(r.jobid, timeout=240)
    assert run.exit_status == 0, (run.stdout, run.stderr)
    assert run.env["HPCRUN_IMAGE"] == image
    lines = sorted(l for l in run.stdout.splitlines() if l.startswith("hello rank"))
    assert lines == ["hello rank 0 of 2 sum 1 %s" % IMAGE_OS, "hello rank 1 of 2 sum 1 %s" % IMAGE_OS]
    assert len(run.hook_results) == 1          # PBS saw the job shell, never the ranks


def test_wrapped_job_shell_runs_inside_the_image(pbs_server, pbs_mom, test_user, as_user,
                                                 hpcrun_bin, busybox_image, job_dir):
    user = job_user(as_user, test_user, hpcrun_bin, busybox_image, job_dir)
    own(job_dir, user)
    install_hooks(pbs_server)
    cfg = os.path.join(job_dir, "wrap.json")
    write_file(cfg, '{"wrap_job_shell": true, "hpcrun": "%s"}' % hpcrun_bin)
    for hook in pbs_server.hooks.values():
        hook["config"] = open(cfg).read()
    # -S: the job shell must exist inside the image too
    r = submit_job(pbs_server, "#PBS -S /bin/sh\n#PBS -l container_image=%s\nhead -1 /etc/os-release\n"
                   % busybox_image, user, job_dir)
    assert r.rc == 0, r.err
    run = pbs_mom.run_job(r.jobid, timeout=120)
    assert run.exit_status == 0, (run.stdout, run.stderr)
    assert run.progname == hpcrun_bin and run.argv[0] == "-hpcrun"
    assert run.stdout.strip() == IMAGE_OS
