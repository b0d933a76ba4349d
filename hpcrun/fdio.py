"""Small descriptor-level helpers shared by the rank's join, the keeper and the
stager: locks on files a departing owner may unlink, reading a pipe to its
end, quiet removal.

The bottom floor: imports only os and fcntl (both loaded on the launch path
anyway), never another hpcrun module.
"""
import fcntl
import os


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

