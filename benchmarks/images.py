"""Build the benchmark programs and the images they run in, from host files (no network).

Two images, each as a directory, a plain SquashFS file and an hpcrun image:
- light: busybox only (entry benchmarks: /bin/true, readlink);
- mpi:   busybox + /bench/{pingpong,hello} + their libraries + the whole Open MPI
         runtime (plugins, help files, PMIx) + python3 with its stdlib and mpi4py,
         so ranks run the image's MPI, not the host's.
Outputs are rebuilt only when the sources or this file change (a stamp with their hash).
"""
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import common

sys.path.insert(0, os.path.join(common.REPO, "tests"))
import imagetools  # noqa: E402

C_PROGRAMS = ("pingpong", "hello")
MPI_PACKAGES = ("libopenmpi3", "openmpi-common", "libpmix2", "libhwloc15", "libhwloc-plugins")
PY_STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data",
                  "unittest", "distutils", "venv", "site-packages", "dist-packages"}


def _stamp(sources):
    h = hashlib.sha256()
    for p in sorted(sources):
        with open(p, "rb") as f:
            h.update(p.encode() + b"\0" + f.read())
    return h.hexdigest()


def _fresh(out_dir, stamp):
    try:
        with open(os.path.join(out_dir, "stamp")) as f:
            return f.read() == stamp
    except OSError:
        return False


def _write_forms(root, out_dir, name):
    """root dir -> name.sqfs (plain SquashFS) and name.img (hpcrun image with the same payload)."""
    from hpcrun import imagefile
    sqfs = imagetools.mksquashfs(root, os.path.join(out_dir, name + ".sqfs"))
    img = os.path.join(out_dir, name + ".img")
    with open(os.path.join(root, ".hpcrun/image.json")) as f:
        meta = json.load(f)
    imagefile.write_image(img, sqfs, meta, mode=0o755)
    return {"dir": root, "sqfs": sqfs, "img": img}


def _base_root(root, name):
    if os.path.exists(root):
        shutil.rmtree(root)
    imagetools.make_busybox_root(root, env=[("PATH", "/bench:/usr/bin:/bin")],
                                 labels={"org.hpcrun.benchmark": name})
    # ch-run binds the host's files onto these only when they exist in the image.
    for f in ("etc/hosts", "etc/resolv.conf", "etc/localtime"):
        open(os.path.join(root, f), "a").close()
    os.chmod(root, 0o755)


def _copy(root, path):
    """Copy one host file (keeping symlinks as symlinks, and their targets) into root."""
    dst = os.path.join(root, path.lstrip("/"))
    if os.path.lexists(dst):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), dst)
        _copy(root, os.path.join(os.path.dirname(path), os.readlink(path)) if not os.readlink(path).startswith("/")
              else os.readlink(path))
    elif os.path.isfile(path):
        shutil.copy2(path, dst)


def _add_with_libs(root, paths):
    """Copy files and, for ELF files, their ldd closure."""
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            continue
        _copy(root, p)
        if not os.path.islink(p) and imagetools.is_elf(p):
            imagetools.add_host_program(root, p)


