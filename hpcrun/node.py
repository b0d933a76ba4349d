"""The node's container: its run directory and its keeper's whole life.

Ranks of a job step on a node must share one user namespace (else Open MPI
loses its single-copy CMA path: "not available due to different user
namespaces") and should share one mount (else N ranks make N mounts).  One
*keeper* process per (user, image, mount plan) holds those namespaces; every
rank joins them (join.py).

State lives in run_dir (private to the user): <key>.lock (flock: shared while
a rank joins, exclusive to start or end a keeper), <key>.pid (the keeper's PID
and start time), <key>.d (the keeper's workspace, empty seen from the host)
and stage/ (stage.py).

The keeper's life:
  start    start(): double fork + setsid, so the rank that started it can
           exec and exit without taking it along, and never sees it as a child;
           the rank waits (with a time limit) for "ready" or the keeper's error.
  build    unshare(user+mount) (mount only as root), map uid/gid to
           themselves, a tmpfs workspace, the image mounted there (stage.py),
           the site's MPI/GPU wiring for this image, the root assembled and
           pivoted into (rootfs.py); then its record, then "ready".
  find     find(): the record's PID and start time name a live keeper.
  linger   every second it looks for processes in its mount namespace; once
           none has been seen for `linger` seconds it takes the lock
           exclusively (no join can be half done then),
  remove   removes its record and lock and exits; its mounts go with it.

A keeper that dies (killed) leaves a record naming a dead PID: find() sees
that (PID and start time both checked) and the next rank starts a new one.

Imports: errors and fdio here; stage, rootfs, linux (ctypes) and the MPI/GPU
wiring only inside the keeper, so a rank that joins loads none of them.
"""
from hpcrun import rankos as os     # os without its import cost (rankos.py)
import time

from hpcrun import errors, fdio

NS_FILES = ("user", "mnt")
READY_TIMEOUT = 120       # seconds a rank waits for a new keeper (squashfuse alone may take 30)


# ------------------------------------------------------------ run_dir ---

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
            import errno
            if e.errno in (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP):
                # another user's directory, or a link in its place: squatted
                raise errors.Error(errors.NOPERM, "run directory is not this user's own (%s)" % e.strerror, path)
            raise errors.Error(errors.OSERR, "cannot open hpcrun's run directory: %s" % e.strerror, path)
        st = os.fstat(fd)
        if st.st_uid != uid or st.st_mode & 0o022:
            os.close(fd)
            raise errors.Error(errors.NOPERM, "run directory is not private to this user "
                               "(owner %d, mode %o)" % (st.st_uid, st.st_mode & 0o7777), path)
        return fd
    raise errors.Error(errors.OSERR, "cannot create hpcrun's run directory", path)


def linger_seconds(cfg):
    """How long a node's container outlives its last process; checked by the
    rank, before any keeper exists, so a bad value is a config error."""
    raw = os.getenv("HPCRUN_LINGER") or cfg.get("linger", "10")
    try:
        value = float(raw)
        if not 0 <= value < 1e9:
            raise ValueError
    except ValueError:
        where = "HPCRUN_LINGER" if os.getenv("HPCRUN_LINGER") else "linger in the config"
        raise errors.Error(errors.CONFIG, "linger must be a number of seconds (%s)" % where, raw)
    return value


# --------------------------------------------------------------- find ---

def find(dir_fd, key):
    """The live keeper's PID from its record, or None."""
    try:
        # O_NONBLOCK: a FIFO put there (a program has the user's rights, and /tmp) reads as empty
        fd = os.open(key + ".pid", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, 128).split()
    finally:
        os.close(fd)
    if len(data) != 2:
        return None
    pid, start = int(data[0]), data[1]
    if start_time(pid) != start:
        return None           # dead, or its PID was reused
    return pid


def start_time(pid):
    """/proc/PID/stat's start time, or None for a dead process.  A zombie
    still has its stat (until init reaps it, which can take seconds) but no
    namespaces left to join: dead too."""
    try:
        fd = os.open("/proc/%d/stat" % pid, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)        # one line, well under a page, read whole (not open(): io's ~50 us)
    except OSError:
        return None
    finally:
        os.close(fd)
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return fields[19]


def namespaces(pid):
    """Open the keeper's namespace files (user, mnt), or None if it is gone
    (they pin the namespaces from here on, even if it exits now)."""
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


# -------------------------------------------------------------- start ---

def start(plan, cfg, dir_fd, run_dir, linger):
    """Fork the keeper (double fork) and wait for 'ready' or its error.
    The caller holds <key>.lock exclusively."""
    limit = ready_timeout(cfg)
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
    msg, done = _read_until(r, limit)
    keeper = None
    if msg.startswith(b"pid "):                    # the keeper's first word
        first, _, msg = msg.partition(b"\n")
        keeper = int(first.split()[1])
    if not done:
        _stop(keeper, dir_fd, plan["key"])
        raise errors.Error(errors.OSERR, "the node's container was not ready within %g s" % limit, run_dir)
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


