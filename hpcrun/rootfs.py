"""The mounted image -> the container's root, inside the keeper.

Called once per node per key by the keeper (node.py), after it unshared its
namespaces, mounted the image (stage.py) and wired the site's MPI/GPU
libraries: overlay (tmpfs upper, so missing mount points can be made) ->
generated files (passwd, group, launch.env) -> binds -> root remounted
read-only -> pivot_root.

Every path inside the image (bind destinations, /etc/passwd, image.json) is
resolved by one mechanism, open_in_root(): openat2(2) with RESOLVE_IN_ROOT |
RESOLVE_NO_MAGICLINKS relative to a descriptor of the root, so symlinks are
followed *inside* the root (absolute targets restart at it, ".." stops at it)
and /proc's magic links (/proc/self/root ...) are refused; where the kernel
lacks openat2, a component walk with O_PATH|O_NOFOLLOW that follows symlinks
by hand, refuses links on procfs and checks where the final descriptor is.
Missing mount points are created with mkdirat/openat relative to a resolved
parent descriptor, only on the root's own (overlay) file system, and every
mount goes onto /proc/self/fd/N of a descriptor resolved this way: no path
is looked up again between the check and the mount, and nothing is ever
created or mounted on a host path.  Read-only binds are read-only all the
way down (mount_setattr(2) with AT_RECURSIVE, else every submount).
"""
import errno
import os
import stat

from hpcrun import errors, fdio, linux

NOSUID_NODEV = linux.MS_NOSUID | linux.MS_NODEV


