"""hpcrun build: real programs compiled here, packed from specs, run with hpcrun --cleanenv."""
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

import imagetools

from hpcrun import elf, imagefile, ldcache



def run(argv, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run(argv, **kw)


def build(hpcrun_bin, out, *args):
    r = run([hpcrun_bin, "build", out] + list(args))
    assert r.returncode == 0, r.stderr
    return out


def meta_of(path):
    return imagefile.read_header(path).meta()


def payload_names(img):
    """File names in the image's SquashFS payload (listed without mounting)."""
    h = imagefile.read_header(img)
    tmp = img + ".payload"
    with open(img, "rb") as f, open(tmp, "wb") as out:
        f.seek(h.offset)
        out.write(f.read(h.size))
    try:
        r = run(["unsquashfs", "-lls", "-d", "", tmp])
    finally:
        os.unlink(tmp)
    return r.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("build"))


@pytest.fixture(scope="module")
def c_prog(work):
    """A program linked against a library of its own ($ORIGIN rpath) and libm."""
    d = os.path.join(work, "cprog")
    os.makedirs(os.path.join(d, "lib"))
    with open(os.path.join(d, "greet.c"), "w") as f:
        f.write('#include <stdio.h>\n#include <math.h>\n'
                'void greet(const char *w) { printf("hello, %s %.0f\\n", w, sqrt(16.0)); }\n')
    with open(os.path.join(d, "prog.c"), "w") as f:
        f.write('void greet(const char *);\n'
                'int main(int c, char **v) { greet(c > 1 ? v[1] : "world"); return 3; }\n')
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", "lib/libgreet.so.1", "-Wl,-soname,libgreet.so.1", "greet.c",
                    "-Wl,--no-as-needed", "-lm"], cwd=d, check=True)
    os.symlink("libgreet.so.1", os.path.join(d, "lib/libgreet.so"))
    subprocess.run(["gcc", "-o", "prog", "prog.c", "-Llib", "-lgreet", "-Wl,-rpath,$ORIGIN/lib"], cwd=d, check=True)
    return d


def test_elf_reader_matches_readelf(c_prog):
    info = elf.read(os.path.join(c_prog, "prog"))
    assert info.interp and info.interp.startswith("/lib")
    assert info.needed == ["libgreet.so.1", "libc.so.6"]
    assert info.runpath == ["$ORIGIN/lib"] or info.rpath == ["$ORIGIN/lib"]
    lib = elf.read(os.path.join(c_prog, "lib/libgreet.so.1"))
    assert lib.soname == "libgreet.so.1" and "libm.so.6" in lib.needed
    assert "GLIBC_2.2.5" in elf.verneed(os.path.join(c_prog, "prog"))["libc.so.6"]
    assert elf.max_glibc(os.path.join(c_prog, "prog")) is not None
    libc = ldcache.find("libc.so.6")
    assert libc and os.path.exists(libc)
    assert "GLIBC_2.2.5" in elf.verdef(libc)
    assert elf.read(os.path.join(c_prog, "prog.c")) is None


def test_c_program_with_libraries(hpcrun_bin, c_prog):
    with open(os.path.join(c_prog, "spec"), "w") as f:
        f.write("# a C program\n./prog\n%labels\norg.test.kind c\n%env\nGREETING=hi there\n")
    img = build(hpcrun_bin, os.path.join(c_prog, "prog.img"), os.path.join(c_prog, "spec"))
    meta = meta_of(img)
    assert meta["runscript"] == ["/app/prog"]
    assert meta["labels"] == {"org.test.kind": "c"}
    assert ["GREETING", "hi there"] in meta["env"]
    assert "./prog" in meta["build"]["spec"]
    assert os.stat(img).st_mode & 0o111
    listing = payload_names(img)
    assert listing.splitlines()[0].startswith("drwxr-xr-x ")      # / of the image: not mkdtemp's 0700
    for name in ("/app/lib/libgreet.so.1", "libm.so.6", "libc.so.6", "ld-linux", "/etc/passwd", "/.hpcrun/image.json"):
        assert name in listing
    r = run([hpcrun_bin, "--cleanenv", img, "/app/prog", "cluster"])
    assert (r.returncode, r.stdout) == (3, "hello, cluster 4\n"), r.stderr
    assert " /bin/sh" not in listing and "/usr/bin/" not in listing   # nothing but what the program needs


