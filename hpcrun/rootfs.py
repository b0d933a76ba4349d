"""The mounted image -> the container's root, inside the keeper.

Called once per node per key by the keeper (node.py), after it unshared its
namespaces, mounted the image (stage.py) and wired the site's MPI/GPU
libraries: overlay (tmpfs upper, so missing mount points can be made) ->
generated files (passwd, group, launch.env) -> binds -> root remounted
read-only -> pivot_root.

Bind destinations are resolved inside the new root as if it were already /
(resolve_in_root): an image's symlink can redirect a bind only to another
place inside the image, never onto a host path.  The destination is then
opened with O_PATH|O_NOFOLLOW and the mount goes onto /proc/self/fd/N, so
nothing can swap a path component between the check and the mount.
"""
import os
import stat

from hpcrun import errors, linux

NOSUID_NODEV = linux.MS_NOSUID | linux.MS_NODEV


def assemble(plan, ws, image_root):
    """The root from the image mounted at image_root, in the workspace ws
    (a tmpfs): overlay, generated files, binds, read-only, pivot_root."""
    root = os.path.join(ws, "root")
    files = os.path.join(ws, "files")
    generated = _generated_files(plan, image_root, files)
    layer = plan["writable_layer"]
    if layer == "overlay":
        _precreate_mount_points(image_root, os.path.join(ws, "upper"), plan["binds"] + generated)
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

    for b in plan["binds"] + generated:
        _bind(root, b, plan)
    _hide_workspace(root, ws)
    linux.mount(None, root, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | NOSUID_NODEV)

    os.chdir(root)
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")


def _precreate_mount_points(image_root, upper, binds):
    """Make missing bind destinations in the overlay's upper layer before it
    is mounted.  Through the mounted overlay we could not: in a user
    namespace the image's directories belong to an unmapped root, and even
    our capabilities do not let us create entries in them."""
    for b in binds:
        path, exists = resolve_in_root(image_root, b["dst"])
        if exists:
            continue
        rel = os.path.relpath(path, image_root)
        if rel.startswith(".."):
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
    path, ok = resolve_in_root(image_root, "/.hpcrun/image.json")
    if not ok:
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _generated_files(plan, image_root, files):
    """passwd/group with the caller's entry, and launch.env for the ranks."""
    import grp
    user = plan["user"]
    out = []
    passwd = _read_text(image_root, "/etc/passwd")
    if not any(line.split(":")[2:3] == [str(plan["uid"])] for line in passwd.splitlines()):
        passwd += "%s:x:%d:%d:%s:%s:%s\n" % (user["name"], plan["uid"], plan["gid"], user["gecos"],
                                             user["home"], user["shell"] or "/bin/sh")
    group = _read_text(image_root, "/etc/group")
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


def _read_text(image_root, path):
    real, ok = resolve_in_root(image_root, path)
    if not ok:
        return ""
    try:
        with open(real) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return ""
    return text if text.endswith("\n") or not text else text + "\n"


def resolve_in_root(root, path):
    """Resolve `path` as if `root` were /: symlinks are followed *inside* root
    (absolute targets restart at root, '..' stops at root).  Returns
    (host_path, exists); for a missing path, the resolved existing prefix
    plus the remaining components."""
    parts = [p for p in path.split("/") if p and p != "."]
    cur = []
    links = 0
    while parts:
        p = parts.pop(0)
        if p == "..":
            if cur:
                cur.pop()
            continue
        candidate = root + "/" + "/".join(cur + [p])
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            return root + "/" + "/".join(cur + [p] + parts), False
        except NotADirectoryError:
            raise errors.Error(errors.USAGE, "bind destination passes through a non-directory in the image", path)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 40:
                raise errors.Error(errors.USAGE, "too many symbolic links in the image resolving", path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                cur = []
            parts = [x for x in target.split("/") if x and x != "."] + parts
            continue
        cur.append(p)
    return root + ("/" + "/".join(cur) if cur else ""), True


def _bind(root, b, plan):
    target, exists = resolve_in_root(root, b["dst"])
    src_is_dir = b.get("dir", os.path.isdir(b["src"]))
    if not exists:
        _make_mount_point(root, target, src_is_dir, b)
    fd = os.open(target, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        if is_dir != src_is_dir:
            raise errors.Error(errors.USAGE, "bind %s a directory onto a %s" % (
                "of" if src_is_dir else "of a file, not", "file" if not is_dir else "directory"),
                "%s:%s" % (b["src"], b["dst"]))
        at = "/proc/self/fd/%d" % fd
        try:
            linux.mount(b["src"], at, None, linux.MS_BIND | linux.MS_REC)
        except OSError as e:
            raise errors.Error(errors.OSERR, "bind mount failed: %s" % e.strerror, "%s:%s" % (b["src"], b["dst"]))
        if b["ro"]:
            locked = _locked_flags(b["src"])   # the fd names what lies under the new mount: use the path
            try:
                linux.mount(None, target, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | locked)
            except OSError as e:
                raise errors.Error(errors.OSERR, "read-only remount failed: %s" % e.strerror,
                                   "%s:%s" % (b["src"], b["dst"]))
    finally:
        os.close(fd)


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
    with open("/proc/self/mountinfo") as f:
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


def _make_mount_point(root, target, is_dir, b):
    """Create a missing destination, but only on the image's writable layer:
    never on a host filesystem bound earlier, never on the read-only image."""
    root_dev = os.stat(root).st_dev
    missing = []
    parent = target
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    where = "%s:%s" % (b["src"], b["dst"])
    if os.stat(parent).st_dev != root_dev:
        raise errors.Error(errors.USAGE, "bind destination does not exist and would have to be created on a "
                           "host filesystem", where)
    try:
        for p in reversed(missing[1:]):
            os.mkdir(p, 0o755)
        if is_dir:
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    except OSError as e:
        raise errors.Error(errors.USAGE, "bind destination does not exist in the image and cannot be created "
                           "(%s)" % e.strerror, where)


def _locked_flags(path):
    """Flags a user namespace may not clear on remount (nosuid, nodev, noexec, ...)."""
    f = os.statvfs(path).f_flag
    out = 0
    for st_flag, ms_flag in ((os.ST_NOSUID, linux.MS_NOSUID), (os.ST_NODEV, linux.MS_NODEV),
                             (os.ST_NOEXEC, linux.MS_NOEXEC)):
        if f & st_flag:
            out |= ms_flag
    return out
