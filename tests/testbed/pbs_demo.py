"""`make demo-pbs`: a real PBS job runs its MPI ranks inside an hpcrun image.

Starts the test bed's OpenPBS (built on first use, see pbs.py), installs the
hooks with plugins/pbs/install.sh, builds an image holding an MPI program and a
file only the image has, submits a job as an unprivileged user with qsub and
shows what PBS and the job saw.  Everything it started or changed is put back.
"""
import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))          # tests/: imagetools
import imagetools  # noqa: E402

from testbed import pbs as testbed  # noqa: E402

HELLO_C = r"""
#include <mpi.h>
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    int rank, size, sum = 0;
    char data[256] = "(no /opt/solver/input.txt)";
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    FILE *f = fopen("/opt/solver/input.txt", "r");     /* only the image has it */
    if (f) { if (fgets(data, sizeof data, f)) data[strcspn(data, "\n")] = 0; fclose(f); }
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("hello rank %d of %d sum %d: %s\n", rank, size, sum, data);
    MPI_Finalize();
    return 0;
}
"""
IMAGE_DATA = "solver input from inside the image"
# Open MPI's run-time pieces that ldd cannot see (dlopened components, help texts, params).
OMPI_RUNTIME = ["/usr/lib/x86_64-linux-gnu/openmpi", "/usr/lib/x86_64-linux-gnu/pmix2",
                "/usr/share/openmpi", "/etc/openmpi"]


def build_mpi_app(d):
    """<d>/hello (built on the host), and <d>/hello.img (hpcrun's single-file format) and
    <d>/hello.sqfs (plain SquashFS) holding busybox, hello, its libraries, Open MPI's run
    time and /opt/solver/input.txt, which exists only in the image."""
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
    os.makedirs(os.path.join(root, "opt", "solver"))
    with open(os.path.join(root, "opt", "solver", "input.txt"), "w") as f:
        f.write(IMAGE_DATA + "\n")
    image = imagetools.make_image(root, os.path.join(d, "hello.img"))
    squashfs = imagetools.mksquashfs(root, os.path.join(d, "hello.sqfs"))
    shutil.rmtree(root)
    return hello, image, squashfs


def demo_user(name="hpcrun-demo"):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
        return pwd.getpwnam(name)


def say(text):
    print("\n\033[1m== %s\033[0m" % text, flush=True)


def main():
    if os.getuid() != 0:
        raise SystemExit("make demo-pbs: run as root (it starts PBS's daemons)")
    hpcrun_bin = os.path.join(os.path.dirname(sys.executable), "hpcrun")
    user = demo_user()
    say("OpenPBS: built once into /opt/pbs (a few minutes the first time)")
    testbed.build()
    pbs = testbed.start()
    work = tempfile.mkdtemp(prefix="hpcrun-demo-pbs-")
    os.chmod(work, 0o755)
    try:
        print("server, scheduler, comm, mom and PostgreSQL on %s, started in %.1f s"
              % (pbs.host, pbs.started_in))
        say("plugins/pbs/install.sh --run  (the admin installs the hooks)")
        r = pbs.install_hooks()
        print(r.stdout.rstrip())
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        print(pbs.qmgr("list resource container_image").stdout.rstrip())
        say("an image holding an MPI program and /opt/solver/input.txt (the host has no such file)")
        job = os.path.join(work, "job")
        build_mpi_app(job)
        for n in [job] + [os.path.join(job, f) for f in os.listdir(job)]:
            os.chown(n, user.pw_uid, user.pw_gid)
        script = ("#!/bin/sh\n"
                  "#PBS -N hello\n"
                  "#PBS -l select=1:ncpus=2:mpiprocs=2\n"
                  "#PBS -l container_image=hello.img\n"
                  "#PBS -j oe\n"
                  'cd "$PBS_O_WORKDIR"\n'
                  'echo "job $PBS_JOBID on $(hostname): HPCRUN_IMAGE=$HPCRUN_IMAGE"\n'
                  'PATH="%s:$PATH"      # a site installs hpcrun in /usr/local/bin\n'
                  'mpirun -np 2 hpcrun "$HPCRUN_IMAGE" ./hello\n' % os.path.dirname(hpcrun_bin))
        say("job.sh, submitted by %s with `qsub job.sh` from %s" % (user.pw_name, job))
        print(script.rstrip())
        p, jobid = pbs.qsub(user, job, script, args=["-o", os.path.join(job, "hello.out")])
        if jobid is None:
            raise SystemExit(p.stderr)
        print("qsub: %s" % jobid)
        attrs = pbs.wait(jobid, timeout=300)
        say("qstat -x -f %s (part)" % jobid)
        for k in ("job_state", "Exit_status", "exec_host"):
            print("    %s = %s" % (k, attrs.get(k)))
        print("    Resource_List.container_image = %s" % attrs["Resource_List"].get("container_image"))
        say("the job's output")
        with open(os.path.join(job, "hello.out")) as f:
            print(f.read().rstrip())
        say("a request for a missing image is refused at qsub")
        p, _ = pbs.qsub(user, job, script.replace("hello.img", "missing.img"))
        print("$ qsub job.sh\n" + p.stderr.rstrip())
    finally:
        testbed.stop(pbs)
        shutil.rmtree(work, ignore_errors=True)
    say("PBS stopped, /etc/hosts restored")


if __name__ == "__main__":
    try:
        main()
    except testbed.TestbedError as err:
        raise SystemExit("demo-pbs: error: %s" % err)