def test_verbose_says_why(hpcrun_bin, c_prog):
    r = run([hpcrun_bin, "build", "-v", os.path.join(c_prog, "v.img"), os.path.join(c_prog, "prog")])
    assert r.returncode == 0, r.stderr
    assert "libgreet.so.1 needed by /app/prog (via RUNPATH)" in r.stderr
    assert "needed by /app/lib/libgreet.so.1" in r.stderr           # libm, transitively
    assert "interpreter of /app/prog" in r.stderr


def test_shell_script(hpcrun_bin, work):
    d = os.path.join(work, "script")
    os.makedirs(d)
    with open(os.path.join(d, "hello.sh"), "w") as f:
        f.write('#!/usr/bin/env bash\necho "bash $BASH_VERSINFO says $1"\nexit 5\n')
    os.chmod(os.path.join(d, "hello.sh"), 0o755)
    img = build(hpcrun_bin, os.path.join(d, "sh.img"), os.path.join(d, "hello.sh"))
    assert meta_of(img)["runscript"] == ["/app/hello.sh"]
    r = run([hpcrun_bin, "--cleanenv", img, "/app/hello.sh", "hi"])
    assert r.returncode == 5, r.stderr
    assert r.stdout.startswith("bash 5 says hi"), r.stdout


def test_runscript_section_adds_sh(hpcrun_bin, c_prog):
    spec = os.path.join(c_prog, "rs.spec")
    with open(spec, "w") as f:
        f.write('./prog\n%runscript\nexec /app/prog "from-runscript-$1"\n')
    img = build(hpcrun_bin, os.path.join(c_prog, "rs.img"), spec)
    assert meta_of(img)["runscript"] == ["/bin/sh", "/.hpcrun/runscript"]
    r = run([hpcrun_bin, "--cleanenv", img, "/bin/sh", "/.hpcrun/runscript", "x"])
    assert r.stdout == "hello, from-runscript-x 4\n", r.stderr


@pytest.fixture(scope="module")
def py_script(work):
    """A script run by the venv's python that imports psutil (a C extension in
    site-packages) and a pure-Python package with a data file next to it."""
    d = os.path.join(work, "py")
    os.makedirs(os.path.join(d, "mypkg"))
    with open(os.path.join(d, "hello.py"), "w") as f:
        f.write("#!%s\nimport sys, psutil, mypkg\n"
                "print(mypkg.data(), psutil.Process().pid > 0, psutil._psutil_linux.__file__.startswith(sys.prefix))\n"
                % sys.executable)
    os.chmod(os.path.join(d, "hello.py"), 0o755)
    with open(os.path.join(d, "mypkg/__init__.py"), "w") as f:
        f.write("import os\ndef data():\n"
                "    return open(os.path.join(os.path.dirname(__file__), 'data.txt')).read().strip()\n")
    with open(os.path.join(d, "mypkg/data.txt"), "w") as f:
        f.write("data-file-ok\n")
    return d


def test_python_script(hpcrun_bin, py_script):
    img = build(hpcrun_bin, os.path.join(py_script, "py.img"), os.path.join(py_script, "hello.py"))
    listing = payload_names(img)
    assert "/app/mypkg/data.txt" in listing
    assert "_psutil_linux" in listing and "pyvenv.cfg" in listing
    r = run([hpcrun_bin, "--cleanenv", img, "/app/hello.py"])
    assert (r.returncode, r.stdout) == (0, "data-file-ok True True\n"), r.stderr


@pytest.fixture(scope="module")
def mpi_prog(work):
    d = os.path.join(work, "mpi")
    os.makedirs(d)
    with open(os.path.join(d, "mpi_hello.c"), "w") as f:
        f.write('#include <mpi.h>\n#include <stdio.h>\nint main(int c, char **v) { int r, n;\n'
                'MPI_Init(&c, &v); MPI_Comm_rank(MPI_COMM_WORLD, &r); MPI_Comm_size(MPI_COMM_WORLD, &n);\n'
                'printf("rank %d of %d\\n", r, n); MPI_Finalize(); return 0; }\n')
    subprocess.run(["mpicc", "-o", "mpi_hello", "mpi_hello.c"], cwd=d, check=True)
    return d


