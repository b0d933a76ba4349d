"""Join tickets: what lets the compiled front (hpcrun/front/front.c) join without Python.

A joining rank's launch is a function of its argv, environment, ids, current
directory, the installed hpcrun, and what it *observed* in file systems (stat,
lstat, readlink, access, open, listdir, chdir: on the host, then inside the
node's container).  When the front could not serve a rank, it starts the Python
entry with _HPCRUN_TICKET=K, K being the hash of the non-file inputs (key()).
Python then records every observation and its outcome (the container and its
keeper, the program, the directory and environment it gets) in
run_dir/tickets/K.  A later rank with the same K is served by the front only
if every observation, replayed as that rank (inside ones through
/proc/KEEPER/root, before setns), comes out the same; anything else is the
Python path, unchanged.  docs/install.md tells the contract in full.

Per-rank launcher variables (PER_RANK) enter K by name only, so the ranks of a
job share a ticket; a ticket is written only if the launch never read their
values (Watched), and they then pass through as the caller has them.
Nothing here runs unless the front started this process; it is imported then
only, before the join (after it, imports are sealed: join.seal_imports).
"""
import builtins
import io
import os
import pwd
import stat
import sys
import time
from _sha256 import sha256

from hpcrun import rankos

# Where the launch's file-system calls are looked up: os, and rankos (the rank's modules' os).
# Both hold the same posix functions, so the Recorder wraps each name in both.
WRAPPED_MODULES = (os, rankos)
WRAPPED = ("stat", "lstat", "readlink", "access", "open", "listdir", "scandir", "chdir")

# What differs between the ranks of one job on a node (measured: mpirun -np 3, srun -n 3).
# An incomplete list costs speed only (those ranks miss), never correctness.
PER_RANK = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_NODE_RANK",
            "OMPI_MCA_ess_base_vpid", "OMPI_MCA_orte_ess_node_rank", "PMIX_RANK", "PMIX_ID", "PMI_RANK",
            "PMI_FD", "MPI_LOCALRANKID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_TASK_PID", "PBS_TASKNUM",
            "PBS_VNODENUM")
LIFETIME = 600            # seconds a ticket is served: job start, not forever
MAX_SIZE = 1 << 20


def default_run_dir(uid):
    return "/tmp/hpcrun-%d" % uid


def stamp(package_dir):
    st = os.stat(package_dir)
    return "%d:%d:%d" % (st.st_dev, st.st_ino, st.st_mtime_ns)


def key(args, environ, cwd, uid, gid, groups, package_stamp):
    """K, as the front computes it (docs/install.md): args is argv[1:], environ bytes -> bytes."""
    parts = [b"hpcrun-ticket-1", package_stamp.encode(), b"%d" % uid, b"%d" % gid, b"%d" % len(groups)]
    parts += [b"%d" % g for g in sorted(groups)]
    parts.append(b"%d" % len(args))
    parts += [os.fsencode(a) for a in args]
    parts.append(os.fsencode(cwd))
    per_rank = {os.fsencode(n) for n in PER_RANK}
    entries = sorted(k if k in per_rank else k + b"=" + v for k, v in environ.items())
    parts.append(b"%d" % len(entries))
    parts += entries
    return sha256(b"\0".join(parts) + b"\0").hexdigest()


def identity(st):
    if stat.S_ISDIR(st.st_mode):
        return "D %d %d %d %d %d" % (st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid)
    return "F %d %d %d %d %d %d %d %d" % (st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                          st.st_mtime_ns, st.st_ctime_ns)


def encode(keeper, observations, cwd, argv, env, passed, expires):
    """The ticket's bytes.  keeper: (key, pid, start, userns); observations: (where, op, path,
    expect); env: the final environment in execve order; passed: names taken from the caller."""
    fields = ["hpcrun-ticket", "1", "expires", "%d" % expires,
              "keeper", keeper[0], "%d" % keeper[1], keeper[2], "1" if keeper[3] else "0"]
    for where, op, path, expect in observations:
        fields += [where, op, path, expect]
    fields += ["cwd", cwd]
    for a in argv:
        fields += ["arg", a]
    for k, v in env.items():
        fields += ["pass", k] if k in passed else ["set", "%s=%s" % (k, v)]
    fields.append("end")
    return b"".join(os.fsencode(f) + b"\0" for f in fields)


