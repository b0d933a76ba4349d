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


def test_unknown_config_keys_are_named(hpcrun_bin, tmp_path):
    # A misspelt policy key is ignored by every launch: check is where an admin sees it.
    conf = tmp_path / "site.conf"
    conf.write_text("forbid-bnd = /root\nlinger = 5\n")
    (tmp_path / "site.conf.d").mkdir()
    (tmp_path / "site.conf.d" / "50-x.conf").write_text("nv_extras = libfoo.so\n")
    r = check(hpcrun_bin, "--json", env={"HPCRUN_CONF": str(conf)})
    rows = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert r.returncode == 0, r.stdout + r.stderr
    assert rows["config"]["status"] == "warn", rows["config"]
    assert "forbid_bnd (%s)" % conf in rows["config"]["value"]
    assert "nv_extras (%s)" % (tmp_path / "site.conf.d" / "50-x.conf") in rows["config"]["value"]
    assert "linger" not in rows["config"]["value"]
    conf.write_text("forbid_bind = /root\n")
    (tmp_path / "site.conf.d" / "50-x.conf").write_text("nv_extra = libfoo.so\n")
    rows = {c["name"]: c for c in json.loads(check(hpcrun_bin, "--json", env={"HPCRUN_CONF": str(conf)}).stdout)["checks"]}
    assert rows["config"]["status"] == "ok" and str(conf) in rows["config"]["value"], rows["config"]


def test_known_keys_are_the_documented_ones():
    """config.KNOWN_KEYS and docs/config.md name the same keys: a key added to one
    and not the other would be warned about, or undocumented."""
    import re
    from hpcrun import config
    with open(os.path.join(os.path.dirname(HERE), "docs", "config.md")) as f:
        text = f.read()
    rows = set(re.findall(r"^\| `([a-z_]+)`", text, re.M))
    rows |= {k for pair in re.findall(r"^\| `([a-z_]+)`, `([a-z_]+)`", text, re.M) for k in pair}
    rocm = text[text.index("`--rocm` (AMD GPUs) reads the same keys"):]
    rows |= set(re.findall(r"`(rocm(?:_[a-z]+)?)`", rocm[:rocm.index("\n\n")]))
    assert rows == set(config.KNOWN_KEYS), (rows ^ set(config.KNOWN_KEYS))