def test_mpi_program_metadata(hpcrun_bin, mpi_prog):
    img = build(hpcrun_bin, os.path.join(mpi_prog, "mpi.img"), os.path.join(mpi_prog, "mpi_hello"))
    mpi = meta_of(img)["mpi"]
    host_version = run(["mpirun", "--version"]).stdout.split()[3]     # "mpirun (Open MPI) 4.1.4"
    assert mpi == {"flavor": "openmpi", "soname": "libmpi.so.40", "version": host_version,
                   "programs": ["/app/mpi_hello"]}
    r = run([hpcrun_bin, "inspect", "--json", img])
    assert json.loads(r.stdout)["mpi"]["soname"] == "libmpi.so.40"
    listing = payload_names(img)
    assert "help-mpi-runtime.txt" in listing and "mca_btl_self.so" in listing     # runtime, not only libmpi


def test_mpi_program_runs_under_mpirun(hpcrun_bin, mpi_prog):
    """One rank under the host's mpirun, with the Open MPI runtime the build put in the image."""
    img = os.path.join(mpi_prog, "mpi.img")
    if not os.path.exists(img):
        build(hpcrun_bin, img, os.path.join(mpi_prog, "mpi_hello"))
    r = run(["mpirun", "--allow-run-as-root", "-np", "1", hpcrun_bin, "--cleanenv", img,
             "/app/mpi_hello"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["rank 0 of 1"]


def test_from_directory(hpcrun_bin, busybox_root, work):
    out = os.path.join(work, "fromdir.img")
    build(hpcrun_bin, out, "--from", busybox_root)
    meta = meta_of(out)
    assert meta["runscript"] == ["/bin/echo", "runscript says"]       # inherited from the base
    assert meta["build"]["from"] == busybox_root
    r = run([hpcrun_bin, "--cleanenv", out, "/bin/cat", "/etc/os-release"])
    assert "hpcrun test image (busybox)" in r.stdout, r.stderr


@pytest.fixture(scope="module")
def docker_tar(work):
    """A docker-save style archive: busybox in layer 1; layer 2 deletes a file
    (whiteout), empties a directory (opaque whiteout) and adds one file."""
    with open("/bin/busybox", "rb") as f:
        bb = f.read()
    layer1 = imagetools.layer_tar({"bin": None, "bin/busybox": bb, "bin/sh": ("sym", "busybox"), "bin/cat": ("sym", "busybox"),
                     "bin/ls": ("sym", "busybox"), "etc": None, "etc/gone.conf": b"x\n", "opt": None,
                     "opt/old": None, "opt/old/a": b"a\n", "opt/old/b": b"b\n"})
    layer2 = imagetools.layer_tar({"etc/.wh.gone.conf": b"", "opt/old/.wh..wh..opq": b"", "opt/old/new": b"new\n",
                     "etc/kept.conf": b"kept\n"})
    config = {"config": {"Env": ["PATH=/bin", "FROM_DOCKER=yes"], "Cmd": ["/bin/ls", "/opt/old"],
                         "Labels": {"org.test.base": "docker"}}}
    path = os.path.join(work, "image.tar")
    with tarfile.open(path, "w") as t:
        for name, data in (("l1/layer.tar", layer1), ("l2/layer.tar", layer2),
                           ("config.json", json.dumps(config).encode()),
                           ("manifest.json", json.dumps([{"Config": "config.json", "RepoTags": ["t:1"],
                                                          "Layers": ["l1/layer.tar", "l2/layer.tar"]}]).encode())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return path


def test_from_docker_archive_with_whiteouts(hpcrun_bin, docker_tar, work):
    out = os.path.join(work, "docker.img")
    build(hpcrun_bin, out, "--from", docker_tar)
    meta = meta_of(out)
    assert meta["runscript"] == ["/bin/ls", "/opt/old"]
    assert ["FROM_DOCKER", "yes"] in meta["env"] and meta["labels"] == {"org.test.base": "docker"}
    r = run([hpcrun_bin, "--cleanenv", out, "/bin/sh", "-c",
             "ls /opt/old; cat /etc/kept.conf; test -e /etc/gone.conf || echo gone; echo $FROM_DOCKER"])
    assert r.stdout.split() == ["new", "kept", "gone", "yes"], r.stderr


def test_from_image_spec_adds_program(hpcrun_bin, busybox_image, c_prog, work):
    spec = os.path.join(c_prog, "layered.spec")
    with open(spec, "w") as f:
        f.write("From: %s\n./prog\n%%files\ngreet.c /src/greet.c\n" % busybox_image)
    out = os.path.join(work, "layered.img")
    build(hpcrun_bin, out, spec)
    r = run([hpcrun_bin, "--cleanenv", out, "/bin/sh", "-c", "/app/prog layered; head -c 18 /src/greet.c"])
    assert r.stdout == "hello, layered 4\n#include <stdio.h>", r.stderr


@pytest.mark.parametrize("spec_text, code, message", [
    ("./prog\n%bogus\n", 65, "unknown section %bogus"),
    ("./no-such-file\n", 66, "file not found: ./no-such-file"),
    ("./needs-missing\n", 66, "cannot resolve shared library libmissing.so.7 needed by /app/needs-missing"),
    ("From: ./truncated.tar\n", 65, "truncated or corrupt archive"),
    ("./prog\n%exclude\nlib/*.so\n", 65, "an %exclude glob matches image paths"),
])
def test_bad_spec(hpcrun_bin, c_prog, tmp_path, spec_text, code, message):
    if not os.path.exists(os.path.join(c_prog, "needs-missing")):
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", "libmissing.so.7", "-Wl,-soname,libmissing.so.7",
                        "greet.c"], cwd=c_prog, check=True)
        subprocess.run(["gcc", "-o", "needs-missing", "prog.c", "-L.", "-l:libmissing.so.7"], cwd=c_prog, check=True)
        os.unlink(os.path.join(c_prog, "libmissing.so.7"))
        with open(os.path.join(c_prog, "truncated.tar"), "wb") as f:    # a real tar, cut short
            with tarfile.open(fileobj=f, mode="w") as t:
                t.add(os.path.join(c_prog, "prog.c"), "manifest.json")
            f.truncate(700)
    spec = os.path.join(c_prog, "bad.spec")
    with open(spec, "w") as f:
        f.write(spec_text)
    out = os.path.join(c_prog, "bad.img")
    r = run([hpcrun_bin, "build", out, spec], env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == code, r.stderr
    assert os.listdir(tmp_path) == []                                  # no staging left behind
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcrun: error: ") and message in lines[0], r.stderr
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(c_prog) if n.startswith(".bad.img")]       # no temp file either


def test_unwritable_output_dir(hpcrun_bin, as_user, c_prog, shared_dir):
    src = os.path.join(shared_dir, "build-src")
    os.makedirs(src, exist_ok=True)
    shutil.copy2(os.path.join(c_prog, "greet.c"), src)
    os.chmod(os.path.join(src, "greet.c"), 0o644)
    with open(os.path.join(src, "spec"), "w") as f:
        f.write("%files\ngreet.c /greet.c\n")
    r = as_user([hpcrun_bin, "build", "/root/x.img", os.path.join(src, "spec")])
    assert r.returncode == 73 and r.stderr.startswith("hpcrun: error: output directory not writable"), r.stderr


def test_inspect_text_and_other_kinds(hpcrun_bin, c_prog, busybox_squashfs):
    img = os.path.join(c_prog, "prog.img")
    if not os.path.exists(img):
        build(hpcrun_bin, img, os.path.join(c_prog, "prog"))
    r = run([hpcrun_bin, "inspect", img])
    assert r.returncode == 0
    h = imagefile.read_header(img)
    assert "format:     hpcrun" in r.stdout and h.sha256 in r.stdout and "runscript:  /app/prog" in r.stdout
    r = run([hpcrun_bin, "inspect", "--json", busybox_squashfs])
    d = json.loads(r.stdout)
    assert d["format"] == "squashfs" and "without mounting" in d["note"]
    r = run([hpcrun_bin, "inspect", os.path.join(c_prog, "prog.c")])
    assert r.returncode == 65 and r.stderr.startswith("hpcrun: error: not an image"), r.stderr


def test_built_image_runs_as_unprivileged_user(hpcrun_bin, as_user, c_prog, shared_dir):
    """The staged root must become a world-traversable / (not mkdtemp's 0700)."""
    if as_user(["sh", "-c", "test -r /dev/fuse -a -w /dev/fuse"]).returncode != 0:
        pytest.skip("/dev/fuse is not usable by the test user on this machine (squashfuse needs it)")
    img = os.path.join(shared_dir, "built-prog.img")
    build(hpcrun_bin, img, os.path.join(c_prog, "prog"))
    os.chmod(img, 0o755)
    r = as_user([hpcrun_bin, "--cleanenv", img, "/app/prog", "user"])
    assert (r.returncode, r.stdout) == (3, "hello, user 4\n"), r.stderr


# --- Python images carry what a program can import by name (issue 18 items 4, 5) ---

PYC_CHECK = r'''
import json, os, struct, sys
stale = fresh = 0
for m in list(sys.modules.values()):
    src, pyc = getattr(m, "__file__", None), getattr(m, "__cached__", None)
    if not src or not pyc or not src.endswith(".py") or not os.path.exists(pyc):
        continue
    with open(pyc, "rb") as f:
        flags, mtime, size = struct.unpack("<III", f.read(16)[4:16])
    st = os.stat(src)
    if flags & 1 or (mtime, size) == (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF):
        fresh += 1
    else:
        stale += 1
'''


def test_python_dynamic_imports_and_valid_pyc(hpcrun_bin, py_script):
    """Modules imported by computed names (the standard library whole) and a
    package's modules the scanner cannot see (the package directory whole); the
    image's .pyc files stay valid for their .py (mtimes kept), else Python
    recompiles them at every start in the read-only image."""
    d = py_script
    with open(os.path.join(d, "mypkg/hidden.py"), "w") as f:
        f.write("VALUE = 'hidden-ok'\n")
    with open(os.path.join(d, "dyn.py"), "w") as f:
        f.write("#!%s\nimport importlib, sysconfig\n" % sys.executable
                + "cp = __import__('config' + 'parser')\n"
                "sysconfig.get_config_vars()\n"           # imports _sysconfigdata_* by a computed name
                "import mypkg\nhidden = importlib.import_module('mypkg.' + 'hidden')\n"
                + PYC_CHECK
                + "print(cp.__name__, hidden.VALUE, json.dumps({'fresh': fresh, 'stale': stale}))\n")
    os.chmod(os.path.join(d, "dyn.py"), 0o755)
    img = build(hpcrun_bin, os.path.join(d, "dyn.img"), os.path.join(d, "dyn.py"))
    r = run([hpcrun_bin, "--cleanenv", img, "/app/dyn.py"])
    assert r.returncode == 0, r.stderr
    name, value, counts = r.stdout.split(" ", 2)
    assert (name, value) == ("configparser", "hidden-ok")
    counts = json.loads(counts)
    assert counts["stale"] == 0 and counts["fresh"] > 20, counts
    listing = payload_names(img)
    assert "/test/" not in listing and "idlelib" not in listing and "/config-3" not in listing   # no test suites


def test_python_build_as_user(hpcrun_bin, as_user, shared_dir):
    """Unprivileged, host files are copied, not hard-linked (protected_hardlinks):
    the copies keep their mtimes, so the image's .pyc files stay valid."""
    d = os.path.join(shared_dir, "py-user")
    os.makedirs(d)
    os.chmod(d, 0o777)
    script = os.path.join(d, "u.py")
    with open(script, "w") as f:
        f.write("#!/usr/bin/python3\nimport sysconfig\nsysconfig.get_config_vars()\n"
                "cp = __import__('config' + 'parser')\n" + PYC_CHECK
                + "print(cp.__name__, json.dumps({'fresh': fresh, 'stale': stale}))\n")
    os.chmod(script, 0o755)
    img = os.path.join(d, "u.img")
    r = as_user([hpcrun_bin, "build", img, script], env={"TMPDIR": d})
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(d)) == ["u.img", "u.py"]                    # no staging left behind
    r = as_user([hpcrun_bin, "--cleanenv", img, "/app/u.py"])
    assert r.returncode == 0, r.stderr
    name, counts = r.stdout.split(" ", 1)
    counts = json.loads(counts)
    assert name == "configparser" and counts["stale"] == 0 and counts["fresh"] > 20, r.stdout


