"""hpcrun build: real programs compiled here, packed from specs, run with hpcrun --cleanenv."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

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


def _layer(files):
    """files: {name: bytes | None (directory) | ("sym", target)} -> tar bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, content in files.items():
            ti = tarfile.TarInfo(name)
            if content is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                t.addfile(ti)
            elif isinstance(content, tuple):
                ti.type, ti.linkname = tarfile.SYMTYPE, content[1]
                t.addfile(ti)
            else:
                ti.size, ti.mode = len(content), 0o755
                t.addfile(ti, io.BytesIO(content))
    return buf.getvalue()


@pytest.fixture(scope="module")
def docker_tar(work):
    """A docker-save style archive: busybox in layer 1; layer 2 deletes a file
    (whiteout), empties a directory (opaque whiteout) and adds one file."""
    with open("/bin/busybox", "rb") as f:
        bb = f.read()
    layer1 = _layer({"bin": None, "bin/busybox": bb, "bin/sh": ("sym", "busybox"), "bin/cat": ("sym", "busybox"),
                     "bin/ls": ("sym", "busybox"), "etc": None, "etc/gone.conf": b"x\n", "opt": None,
                     "opt/old": None, "opt/old/a": b"a\n", "opt/old/b": b"b\n"})
    layer2 = _layer({"etc/.wh.gone.conf": b"", "opt/old/.wh..wh..opq": b"", "opt/old/new": b"new\n",
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
])
def test_bad_spec(hpcrun_bin, c_prog, spec_text, code, message):
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
    r = run([hpcrun_bin, "build", out, spec])
    assert r.returncode == code, r.stderr
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
