"""Unpack a base (`From:` or `--from`) into the staging root.

A base is a directory (a root filesystem), an image of any kind hpcrun reads
(hpcrun, SquashFS, SIF), a `docker save` tarball, or an OCI image layout (a
directory or a tarball of one).  Layers are applied in order with OCI
whiteouts: `.wh.NAME` deletes NAME from the lower layers, `.wh..wh..opq`
empties its directory.  Returns the base's metadata (runscript, env, labels)
so the new image inherits it.

No importer ever opens a file of a source that is not a regular file: device
nodes, FIFOs and sockets are recreated with mknod (as root) or left out
(Tree.special).  Layer members are written with chroot semantics (inside()),
never through a symlink a layer planted, and keep their mtimes (a .pyc stays
valid for its .py).
"""
import errno
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile

from hpcrun import environment, errors, image
from hpcrun.imagebuild.tree import inside

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def unpack(source, tree, log, platform=None):
    """platform: (os, arch, variant) the user asked for (--platform), or None: the host's."""
    root = tree.root
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise errors.Error(errors.NOINPUT, "base not found", source)
    except OSError as e:
        raise errors.Error(errors.NOINPUT, "base not accessible: %s" % e.strerror, source)
    if stat.S_ISDIR(st.st_mode):
        if _is_regular(os.path.join(source, "oci-layout")):
            return _oci_dir(source, tree, log, platform)
        _no_platform(platform, source)
        img = image.open_image(source)
        log("base: directory %s" % source)
        _copy_dir(source, tree)
        return img.meta()
    if not stat.S_ISREG(st.st_mode):
        raise errors.Error(errors.DATA, "base is not a directory, image or archive (not a regular file)", source)
    try:
        with open(source, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise errors.Error(errors.NOINPUT, "base not readable: %s" % e.strerror, source)
    if _is_tar(source, head):
        return _archive(source, tree, log, platform)
    img = image.open_image(source)
    _no_platform(platform, source)
    log("base: %s image %s" % (img.kind, source))
    _unsquash(img, tree)
    meta = img.meta()
    if not meta:
        try:
            with open(os.path.join(root, ".hpcrun/image.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = {}
    return meta


def _no_platform(platform, source):
    if platform:
        raise errors.Error(errors.USAGE, "--platform chooses among the images of a docker archive or OCI layout;"
                           " this base is neither", source)


def _is_tar(path, head):
    if head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar":
        return True
    return False


def _is_regular(path):
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _copy_dir(src, tree):
    """A root filesystem directory into the staging root: files hard-linked (copied
    across filesystems), symlinks recreated as they are, special files to
    tree.special(); modes and mtimes kept.  Nothing but regular files is opened."""
    root = tree.root
    dirs_done = []
    for top, dirs, files in os.walk(src):
        rel = os.path.relpath(top, src)
        for name in sorted(dirs + files):
            path = os.path.join(top, name)
            ipath = os.path.normpath("/" + os.path.join(rel, name))
            if tree.excluded(ipath):
                if name in dirs:
                    dirs.remove(name)
                continue
            st = os.lstat(path)
            dst = os.path.join(root, ipath.lstrip("/"))       # parents are real directories made here
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(dst, 0o700)
                dirs_done.append((dst, st))
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(path), dst)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            elif stat.S_ISREG(st.st_mode):
                try:
                    os.link(path, dst)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK):
                        raise
                    shutil.copy2(path, dst)
            else:
                tree.special(ipath, st.st_mode, st.st_rdev, st.st_mtime_ns, "base %s" % src)
    for dst, st in reversed(dirs_done):        # deepest first: a read-only directory is filled before it closes
        os.chmod(dst, stat.S_IMODE(st.st_mode) | 0o700)
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


DEVICE_LINE = re.compile(r"^[cb]\S*\s+\S+\s+\d+,\s*\d+\s+\S+\s+\S+\s(/.*)$")


def _unsquash(img, tree):
    """unsquashfs has no offset option: copy the payload range to a temp file first.
    Unprivileged, unsquashfs cannot make device nodes (and fails): those are
    listed first and left out (Tree.specials, one note)."""
    root = tree.root
    tmp = excludes = None
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
        cmd = ["unsquashfs", "-f", "-n", "-no-xattrs", "-d", root]
        if os.geteuid() != 0:
            devices = _devices(src)
            if devices:
                fd, excludes = tempfile.mkstemp(prefix="hpcrun-base-", suffix=".exclude")
                with os.fdopen(fd, "w") as f:
                    f.write("".join(d.lstrip("/") + "\n" for d in devices))
                cmd += ["-exclude-file", excludes]
                tree.specials.extend(devices)
        r = subprocess.run(cmd + [src], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["unsquashfs failed"])[-1]
            raise errors.Error(errors.DATA, "cannot unpack base image: %s" % last, img.path)
    finally:
        for path in (tmp, excludes):
            if path:
                os.unlink(path)


def _devices(sqfs):
    """Device nodes in a SquashFS (its listing; nothing is extracted)."""
    r = subprocess.run(["unsquashfs", "-lln", "-d", "", sqfs], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True, errors="surrogateescape")
    return [m.group(1) for m in map(DEVICE_LINE.match, r.stdout.splitlines()) if m]


def _archive(path, tree, log, platform):
    try:
        with tarfile.open(path, "r:*") as outer:
            names = set(outer.getnames())
            if "manifest.json" in names:
                manifest = json.load(_member(outer, "manifest.json"))[0]
                layers = manifest["Layers"]
                config = json.load(_member(outer, manifest["Config"]))
                mismatch = _check_platform(config, platform, path)
                log("base: docker archive %s, %d layers" % (path, len(layers)))
                for n, layer in enumerate(layers, 1):
                    _apply_layer(_member(outer, layer), tree, "%s layer %d" % (path, n))
                return _config_meta(config, mismatch)
            if "oci-layout" in names or "index.json" in names:
                read = lambda name: _member(outer, name)        # noqa: E731
                return _oci(read, tree, path, log, platform)
    except (tarfile.TarError, EOFError, KeyError, ValueError, IndexError, AttributeError, TypeError) as e:
        raise errors.Error(errors.DATA, "truncated or corrupt archive: %s" % _why(e), path)
    raise errors.Error(errors.DATA, "archive is neither a docker save tarball nor an OCI image layout", path)


def _member(outer, name):
    """A regular file of an archive (a link or device member of that name is not read)."""
    m = outer.getmember(name)
    if not m.isfile():
        raise errors.Error(errors.DATA, "archive member is not a regular file: %s" % name, outer.name)
    return outer.extractfile(m)


def _oci_dir(path, tree, log, platform):
    def read(name):
        full = os.path.join(path, name)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise errors.Error(errors.DATA, "OCI layout incomplete: %s" % e.strerror, full)
        f = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(fd).st_mode):       # O_NONBLOCK: a FIFO does not block the open
            f.close()
            raise errors.Error(errors.DATA, "OCI layout file is not a regular file", full)
        return f
    try:
        return _oci(read, tree, path, log, platform)
    except (tarfile.TarError, EOFError, KeyError, ValueError, IndexError, AttributeError, TypeError) as e:
        raise errors.Error(errors.DATA, "truncated or corrupt OCI layout: %s" % _why(e), path)