MPI4PY_CACHE = os.environ.get("HPCRUN_TEST_CACHE", "/var/tmp/hpcrun-test-cache")


@pytest.fixture(scope="module")
def mpi4py_suite(work):
    """mpi4py's own test suite: the sdist of the venv's mpi4py version, from the
    package registry (kept in a cache directory), unpacked here."""
    import mpi4py
    version = mpi4py.__version__
    cache = os.path.join(MPI4PY_CACHE, "mpi4py-%s" % version)
    sdist = os.path.join(cache, "mpi4py-%s.tar.gz" % version)
    if not os.path.exists(sdist):
        os.makedirs(cache, exist_ok=True)
        r = run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                 "mpi4py==%s" % version, "-d", cache], timeout=300)
        if r.returncode != 0 or not os.path.exists(sdist):
            pytest.skip("mpi4py %s sdist not downloadable here: %s" % (version, r.stderr.strip()[-200:]))
    d = os.path.join(work, "mpi4py-suite")
    os.makedirs(d)
    with tarfile.open(sdist) as t:
        members = [m for m in t.getmembers() if m.name.startswith("mpi4py-%s/test/" % version)]
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        t.extractall(d, members=members, **kw)
    return os.path.join(d, "mpi4py-%s" % version)


def _unittest_summary(out):
    """("Ran N tests", "OK (skipped=K)") from unittest's output (each rank prints it)."""
    ran = [l.split(" in ")[0] for l in out.splitlines() if l.startswith("Ran ")]
    ok = [l.strip() for l in out.splitlines() if l.startswith(("OK", "FAILED"))]
    return ran[:1] + ok[:1]