def ready_timeout(cfg):
    """Seconds a rank waits for a new keeper to be ready (config keeper_timeout)."""
    try:
        value = float(cfg.get("keeper_timeout", READY_TIMEOUT))
        if not 0 < value < 1e9:
            raise ValueError
    except ValueError:
        raise errors.Error(errors.CONFIG, "keeper_timeout must be a positive number of seconds",
                           cfg.get("keeper_timeout"))
    return value


def _read_until(fd, limit):
    """(what the keeper wrote, whether it closed the pipe within limit
    seconds).  The pipe is closed either way."""
    import select
    deadline = time.monotonic() + limit
    chunks = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return b"".join(chunks), False
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
    finally:
        os.close(fd)


def _stop(keeper, dir_fd, key):
    """A keeper that did not get ready in time: kill it (its squashfuse dies
    with it, PR_SET_PDEATHSIG; its mounts go with its namespace) and remove
    what it left in run_dir.  The caller removes the lock."""
    import signal
    if keeper is not None:
        try:
            os.kill(keeper, signal.SIGKILL)
        except OSError:
            pass
        deadline = time.monotonic() + 10
        while start_time(keeper) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
    fdio.remove(dir_fd, key + ".pid.tmp")
    fdio.remove(dir_fd, key + ".pid")
    fdio.remove(dir_fd, key + ".d", rmdir=True)


# -------------------------------------------------------------- build ---

def _keeper_main(plan, cfg, dir_fd, run_dir, ready_w, linger):
    """Runs in the keeper process; never returns."""
    import gc
    import signal
    import sys
    gc.enable()                         # it lingers (the installed entry turned the collector off: entry.py)
    code = 0
    st = None
    lingered = False
    try:
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN if sig != signal.SIGTERM else signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.write(ready_w, b"pid %d\n" % os.getpid())     # so a rank that stops waiting can stop us
        with open("/proc/self/comm", "w") as f:
            f.write("hpcrun-keeper")
        # Everything the keeper will ever import must be imported now: after
        # pivot_root its / is the image, without this Python's library.
        from hpcrun import linux, rootfs, stage  # noqa: F401
        # Before the build: after pivot_root there may be no /proc.
        record = "%d %s\n" % (os.getpid(), start_time(os.getpid()).decode())
        proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        st = _build(plan, cfg, dir_fd, run_dir, proc_fd)
        tmp = plan["key"] + ".pid.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        os.write(fd, record.encode())
        os.close(fd)
        os.rename(tmp, plan["key"] + ".pid", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        said = ["W " + w for w in plan.get("warnings", [])] + ["N " + n for n in plan.get("notes", [])]
        os.write(ready_w, "\n".join(["ready %d" % os.getpid()] + [x.replace("\n", " ") for x in said]).encode(
            errors="surrogateescape"))
        os.close(ready_w)
        ready_w = None
        _linger(plan, dir_fd, st, linger, proc_fd)
        lingered = True
    except errors.Error as e:
        code = 1
        if ready_w is not None:
            msg = "error %d %s\0%s" % (e.code, e.what, e.subject or "")
            os.write(ready_w, msg.encode(errors="surrogateescape"))
    except BaseException as e:  # report anything, never leave the creator waiting
        code = 1
        if ready_w is not None:
            msg = "error %d keeper failed: %s\0" % (errors.OSERR, e)
            os.write(ready_w, msg.encode(errors="surrogateescape"))
    finally:
        if st is not None:
            stage.release(st, dir_fd)
        staging = sys.modules.get("hpcrun.stage")
        if staging is not None:         # a build that failed after staging: the copy goes too
            staging.release_all(dir_fd)
        if not lingered:    # a failed build: the rank that started us still holds the lock
            fdio.remove(dir_fd, plan["key"] + ".d", rmdir=True)
        os._exit(code)


def _build(plan, cfg, dir_fd, run_dir, proc_fd):
    """Namespaces, workspace, image, wiring, root; returns the stage.Stage
    (what must be released when the keeper ends)."""
    from hpcrun import linux, rootfs, stage
    bcast = stage.find_broadcast(plan, cfg, run_dir)      # docs/broadcast.md
    signed = cfg.getbool("require_signature")
    if signed:
        # Site policy, once per keeper (node, image identity, mount plan), before any mount.
        # A payload that will be staged is hashed as it is copied, a broadcast copy
        # before it is mounted: not read twice, nor from the shared file.  An acceptance
        # is remembered in run_dir/verified/ for the next keeper of this file.
        from hpcrun import signature
        how = stage.strategy(plan)
        staged = bool(bcast) or bool(plan["image"].get("offset")) and (
            how == "extract" or (how == "fuse" and not stage.squashfuse_has_offset()))
        signature.enforce(plan["image"], cfg, payload_checked_later=staged, cache_dir_fd=dir_fd)
        if plan["image"]["kind"] == "sif":
            bcast = None        # a SIF's signature was checked on the file, not on a broadcast copy
    uid, gid = plan["uid"], plan["gid"]
    ws = os.path.join(run_dir, plan["key"] + ".d")
    try:
        os.mkdir(plan["key"] + ".d", 0o700, dir_fd=dir_fd)
    except FileExistsError:
        pass
    try:
        if plan["userns"]:
            linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS)
            _map_ids(uid, gid)
        else:
            linux.unshare(linux.CLONE_NEWNS)
    except OSError as e:
        if plan["userns"]:
            raise errors.Error(errors.UNAVAILABLE, "user namespaces are disabled on this host (%s); "
                               "ask the administrator to enable them" % e.strerror,
                               "kernel.unprivileged_userns_clone / user.max_user_namespaces")
        raise errors.Error(errors.OSERR, "cannot create a mount namespace: %s" % e.strerror)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.mount("hpcrun", ws, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755")
    try:
        for d in ("image", "upper", "work", "root", "files"):
            os.mkdir(os.path.join(ws, d), 0o755)
        image_root = os.path.join(ws, "image")
        st = stage.mount_image(plan, image_root, dir_fd, run_dir, bcast, verify_bcast=signed)
        plan["image_meta"] = rootfs.read_meta(image_root)
        _site_wiring(plan, cfg, image_root)
        if plan["user"] is None:
            from hpcrun.plan import user_entry
            plan["user"] = user_entry(plan["uid"], os.environ)
        rootfs.assemble(plan, ws, image_root)
        if plan["userns"]:
            _lock_mounts(plan, proc_fd)
        return st
    except BaseException:
        try:
            linux.umount2(ws, linux.MNT_DETACH)    # so the keeper can remove <key>.d
        except OSError:
            pass
        raise


def _map_ids(uid, gid, proc_fd=None):
    """The user inside is the user outside: map our ids to themselves, nothing else."""
    for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                       ("gid_map", "%d %d 1" % (gid, gid))):
        fd = os.open("self/" + name if proc_fd is not None else "/proc/self/" + name,
                     os.O_WRONLY | os.O_CLOEXEC, dir_fd=proc_fd)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def _lock_mounts(plan, proc_fd):
    """Ranks join a child user namespace and a mount namespace it owns, made
    after the root was built: the kernel copies every mount into it *locked*
    (it came from a more privileged namespace), so nothing holding this
    namespace's capabilities (a program that regains them, any code running
    before execve) can make a read-only bind writable, unmount a bind to
    reveal what is below, or remount the root.  All ranks still share this
    one user namespace (Open MPI's CMA).  The keeper moves in too: ranks find
    the pair through /proc/<keeper>/ns/.  Not done as real root: no user
    namespace then, and root could undo anything anyway."""
    from hpcrun import linux
    try:
        linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS)
        _map_ids(plan["uid"], plan["gid"], proc_fd)       # the host's /proc: the root may have none
    except OSError as e:
        raise errors.Error(errors.OSERR, "cannot lock the container's mounts: %s" % e.strerror)