INDEX_DEPTH_MAX = 8     # skopeo --all writes 2 (index.json, then the image index)


def _oci(read, tree, path, log, platform):
    def blob(digest):
        algo, _, hexd = digest.partition(":")
        if algo not in ("sha256", "sha512") or not hexd.isalnum():      # a digest names a blob, never a path
            raise errors.Error(errors.DATA, "corrupt OCI image: bad digest %r" % digest, path)
        return read("blobs/%s/%s" % (algo, hexd))
    manifest = json.load(read("index.json"))
    depth = 0
    while "manifests" in manifest:                   # an image index (index.json is one): pick the platform's
        depth += 1
        if depth > INDEX_DEPTH_MAX:                  # blob digests are names, not checked: an index can name itself
            raise errors.Error(errors.DATA, "corrupt OCI image: image indexes nested more than %d deep"
                               % INDEX_DEPTH_MAX, path)
        manifest = json.load(blob(_choose(manifest["manifests"], platform, path)["digest"]))
    layers = manifest["layers"]
    config = json.load(blob(manifest["config"]["digest"]))
    mismatch = _check_platform(config, platform, path)
    log("base: OCI image %s, %d layers" % (path, len(layers)))
    for n, layer in enumerate(layers, 1):
        _apply_layer(blob(layer["digest"]), tree, "%s layer %d" % (path, n))
    return _config_meta(config, mismatch)


ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm", "i686": "386", "i386": "386",
        "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64", "mips64": "mips64le"}
