"""The few Linux system calls Python 3.11's os module lacks, through ctypes.

ctypes costs ~2 ms to import, so only the launch path that needs a syscall
imports this module.
"""
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
CAP_SYS_ADMIN = 21

_SYS_pivot_root = {"x86_64": 155, "aarch64": 41, "ppc64le": 203}.get(os.uname().machine, 155)
_SYS_capget = {"x86_64": 125, "aarch64": 90, "ppc64le": 183}.get(os.uname().machine, 125)
_SYS_capset = {"x86_64": 126, "aarch64": 91, "ppc64le": 184}.get(os.uname().machine, 126)
# The same numbers on every architecture (the unified syscall table, Linux >= 5.x).
_SYS_openat2 = 437
_SYS_mount_setattr = 442

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
MOUNT_ATTR_RDONLY = 0x1


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(rc, what, path=None):
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, "%s: %s" % (what, os.strerror(e)), path)


def _b(s):
    return os.fsencode(s) if isinstance(s, str) else s      # paths need not be UTF-8


def mount(source, target, fstype, flags=0, data=None):
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount", target)


def umount2(target, flags=0):
    _check(_libc.umount2(_b(target), flags), "umount", target)


def unshare(flags):
    _check(_libc.unshare(flags), "unshare")


def setns(fd, nstype):
    _check(_libc.setns(fd, nstype), "setns")


def pivot_root(new_root, put_old):
    _check(_libc.syscall(_SYS_pivot_root, _b(new_root), _b(put_old)), "pivot_root", new_root)


def prctl(option, arg2=0, arg3=0, arg4=0, arg5=0):
    _check(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                       ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)), "prctl")


def no_new_privs():
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def raise_ambient(cap):
    """Keep `cap` across execve for a non-root uid: needed so squashfuse, run
    inside our user namespace, may call mount(2) itself (libfuse otherwise
    falls back to the setuid fusermount, which cannot work in a user namespace)."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(_libc.syscall(_SYS_capget, header, data), "capget")
    data[2 if cap < 32 else 5] |= 1 << (cap % 32)     # {eff, perm, inh} x 2 words
    _check(_libc.syscall(_SYS_capset, header, data), "capset")
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


def openat2(dir_fd, path, flags, resolve, mode=0):
    """openat2(2): open path relative to dir_fd under the RESOLVE_* rules.
    OSError(ENOSYS) on kernels before 5.6."""
    how = _OpenHow(flags, mode, resolve)
    fd = _libc.syscall(_SYS_openat2, ctypes.c_int(dir_fd), _b(path), ctypes.byref(how), ctypes.sizeof(how))
    _check(fd, "openat2", path)
    return fd


def mount_setattr(fd, attr_set, recursive=True):
    """mount_setattr(2) on the mount fd refers to (AT_EMPTY_PATH), and with
    recursive on every mount below it.  OSError(ENOSYS) before Linux 5.12."""
    attr = _MountAttr(attr_set, 0, 0, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(_libc.syscall(_SYS_mount_setattr, ctypes.c_int(fd), b"", ctypes.c_uint(flags),
                         ctypes.byref(attr), ctypes.sizeof(attr)), "mount_setattr")
