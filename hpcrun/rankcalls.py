"""The two system calls every rank makes, without importing ctypes.

Each MPI rank calls setns(2) (join the node's container) and
prctl(PR_SET_NO_NEW_PRIVS) before execve.  Python 3.11's os module has
neither, and `import ctypes` costs 2-4 ms a rank (its enum-heavy Python
layer), a third of hpcrun's whole budget.  The C half, _ctypes, loads in
~0.2 ms and can call a libc function by address.  Both calls take only
small non-negative ints, which libffi passes as C int, correctly widened
for prctl's unsigned long arguments on the 64-bit ABIs we run on.

On failure (or a Python without _ctypes.call_function) the same call is
made again through linux.py's ctypes binding, which reports errno.
"""
try:
    import _ctypes
    _libc = _ctypes.dlopen(None, 0)
    _setns = _ctypes.dlsym(_libc, "setns")
    _prctl = _ctypes.dlsym(_libc, "prctl")
    _call = _ctypes.call_function
except (ImportError, AttributeError, OSError):
    _call = None

PR_SET_NO_NEW_PRIVS = 38


def setns(fd, nstype):
    if _call is None or _call(_setns, (fd, nstype)) != 0:
        from hpcrun import linux
        linux.setns(fd, nstype)


def no_new_privs():
    if _call is None or _call(_prctl, (PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) != 0:
        from hpcrun import linux
        linux.no_new_privs()