VARIANT = {"armv7l": "v7", "armv6l": "v6", "aarch64": "v8"}


def host_platform():
    """(os, arch, variant) in the OCI image-spec's words (GOOS/GOARCH), as podman and skopeo pick."""
    machine = os.uname().machine
    return ("linux", ARCH.get(machine, machine), VARIANT.get(machine, ""))


def parse_platform(text):
    """--platform os/arch[/variant] -> (os, arch, variant); bad form: 64."""
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise errors.Error(errors.USAGE, "--platform is OS/ARCH[/VARIANT], e.g. linux/arm64/v8", text)
    return (parts[0], parts[1], parts[2] if len(parts) == 3 else "")


def _platform_name(p):
    return "/".join(x for x in p if x)


def _matches(plat, want):
    """A descriptor's or config's platform against (os, arch, variant).  An
    image with no variant matches any wanted variant (arm64 images rarely
    state v8); a wanted one without variant matches any."""
    os_, arch, variant = want
    have = plat.get("variant") or ""
    return plat.get("os") == os_ and plat.get("architecture") == arch and (not have or not variant or have == variant)


def _choose(descriptors, platform, path):
    """The descriptor of an index for the wanted platform (the host's unless --platform).
    A lone descriptor is followed whatever it says; among several, one without
    a platform or an attestation (unknown/unknown) is never chosen."""
    if not descriptors:
        raise errors.Error(errors.DATA, "corrupt OCI image: an index with no manifests", path)
    want = platform or host_platform()
    with_platform = [d for d in descriptors if isinstance(d.get("platform"), dict)]
    if len(descriptors) == 1:
        return descriptors[0]           # one image (its config's platform is checked) or the index of several
    exact = [d for d in with_platform if _matches(d["platform"], want)]
    if exact:
        # The wanted variant, stated, before one that states none.
        exact.sort(key=lambda d: (d["platform"].get("variant") or "") != want[2])
        return exact[0]
    if not with_platform:
        refs = [str((d.get("annotations") or {}).get("org.opencontainers.image.ref.name", "?")) for d in descriptors]
        raise errors.Error(errors.DATA, "the layout holds %d images (%s) and says no platform for them: copy the one "
                           "you want into a layout of its own (skopeo copy oci:DIR:REF oci:NEW)"
                           % (len(descriptors), ", ".join(refs)), path)
    have = sorted({_platform_name((d["platform"].get("os"), d["platform"].get("architecture"),
                                   d["platform"].get("variant")))
                   for d in with_platform if d["platform"].get("os") != "unknown"})
    raise errors.Error(errors.DATA, "no %s image in this index (it has: %s)%s"
                       % (_platform_name(want), ", ".join(have) or "none",
                          "" if platform else "; --platform picks one"), path)


