"""The staged root filesystem of an image being built.

Files are hard-linked from the host where possible (same filesystem) and
copied otherwise; nothing in the staged tree is ever written in place, since
a hard link shares the host file.  Every write resolves its path inside the
staged root with chroot semantics (inside()), so a symlink in a base image
such as /lib64 -> /lib can never send a write to the host.
"""
import errno
import fnmatch
import os
import shutil
import stat

from hpcrun import errors

APP = "/app"          # where the spec's relative paths land


class Tree:
    def __init__(self, root, spec_dir=None, log=None, exclude=()):
        self.root = root
        self.spec_dir = spec_dir
        self.log = log or (lambda line: None)
        self.exclude = list(exclude)     # the spec's %exclude globs (image paths)
        self.why = {}            # image path -> reason it is in the image
        self.host = {}           # image path -> host path it came from (regular files)
        self.specials = []       # device nodes, FIFOs, sockets left out (image paths)
        self.warned = set()      # image paths a warning line was printed for

    def excluded(self, image_path):
        """Whether a %exclude glob matches image_path or a directory above it."""
        if not self.exclude:
            return False
        parts = image_path.rstrip("/").split("/")
        for i in range(2, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if any(fnmatch.fnmatchcase(prefix, g) for g in self.exclude):
                return True
        return False

    def image_path(self, host_path):
        """Where a host path lives in the image: under the spec's directory -> /app."""
        if self.spec_dir and self.spec_dir != "/" and (host_path + "/").startswith(self.spec_dir + "/"):
            return os.path.normpath(APP + "/" + os.path.relpath(host_path, self.spec_dir))
        return host_path

    def add(self, host_path, why, image_path=None):
        """Add a host file (following and recording its symlink chain); return its real host path."""
        host_path = os.path.normpath(os.path.abspath(host_path))
        if image_path is not None:
            real = _realpath_checked(host_path)
            self._put_file(real, image_path, why)
            return real
        real = self._walk(host_path, why, 0)
        if os.path.isdir(real):
            self.mkdir(self.image_path(real), why)
        else:
            self._put_file(real, self.image_path(real), why)
        return real

    def add_tree(self, host_dir, why, skip=lambda path: False):
        """Add a whole host directory (packages with their data files).  skip(host path)
        leaves a file or directory out; device nodes, FIFOs and sockets are never
        opened (special())."""
        real = self.add(host_dir, why)
        for top, dirs, files in os.walk(real):
            dirs[:] = [d for d in dirs if not skip(os.path.join(top, d))
                       and not self.excluded(self.image_path(os.path.join(top, d)))]
            for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
                path = os.path.join(top, name)
                if skip(path):
                    continue
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode) or stat.S_ISREG(st.st_mode):
                    self.add(path, why)
                else:
                    self.special(self.image_path(path), st.st_mode, st.st_rdev, st.st_mtime_ns, why)
            for d in dirs:
                self.mkdir(self.image_path(os.path.join(top, d)), why)

    def special(self, image_path, mode, rdev, mtime_ns, why):
        """A device node, FIFO or socket: recreated (as root, where mknod works),
        otherwise left out and listed in the build's one note.  Never opened."""
        if self.excluded(image_path):
            return
        self.specials.append(image_path)
        if os.geteuid() != 0:
            return
        dst = inside(self.root, image_path)
        _unlink(dst)
        try:
            os.mknod(dst, mode, rdev)
        except OSError:
            return
        os.utime(dst, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        self.specials.pop()
        self._note(image_path, why)

    def specials_note(self):
        """The one line for what special() left out, or None."""
        if not self.specials:
            return None
        shown = ", ".join(self.specials[:4]) + (" ..." if len(self.specials) > 4 else "")
        return ("note: left out %d device node(s), FIFO(s) or socket(s) (recreating them needs root; "
                "the launcher provides /dev): %s" % (len(self.specials), shown))

    def has(self, image_path):
        return image_path in self.why

    def mkdir(self, image_path, why=None, mode=0o755):
        if why and self.excluded(image_path):
            return
        dst = inside(self.root, image_path, follow_last=True)
        if not os.path.lexists(dst):
            os.mkdir(dst, mode)
            os.chmod(dst, mode)
            if why:
                self.why.setdefault(image_path, why)

    def write(self, image_path, content, why, mode=0o644):
        dst = inside(self.root, image_path)
        _unlink(dst)
        with open(dst, "w") as f:
            f.write(content)
        os.chmod(dst, mode)
        self._note(image_path, why)

    def symlink(self, image_path, target, why):
        if self.excluded(image_path):
            return
        dst = inside(self.root, image_path)
        if os.path.lexists(dst):
            if os.path.islink(dst) and os.readlink(dst) == target:
                return
            if os.path.isdir(dst) and not os.path.islink(dst):
                return          # the base has a real directory here: keep it
            os.unlink(dst)
        os.symlink(target, dst)
        self._note(image_path, why)

    def _put_file(self, real, image_path, why):
        if image_path in self.host and self.host[image_path] == real:
            return
        if self.excluded(image_path):
            return
        try:
            st = os.stat(real)
        except OSError as e:
            raise errors.Error(errors.NOINPUT, "cannot read %s: %s" % (real, e.strerror), why)
        if not stat.S_ISREG(st.st_mode):
            raise errors.Error(errors.DATA, "not a regular file or directory", real)
        if not os.access(real, os.R_OK):
            raise errors.Error(errors.NOINPUT, "file not readable", real)
        dst = inside(self.root, image_path)
        _unlink(dst)
        try:
            os.link(real, dst)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK):
                raise
            shutil.copy2(real, dst)          # copy2: mtimes kept, so .pyc files stay valid
        self.host[image_path] = real
        self._note(image_path, why)

    def _note(self, image_path, why):
        if image_path not in self.why:
            self.why[image_path] = why
            self.log("+ %s  (%s)" % (image_path, why))

    def _walk(self, path, why, depth):
        """realpath(), recording in the image each symlink met on the way."""
        if depth > 40:
            raise errors.Error(errors.DATA, "too many levels of symbolic links", path)
        cur = "/"
        parts = [p for p in path.split("/") if p]
        for i, part in enumerate(parts):
            nxt = os.path.join(cur, part)
            if os.path.islink(nxt):
                target = os.readlink(nxt)
                link_at = self.image_path(nxt)
                if os.path.isabs(target):
                    self.symlink(link_at, self.image_path(os.path.normpath(target)), why)
                    dest = os.path.normpath(target)
                else:
                    self.symlink(link_at, target, why)
                    dest = os.path.normpath(os.path.join(cur, target))
                cur = self._walk(dest, why, depth + 1)
            elif not os.path.lexists(nxt):
                raise errors.Error(errors.NOINPUT, "file not found: %s" % nxt, why)
            else:
                cur = nxt
                if i < len(parts) - 1:
                    self.mkdir(self.image_path(cur))
        return cur