def _site_wiring(plan, cfg, image_root):
    """Site wiring that depends on the image's content (MPI ABI, GPU driver)."""
    if plan["mpi"] != "none":
        try:
            from hpcrun import mpi
        except ImportError:
            mpi = None
        if mpi is not None and hasattr(mpi, "prepare"):
            mpi.prepare(plan, image_root, cfg, plan["mpi"])
    for kind in ("nv", "rocm"):
        if plan.get(kind):
            from hpcrun import gpu
            gpu.prepare(plan, image_root, cfg, kind)


# ------------------------------------------------------ linger, remove ---

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


def _linger(plan, dir_fd, st, linger, proc_fd):
    import fcntl
    me = os.getpid()
    skip = {p.pid for p in st.children}
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
            # O_CREAT: a lock file removed under us (a /tmp cleaner) is made again, as
            # a rank would make it; only a run directory that is gone makes this fail.
            lock = os.open(plan["key"] + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                           dir_fd=dir_fd)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except FileNotFoundError:
            return                       # run_dir removed: no rank can find us any more
        except OSError:
            if lock is not None:
                os.close(lock)
            continue                     # a rank is joining right now
        try:
            if _users_inside(proc_fd, me, skip):
                idle_since = time.monotonic()
                continue
            # Everything of ours goes while the lock is held: a workspace removed
            # after it (the keeper still stopping squashfuse) would be the next
            # keeper's, which may already use the same name.
            fdio.remove(dir_fd, plan["key"] + ".d", rmdir=True)
            fdio.remove(dir_fd, plan["key"] + ".pid")
            fdio.remove(dir_fd, plan["key"] + ".lock")
            return
        finally:
            os.close(lock)