def _check_platform(config, platform, path):
    """A single image: --platform must match its config; the host's platform not
    matching is a warning (as podman's), the build goes on."""
    plat = {"os": config.get("os"), "architecture": config.get("architecture"), "variant": config.get("variant")}
    if not plat["os"] or not plat["architecture"]:
        return None
    if platform and not _matches(plat, platform):
        raise errors.Error(errors.DATA, "the image is for %s, not %s" % (
            _platform_name((plat["os"], plat["architecture"], plat["variant"])), _platform_name(platform)), path)
    if not platform and not _matches(plat, host_platform()):
        return "the image is for %s, this host is %s: its programs may not run here" % (
            _platform_name((plat["os"], plat["architecture"], plat["variant"])), _platform_name(host_platform()))
    return None


def env_literal(value):
    """An image config's Env value in /.hpcrun/env's literal form: single quotes
    where the bare form would expand $NAME or lose quotes or spaces."""
    if "$" in value or value != value.strip() or value[:1] in "'\"" or value[-1:] in "'\"":
        return "'%s'" % value
    return value


def _config_meta(config, mismatch=None):
    """Image config (Env, Entrypoint, Cmd, WorkingDir, User, Labels) -> hpcrun metadata.
    Env values are literal (as podman passes them): written in /.hpcrun/env's
    quoted form.  USER is recorded, never switched to.  "warnings": lines for
    the build to print."""
    c = config.get("config") or config.get("Config") or {}
    meta = {"warnings": [mismatch] if mismatch else []}
    argv = (c.get("Entrypoint") or []) + (c.get("Cmd") or [])
    if argv:
        meta["runscript"] = argv
    env = []
    for entry in c.get("Env") or []:
        k, _, v = entry.partition("=")
        if not environment.valid_name(k):
            meta["warnings"].append("image Env name %r is not a variable name: left out" % k)
            continue
        if "\n" in v or "\r" in v:
            meta["warnings"].append("image Env %s has a line break; /.hpcrun/env cannot hold it: left out" % k)
            continue
        env.append([k, env_literal(v)])
    if env:
        meta["env"] = env
    if c.get("Labels"):
        meta["labels"] = dict(c["Labels"])
    workdir = c.get("WorkingDir") or ""
    if workdir:
        if not workdir.startswith("/"):
            workdir = "/" + workdir
        meta["workdir"] = os.path.normpath(workdir)
    user = c.get("User") or ""
    if user:
        meta["image_user"] = user
        meta["warnings"].append("the image's USER %s is not switched to: in hpcrun the user inside is the user "
                                "outside (docs/coming-from.md)" % user)
    return meta


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _apply_layer(fileobj, tree, what):
    head = fileobj.read(4)
    fileobj.seek(0)
    if head == ZSTD_MAGIC:
        with _zstd(fileobj, what) as plain:
            return _apply_tar(plain, tree, what)
    return _apply_tar(fileobj, tree, what)


