"""The rank's step into the node's container: the thin top of the launch.

  join(plan):
    lock  run_dir/<key>.lock  shared            (many ranks join at once)
    if run_dir/<key>.pid names a live keeper:  setns() into its namespaces
    else: relock exclusive, re-check, start a keeper (node.py), wait until it
          is ready, then setns() into its namespaces
    unlock; return inside the container (root and cwd at its /)

A rank that dies mid-join holds nothing but a lock fd, which the kernel
releases.  Right before setns the import system is sealed: from then on
every path is the image's, and no byte of the image may run inside hpcrun
(which holds the namespace's capabilities until execve).  What the rest of
the launch needs (json for `run`, traceback for --debug) is imported first.
Only setns(2) is called here (rankcalls.py, no ctypes); everything else a
container needs is the keeper's work, once per node.
"""
import fcntl
from hpcrun import rankos as os     # os without its import cost (rankos.py)

from hpcrun import errors, fdio, node

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000


def join(plan, cfg, timing, rec=None):
    from hpcrun import rankcalls
    uid = plan["uid"]
    run_dir = node.run_dir_path(cfg, uid)
    dir_fd = node.open_run_dir(run_dir, uid)
    key = plan["key"]
    lock = fdio.lock_current(dir_fd, key + ".lock", fcntl.LOCK_SH)
    try:
        pid = node.find(dir_fd, key)
        fds = node.namespaces(pid)
        if fds is None:                 # none yet, or it just died: start one
            os.close(lock)
            lock = fdio.lock_current(dir_fd, key + ".lock", fcntl.LOCK_EX)
            pid = node.find(dir_fd, key)
            fds = node.namespaces(pid)
            if fds is None:
                linger = node.linger_seconds(cfg)
                try:
                    pid = node.start(plan, cfg, dir_fd, run_dir, linger)
                except BaseException:
                    fdio.remove(dir_fd, key + ".lock")   # we hold it exclusively: nobody is inside
                    raise
                timing.append(("keeper", None))
                fds = node.namespaces(pid)
                if fds is None:
                    raise errors.Error(errors.OSERR, "the node's container exited right after it started",
                                       "pid %d" % pid)
        if rec is not None:                     # ticket.py: the keeper this launch joins
            rec.joined(key, pid, node.start_time(pid), plan["userns"], dir_fd, run_dir, uid)
        seal_imports()
        try:
            if plan["userns"]:
                rankcalls.setns(fds[0], CLONE_NEWUSER)
            rankcalls.setns(fds[1], CLONE_NEWNS)
        except OSError as e:
            raise errors.Error(errors.OSERR, "cannot join the node's container: %s" % e.strerror, "pid %d" % pid)
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        os.close(lock)
        os.close(dir_fd)


def seal_imports():
    """Keep only the built-in and frozen importers: an import after the join
    finds what sys.modules already holds, or fails; it never loads a file
    (the image's /usr/lib/python3.11/..., encodings/, a planted hpcrun/)."""
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", None) in ("BuiltinImporter",
                                                                                     "FrozenImporter")]
    sys.path_hooks[:] = []
    sys.path_importer_cache.clear()
    sys.path[:] = []