def test_mpi4py_own_suite_in_image(hpcrun_bin, mpi4py_suite, tmp_path):
    """mpi4py 4.x from the venv (one extension per MPI ABI: MPI.openmpi resolves
    here, MPI.mpich does not) packed from a spec of two lines; its own test
    suite gives the same counts under `mpirun -np 2 hpcrun IMG` as natively.
    Spawn tests are off in both runs (children would start outside the image)."""
    spec = os.path.join(mpi4py_suite, "spec")
    with open(spec, "w") as f:
        f.write("./test/main.py\n./test/\n")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"],
               TMPDIR=str(tmp_path))
    img = os.path.join(mpi4py_suite, "suite.img")
    r = run([hpcrun_bin, "build", img, spec], env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if l.startswith("hpcrun: warning:")]
    assert len(warnings) == 1 and "MPI.mpich" in warnings[0] and "libmpi.so.12" in warnings[0], r.stderr
    assert os.listdir(tmp_path) == []                                    # no staging left behind (checked before the runs)
    assert meta_of(img)["mpi"]["soname"] == "libmpi.so.40"
    mpirun = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"]
    env["MPI4PY_TEST_SPAWN"] = "0"
    # Each rank's output to a file of its own: on the shared stderr the two
    # ranks' summaries interleave mid-line ("OKRan 2127 tests").
    summaries = []
    for name, argv in (("native", [sys.executable, "test/main.py"]), ("inside", [hpcrun_bin, "run", img])):
        out = os.path.join(str(tmp_path), name + ".out")
        r = run(mpirun + ["--output-filename", out] + argv, env=env, cwd=mpi4py_suite, timeout=900)
        assert r.returncode == 0, (name, r.stderr[-3000:])
        for rank in (0, 1):
            with open(os.path.join(out, "1", "rank.%d" % rank, "stderr")) as f:
                summaries.append((name, rank, _unittest_summary(f.read())))
    expected = summaries[0][2]
    assert expected[0].startswith("Ran ") and expected[1].startswith("OK"), summaries
    assert [s[2] for s in summaries] == [expected] * 4, summaries