class _zstd:
    """A zstd layer (skopeo --dest-compress-format zstd), decompressed by the zstd
    program (Python 3.11 has no zstd): the layer is fed to it by a thread,
    read back as a stream.  On exit the program and the thread are gone."""

    def __init__(self, fileobj, what):
        self.fileobj, self.what = fileobj, what

    def __enter__(self):
        import threading
        exe = shutil.which("zstd")
        if not exe:
            raise errors.Error(errors.UNAVAILABLE, "zstd layers need the zstd program (Debian: apt install zstd)",
                               self.what)
        self.proc = subprocess.Popen([exe, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.feeder = threading.Thread(target=self._feed, daemon=True)
        self.feeder.start()
        return self.proc.stdout

    def _feed(self):
        try:
            shutil.copyfileobj(self.fileobj, self.proc.stdin, 1 << 20)
        except (OSError, ValueError, EOFError, tarfile.TarError):
            pass                                  # zstd stopped reading (or the layer ended early): it says why
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def __exit__(self, kind, value, tb):
        # Read to the end (the tar's padding; or, after a tar error, what zstd
        # thinks of the stream: a cut-short frame is its error, not tar's).
        drain = kind is None or issubclass(kind, (tarfile.TarError, EOFError, OSError, errors.Error))
        if drain:
            while self.proc.stdout.read(1 << 20):
                pass
        else:
            self.proc.kill()
        self.proc.stdout.close()
        err = self.proc.stderr.read().decode("utf-8", "replace").strip()
        self.proc.stderr.close()
        rc = self.proc.wait()
        self.feeder.join()
        if drain and rc != 0:
            raise errors.Error(errors.DATA, "corrupt zstd layer: %s" % ((err.splitlines() or ["zstd failed"])[-1]),
                               self.what)
        return False


def _apply_tar(fileobj, tree, what):
    root = tree.root
    dirs = {}                                  # directory -> (mode, mtime), set once the layer is in
    with tarfile.open(fileobj=fileobj, mode="r|*") as layer:
        for m in layer:
            name = os.path.normpath(m.name.lstrip("/"))
            if name in (".", ""):
                continue
            if name == ".." or name.startswith("../"):
                raise errors.Error(errors.DATA, "corrupt archive: member %r is outside the root" % m.name, what)
            parent, base = os.path.split(name)
            if base == OPAQUE:
                d = inside(root, "/" + parent, follow_last=True)
                for child in os.listdir(d):
                    _remove(os.path.join(d, child))
                continue
            if base.startswith(WHITEOUT):
                _remove(inside(root, "/" + os.path.join(parent, base[len(WHITEOUT):])))
                continue
            if tree.excluded("/" + name):
                continue
            _extract(layer, m, tree, "/" + name, dirs, what)
    for dst, (mode, mtime) in sorted(dirs.items(), reverse=True):
        if os.path.isdir(dst) and not os.path.islink(dst):
            os.chmod(dst, mode)
            os.utime(dst, (mtime, mtime))


def _extract(layer, m, tree, ipath, dirs, what):
    root = tree.root
    # The last component is not followed: a symlink an earlier member planted
    # there is replaced, never written or chmod'ed through.
    dst = inside(root, ipath)
    if m.isdir():
        if os.path.islink(dst) or (os.path.lexists(dst) and not os.path.isdir(dst)):
            _remove(dst)
        if not os.path.lexists(dst):
            os.mkdir(dst, 0o700)
        dirs[dst] = ((m.mode & 0o7777) | 0o700, m.mtime)
        return
    if os.path.lexists(dst):
        _remove(dst)
    if m.issym():
        os.symlink(m.linkname, dst)
        os.utime(dst, (m.mtime, m.mtime), follow_symlinks=False)
    elif m.islnk():
        target = os.path.normpath(m.linkname.lstrip("/"))
        target_path = None if target.startswith("../") else inside(root, "/" + target)
        if not target_path or not os.path.lexists(target_path) or os.path.isdir(target_path):
            raise errors.Error(errors.DATA, "corrupt archive: hard link %s to %r, not a file of the layers"
                               % (m.name, m.linkname), what)
        os.link(target_path, dst, follow_symlinks=False)       # a link to a symlink stays one
    elif m.isfile():
        src = layer.extractfile(m)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out)
        os.chmod(dst, m.mode & 0o7777)
        os.utime(dst, (m.mtime, m.mtime))
    elif m.ischr() or m.isblk() or m.isfifo():
        kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
        tree.special(ipath, kind | (m.mode & 0o7777), os.makedev(m.devmajor, m.devminor), int(m.mtime) * 10**9,
                     "layer member")


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _why(e):
    """One line from a tarfile/json exception (tarfile's can span several)."""
    lines = [l.strip(" -") for l in str(e).splitlines() if l.strip(" -")]
    return lines[-1] if lines else type(e).__name__