def assemble(plan, ws, image_root):
    """The root from the image mounted at image_root, in the workspace ws
    (a tmpfs): overlay, generated files, binds, read-only, pivot_root."""
    root = os.path.join(ws, "root")
    files = os.path.join(ws, "files")
    layer = plan["writable_layer"]
    image_fd = os.open(image_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        generated = _generated_files(plan, image_fd, files)
        if layer == "overlay":
            _precreate_mount_points(image_fd, os.path.join(ws, "upper"), plan["binds"] + generated)
    finally:
        os.close(image_fd)
    if layer == "overlay":
        opts = "lowerdir=%s,upperdir=%s/upper,workdir=%s/work" % (image_root, ws, ws)
        try:
            linux.mount("hpcrun", root, "overlay", NOSUID_NODEV, opts + (",userxattr" if plan["userns"] else ""))
        except OSError:
            try:
                linux.mount("hpcrun", root, "overlay", NOSUID_NODEV, opts)
            except OSError:
                layer = "none"
    if layer != "overlay":
        linux.mount(image_root, root, None, linux.MS_BIND | linux.MS_REC)
    plan["writable_layer"] = layer

    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for b in plan["binds"] + generated:
            _bind(root_fd, b)
    finally:
        os.close(root_fd)
    _hide_workspace(root, ws)
    linux.mount(None, root, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | NOSUID_NODEV)

    os.chdir(root)
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")


def _precreate_mount_points(image_fd, upper, binds):
    """Make missing bind destinations in the overlay's upper layer before it
    is mounted.  Through the mounted overlay we could not: in a user
    namespace the image's directories belong to an unmapped root, and even
    our capabilities do not let us create entries in them.  The place is
    found in the image (its symlinks followed inside it); upper is our own
    fresh tmpfs, so plain paths are safe there."""
    for b in binds:
        try:
            rel = _missing_part(image_fd, b["dst"])
        except (errors.Error, OSError):
            continue      # _bind() reports it, with the bind named
        if rel is None:
            continue
        target = os.path.join(upper, rel)
        try:
            os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
            if b.get("dir", os.path.isdir(b["src"])):
                os.makedirs(target, 0o755, exist_ok=True)
            elif not os.path.lexists(target):
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
        except OSError:
            pass          # _bind() reports it, with the bind named


def read_meta(image_root):
    """/.hpcrun/image.json of the mounted image, or {}."""
    import json
    fd = os.open(image_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        data = read_regular(fd, "/.hpcrun/image.json")
    finally:
        os.close(fd)
    try:
        meta = json.loads(data) if data else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _generated_files(plan, image_fd, files):
    """passwd/group with the caller's entry, and launch.env for the ranks."""
    import grp
    user = plan["user"]
    out = []
    passwd = _read_text(image_fd, "/etc/passwd")
    if not any(line.split(":")[2:3] == [str(plan["uid"])] for line in passwd.splitlines()):
        passwd += "%s:x:%d:%d:%s:%s:%s\n" % (user["name"], plan["uid"], plan["gid"], user["gecos"],
                                             user["home"], user["shell"] or "/bin/sh")
    group = _read_text(image_fd, "/etc/group")
    if not any(line.split(":")[2:3] == [str(plan["gid"])] for line in group.splitlines()):
        try:
            gname = grp.getgrgid(plan["gid"]).gr_name
        except KeyError:
            gname = user["name"]
        group += "%s:x:%d:\n" % (gname, plan["gid"])
    env_lines = []
    if plan["ld_library_path_prepend"]:
        env_lines.append("LD_LIBRARY_PATH=%s:$LD_LIBRARY_PATH" % ":".join(plan["ld_library_path_prepend"]))
    for k, v in sorted(plan["env"].get("set", {}).items()):
        env_lines.append("%s=%s" % (k, v))
    for name, text, dst in (("passwd", passwd, "/etc/passwd"), ("group", group, "/etc/group"),
                            ("launch.env", "".join(l + "\n" for l in env_lines), "/.hpcrun/launch.env")):
        if name == "launch.env" and not env_lines:
            continue
        path = os.path.join(files, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)
        out.append({"src": path, "dst": dst, "ro": True, "why": "generated", "dir": False})
    return out


def _read_text(image_fd, path):
    data = read_regular(image_fd, path)
    try:
        text = data.decode() if data else ""
    except UnicodeDecodeError:
        return ""
    return text if text.endswith("\n") or not text else text + "\n"


def read_regular(root_fd, path, limit=16 << 20):
    """The bytes of a regular file inside the root, or None (missing, too big,
    or not a regular file: a FIFO, socket or device an image planted must not
    stop the keeper, so it is opened O_NONBLOCK and fstat'ed before reading)."""
    try:
        fd = open_in_root(root_fd, path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except (errors.Error, OSError):
        return None
    return fdio.read_regular_fd(fd, limit)


# ------------------------------------------------ resolution inside a root ---

_MAX_LINKS = 40


def _components(path):
    return [p for p in path.split("/") if p and p != "."]


def open_in_root(root_fd, path, flags=os.O_PATH):
    """A descriptor of `path` resolved as if root_fd were /.  Raises
    FileNotFoundError when it does not exist, Error(NOPERM) when the way
    leads out (a /proc magic link), Error(USAGE) when it loops or passes
    through a non-directory."""
    rel = "/".join(_components(path)) or "."
    for attempt in range(20):
        try:
            return linux.openat2(root_fd, rel, flags | os.O_CLOEXEC,
                                 linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_MAGICLINKS)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                continue          # a mount or rename somewhere raced a ".." step: the kernel asks to retry
            if e.errno == errno.ENOSYS:
                return _walked(root_fd, path, flags)
            if e.errno == errno.ELOOP:
                break             # a magic link or a loop: the walk tells which
            _refuse(e, path)
    else:
        return _walked(root_fd, path, flags)   # mounts kept racing: the walk needs no retries
    os.close(_walked(root_fd, path, flags))
    _refuse(OSError(errno.EXDEV, "openat2 refused what the walk allowed"), path)


def _walked(root_fd, path, flags):
    try:
        return _walk(root_fd, path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        _refuse(e, path)


def _refuse(e, path):
    """The user's error for a resolution that failed; FileNotFoundError stays
    itself (a missing path is not an error everywhere)."""
    if isinstance(e, FileNotFoundError):
        raise e
    if e.errno == errno.ELOOP:
        raise errors.Error(errors.USAGE, "too many symbolic links in the image resolving", path)
    if e.errno == errno.EXDEV:
        raise errors.Error(errors.NOPERM, "path in the image leads out of it (through a /proc magic link)", path)
    if e.errno == errno.ENOTDIR:
        raise errors.Error(errors.USAGE, "path passes through a non-directory in the image", path)
    raise errors.Error(errors.USAGE, "path in the image cannot be resolved (%s)" % os.strerror(e.errno), path)


def _walk(root_fd, path, flags):
    """open_in_root without openat2: one component at a time with
    O_PATH|O_NOFOLLOW, symlinks followed by hand inside the root, links on
    procfs (magic links) refused, and the final descriptor checked to lie
    below the root."""
    proc_dev = os.stat("/proc").st_dev
    stack = [os.dup(root_fd)]
    parts = _components(path)
    links = 0
    try:
        while parts:
            p = parts.pop(0)
            if p == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            st = os.stat(p, dir_fd=stack[-1], follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if st.st_dev == proc_dev:
                    _refuse(OSError(errno.EXDEV, "magic link"), path)
                if links > _MAX_LINKS:
                    _refuse(OSError(errno.ELOOP, "too many links"), path)
                target = os.readlink(p, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts = _components(target) + parts
                continue
            if parts and not stat.S_ISDIR(st.st_mode):
                _refuse(OSError(errno.ENOTDIR, "not a directory"), path)
            stack.append(os.open(p, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1]))
        final = stack.pop()
    finally:
        for fd in stack:
            os.close(fd)
    try:
        root = os.readlink("/proc/self/fd/%d" % root_fd).rstrip("/")
        where = os.readlink("/proc/self/fd/%d" % final)
        if where != root and not where.startswith(root + "/") and root:
            _refuse(OSError(errno.EXDEV, "outside the root"), path)
        if flags == os.O_PATH:
            return os.dup(final)
        return os.open("/proc/self/fd/%d" % final, flags | os.O_CLOEXEC)   # reopens our own descriptor
    finally:
        os.close(final)


def _existing_prefix(root_fd, parts):
    """(descriptor of the longest existing proper prefix of parts, its length)."""
    for k in range(len(parts) - 1, 0, -1):
        try:
            return open_in_root(root_fd, "/".join(parts[:k])), k
        except FileNotFoundError:
            continue
    return os.dup(root_fd), 0


def _first_missing(root_fd, path):
    """Resolve path inside the root up to its first missing component: None
    when it all exists, else (parent descriptor, name, rest).  A dangling
    symlink on the way is followed by hand, still inside the root."""
    parts = _components(path)
    for _ in range(_MAX_LINKS):
        try:
            os.close(open_in_root(root_fd, "/".join(parts)))
            return None
        except FileNotFoundError:
            pass
        parent, k = _existing_prefix(root_fd, parts)
        name, rest = parts[k], parts[k + 1:]
        try:
            target = os.readlink(name, dir_fd=parent)
        except OSError:
            if ".." in rest:
                os.close(parent)
                raise errors.Error(errors.USAGE, "path has '..' after a directory missing in the image", path)
            return parent, name, rest
        os.close(parent)
        parts = ([] if target.startswith("/") else parts[:k]) + _components(target) + rest
    _refuse(OSError(errno.ELOOP, "too many links"), path)


def _missing_part(image_fd, path):
    """The image-relative path (the kernel's, symlinks resolved) that a bind
    destination would need created, or None when it exists."""
    found = _first_missing(image_fd, path)
    if found is None:
        return None
    parent, name, rest = found
    try:
        image = os.readlink("/proc/self/fd/%d" % image_fd)
        where = os.readlink("/proc/self/fd/%d" % parent)
    finally:
        os.close(parent)
    rel = os.path.relpath(where, image)
    if rel == ".." or rel.startswith("../"):
        return None
    return os.path.normpath(os.path.join(rel, name, *rest))


def make_in_root(root_fd, path, is_dir, where):
    """open_in_root(path), creating it (and missing parents) first: with
    mkdirat/openat relative to a resolved parent descriptor, and only on the
    root's own file system (never on a host file system bound in earlier,
    never on the read-only image)."""
    root_dev = os.fstat(root_fd).st_dev
    while True:
        found = _first_missing(root_fd, path)
        if found is None:
            return open_in_root(root_fd, path)
        parent, name, rest = found
        try:
            if os.fstat(parent).st_dev != root_dev:
                raise errors.Error(errors.USAGE, "bind destination does not exist and would have to be created "
                                   "on a host filesystem", where)
            if rest or is_dir:
                os.mkdir(name, 0o755, dir_fd=parent)
            else:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o644, dir_fd=parent))
        except OSError as e:
            raise errors.Error(errors.USAGE, "bind destination does not exist in the image and cannot be "
                               "created (%s)" % e.strerror, where)
        finally:
            os.close(parent)


# ----------------------------------------------------------------- binds ---

def _bind(root_fd, b):
    where = "%s:%s" % (b["src"], b["dst"])
    src_is_dir = b.get("dir", os.path.isdir(b["src"]))
    try:
        fd = make_in_root(root_fd, b["dst"], src_is_dir, where)
    except errors.Error as e:
        e.subject = where
        raise
    try:
        st, root = os.fstat(fd), os.fstat(root_fd)
        if (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino):
            raise errors.Error(errors.USAGE, "bind destination is the container's root", where)
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir != src_is_dir:
            raise errors.Error(errors.USAGE, "bind %s a directory onto a %s" % (
                "of" if src_is_dir else "of a file, not", "file" if not is_dir else "directory"), where)
        try:
            linux.mount(b["src"], "/proc/self/fd/%d" % fd, None, linux.MS_BIND | linux.MS_REC)
        except OSError as e:
            raise errors.Error(errors.OSERR, "bind mount failed: %s" % e.strerror, where)
    finally:
        os.close(fd)
    if b["ro"]:
        top = open_in_root(root_fd, b["dst"])        # now the new mount's root
        try:
            _read_only(top, where)
        finally:
            os.close(top)


def _read_only(fd, where):
    """Make the mount at fd and every mount below it read-only."""
    try:
        linux.mount_setattr(fd, linux.MOUNT_ATTR_RDONLY, recursive=True)
        return
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise errors.Error(errors.OSERR, "read-only remount failed: %s" % e.strerror, where)
    # Without mount_setattr: remount the top and each submount, each with its
    # own locked flags (a user namespace may not clear nosuid, nodev, noexec).
    top = os.readlink("/proc/self/fd/%d" % fd)
    points = [top]
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point.startswith(top.rstrip("/") + "/"):
                points.append(point)
    for point in points:
        try:
            linux.mount(None, point, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | _locked_flags(point))
        except OSError as e:
            raise errors.Error(errors.OSERR, "read-only remount failed: %s" % e.strerror, where)


def _hide_workspace(root, ws):
    """Recursive binds (/tmp, $HOME, the cwd...) copy whatever is mounted below
    their source, and the keeper's workspace (run_dir/<key>.d: the image, the
    overlay, the writable upper layer) usually lies below /tmp.  Detach those
    copies: inside, the workspace would expose the root's writable layer and
    pin the workspace directory (its rmdir fails with EBUSY).  A copy is a
    mount of the workspace's tmpfs with mount root "/"; the generated-file
    binds (/etc/passwd...) come from the same tmpfs but with another root."""
    ws_dev = os.stat(ws).st_dev
    want = "%d:%d" % (os.major(ws_dev), os.minor(ws_dev))
    copies = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            point = _unescape(fields[4])
            if fields[2] == want and fields[3] == "/" and point.startswith(root + "/"):
                copies.append(point)
    for point in sorted(copies, key=len):
        try:
            linux.umount2(point, linux.MNT_DETACH)
        except OSError:
            pass           # gone with an outer copy


def _unescape(path):
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


def _locked_flags(path):
    """Flags a user namespace may not clear on remount (nosuid, nodev, noexec, ...)."""
    f = os.statvfs(path).f_flag
    out = 0
    for st_flag, ms_flag in ((os.ST_NOSUID, linux.MS_NOSUID), (os.ST_NODEV, linux.MS_NODEV),
                             (os.ST_NOEXEC, linux.MS_NOEXEC)):
        if f & st_flag:
            out |= ms_flag
    return out
