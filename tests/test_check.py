"""hpcrun check: the pre-flight report, on this host, with real images."""
import json
import os
import subprocess
import sys

import pytest

import imagetools

HERE = os.path.dirname(os.path.abspath(__file__))


def check(hpcrun_bin, *args, env=None):
    e = dict(os.environ)
    for k in list(e):
        if k.startswith(("OMPI_", "PMIX_", "PMI_", "SLURM_")):
            del e[k]
    e.update(env or {})
    return subprocess.run([hpcrun_bin, "check"] + list(args), capture_output=True, text=True, env=e, timeout=120)


@pytest.fixture(scope="module")
def mpich_dir_image(shared_dir):
    """A sandbox (directory) image whose MPI is a fake MPICH libmpi.so.12."""
    sys.path.insert(0, HERE)
    from test_mpi_unit import build_fake_mpich
    import shutil
    build = build_fake_mpich(os.path.join(shared_dir, "check-fake-mpich"))
    root = os.path.join(shared_dir, "check-mpich-root")
    imagetools.make_busybox_root(root)
    imagetools.add_host_program(root, "/bin/true")
    shutil.copy2(os.path.join(build, "libmpi.so.12"), os.path.join(root, "usr/lib/x86_64-linux-gnu/"))
    return root


def test_report_without_image(hpcrun_bin):
    r = check(hpcrun_bin, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert "libmpi.so.40" in rows["host MPI"]["value"] and "Open MPI" in rows["host MPI"]["value"]
    assert rows["launcher"]["value"].startswith("none")
    assert "GiB" in rows["/dev/shm"]["value"]
    assert "GPU driver" in rows and "fabric libraries" in rows


def test_incompatible_image_fails_under_mpirun(hpcrun_bin, mpich_dir_image, busybox_image):
    # no launcher: MPICH would run as a singleton, fine
    r = check(hpcrun_bin, mpich_dir_image)
    assert r.returncode == 0, r.stdout
    assert "MPICH" in r.stdout and "image glibc" in r.stdout
    # the way the job runs: one rank under Open MPI's mpirun
    r = subprocess.run(["mpirun", "--allow-run-as-root", "-np", "1", hpcrun_bin, "check", mpich_dir_image],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    line = next(l for l in r.stdout.splitlines() if l.startswith("MPI ABI"))
    assert "[FAIL]" in line and "rank 0 of 1" in line
    assert "Open MPI mpirun" in r.stdout
    # an image without MPI has nothing to check
    r = check(hpcrun_bin, busybox_image)
    assert r.returncode == 0 and "nothing to check" in r.stdout


def test_bad_input(hpcrun_bin, tmp_path):
    r = check(hpcrun_bin, str(tmp_path / "missing.img"))
    assert r.returncode != 0 and "image not found" in r.stdout
    r = check(hpcrun_bin, "--bogus")
    assert r.returncode == 64 and r.stderr.startswith("hpcrun: error:") and "Traceback" not in r.stderr
