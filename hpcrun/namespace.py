"""One container per node: the keeper, and how every rank joins it.

Ranks of a job step on a node must share one user namespace (else Open MPI
loses its single-copy CMA path: "not available due to different user
namespaces") and should share one mount (else N ranks make N mounts).  So:

  join(plan):
    lock  run_dir/<key>.lock  shared            (many ranks join at once)
    if run_dir/<key>.pid names a live keeper:  setns() into its namespaces
    else: relock exclusive, re-check, fork a keeper, wait until it is ready,
          then setns() into its namespaces
    unlock; return inside the container (root and cwd at its /)

  keeper (double-forked, setsid, so the rank that started it can exec and
  exit without taking it along, and never sees it as a child):
    unshare(user+mount) (mount only as root), map uid/gid to themselves,
    mount the image (stage.py), overlay a tmpfs for mount points, write
    passwd/group, make the binds, remount the root read-only, pivot_root,
    write its record, tell the creator "ready", then wait; every second it
    looks for processes in its mount namespace, and once none has been seen
    for `linger` seconds it takes the lock exclusively (no join can be half
    done then), removes its record and exits; its mounts go with it.

A keeper that dies (killed) leaves a record naming a dead PID: the next rank
sees that (PID and start time both checked) and starts a new one.  A rank that
dies mid-join holds nothing but a lock fd, which the kernel releases.
"""
import fcntl
import os
import time

from hpcrun import errors

NS_FILES = ("user", "mnt")
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000


# ------------------------------------------------------------------ join ---

def run_dir_path(cfg, uid):
    return cfg.get("run_dir", "/tmp/hpcrun-%u").replace("%u", str(uid))


def open_run_dir(path, uid):
    """Our node-local state directory; refuse one another user could tamper with."""
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if not os.path.isdir(parent):
                os.makedirs(parent, 0o755, exist_ok=True)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            continue
        except OSError as e:
            raise errors.Error(errors.OSERR, "cannot open hpcrun's run directory: %s" % e.strerror, path)
        st = os.fstat(fd)
        if st.st_uid != uid or st.st_mode & 0o022:
            os.close(fd)
            raise errors.Error(errors.NOPERM, "run directory is not private to this user "
                               "(owner %d, mode %o)" % (st.st_uid, st.st_mode & 0o7777), path)
        return fd
    raise errors.Error(errors.OSERR, "cannot create hpcrun's run directory", path)


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


def _keeper_pid(dir_fd, key):
    """The live keeper's PID from its record, or None."""
    try:
        fd = os.open(key + ".pid", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, 128).split()
    finally:
        os.close(fd)
    if len(data) != 2:
        return None
    pid, start = int(data[0]), data[1]
    if _start_time(pid) != start:
        return None           # dead, or its PID was reused
    return pid


def _start_time(pid):
    """/proc/PID/stat's start time, or None for a dead process.  A zombie
    still has its stat (until init reaps it, which can take seconds) but no
    namespaces left to join: dead too."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return fields[19]


def linger_seconds(cfg):
    """How long a node's container outlives its last process; checked by the
    rank, before any keeper exists, so a bad value is a config error."""
    raw = os.environ.get("HPCRUN_LINGER") or cfg.get("linger", "10")
    try:
        value = float(raw)
        if not 0 <= value < 1e9:
            raise ValueError
    except ValueError:
        where = "HPCRUN_LINGER" if os.environ.get("HPCRUN_LINGER") else "linger in the config"
        raise errors.Error(errors.CONFIG, "linger must be a number of seconds (%s)" % where, raw)
    return value


def join(plan, cfg, timing):
    from hpcrun import rankcalls
    uid = plan["uid"]
    run_dir = run_dir_path(cfg, uid)
    dir_fd = open_run_dir(run_dir, uid)
    key = plan["key"]
    lock = lock_current(dir_fd, key + ".lock", fcntl.LOCK_SH)
    try:
        pid = _keeper_pid(dir_fd, key)
        fds = _namespaces(pid)
        if fds is None:                 # none yet, or it just died: start one
            os.close(lock)
            lock = lock_current(dir_fd, key + ".lock", fcntl.LOCK_EX)
            pid = _keeper_pid(dir_fd, key)
            fds = _namespaces(pid)
            if fds is None:
                linger = linger_seconds(cfg)
                try:
                    pid = _start_keeper(plan, cfg, dir_fd, run_dir, linger)
                except BaseException:
                    _remove(dir_fd, key + ".lock")   # we hold it exclusively: nobody is inside
                    raise
                timing.append(("keeper", None))
                fds = _namespaces(pid)
                if fds is None:
                    raise errors.Error(errors.OSERR, "the node's container exited right after it started",
                                       "pid %d" % pid)
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


def _namespaces(pid):
    """Open the keeper's namespace files, or None if it is gone (they pin the
    namespaces from here on, even if it exits now)."""
    if pid is None:
        return None
    fds = []
    try:
        for ns in NS_FILES:
            fds.append(os.open("/proc/%d/ns/%s" % (pid, ns), os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        for fd in fds:
            os.close(fd)
        return None
    return fds


# ---------------------------------------------------------------- keeper ---

def _start_keeper(plan, cfg, dir_fd, run_dir, linger):
    """Fork the keeper (double fork) and wait for 'ready' or its error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # intermediate child
        try:
            os.close(r)
            os.setsid()
            # The keeper must hold nothing of the rank's: not its flock on
            # <key>.lock (joins and the keeper's own exit would block), not its
            # pipes (a reader of the rank's output would wait for EOF).
            keep = sorted({w, dir_fd})
            os.closerange(3, keep[0])
            if len(keep) > 1:
                os.closerange(keep[0] + 1, keep[1])
            os.closerange(keep[-1] + 1, os.sysconf("SC_OPEN_MAX"))
            if os.fork() == 0:                     # the keeper
                _keeper_main(plan, cfg, dir_fd, run_dir, w, linger)
        except BaseException:
            pass
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    msg = read_all(r)
    if msg.startswith(b"ready "):
        # "ready PID" then the keeper's warnings and notes (MPI and GPU wiring
        # is decided in there), one per line: only this creating rank says them.
        lines = msg.decode(errors="replace").split("\n")
        said = {"W": [], "N": []}
        for line in lines[1:]:
            kind, _, text = line.partition(" ")
            said.get(kind, said["N"]).append(text)
        plan["warnings"], plan["notes"] = said["W"], said["N"]      # the keeper's copy has ours too
        return int(lines[0].split()[1])
    if msg.startswith(b"error "):
        _, code, text = msg.decode(errors="replace").split(" ", 2)
        what, _, subject = text.partition("\0")
        raise errors.Error(int(code), what, subject or None)
    raise errors.Error(errors.OSERR, "the node's container keeper failed to start", run_dir)


