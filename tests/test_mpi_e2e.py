"""Real MPI jobs through hpcrun: mpirun -np N hpcrun IMAGE ./hello, as root and as an
unprivileged user; the ranks of a node share one container (one user and one mount
namespace, so Open MPI's single-copy CMA path works); a deliberately incompatible
image (fake MPICH libmpi.so.12) is refused before MPI_Init; --mpi=host injects the
host's Open MPI into an image that has none; PMI_FD survives; pytest-mpi inside."""
import os
import shutil
import subprocess
import sys

import pytest

import imagetools
from hpcrun import errors, ldcache
from hpcrun.mpi import inject

HERE = os.path.dirname(os.path.abspath(__file__))
MPIRUN = ["mpirun", "--oversubscribe", "--allow-run-as-root"]
OMPI_DIRS = ["/usr/lib/x86_64-linux-gnu/openmpi", "/usr/share/openmpi", "/etc/openmpi"]
GLIBC_PARTS = ["libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libutil.so.1", "libresolv.so.2"]
NS_WARNING = "different user namespaces"
HELLO_C = r"""#include <mpi.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <stdlib.h>
/* hello: rank/size and the namespaces it runs in.  pingpong N: N round trips of 1 MiB between 0 and 1. */
int main(int argc, char **argv) {
    int rank, size;
    char user[64] = "", mnt[64] = "";
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    readlink("/proc/self/ns/user", user, sizeof user - 1);
    readlink("/proc/self/ns/mnt", mnt, sizeof mnt - 1);
    if (argc > 1 && strcmp(argv[1], "pingpong") == 0 && size >= 2) {
        int n = 1 << 20, iters = argc > 2 ? atoi(argv[2]) : 20, ok = 1;
        char *buf = malloc(n);
        for (int i = 0; i < iters; i++) {
            if (rank == 0) {
                memset(buf, i & 0xff, n);
                MPI_Send(buf, n, MPI_CHAR, 1, 0, MPI_COMM_WORLD);
                MPI_Recv(buf, n, MPI_CHAR, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                ok &= buf[n - 1] == (char)((i + 1) & 0xff);
            } else if (rank == 1) {
                MPI_Recv(buf, n, MPI_CHAR, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                ok &= buf[0] == (char)(i & 0xff);
                memset(buf, (i + 1) & 0xff, n);
                MPI_Send(buf, n, MPI_CHAR, 0, 0, MPI_COMM_WORLD);
            }
        }
        if (rank < 2) printf("pingpong rank %d %s\n", rank, ok ? "ok" : "CORRUPT");
    }
    MPI_Barrier(MPI_COMM_WORLD);
    printf("rank %d of %d user=%s mnt=%s\n", rank, size, user, mnt);
    MPI_Finalize();
    return 0;
}
"""


def copy_libs(root, files):
    """The libraries these host files need (through the host's ld.so cache) into root."""
    cache = ldcache.read()
    libs, _ = inject.closure({}, cache, files)
    libs.update({s: cache[s][0] for s in GLIBC_PARTS if s in cache})
    dst = os.path.join(root, "usr/lib/x86_64-linux-gnu")
    os.makedirs(dst, exist_ok=True)
    for soname, path in libs.items():
        if not os.path.exists(os.path.join(dst, soname)):
            shutil.copy2(os.path.realpath(path), os.path.join(dst, soname))


def base_root(root, hello=None):
    imagetools.make_busybox_root(root)
    imagetools.add_host_program(root, "/bin/true")       # glibc and its loader
    os.makedirs(os.path.join(root, "app"), exist_ok=True)
    if hello:
        shutil.copy2(hello, os.path.join(root, "app/hello"))
    return root


@pytest.fixture(scope="module")
def hello_bin(shared_dir):
    out = os.path.join(shared_dir, "mpi-e2e-hello")
    with open(out + ".c", "w") as f:
        f.write(HELLO_C)
    subprocess.run(["mpicc", "-O2", "-o", out, out + ".c"], check=True)
    return out


@pytest.fixture(scope="module")
def ompi_image(shared_dir, hello_bin):
    """Image with its own Open MPI (the host's, copied: the hybrid case) and /app/hello."""
    root = base_root(os.path.join(shared_dir, "mpi-e2e-ompi-root"), hello_bin)
    for d in OMPI_DIRS:
        shutil.copytree(d, root + d, symlinks=True, dirs_exist_ok=True)
    copy_libs(root, [hello_bin] + inject.shared_objects(OMPI_DIRS[0]))
    imagetools.add_host_program(root, "/usr/bin/orted")     # a singleton's MPI_Init starts one
    return imagetools.make_image(root, os.path.join(shared_dir, "mpi-e2e-ompi.img"))


@pytest.fixture(scope="module")
def bare_image(shared_dir, hello_bin):
    """Image with /app/hello (linked against libmpi.so.40) but no MPI at all: --mpi=host's job."""
    root = base_root(os.path.join(shared_dir, "mpi-e2e-bare-root"), hello_bin)
    copy_libs(root, [])         # a whole glibc (libm...): injected host libraries use the image's
    return imagetools.make_image(root, os.path.join(shared_dir, "mpi-e2e-bare.img"))


