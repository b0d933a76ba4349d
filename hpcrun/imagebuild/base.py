"""Unpack a base (`From:` or `--from`) into the staging root.

A base is a directory (a root filesystem), an image of any kind hpcrun reads
(hpcrun, SquashFS, SIF), a `docker save` tarball, or an OCI image layout (a
directory or a tarball of one).  Layers are applied in order with OCI
whiteouts: `.wh.NAME` deletes NAME from the lower layers, `.wh..wh..opq`
empties its directory.  Returns the base's metadata (runscript, env, labels)
so the new image inherits it.
"""
import json
import os
import shutil
import subprocess
import tarfile
import tempfile

from hpcrun import errors, image
from hpcrun.imagebuild.tree import inside

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def unpack(source, root, log):
    if not os.path.lexists(source):
        raise errors.Error(errors.NOINPUT, "base not found", source)
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "oci-layout")):
            return _oci_dir(source, root, log)
        img = image.open_image(source)
        log("base: directory %s" % source)
        _copy_dir(source, root)
        return img.meta()
    try:
        with open(source, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise errors.Error(errors.NOINPUT, "base not readable: %s" % e.strerror, source)
    if _is_tar(source, head):
        return _archive(source, root, log)
    img = image.open_image(source)
    log("base: %s image %s" % (img.kind, source))
    _unsquash(img, root)
    meta = img.meta()
    if not meta:
        try:
            with open(os.path.join(root, ".hpcrun/image.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = {}
    return meta


def _is_tar(path, head):
    if head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar":
        return True
    return False


def _copy_dir(src, root):
    shutil.copytree(src, root, symlinks=True, dirs_exist_ok=True)


def _unsquash(img, root):
    """unsquashfs has no offset option: copy the payload range to a temp file first."""
    tmp = None
    try:
        src = img.path
        if img.offset:
            fd, tmp = tempfile.mkstemp(prefix="hpcrun-base-", suffix=".sqfs")
            with os.fdopen(fd, "wb") as out, open(img.path, "rb") as f:
                f.seek(img.offset)
                left = img.size
                while left:
                    block = f.read(min(left, 1 << 20))
                    if not block:
                        raise errors.Error(errors.DATA, "truncated image", img.path)
                    out.write(block)
                    left -= len(block)
            src = tmp
        r = subprocess.run(["unsquashfs", "-f", "-n", "-no-xattrs", "-d", root, src],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["unsquashfs failed"])[-1]
            raise errors.Error(errors.DATA, "cannot unpack base image: %s" % last, img.path)
    finally:
        if tmp:
            os.unlink(tmp)


def _archive(path, root, log):
    try:
        with tarfile.open(path, "r:*") as outer:
            names = set(outer.getnames())
            if "manifest.json" in names:
                manifest = json.load(outer.extractfile("manifest.json"))[0]
                layers = manifest["Layers"]
                config = json.load(outer.extractfile(manifest["Config"]))
                log("base: docker archive %s, %d layers" % (path, len(layers)))
                for n, layer in enumerate(layers, 1):
                    _apply_layer(outer.extractfile(layer), root, "%s layer %d" % (path, n))
                return _config_meta(config)
            if "oci-layout" in names or "index.json" in names:
                read = lambda name: outer.extractfile(name)        # noqa: E731
                return _oci(read, root, path, log)
    except (tarfile.TarError, EOFError, KeyError, ValueError, IndexError, AttributeError) as e:
        raise errors.Error(errors.DATA, "truncated or corrupt archive: %s" % _why(e), path)
    raise errors.Error(errors.DATA, "archive is neither a docker save tarball nor an OCI image layout", path)


def _oci_dir(path, root, log):
    def read(name):
        try:
            return open(os.path.join(path, name), "rb")
        except OSError as e:
            raise errors.Error(errors.DATA, "OCI layout incomplete: %s" % e.strerror, os.path.join(path, name))
    try:
        return _oci(read, root, path, log)
    except (tarfile.TarError, EOFError, KeyError, ValueError, IndexError) as e:
        raise errors.Error(errors.DATA, "truncated or corrupt OCI layout: %s" % _why(e), path)


def _oci(read, root, path, log):
    def blob(digest):
        algo, _, hexd = digest.partition(":")
        return read("blobs/%s/%s" % (algo, hexd))
    index = json.load(read("index.json"))
    desc = index["manifests"][0]
    manifest = json.load(blob(desc["digest"]))
    if "manifests" in manifest:                      # an image index: take the first image
        manifest = json.load(blob(manifest["manifests"][0]["digest"]))
    layers = manifest["layers"]
    log("base: OCI image %s, %d layers" % (path, len(layers)))
    for n, layer in enumerate(layers, 1):
        _apply_layer(blob(layer["digest"]), root, "%s layer %d" % (path, n))
    return _config_meta(json.load(blob(manifest["config"]["digest"])))


def _config_meta(config):
    """Image config (Env, Entrypoint, Cmd, Labels) -> hpcrun metadata."""
    c = config.get("config") or config.get("Config") or {}
    meta = {}
    argv = (c.get("Entrypoint") or []) + (c.get("Cmd") or [])
    if argv:
        meta["runscript"] = argv
    env = [e.partition("=") for e in c.get("Env") or []]
    if env:
        meta["env"] = [[k, v] for k, _, v in env]
    if c.get("Labels"):
        meta["labels"] = dict(c["Labels"])
    return meta


def _apply_layer(fileobj, root, what):
    with tarfile.open(fileobj=fileobj, mode="r|*") as layer:
        for m in layer:
            name = os.path.normpath(m.name.lstrip("/"))
            if name in (".", "") or name.startswith("../"):
                continue
            parent, base = os.path.split(name)
            if base == OPAQUE:
                d = inside(root, "/" + parent, follow_last=True)
                for child in os.listdir(d):
                    _remove(os.path.join(d, child))
                continue
            if base.startswith(WHITEOUT):
                _remove(inside(root, "/" + os.path.join(parent, base[len(WHITEOUT):])))
                continue
            _extract(layer, m, root, "/" + name)


def _extract(layer, m, root, ipath):
    dst = inside(root, ipath)
    if m.isdir():
        if os.path.lexists(dst) and not os.path.isdir(dst):
            _remove(dst)
        if not os.path.isdir(dst):
            os.mkdir(dst)
        os.chmod(dst, (m.mode & 0o7777) | 0o700)
        return
    if os.path.lexists(dst):
        _remove(dst)
    if m.issym():
        os.symlink(m.linkname, dst)
    elif m.islnk():
        target = inside(root, "/" + os.path.normpath(m.linkname.lstrip("/")))
        os.link(target, dst)
    elif m.isfile():
        src = layer.extractfile(m)
        with open(dst, "wb") as out:
            shutil.copyfileobj(src, out)
        os.chmod(dst, m.mode & 0o7777)
    # devices and fifos are left out: the launcher provides /dev


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _why(e):
    """One line from a tarfile/json exception (tarfile's can span several)."""
    lines = [l.strip(" -") for l in str(e).splitlines() if l.strip(" -")]
    return lines[-1] if lines else type(e).__name__