class Watched(dict):
    """An environment that remembers which values were read (get, []) and which names were
    set (a per-rank name set to a constant is the launch's value, not the caller's: never
    `pass`, even where the first rank's own value was the same)."""
    read = written = None

    def __setitem__(self, name, value):
        self.written.add(name)
        dict.__setitem__(self, name, value)

    def setdefault(self, name, default=None):
        self.read.add(name)
        self.written.add(name)
        return dict.setdefault(self, name, default)

    def update(self, *args, **kwargs):
        for name, value in dict(*args, **kwargs).items():
            self[name] = value

    def __getitem__(self, name):
        self.read.add(name)
        return dict.__getitem__(self, name)

    def get(self, name, default=None):
        self.read.add(name)
        return dict.get(self, name, default)


def watched(environ, read, written=None):
    w = Watched(environ)
    w.read, w.written = read, set() if written is None else written
    return w


class Recorder:
    """Records file-system observations while active (os.stat & co. wrapped, in os and rankos).
    Whatever it cannot record (a dir_fd, a write, NSS...) spoils the ticket."""

    def __init__(self, claimed):
        self.claimed = claimed
        self.observations = []
        self.read = set()           # environment names whose values were read
        self.written = set()        # ... and set (environment.final)
        self.spoiled = None
        self.where = "host"
        self.inside_cwd = "/"
        self.keeper = self.run_dir_fd = self.claim = None
        self.saved = None

    # --- the wrappers -------------------------------------------------------------------
    def _path(self, path):
        path = os.fsdecode(os.fspath(path))
        if self.where == "inside" and not path.startswith("/"):
            path = self.inside_cwd.rstrip("/") + "/" + path
        return path

    def _note(self, op, path, expect):
        self.observations.append((self.where, op, self._path(path), expect))

    def _spoil(self, why):
        if self.spoiled is None:
            self.spoiled = why

    def install(self, where):
        self.where = where
        real = self.saved = {"stat": os.stat, "lstat": os.lstat, "readlink": os.readlink, "access": os.access,
                             "open": os.open, "listdir": os.listdir, "scandir": os.scandir, "chdir": os.chdir,
                             "bopen": builtins.open, "getpwuid": pwd.getpwuid, "getpwnam": pwd.getpwnam}
        rec = self

        def stat(path, *, dir_fd=None, follow_symlinks=True):
            if isinstance(path, int):
                return real["stat"](path)
            if dir_fd is not None:
                rec._spoil("stat with dir_fd")
            op = "stat" if follow_symlinks else "lstat"
            try:
                st = real["stat"](path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
            except OSError as e:
                rec._note(op, path, "E%d" % e.errno)
                raise
            rec._note(op, path, identity(st))
            return st

        def lstat(path, *, dir_fd=None):
            return stat(path, dir_fd=dir_fd, follow_symlinks=False)

        def readlink(path, *, dir_fd=None):
            if dir_fd is not None or isinstance(path, int):
                rec._spoil("readlink with dir_fd")
            try:
                target = real["readlink"](path, dir_fd=dir_fd)
            except OSError as e:
                rec._note("readlink", path, "E%d" % e.errno)
                raise
            rec._note("readlink", path, "L" + os.fsdecode(target))
            return target

        def access(path, mode, *, dir_fd=None, effective_ids=False, follow_symlinks=True):
            if dir_fd is not None or effective_ids or not follow_symlinks or isinstance(path, int):
                rec._spoil("access with options")
            ok = real["access"](path, mode, dir_fd=dir_fd, effective_ids=effective_ids,
                                follow_symlinks=follow_symlinks)
            rec._note("access%d" % mode, path, "1" if ok else "0")
            return ok

        def open_(path, flags, mode=0o777, *, dir_fd=None):
            if dir_fd is not None or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
                rec._spoil("open for writing or with dir_fd")
            op = "openl" if flags & os.O_NOFOLLOW else "open"
            try:
                fd = real["open"](path, flags, mode, dir_fd=dir_fd)
            except OSError as e:
                rec._note(op, path, "E%d" % e.errno)
                raise
            rec._note(op, path, identity(os.fstat(fd)))
            return fd

        def listdir(path="."):
            if isinstance(path, int):
                rec._spoil("listdir of an fd")
            try:
                names = real["listdir"](path)
            except OSError as e:
                rec._note("listdir", path, "E%d" % e.errno)
                raise
            rec._note("listdir", path, "N" + os.fsdecode(b"/".join(sorted(os.fsencode(n) for n in names))))
            return names

        def scandir(path="."):
            rec._spoil("scandir")
            return real["scandir"](path)

        def chdir(path):
            if isinstance(path, int):
                rec._spoil("fchdir")
            try:
                real["chdir"](path)
            except OSError as e:
                rec._note("chdir", path, "E%d" % e.errno)
                raise
            rec._note("chdir", path, "0")
            if rec.where == "inside":
                rec.inside_cwd = rec._path(path)

        def bopen(file, mode="r", *args, **kwargs):
            if isinstance(file, int) or set(mode) & set("wax+"):
                rec._spoil("open() of an fd or for writing")
                return real["bopen"](file, mode, *args, **kwargs)
            try:
                f = real["bopen"](file, mode, *args, **kwargs)
            except OSError as e:
                rec._note("open", file, "E%d" % e.errno)
                raise
            rec._note("open", file, identity(os.fstat(f.fileno())))
            return f

        wrappers = {"stat": stat, "lstat": lstat, "readlink": readlink, "access": access, "open": open_,
                    "listdir": listdir, "scandir": scandir, "chdir": chdir}
        for module in WRAPPED_MODULES:
            for name in WRAPPED:
                setattr(module, name, wrappers[name])
        real["stdout"], real["stderr"] = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Talk(sys.stdout, self), _Talk(sys.stderr, self)    # the front would be silent
        builtins.open = io.open = bopen
        pwd.getpwuid = lambda uid: (rec._spoil("passwd lookup"), real["getpwuid"](uid))[1]
        pwd.getpwnam = lambda name: (rec._spoil("passwd lookup"), real["getpwnam"](name))[1]

    def uninstall(self):
        real = self.saved
        if real is None:
            return
        for module in WRAPPED_MODULES:
            for name in WRAPPED:
                setattr(module, name, real[name])
        sys.stdout, sys.stderr = real["stdout"], real["stderr"]
        builtins.open = io.open = real["bopen"]
        pwd.getpwuid, pwd.getpwnam = real["getpwuid"], real["getpwnam"]
        self.saved = None

    def watched(self, environ):
        return watched(environ, self.read, self.written)

    def begin_host(self, environ):
        """Record the host side from here: the file-system calls, first the cwd's identity (its name
        is K's; noted by the first begin only, though a Slurm task's entry and then its launch both
        begin here), and the per-rank values read from environ, which is returned watched."""
        self.install("host")
        if not self.observations:
            os.stat(".")
        return watched(environ, self.read)

    def joined(self, key, pid, start, userns, dir_fd, run_dir, uid):
        """join.py, before setns: which keeper, and the run directory to write into."""
        if start is None:                            # gone already: the launch will say so
            return
        self.keeper = (key, pid, os.fsdecode(start), userns)
        if run_dir == default_run_dir(uid):          # the only one the front looks in
            self.run_dir_fd = os.dup(dir_fd)

    def discard(self):
        """Done: the run directory and the first-wave lock let go (the waiting ranks look again)."""
        if self.run_dir_fd is not None:
            os.close(self.run_dir_fd)
        self.run_dir_fd = None
        let_go(self.claim)

    # --- the ticket ---------------------------------------------------------------------
    def write(self, cwd, argv, env, caller_env):
        """Write run_dir/tickets/K if everything the launch depended on was recorded.
        Never fails the launch: a ticket is only a shortcut."""
        try:
            if self.spoiled or self.keeper is None or self.run_dir_fd is None:
                return
            if any(n in self.read for n in PER_RANK):
                return
            passed = {n for n in PER_RANK
                      if n in env and n not in self.written and dict.get(env, n) == caller_env.get(n)}
            data = encode(self.keeper, self.observations, cwd, argv, env, passed, int(time.time()) + LIFETIME)
            if len(data) > MAX_SIZE:
                return
            _write_into(self.run_dir_fd, self.claimed, data)
        except (OSError, ValueError, UnicodeError):
            pass
        finally:
            self.discard()


class _Talk:
    """stdout/stderr while recording: a launch that says something gets no ticket."""

    def __init__(self, stream, rec):
        self._stream, self._rec = stream, rec

    def write(self, text):
        self._rec._spoil("printed")
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _write_into(run_dir_fd, name, data):
    try:
        os.mkdir("tickets", 0o700, dir_fd=run_dir_fd)
    except FileExistsError:
        pass
    d = os.open("tickets", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=run_dir_fd)
    try:
        st = os.fstat(d)
        if st.st_uid != os.getuid() or st.st_mode & 0o077 or not stat.S_ISDIR(st.st_mode):
            return
        tmp = "%s.tmp-%d" % (name, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=d)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)
        except OSError:
            os.unlink(tmp, dir_fd=d)
            raise
        prune(d)
    finally:
        os.close(d)


