"""Node-local storage for a fake Slurm node: a mount namespace of its own with
its own tmpfs on /tmp and /dev/shm, the "shared file system" paths bound back in.

    python3 nodens.py --name LABEL --size 1g --shared DIR [--shared DIR ...] -- slurmd -D -N n1 ...
        becomes the command (exec) in a new private mount namespace;
    python3 nodens.py --join PID --shared DIR
        makes DIR (a host path, e.g. a file system mounted after the node started)
        visible at the same path in the namespace of process PID.

Run as root by testbed/cluster.py.  Nothing is mounted on the host: the
tmpfs mounts live only in the node's namespace and go when its last process
(slurmd, its slurmstepds and their tasks) exits.  Standard library only
(ctypes for unshare/mount/open_tree/move_mount, which Python 3.11 lacks).
"""
import argparse
import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 1 << 18
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, 0o2000000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429      # the same number on every architecture since 5.2

COVERED = ("/tmp", "/dev/shm")

libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, "%s: %s" % (what, os.strerror(e)))
    return ret


def mount(source, target, fstype, flags, data=None):
    enc = (lambda s: None if s is None else os.fsencode(s))
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           "mount %s on %s" % (source, target))


def covered(path):
    return any(path == top or path.startswith(top + "/") for top in COVERED)


def start(name, size, shared, argv):
    _check(libc.unshare(CLONE_NEWNS), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Hold the shared paths by descriptor: the tmpfs on /tmp is about to cover them.
    held = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in map(os.path.abspath, shared)
            if covered(p)]
    for top in COVERED:   # the source name finds this node's mounts in any mountinfo
        mount(name, top, "tmpfs", 0, "mode=1777,size=%s" % size)
    for path, fd in held:
        os.makedirs(path, mode=0o755, exist_ok=True)
        mount("/proc/self/fd/%d" % fd, path, None, MS_BIND | MS_REC)
        os.close(fd)
    os.chdir("/")
    os.execvp(argv[0], argv)


def join(pid, shared):
    """Clone the host's tree at each path and attach it in PID's mount namespace."""
    trees = [(p, _check(libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(p),
                                     OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE), "open_tree " + p))
             for p in shared]
    ns = os.open("/proc/%d/ns/mnt" % pid, os.O_RDONLY)
    _check(libc.setns(ns, CLONE_NEWNS), "setns")
    for path, fd in trees:
        os.makedirs(path, mode=0o755, exist_ok=True)
        _check(libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(path), MOVE_MOUNT_F_EMPTY_PATH),
               "move_mount " + path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name")
    ap.add_argument("--size", default="1g")
    ap.add_argument("--shared", action="append", default=[])
    ap.add_argument("--join", type=int)
    ap.add_argument("argv", nargs="*")
    a = ap.parse_args()
    if a.join:
        join(a.join, a.shared)
    else:
        start(a.name, a.size, a.shared, a.argv)


if __name__ == "__main__":
    sys.exit(main())
