"""`make demo`: a real MPI job inside an hpcrun image, as an unprivileged user.

    1. compile an MPI hello-world on the host (mpicc)
    2. `hpcrun build` an image from a short spec: the program's libraries
       and Open MPI's runtime come in by themselves
    3. `hpcrun inspect` it, 4.-5. look inside it
    6. `mpirun -np 4 hpcrun demo.img /app/hello`

Every step runs as the user `hpcrun-demo` (created when we are root), with no
privilege at all; each command is printed before its output.  Work directory:
/tmp/hpcrun-demo (/tmp/hpcrun-demo-USER when not root), remade on every run.
Needs the Debian packages and the venv that `make venv` installs.
"""
import os
import pwd
import shutil
import subprocess
import sys

USER = "hpcrun-demo"
WORK = "/tmp/hpcrun-demo"
VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
RANKS = 4

HELLO_C = r"""#include <mpi.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int rank, size, len;
    char host[MPI_MAX_PROCESSOR_NAME], os[256] = "?", line[256], mnt[64] = "";
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(host, &len);
    FILE *f = fopen("/etc/os-release", "r");          /* the image's, not the host's */
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "PRETTY_NAME=", 12) == 0) { strcpy(os, line + 12); os[strcspn(os, "\n")] = 0; }
    readlink("/proc/self/ns/mnt", mnt, sizeof mnt - 1);   /* same for all ranks: one container per node */
    printf("rank %d of %d on %s: uid %d, os-release %s, %s\n", rank, size, host, (int)getuid(), os, mnt);
    MPI_Finalize();
    return 0;
}
"""
SPEC = """# programs to pack: their libraries (and Open MPI's runtime) come in by themselves
./hello
/bin/cat
%files
./os-release /etc/os-release
%labels
org.hpcrun.demo mpi-hello
"""
OS_RELEASE = 'PRETTY_NAME="hpcrun demo image"\nID=hpcrun-demo\n'


def fail(msg):
    sys.exit("\ndemo: FAILED: %s" % msg)


def demo_user():
    """The unprivileged user to run as: hpcrun-demo when root (created if missing), else ourselves."""
    if os.getuid() != 0:
        return pwd.getpwuid(os.getuid())
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        print("# as root: useradd --create-home %s" % USER)
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
        return pwd.getpwnam(USER)


def step(title, argv, user, expect_rc=0):
    """Print and run argv in WORK (as `user`, through setpriv when we are root); return stdout."""
    if title:
        print("\n== %s ==" % title)
    print("%s$ %s" % (user.pw_name, " ".join(argv)))
    env = {"PATH": "%s:/usr/local/bin:/usr/bin:/bin" % VENV_BIN, "HOME": user.pw_dir, "USER": user.pw_name,
           "LOGNAME": user.pw_name, "LANG": "C.UTF-8"}
    full = ["env"] + ["%s=%s" % kv for kv in env.items()] + argv
    if os.getuid() != user.pw_uid:
        full = ["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid, "--init-groups",
                "--reset-env", "--"] + full
    try:
        r = subprocess.run(full, cwd=WORK, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as e:
        fail("%s: %s" % (argv[0], e))
    sys.stdout.write(r.stdout)
    if r.returncode != expect_rc:
        fail("`%s` exited with %d (expected %d).  Is `make venv` done, and is this checkout readable by %s?"
             % (" ".join(argv), r.returncode, expect_rc, user.pw_name))
    return r.stdout


def main():
    for tool in ("mpicc", "mpirun", "mksquashfs", "squashfuse"):
        if not shutil.which(tool):
            fail("%s not found: run `make venv` as root on Debian 12 (it installs the packages)" % tool)
    if not os.access(os.path.join(VENV_BIN, "hpcrun"), os.X_OK):
        fail("%s/hpcrun missing: run `make venv`" % VENV_BIN)
    user = demo_user()

    # A fresh work directory that belongs to the user.
    global WORK
    if os.getuid() != 0:
        WORK += "-" + user.pw_name
    shutil.rmtree(WORK, ignore_errors=True)
    try:
        os.mkdir(WORK, 0o755)
    except OSError as e:
        fail("cannot make the work directory %s: %s" % (WORK, e.strerror))
    for name, text in (("hello.c", HELLO_C), ("demo.spec", SPEC), ("os-release", OS_RELEASE)):
        with open(os.path.join(WORK, name), "w") as f:
            f.write(text)
    for name in (".", "hello.c", "demo.spec", "os-release"):
        os.chown(os.path.join(WORK, name), user.pw_uid, user.pw_gid)
    print("demo: running as %s (uid %d) in %s; hpcrun from %s" % (user.pw_name, user.pw_uid, WORK, VENV_BIN))

    step("0. the venv's hpcrun, as %s" % user.pw_name, ["hpcrun", "version"], user)
    step("1. compile an MPI program on the host", ["mpicc", "-o", "hello", "hello.c"], user)
    step("2. build the image from demo.spec (unprivileged)", ["cat", "demo.spec"], user)
    step(None, ["hpcrun", "build", "demo.img", "demo.spec"], user)
    step("3. what the image holds", ["hpcrun", "inspect", "demo.img"], user)
    step("4. the host's os-release, then the image's", ["grep", "PRETTY_NAME", "/etc/os-release"], user)
    step(None, ["hpcrun", "demo.img", "cat", "/etc/os-release"], user)
    step("5. only what the image holds is there: no `ls` (exit 127)", ["hpcrun", "demo.img", "ls", "/"],
         user, expect_rc=127)
    out = step("6. an MPI job: %d ranks, each one exec'd in place inside the image" % RANKS,
               ["mpirun", "--oversubscribe", "-np", str(RANKS), "hpcrun", "demo.img", "/app/hello"], user)

    ranks = [l for l in out.splitlines() if l.startswith("rank ")]
    if sorted(int(l.split()[1]) for l in ranks) != list(range(RANKS)):
        fail("expected %d lines `rank N of %d`, got:\n%s" % (RANKS, RANKS, out))
    if not all("uid %d," % user.pw_uid in l and "hpcrun demo image" in l for l in ranks):
        fail("the ranks did not run inside the image as uid %d" % user.pw_uid)
    if len({l.rsplit(" ", 1)[-1] for l in ranks}) != 1:
        fail("the ranks are in different mount namespaces (expected one container per node)")
    print("\ndemo: OK: %d ranks ran inside demo.img as %s (uid %d), sharing one container;"
          " no root, no setuid helper." % (RANKS, user.pw_name, user.pw_uid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
