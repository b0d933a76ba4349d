"""Build real test images from host files, without network.

A busybox-static root filesystem is enough for most launcher tests; tests that
need glibc programs copy them and their libraries (see add_host_program).
"""
import json
import os
import shutil
import subprocess

from hpcrun import imagefile

BUSYBOX = "/bin/busybox"
APPLETS = ["sh", "cat", "id", "echo", "ls", "true", "false", "sleep", "env", "pwd", "readlink",
           "stat", "touch", "mkdir", "rm", "kill", "grep", "head", "wc", "test", "whoami", "hostname",
           "mount", "printf", "sed", "tr", "basename", "dirname", "chmod", "uname", "ps", "seq", "xargs"]


def is_elf(path):
    """path is an ELF file (not a script, not a link's target we could not read)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def make_busybox_root(root, runscript=None, env=None, labels=None, extra_meta=None):
    os.makedirs(root, exist_ok=True)
    for d in ("bin", "usr/bin", "etc", "tmp", "var/tmp", "home", "proc", "sys", "dev", "root", ".hpcrun"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    shutil.copy2(BUSYBOX, os.path.join(root, "bin/busybox"))
    for a in APPLETS:
        p = os.path.join(root, "bin", a)
        if not os.path.lexists(p):
            os.symlink("busybox", p)
    with open(os.path.join(root, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    with open(os.path.join(root, "etc/group"), "w") as f:
        f.write("root:x:0:\n")
    with open(os.path.join(root, "etc/os-release"), "w") as f:
        f.write('PRETTY_NAME="hpcrun test image (busybox)"\nID=hpcrun-test\n')
    meta = {"labels": labels or {"org.hpcrun.test": "busybox"}}
    if runscript:
        meta["runscript"] = runscript
    if env:
        meta["env"] = [list(kv) for kv in env]
        with open(os.path.join(root, ".hpcrun/env"), "w") as f:
            for k, v in env:
                f.write("%s=%s\n" % (k, v))
    meta.update(extra_meta or {})
    with open(os.path.join(root, ".hpcrun/image.json"), "w") as f:
        json.dump(meta, f)
    return meta


def add_host_program(root, path):
    """Copy a host program and the shared libraries ldd lists into root."""
    files = [path]
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        for p in parts:
            if p.startswith("/"):
                files.append(p)
    for f in files:
        real = os.path.realpath(f)
        for src in {f, real}:
            dst = os.path.join(root, src.lstrip("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if not os.path.exists(dst):
                shutil.copy2(real, dst)


def mksquashfs(root, out):
    if os.path.exists(out):
        os.unlink(out)
    subprocess.run(["mksquashfs", root, out, "-noappend", "-quiet", "-all-root", "-no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
    os.chmod(out, 0o644)
    return out


def make_image(root, out, meta=None):
    """root dir -> hpcrun single-file image at out (executable)."""
    sq = out + ".sqfs.tmp"
    mksquashfs(root, sq)
    if meta is None:
        try:
            with open(os.path.join(root, ".hpcrun/image.json")) as f:
                meta = json.load(f)
        except OSError:
            meta = {}
    try:
        imagefile.write_image(out, sq, meta, mode=0o755)
    finally:
        os.unlink(sq)
    os.chmod(out, 0o755)
    return out


def layer_tar(files, mtime=0):
    """files: {name: bytes | None (directory) | ("sym", target)} -> the bytes of
    a tar layer (PAX, as image tools write them), every entry dated `mtime`."""
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, content in files.items():
            ti = tarfile.TarInfo(name)
            ti.mtime = mtime
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