@pytest.fixture(scope="module")
def mpich_image(shared_dir):
    """Image whose MPI is a fake MPICH (libmpi.so.12): incompatible with the host's mpirun."""
    sys.path.insert(0, HERE)
    from test_mpi_unit import build_fake_mpich
    build = build_fake_mpich(os.path.join(shared_dir, "mpi-e2e-fake-mpich"))
    root = base_root(os.path.join(shared_dir, "mpi-e2e-mpich-root"), os.path.join(build, "hello"))
    shutil.copy2(os.path.join(build, "libmpi.so.12"), os.path.join(root, "usr/lib/x86_64-linux-gnu/"))
    return imagetools.make_image(root, os.path.join(shared_dir, "mpi-e2e-mpich.img"))


def run_root(argv, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 300)
    return subprocess.run(argv, **kw)


def ranks_of(out):
    return [line for line in out.splitlines() if line.startswith("rank ")]


def check_hello(r, np):
    assert r.returncode == 0, r.stderr
    lines = ranks_of(r.stdout)
    assert sorted(int(l.split()[1]) for l in lines) == list(range(np))
    assert all(l.split()[3] == str(np) for l in lines)
    # one container per node: every rank in the same user and mount namespace
    assert len({l.split()[4] for l in lines}) == 1 and len({l.split()[5] for l in lines}) == 1
    assert NS_WARNING not in r.stdout + r.stderr


@pytest.mark.parametrize("np", [2, 4, 16])
def test_hello_as_root(hpcrun_bin, ompi_image, np, tmp_path):
    r = run_root(MPIRUN + ["-np", str(np), hpcrun_bin, ompi_image, "/app/hello"], cwd=str(tmp_path))
    check_hello(r, np)
    host_mnt = os.readlink("/proc/self/ns/mnt")
    assert ranks_of(r.stdout)[0].split()[5] != "mnt=" + host_mnt      # really inside


@pytest.mark.parametrize("np", [2, 8])
def test_hello_unprivileged(hpcrun_bin, ompi_image, as_user, np):
    r = as_user(MPIRUN[:2] + ["-np", str(np), hpcrun_bin, ompi_image, "/app/hello"], timeout=300)
    check_hello(r, np)
    assert ranks_of(r.stdout)[0].split()[4] != "user=" + os.readlink("/proc/self/ns/user")