def prune(tickets_fd):
    """Remove tickets past their time (and temp files of writers that died): one job's
    first ranks write them, nobody else would."""
    old = time.time() - LIFETIME - 60
    for name in os.listdir(tickets_fd):
        try:
            if os.stat(name, dir_fd=tickets_fd, follow_symlinks=False).st_mtime < old:
                os.unlink(name, dir_fd=tickets_fd)
        except OSError:
            pass


def let_go(claim):
    """Close the first-wave lock (the job's waiting ranks look again) and remove its file, if it is
    still the one we hold: it serves no one after this, and a launch that writes no ticket (a
    run_dir elsewhere, a warning, no $HOME ...) would leave one per job behind."""
    if not claim or claim[1] is None:
        return
    lock, tickets, claim[1], claim[2] = claim[1], claim[2], None, None
    try:
        if tickets is not None and len(claim[0]) == 64 and claim[0].isalnum():    # K: hex, no path
            name = claim[0] + ".lock"
            held, there = os.fstat(lock), os.stat(name, dir_fd=tickets, follow_symlinks=False)
            if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
                os.unlink(name, dir_fd=tickets)
    except (OSError, ValueError):
        pass
    finally:
        os.close(lock)
        if tickets is not None:
            os.close(tickets)


def allowed(opts):
    """A launch that prints (a plan, notes, a traceback) is never a ticket: the front prints nothing."""
    return not (opts.dry_run or opts.verbose or opts.debug)


def start(claim, args, opts):
    """A Recorder when the front started us with a K that this launch matches, else None.
    claim: cli._front_claim's; its lock is the fd the job's other ranks wait on (front.c,
    first_wave), let go once the ticket is written or known not to come."""
    claimed, rec = claim[0], None
    if claimed and len(claimed) == 64 and (opts is None or allowed(opts)):
        try:
            import hpcrun
            here = key(args, os.environb, os.getcwd(), os.getuid(), os.getgid(), os.getgroups(),
                       stamp(os.path.dirname(hpcrun.__file__)))
        except (OSError, ValueError):
            here = None
        if here == claimed:
            rec = Recorder(claimed)
            rec.claim = claim
    if rec is None:
        let_go(claim)
    return rec
