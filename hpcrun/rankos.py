"""os for the rank's path, without importing os.

`import os` costs a joining rank ~4.5 M instructions (~1 ms of CPU), 2.7 M of them in
_collections_abc, which os imports for os.environ.  The rank's modules import this instead,
as `from hpcrun import rankos as os`, and use it as they would use os:
  - the system calls are posix's own functions, the very objects os re-exports;
  - os.path's functions a launch calls, as posixpath has them (same algorithms, same
    system calls): join, split, dirname, basename, isabs, normpath, abspath, realpath,
    exists, isfile, isdir;
  - the environment, read and changed in posix.environ, the bytes dict that os.environ
    wraps (an os imported later sees every change): getenv, setenv, unsetenv, environ_dict;
  - anything else (os.environ, makedirs, fdopen, devnull, another os.path function)
    is os's own: os is imported then, on paths a joining rank does not take.
ticket.Recorder wraps the file-system calls here as it wraps os's: call them as
os.stat(...) (this module's attribute), never bound to another name, or a recording
would miss what they observe.
"""
import posix
import sys
# posix's functions the rank's modules call, by name (`from posix import *` costs ~0.2 M instructions);
# another is os's (__getattr__): no error, only os's import.  Never posix.environ: bytes, not os.environ's str.
from posix import (F_OK, O_APPEND, O_CLOEXEC, O_CREAT, O_DIRECTORY, O_EXCL, O_NOCTTY, O_NOFOLLOW,  # noqa: F401
                   O_NONBLOCK, O_RDONLY, O_RDWR, O_TRUNC, O_WRONLY, R_OK, W_OK, X_OK, _exit, access, chdir, chmod,
                   close, closerange, dup, dup2, execv, execve, fork, fspath, fstat, fsync, getcwd, getcwdb, getgid,
                   getgroups, getpid, getuid, kill, listdir, lseek, lstat, mkdir, open, pipe, pread, putenv, read,
                   readlink, rename, rmdir, scandir, set_blocking, set_inheritable, setsid, stat, strerror, sysconf,
                   umask, unlink, waitpid, write)

sep, curdir, pardir, extsep, pathsep = "/", ".", "..", ".", ":"
defpath = "/bin:/usr/bin"
devnull = "/dev/null"
_ENCODING, _ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


def __getattr__(name):
    """The rest of os, from os itself (imported on first use)."""
    import os
    return getattr(os, name)


def fsencode(name):
    name = fspath(name)
    return name.encode(_ENCODING, _ERRORS) if isinstance(name, str) else name


def fsdecode(name):
    name = fspath(name)
    return name.decode(_ENCODING, _ERRORS) if isinstance(name, bytes) else name


# --- the environment (posix.environ: the environment this process started with, as os.environ's data) ---

def getenv(name, default=None):
    value = posix.environ.get(fsencode(name))
    return default if value is None else fsdecode(value)


def setenv(name, value):
    key, value = fsencode(name), fsencode(value)
    putenv(key, value)
    posix.environ[key] = value


def unsetenv(name):
    key = fsencode(name)
    posix.unsetenv(key)
    posix.environ.pop(key, None)


def environ_dict():
    """The environment as os.environ would hand it out, decoded once, as a plain dict."""
    return {k.decode(_ENCODING, _ERRORS): v.decode(_ENCODING, _ERRORS) for k, v in posix.environ.items()}


# --- os.path (posixpath's code for str and bytes, with this module's stat, lstat, readlink, getcwd) ---

class _Path:
    """os.path's functions for the rank; any other from posixpath itself."""

    def __getattr__(self, name):
        import posixpath
        return getattr(posixpath, name)

    @staticmethod
    def isabs(s):
        s = fspath(s)
        return s.startswith("/" if isinstance(s, str) else b"/")

    @staticmethod
    def join(a, *p):
        a = fspath(a)
        sep = "/" if isinstance(a, str) else b"/"
        path = a
        for b in map(fspath, p):
            if b.startswith(sep):
                path = b
            elif not path or path.endswith(sep):
                path += b
            else:
                path += sep + b
        return path

    @staticmethod
    def split(p):
        p = fspath(p)
        sep = "/" if isinstance(p, str) else b"/"
        i = p.rfind(sep) + 1
        head, tail = p[:i], p[i:]
        if head and head != sep * len(head):
            head = head.rstrip(sep)
        return head, tail

    @staticmethod
    def dirname(p):
        return path.split(p)[0]

    @staticmethod
    def basename(p):
        p = fspath(p)
        return p[p.rfind("/" if isinstance(p, str) else b"/") + 1:]

    @staticmethod
    def normpath(p):
        p = fspath(p)
        if not hasattr(posix, "_path_normpath"):                    # before Python 3.11
            import posixpath
            return posixpath.normpath(p)
        if isinstance(p, bytes):
            return fsencode(posix._path_normpath(fsdecode(p))) or b"."
        return posix._path_normpath(p) or "."

    @staticmethod
    def abspath(p):
        p = fspath(p)
        if not path.isabs(p):
            p = path.join(getcwd() if isinstance(p, str) else getcwdb(), p)
        return path.normpath(p)

    @staticmethod
    def exists(p):
        try:
            stat(p)
        except (OSError, ValueError):
            return False
        return True

    @staticmethod
    def isfile(p):
        return _is_type(p, 0o100000)                       # S_ISREG

    @staticmethod
    def isdir(p):
        return _is_type(p, 0o040000)                       # S_ISDIR

    @staticmethod
    def realpath(filename):
        """posixpath.realpath(filename) (strict=False): each component lstat'ed, links read."""
        filename = fspath(filename)
        p, _ = _joinrealpath(filename[:0], filename, {})
        return path.abspath(p)


def _is_type(p, file_type):
    """stat(p) (this module's: the recorder sees it) says file_type; False where it fails."""
    try:
        return stat(p).st_mode & 0o170000 == file_type
    except (OSError, ValueError):
        return False


def _joinrealpath(p, rest, seen):
    """posixpath._joinrealpath, not strict."""
    if isinstance(p, bytes):
        sep, cur, par = b"/", b".", b".."
    else:
        sep, cur, par = "/", ".", ".."
    if path.isabs(rest):
        rest = rest[1:]
        p = sep
    while rest:
        name, _, rest = rest.partition(sep)
        if not name or name == cur:
            continue
        if name == par:
            if p:
                p, name = path.split(p)
                if name == par:
                    p = path.join(p, par, par)
            else:
                p = par
            continue
        newpath = path.join(p, name)
        try:
            is_link = lstat(newpath).st_mode & 0o170000 == 0o120000  # S_ISLNK
        except OSError:
            is_link = False
        if not is_link:
            p = newpath
            continue
        if newpath in seen:
            p = seen[newpath]
            if p is not None:
                continue
            return path.join(newpath, rest), False          # a loop: the rest as it is
        seen[newpath] = None
        p, ok = _joinrealpath(p, readlink(newpath), seen)
        if not ok:
            return path.join(p, rest), False
        seen[newpath] = p
    return p, True


path = _Path()