def test_pingpong_large_messages_single_copy(hpcrun_bin, ompi_image, as_user):
    # CMA is Open MPI's single-copy path; it needs both ranks in one user namespace
    r = as_user(MPIRUN[:2] + ["--mca", "btl", "self,vader", "--mca", "btl_vader_single_copy_mechanism", "cma",
                              "-np", "2", hpcrun_bin, ompi_image, "/app/hello", "pingpong", "50"], timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok") == 2 and "CORRUPT" not in r.stdout
    assert NS_WARNING not in r.stdout + r.stderr


def test_incompatible_image_refused_before_mpi_init(hpcrun_bin, mpich_image, as_user, tmp_path):
    for r in (run_root(MPIRUN + ["-np", "2", hpcrun_bin, mpich_image, "/app/hello"], cwd=str(tmp_path)),
              as_user(MPIRUN[:2] + ["-np", "2", hpcrun_bin, mpich_image, "/app/hello"])):
        assert r.returncode != 0
        assert "fake mpich hello" not in r.stdout                 # the program never ran
        lines = [l for l in r.stderr.splitlines() if l.startswith("hpcrun: error:")]
        assert lines and all("MPICH" in l and "Open MPI" in l for l in lines), r.stderr
        assert "Traceback" not in r.stderr
    # the exit status is the documented one (mpirun reports it; run one rank directly to see it)
    env = dict(os.environ, OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="1", OMPI_MCA_orte_hnp_uri="x")
    r = run_root([hpcrun_bin, mpich_image, "/app/hello"], env=env, cwd=str(tmp_path))
    assert r.returncode == errors.MPI_ABI and r.stderr.startswith("hpcrun: error:")
    # --mpi=none asks nothing: the fake library "runs" as a singleton
    r = run_root([hpcrun_bin, "--mpi=none", mpich_image, "/app/hello"], cwd=str(tmp_path))
    assert r.returncode == 0 and "fake mpich hello" in r.stdout


def test_host_mpi_injected_into_image_without_mpi(hpcrun_bin, bare_image, as_user, tmp_path):
    r = run_root(MPIRUN + ["-np", "2", hpcrun_bin, bare_image, "/app/hello"], cwd=str(tmp_path))
    check_hello(r, 2)           # auto: the image has no libmpi.so.40, the host's is bound in
    r = as_user(MPIRUN[:2] + ["-np", "2", hpcrun_bin, "--mpi=host", bare_image, "/app/hello", "pingpong", "5"])
    check_hello(r, 2)
    r = run_root(MPIRUN + ["-np", "2", hpcrun_bin, "--mpi=hybrid", bare_image, "/app/hello"], cwd=str(tmp_path))
    assert r.returncode != 0 and "libmpi.so.40" in r.stderr and "--mpi=host" in r.stderr


def test_pmi_fd_survives(hpcrun_bin, ompi_image, tmp_path):
    rfd, wfd = os.pipe()
    try:
        env = dict(os.environ, PMI_FD=str(wfd), PMI_RANK="0", PMI_SIZE="1")
        p = subprocess.Popen([hpcrun_bin, "--cleanenv", ompi_image, "/bin/sh", "-c",
                              'echo "cmd=init pmi_version=1 fd=$PMI_FD rank=$PMI_RANK" >&$PMI_FD'],
                             pass_fds=(wfd,), env=env, cwd=str(tmp_path), stderr=subprocess.PIPE, text=True)
        os.close(wfd)
        wfd = None
        data = os.read(rfd, 4096).decode()
        assert p.wait(timeout=120) == 0, p.stderr.read()
        assert data == "cmd=init pmi_version=1 fd=%s rank=0\n" % env["PMI_FD"]
    finally:
        os.close(rfd)
        if wfd is not None:
            os.close(wfd)


INSIDE_TEST = '''
import os
import pytest
from mpi4py import MPI


@pytest.mark.mpi(min_size=2)
def test_allreduce_inside_image():
    comm = MPI.COMM_WORLD
    assert os.path.isdir("/.hpcrun") and os.environ["HPCRUN_CONTAINER"]
    assert comm.allreduce(comm.rank + 1) == comm.size * (comm.size + 1) // 2
    ranks = comm.allgather(comm.rank)
    assert ranks == list(range(comm.size))
'''


def test_pytest_mpi_inside_image(hpcrun_bin, ompi_image, shared_dir, tmp_path):
    """mpi4py and pytest from the project's venv, bound at the same path; Python's stdlib too."""
    venv = os.path.dirname(os.path.dirname(sys.executable))
    stdlib = os.path.dirname(os.__file__)
    test = tmp_path / "test_inside.py"
    test.write_text(INSIDE_TEST)
    r = run_root(MPIRUN + ["-np", "2", hpcrun_bin, "-B", venv, "-B", stdlib, "-B", os.path.realpath(sys.executable),
                           "-B", "/usr/bin/python3",    # the venv's bin/python links to it
                           "-B", "/usr/lib/x86_64-linux-gnu", ompi_image, os.path.join(venv, "bin/python"),
                           "-m", "pytest", "-q", "--with-mpi", "-p", "no:cacheprovider", str(test)],
                 cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("1 passed") == 2


def test_host_site_mca_params_are_the_ranks_defaults(hpcrun_bin, ompi_image, tmp_path):
    """The host's openmpi-mca-params.conf (site fabric policy) applies inside a hybrid
    container; a variable set for the job still wins.  Without it an image lacking the
    file picked the ofi MTL's TCP provider on one node: 7 us latency instead of 0.3 us."""
    params = tmp_path / "openmpi-mca-params.conf"
    params.write_text("# site policy\nmtl = ^ofi\npml = ob1   # comment\nbtl_vader_fbox_max = 32\n")
    conf = tmp_path / "hpcrun.conf"
    conf.write_text("mpi_site_mca_params = %s\n" % params)
    env = dict(os.environ, HPCRUN_CONF=str(conf))
    show = 'echo "$OMPI_MCA_mtl|$OMPI_MCA_pml|$OMPI_MCA_btl_vader_fbox_max"'
    r = run_root(MPIRUN + ["-np", "2", hpcrun_bin, ompi_image, "/bin/sh", "-c", show], env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["^ofi|ob1|32"] * 2
    r = run_root(MPIRUN + ["-np", "2", "-x", "OMPI_MCA_pml=cm", hpcrun_bin, ompi_image, "/bin/sh", "-c", show],
                 env=env, cwd=str(tmp_path))
    assert r.stdout.split() == ["^ofi|cm|32"] * 2, r.stderr


def test_singleton_without_a_launcher(hpcrun_bin, ompi_image, as_user):
    """`hpcrun img ./mpi_program` alone: Open MPI's singleton init starts orted from the
    image, which has no ssh; hpcrun makes that node-local instead of a failed MPI_Init."""
    r = as_user([hpcrun_bin, ompi_image, "/app/hello"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert ranks_of(r.stdout) and ranks_of(r.stdout)[0].split()[:4] == ["rank", "0", "of", "1"]


def test_consecutive_jobs_reuse_the_node_container(hpcrun_bin, ompi_image, tmp_path):
    """Open MPI's per-job session directories lie under the /tmp bind: they do not enter
    the container key, so a second job step within `linger` joins the first one's container
    instead of building its own (the launch benchmark's per-job cost)."""
    env = dict(os.environ, HPCRUN_LINGER="30")
    mnts = []
    for _ in range(2):
        r = run_root(MPIRUN + ["-np", "2", hpcrun_bin, ompi_image, "/app/hello"], cwd=str(tmp_path), env=env)
        check_hello(r, 2)
        mnts.append(ranks_of(r.stdout)[0].split()[5])
    assert mnts[0] == mnts[1]
