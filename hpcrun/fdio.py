"""Small descriptor-level helpers shared by the rank's join, the keeper and the
stager: locks on files a departing owner may unlink, reading a pipe to its
end, quiet removal, reading a file an image supplies without blocking.

The bottom floor: imports only os and fcntl (both loaded on the launch path
anyway), never another hpcrun module.
"""
import fcntl
from hpcrun import rankos as os     # os without its import cost (rankos.py)
import _stat as stat     # stat.py's C half, all of it a rank uses (stat.py: ~0.2 M instructions more)


def lock_current(dir_fd, name, mode):
    """flock a lock file that may be unlinked by a departing keeper (or stager):
    retry until the file we locked is the one the name points to."""
    while True:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        fcntl.flock(fd, mode)
        try:
            if os.stat(name, dir_fd=dir_fd).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def read_all(fd):
    """Everything until EOF from a pipe, which is then closed."""
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def remove(dir_fd, name, rmdir=False):
    """unlink (or rmdir) name under dir_fd; gone already is fine."""
    try:
        if rmdir:
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass



def read_regular(path, dir_fd=None, limit=16 << 20):
    """The bytes of a regular file, or None when it is missing or anything
    else (FIFO, device, socket, directory).  Opened O_NONBLOCK so a FIFO an
    image planted cannot stop the reader in open(2), then fstat'ed; files
    larger than `limit` are refused too.  Used inside the container, where
    following a link cannot lead anywhere the program could not go itself;
    stat'ed first, so a link to a device (/dev/watchdog) is never opened."""
    try:
        if not stat.S_ISREG(os.stat(path, dir_fd=dir_fd).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=dir_fd)
    except OSError:
        return None
    return read_regular_fd(fd, limit)


def read_regular_fd(fd, limit=16 << 20):
    """The bytes behind fd (opened O_NONBLOCK) if it is a regular file of at
    most `limit` bytes, else None; fd is closed."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)


def open_regular(path):
    """open(path, "rb") for a file an image may have planted: O_NONBLOCK so a
    FIFO cannot stop us in open(2), and anything but a regular file refused
    (OSError; IsADirectoryError for a directory, as open() says)."""
    import errno
    mode = os.stat(path).st_mode                # a device is never opened (a link to /dev/watchdog)
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise OSError(errno.EINVAL, "not a regular file", path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