def test_exclude_section(hpcrun_bin, py_script):
    """%exclude leaves paths out: an extension module whose library is missing
    here is neither packed nor warned about."""
    d = py_script
    with open(os.path.join(d, "mpi.py"), "w") as f:
        f.write("#!%s\nfrom mpi4py import MPI\nprint(MPI.COMM_WORLD.Get_size())\n" % sys.executable)
    os.chmod(os.path.join(d, "mpi.py"), 0o755)
    spec = os.path.join(d, "mpi.spec")
    with open(spec, "w") as f:
        f.write("./mpi.py\n%exclude\n*/mpi4py/MPI.mpich.*\n/usr/lib/python3*/email\n")
    out = os.path.join(d, "mpi.img")
    r = run([hpcrun_bin, "build", out, spec])
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    listing = payload_names(out)
    assert "MPI.openmpi" in listing and "MPI.mpich" not in listing
    assert "/json/" in listing and "/email/" not in listing
    r = run(["mpirun", "--allow-run-as-root", "-np", "1", hpcrun_bin, "--cleanenv", out, "/app/mpi.py"], timeout=60)
    assert (r.returncode, r.stdout) == (0, "1\n"), r.stderr


# --- sources with device nodes, FIFOs and sockets; layers that plant symlinks (items 6; issue 17 item 1) ---