def exists(root, image_path):
    """Whether image_path exists in the staged root (symlinks followed inside it)."""
    try:
        return os.path.exists(inside(root, image_path, follow_last=True, create=False))
    except (errors.Error, FileNotFoundError):
        return False


def inside(root, image_path, follow_last=False, create=True):
    """The host path of image_path inside root, resolving symlinks as a chroot
    would and creating missing parent directories.  The last component is not
    followed unless follow_last (it is the thing about to be written).
    With create=False a missing directory raises FileNotFoundError instead."""
    todo = [p for p in image_path.split("/") if p]
    last = None if follow_last else (todo.pop() if todo else None)
    done = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(root, *done, part)
        if os.path.islink(here):
            hops += 1
            if hops > 40:
                raise errors.Error(errors.DATA, "too many levels of symbolic links in the image", image_path)
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p] + todo
            continue
        if not os.path.lexists(here):
            if not create:
                raise FileNotFoundError(image_path)
            os.mkdir(here, 0o755)
        elif not os.path.isdir(here):
            raise errors.Error(errors.DATA, "not a directory in the image: /%s" % "/".join(done + [part]),
                               image_path)
        done.append(part)
    if last is None:
        return os.path.join(root, *done)
    if last == "..":
        raise errors.Error(errors.DATA, "bad path in the image", image_path)
    return os.path.join(root, *done, last)


def _realpath_checked(path):
    if not os.path.lexists(path):
        raise errors.Error(errors.NOINPUT, "file not found", path)
    return os.path.realpath(path)


def _unlink(path):
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        raise errors.Error(errors.DATA, "a directory is in the way in the image", path)