def _ompi_version():
    out = subprocess.run(["ompi_info", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"v(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else ""


def compile_programs(bin_dir):
    os.makedirs(bin_dir, exist_ok=True)
    for name in C_PROGRAMS:
        src = os.path.join(common.BENCH_DIR, name + ".c")
        subprocess.run(["mpicc", "-O2", "-o", os.path.join(bin_dir, name), src], check=True)
    shutil.copy2(os.path.join(common.BENCH_DIR, "pingpong.py"), os.path.join(bin_dir, "pingpong.py"))
    return bin_dir


def _add_openmpi(root):
    files = []
    for pkg in MPI_PACKAGES:
        out = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True, check=True).stdout
        files += [p for p in out.splitlines() if not p.startswith(("/usr/share/doc", "/usr/share/man"))]
    _add_with_libs(root, [p for p in files if os.path.lexists(p)])


def _add_python(root):
    import mpi4py
    py = os.path.realpath("/usr/bin/python3")
    _add_with_libs(root, [py])
    os.symlink(os.path.basename(py), os.path.join(root, "usr/bin/python3"))
    stdlib = os.path.dirname(os.__file__)
    if not stdlib.startswith("/usr/lib/"):
        raise RuntimeError("benchmarks need Debian's python3 (stdlib at /usr/lib/python3.X), not %s" % stdlib)
    dst = os.path.join(root, stdlib.lstrip("/"))
    shutil.copytree(stdlib, dst, symlinks=True,
                    ignore=lambda d, names: [n for n in names if d == stdlib and n in PY_STDLIB_SKIP])
    _add_with_libs(root, glob.glob(os.path.join(stdlib, "lib-dynload", "*.so")))
    pkg = os.path.dirname(mpi4py.__file__)
    pkg_dst = os.path.join(root, "usr/lib/python3/dist-packages/mpi4py")
    shutil.copytree(pkg, pkg_dst, symlinks=True)
    _add_with_libs(root, glob.glob(os.path.join(pkg, "*.so")))


def build(build_dir=common.DEFAULT_BUILD, mpi=True, log=print):
    """Build what is missing; return {"bin": dir, "light": {...}, "mpi": {...}} with image paths."""
    os.makedirs(build_dir, exist_ok=True)
    os.chmod(build_dir, 0o755)
    out = {"bin": os.path.join(build_dir, "bin")}
    sources = [__file__, os.path.join(common.REPO, "tests", "imagetools.py")]
    light_dir = os.path.join(build_dir, "light")
    stamp = _stamp(sources)
    if not _fresh(light_dir, stamp):
        log("building the light image (busybox)")
        os.makedirs(light_dir, exist_ok=True)
        _base_root(os.path.join(light_dir, "root"), "light")
        _write_forms(os.path.join(light_dir, "root"), light_dir, "light")
        with open(os.path.join(light_dir, "stamp"), "w") as f:
            f.write(stamp)
    out["light"] = {"dir": os.path.join(light_dir, "root"), "sqfs": os.path.join(light_dir, "light.sqfs"),
                    "img": os.path.join(light_dir, "light.img")}
    if not mpi:
        return out
    mpi_dir = os.path.join(build_dir, "mpi")
    srcs = sources + [os.path.join(common.BENCH_DIR, n) for n in ("pingpong.c", "hello.c", "pingpong.py")]
    stamp = _stamp(srcs)
    if not _fresh(mpi_dir, stamp) or not os.path.exists(os.path.join(out["bin"], "pingpong")):
        log("building the MPI programs and the MPI image (Open MPI, python3, mpi4py)")
        compile_programs(out["bin"])
        os.makedirs(mpi_dir, exist_ok=True)
        root = os.path.join(mpi_dir, "root")
        _base_root(root, "mpi")
        os.makedirs(os.path.join(root, "bench"))
        for name in C_PROGRAMS + ("pingpong.py",):
            shutil.copy2(os.path.join(out["bin"], name), os.path.join(root, "bench", name))
        _add_with_libs(root, [os.path.join(out["bin"], n) for n in C_PROGRAMS])
        _add_openmpi(root)
        _add_python(root)
        with open(os.path.join(root, ".hpcrun/image.json")) as f:
            meta = json.load(f)
        meta["mpi"] = {"flavor": "openmpi", "soname": "libmpi.so.40", "version": _ompi_version(),
                       "programs": ["/bench/" + n for n in C_PROGRAMS]}
        with open(os.path.join(root, ".hpcrun/image.json"), "w") as f:
            json.dump(meta, f)
        _write_forms(root, mpi_dir, "mpi")
        with open(os.path.join(mpi_dir, "stamp"), "w") as f:
            f.write(stamp)
    out["mpi"] = {"dir": os.path.join(mpi_dir, "root"), "sqfs": os.path.join(mpi_dir, "mpi.sqfs"),
                  "img": os.path.join(mpi_dir, "mpi.img")}
    return out


if __name__ == "__main__":
    import time
    t0 = time.time()
    print(json.dumps(build(sys.argv[1] if len(sys.argv) > 1 else common.DEFAULT_BUILD), indent=1))
    print("%.1f s" % (time.time() - t0))