def _special_root(busybox_root, path, devices):
    """busybox_root plus what debootstrap --variant=minbase leaves in /dev, a FIFO and a socket."""
    import socket
    shutil.copytree(busybox_root, path, symlinks=True)
    os.makedirs(os.path.join(path, "dev"), exist_ok=True)
    if devices:
        for name, major, minor in (("console", 5, 1), ("full", 1, 7), ("null", 1, 3), ("zero", 1, 5),
                                   ("random", 1, 8)):
            os.mknod(os.path.join(path, "dev", name), 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    os.mkfifo(os.path.join(path, "dev", "fifo"))
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(path, "dev", "sock"))
    s.close()
    for top, dirs, files in os.walk(path):
        os.chmod(top, 0o755)


def test_from_rootfs_with_device_nodes_as_root(hpcrun_bin, busybox_root, work, tmp_path):
    if os.getuid() != 0:
        pytest.skip("making device nodes needs root")
    src = os.path.join(work, "devroot")
    _special_root(busybox_root, src, devices=True)
    out = os.path.join(work, "devroot.img")
    r = run([hpcrun_bin, "build", out, "--from", src], env=dict(os.environ, TMPDIR=str(tmp_path)), timeout=120)
    assert r.returncode == 0, r.stderr
    assert os.stat(out).st_size < 8 << 20                          # /dev/full was not read
    assert os.listdir(tmp_path) == []
    listing = payload_names(out)
    for name in ("/dev/console", "/dev/full", "/dev/null"):
        line = [l for l in listing.splitlines() if l.endswith(name)]
        assert line and line[0].startswith("c"), listing             # recreated as device nodes
    assert [l for l in listing.splitlines() if l.endswith("/dev/fifo")][0].startswith("p")
    r = run([hpcrun_bin, "--cleanenv", out, "/bin/cat", "/etc/os-release"])
    assert "hpcrun test image (busybox)" in r.stdout, r.stderr


def test_from_rootfs_with_fifo_as_user(hpcrun_bin, as_user, busybox_root, shared_dir):
    """Unprivileged: what mknod cannot recreate is left out with one note."""
    src = os.path.join(shared_dir, "fiforoot")
    _special_root(busybox_root, src, devices=os.getuid() == 0)
    out_dir = os.path.join(shared_dir, "fifo-out")
    tmp = os.path.join(shared_dir, "fifo-tmp")
    for d in (out_dir, tmp):
        os.makedirs(d)
        os.chmod(d, 0o777)
    out = os.path.join(out_dir, "fifo.img")
    r = as_user([hpcrun_bin, "build", out, "--from", src], env={"TMPDIR": tmp})
    assert r.returncode == 0, r.stderr
    notes = [l for l in r.stderr.splitlines() if l.startswith("hpcrun: note:")]
    assert len(notes) == 1 and "/dev/fifo" in notes[0], r.stderr
    assert os.listdir(tmp) == []
    listing = payload_names(out)
    assert "/dev/fifo" not in listing and "/dev/console" not in listing and "/bin/busybox" in listing
    if os.getuid() != 0:
        return
    # An image base with device nodes: unsquashfs cannot make them unprivileged.
    sqfs = os.path.join(shared_dir, "devroot.sqfs")
    subprocess.run(["mksquashfs", src, sqfs, "-quiet", "-no-progress", "-all-root"], check=True,
                   stdout=subprocess.DEVNULL)
    os.chmod(sqfs, 0o644)
    out = os.path.join(out_dir, "fromsqfs.img")
    r = as_user([hpcrun_bin, "build", out, "--from", sqfs], env={"TMPDIR": tmp})
    assert r.returncode == 0, r.stderr
    notes = [l for l in r.stderr.splitlines() if l.startswith("hpcrun: note:")]
    assert len(notes) == 1 and "/dev/console" in notes[0], r.stderr
    assert os.listdir(tmp) == []
    listing = payload_names(out)
    assert "/dev/console" not in listing and "/dev/fifo" in listing and "/bin/busybox" in listing