def _keeper_main(plan, cfg, dir_fd, run_dir, ready_w, linger):
    """Runs in the keeper process; never returns."""
    import signal
    code = 0
    st = None
    try:
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN if sig != signal.SIGTERM else signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        with open("/proc/self/comm", "w") as f:
            f.write("hpcrun-keeper")
        # Everything the keeper will ever import must be imported now: after
        # pivot_root its / is the image, without this Python's library.
        from hpcrun import rootfs, stage  # noqa: F401
        # Before the build: after pivot_root there may be no /proc.
        record = "%d %s\n" % (os.getpid(), _start_time(os.getpid()).decode())
        proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        st = rootfs.build(plan, cfg, dir_fd, run_dir)
        tmp = plan["key"] + ".pid.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        os.write(fd, record.encode())
        os.close(fd)
        os.rename(tmp, plan["key"] + ".pid", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        said = ["W " + w for w in plan.get("warnings", [])] + ["N " + n for n in plan.get("notes", [])]
        os.write(ready_w, "\n".join(["ready %d" % os.getpid()] + [x.replace("\n", " ") for x in said]).encode())
        os.close(ready_w)
        ready_w = None
        _wait_for_last_user(plan, dir_fd, st, linger, proc_fd)
    except errors.Error as e:
        code = 1
        if ready_w is not None:
            os.write(ready_w, ("error %d %s\0%s" % (e.code, e.what, e.subject or "")).encode())
    except BaseException as e:  # report anything, never leave the creator waiting
        code = 1
        if ready_w is not None:
            os.write(ready_w, ("error %d keeper failed: %s\0" % (errors.OSERR, e)).encode())
    finally:
        if st is not None:
            stage.release(st.stage, dir_fd)
        _remove(dir_fd, plan["key"] + ".d", rmdir=True)
        os._exit(code)


def _users_inside(proc_fd, me, skip):
    """PIDs other than ours and our helpers whose mount namespace is ours.
    proc_fd is the host's /proc, opened before pivot_root: the container may
    have no /proc of its own (default_binds = no)."""
    try:
        mine = os.readlink("self/ns/mnt", dir_fd=proc_fd)
    except OSError:
        return True
    for name in os.listdir(proc_fd):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == me or pid in skip:
            continue
        try:
            if os.readlink(name + "/ns/mnt", dir_fd=proc_fd) == mine:
                return True
        except OSError:
            continue
    return False


def _wait_for_last_user(plan, dir_fd, st, linger, proc_fd):
    me = os.getpid()
    skip = {p.pid for p in st.stage.children}
    idle_since = time.monotonic()
    while True:
        time.sleep(0.2 if linger < 2 else 1.0)
        if _users_inside(proc_fd, me, skip):
            idle_since = time.monotonic()
            continue
        if time.monotonic() - idle_since < linger:
            continue
        lock = None
        try:
            lock = os.open(plan["key"] + ".lock", os.O_RDWR | os.O_CLOEXEC, dir_fd=dir_fd)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if lock is not None:
                os.close(lock)
            continue                     # a rank is joining right now
        try:
            if _users_inside(proc_fd, me, skip):
                idle_since = time.monotonic()
                continue
            _remove(dir_fd, plan["key"] + ".pid")
            _remove(dir_fd, plan["key"] + ".lock")
            return
        finally:
            os.close(lock)


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


def _remove(dir_fd, name, rmdir=False):
    try:
        if rmdir:
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