def _docker_archive(path, entries):
    """A one-layer `docker save` archive; entries: (name, tar type, bytes | link target | None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, kind, extra in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = kind, 0o777 if kind == tarfile.DIRTYPE else 0o755, 1500040000
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                ti.linkname = extra
            if kind == tarfile.CHRTYPE:
                ti.devmajor, ti.devminor = 1, 7
            if kind == tarfile.REGTYPE:
                ti.size = len(extra)
                t.addfile(ti, io.BytesIO(extra))
            else:
                t.addfile(ti)
    layer = buf.getvalue()
    config = json.dumps({"config": {"Cmd": ["/bin/sh"]}}).encode()
    with tarfile.open(path, "w") as t:
        for name, data in (("l/layer.tar", layer), ("config.json", config),
                           ("manifest.json", json.dumps([{"Config": "config.json",
                                                          "Layers": ["l/layer.tar"]}]).encode())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return path


@pytest.mark.parametrize("entries, message", [
    ([("../escape", tarfile.REGTYPE, b"x\n")], "member '../escape' is outside the root"),
    ([("etc", tarfile.DIRTYPE, None), ("etc/h", tarfile.LNKTYPE, "../../etc/passwd")], "hard link etc/h"),
    ([("h", tarfile.LNKTYPE, "missing")], "hard link h to 'missing'"),
])
def test_from_corrupt_layer(hpcrun_bin, work, tmp_path, entries, message):
    """A member outside the root or a hard link to no file of the layers: one line, 65, nothing written."""
    path = _docker_archive(str(tmp_path / "bad.tar"), entries)
    out = str(tmp_path / "bad.img")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = run([hpcrun_bin, "build", out, "--from", path], env=dict(os.environ, TMPDIR=str(tmp)))
    assert r.returncode == 65, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcrun: error: corrupt archive") and message in lines[0], r.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.tar", "tmp"] and os.listdir(tmp) == []
    assert not os.path.exists(os.path.join(os.path.dirname(work), "escape"))


def test_from_docker_layer_symlink_does_not_escape(hpcrun_bin, work, tmp_path):
    """A layer with `evil -> HOSTDIR`, then `evil/` (mode 0777) and `evil/planted`:
    the host directory is neither chmod'ed nor written; a char device member is
    recreated as root, never read."""
    host_dir = os.path.join(work, "host-victim")
    os.makedirs(host_dir)
    os.chmod(host_dir, 0o755)
    with open("/bin/busybox", "rb") as f:
        bb = f.read()
    path = _docker_archive(os.path.join(work, "evil.tar"), [
        ("bin", tarfile.DIRTYPE, None), ("bin/busybox", tarfile.REGTYPE, bb), ("bin/sh", tarfile.SYMTYPE, "busybox"),
        ("evil", tarfile.SYMTYPE, host_dir), ("evil", tarfile.DIRTYPE, None), ("evil/planted", tarfile.REGTYPE, b"x\n"),
        ("link", tarfile.SYMTYPE, host_dir + "/target"), ("hard", tarfile.LNKTYPE, "link"),
        ("dev", tarfile.DIRTYPE, None), ("dev/full", tarfile.CHRTYPE, None)])
    out = os.path.join(work, "evil.img")
    r = run([hpcrun_bin, "build", out, "--from", path], env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(host_dir).st_mode) == 0o755 and os.listdir(host_dir) == []
    assert os.listdir(tmp_path) == []
    listing = payload_names(out)
    assert [l for l in listing.splitlines() if l.endswith("/evil")][0].startswith("d")
    assert "/evil/planted" in listing
    assert [l for l in listing.splitlines() if l.endswith("/bin/busybox")][0].split()[3] == "2017-07-14"  # mtime kept
    if os.getuid() == 0:
        assert [l for l in listing.splitlines() if l.endswith("/dev/full")][0].startswith("c")


@pytest.mark.parametrize("what", ["spec-lists-fifo", "spec-is-fifo", "from-fifo"])
def test_fifo_sources_refused_not_read(hpcrun_bin, work, tmp_path, what):
    """A FIFO named as a spec, in a spec or as a base is refused at once (one line,
    65), never opened (which would block)."""
    d = os.path.join(work, "fifo-" + what)
    os.makedirs(d)
    fifo = os.path.join(d, "pipe")
    os.mkfifo(fifo)
    spec = os.path.join(d, "spec")
    with open(spec, "w") as f:
        f.write("./pipe\n")
    args = {"spec-lists-fifo": [spec], "spec-is-fifo": [fifo], "from-fifo": ["--from", fifo]}[what]
    out = os.path.join(d, "x.img")
    r = run([hpcrun_bin, "build", out] + args, timeout=60, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == 65, r.stderr
    assert os.listdir(tmp_path) == []
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcrun: error: ") and "not a regular file" in lines[0], r.stderr
    assert sorted(os.listdir(d)) == ["pipe", "spec"]
