"""hpcrun broadcast IMAGE: put an image's payload on every node's local storage, once per job.

    mpirun --map-by ppr:1:node hpcrun broadcast IMG     (any mapping works)
    srun --mpi=pmix --ntasks-per-node=1 hpcrun broadcast IMG
    hpcrun broadcast IMG                                 (alone: this node only)
    hpcrun broadcast --clean [--job ID]                  (job end: this node's copies go)

Under an MPI launcher (mpi4py, imported here only) rank 0 reads the payload
from the image file once and sends it in chunks with MPI_Bcast (a tree in
Open MPI and MPICH); one rank per node-local directory (the node leader)
writes it to `.tmp.<pid>.<name>`, hashing as it writes.  All leaders agree
(an allgather of their outcome) before any renames, and undo their renames if
one of them failed: a failure anywhere leaves no copy anywhere.  A leader
whose node has the copy already receives nothing.  The launch's keeper finds
the copy (stage.find_broadcast) and mounts it instead of the image file.
docs/broadcast.md is the contract and the command page.
"""
import argparse
import errno
import os
import socket
import stat
import sys
import time

from hpcrun import config, errors, image, imagefile, node, stage

CHUNK_MIB = 8          # per MPI_Bcast; docs/broadcast.md has the measurements
MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise errors.Error(errors.USAGE, message, self.prog)


def main(argv):
    p = Parser(prog="hpcrun broadcast",
               description="Copy an image's payload to node-local storage once per job: over MPI when started "
                           "by an MPI launcher, else on this node (docs/broadcast.md).")
    p.add_argument("--to", metavar="DIR", help="node-local directory (default: the config's broadcast_dir, "
                                               "else RUN_DIR/bcast)")
    p.add_argument("--job", metavar="ID", help="the job's subdirectory job-ID (default: $SLURM_JOB_ID or "
                                               "$PBS_JOBID; --no-job: none)")
    p.add_argument("--no-job", action="store_true", help="land in DIR itself, not in a job's subdirectory")
    p.add_argument("--clean", action="store_true", help="remove the job's copies on this node (the job's "
                                                         "directory; with --no-job, DIR's own copies)")
    p.add_argument("--uid", type=int, metavar="UID", help="root only, with --clean: the user whose copies go "
                                                           "(a job epilogue)")
    p.add_argument("--mpi", choices=("auto", "yes", "no"), default="auto",
                   help="auto: MPI when an MPI launcher started us (default)")
    p.add_argument("--chunk-mib", type=int, default=CHUNK_MIB, metavar="N", help="MiB per MPI_Bcast (default 8)")
    p.add_argument("--for", dest="for_path", metavar="PATH",
                   help="alone: IMAGE is a node-local copy (sbcast) of the image launches name as PATH")
    p.add_argument("-v", "--verbose", action="store_true", help="say what each node did")
    p.add_argument("image", metavar="IMAGE", nargs="?")
    args = p.parse_args(argv)
    if args.job is not None and args.no_job:
        raise errors.Error(errors.USAGE, "--job and --no-job exclude each other", p.prog)
    if args.job is not None and not stage.valid_job_id(args.job):
        raise errors.Error(errors.USAGE, "--job must be a plain name (letters, digits, . _ -)", ascii(args.job))
    if not 1 <= args.chunk_mib <= 1024:
        raise errors.Error(errors.USAGE, "--chunk-mib must be 1 to 1024", str(args.chunk_mib))
    if args.uid is not None and (not args.clean or os.getuid() != 0):
        raise errors.Error(errors.USAGE, "--uid is for root's --clean (a job epilogue)", p.prog)
    if args.clean:
        if args.image:
            raise errors.Error(errors.USAGE, "--clean takes no IMAGE", p.prog)
        return clean(target(args, create=False))
    if not args.image:
        raise errors.Error(errors.USAGE, "IMAGE is required (or --clean)", p.prog)
    use_mpi = args.mpi == "yes" or (args.mpi == "auto" and any(os.environ.get(v) for v in MPI_ENV))
    if use_mpi:
        if args.for_path:
            raise errors.Error(errors.USAGE, "--for is for a node's own step (--mpi no), not under MPI", p.prog)
        return Broadcast(args).run_mpi()
    return Broadcast(args).run_alone()


# ------------------------------------------------------------ where ---

class Where:
    """The node-local directory a copy lands in: fd and path."""

    def __init__(self, fd, path, job):
        self.fd, self.path, self.job = fd, path, job


def target(args, create=True):
    """Open (and make) <dir>[/job-ID] with the run directory's care: our own,
    not writable by others, never through a symlink."""
    uid = os.getuid() if args.uid is None else args.uid
    cfg = config.load()
    run_dir = node.run_dir_path(cfg, uid)
    job = None if args.no_job else (args.job or stage.job_id(os.environ))
    if args.to:
        root = os.path.abspath(args.to)
    else:
        root = stage.broadcast_root(cfg, run_dir, uid)
        if root == os.path.join(run_dir, "bcast") and create:
            os.close(node.open_run_dir(run_dir, uid))        # the default lies inside run_dir
    if args.uid is not None:
        _become(uid)            # root's epilogue: the user's directories, with the user's rights only
    foreign = stage.foreign_ancestor(root, uid)
    if foreign:
        raise errors.Error(errors.NOPERM, "node-local broadcast directory lies in a directory another user "
                           "can change (%s): a launch would not use its copies" % foreign, root)
    fd = _open_private(None, root, root, uid, create)
    if fd is None:
        return None
    if job:
        sub = _open_private(fd, "job-" + job, os.path.join(root, "job-" + job), uid, create)
        os.close(fd)
        if sub is None:
            return None
        return Where(sub, os.path.join(root, "job-" + job), job)
    return Where(fd, root, None)


def _become(uid):
    """Drop root for the user's own uid and groups (as the SPANK epilog does):
    a path the user controls (their run directory may be a link) then leads
    root's clean-up nowhere the user could not go themselves."""
    import pwd
    try:
        pw = pwd.getpwuid(uid)
        gid = pw.pw_gid
        os.initgroups(pw.pw_name, gid)
    except KeyError:
        gid = uid
        os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _open_private(dir_fd, name, path, uid, create):
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise errors.Error(errors.OSERR, "node-local broadcast directory cannot be made: its parent "
                                   "does not exist (set broadcast_dir or --to, docs/broadcast.md)", path)
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise errors.Error(errors.OSERR, "node-local broadcast directory cannot be made: %s"
                                   % e.strerror, path)
            raise errors.Error(errors.OSERR, "node-local broadcast directory: %s" % e.strerror, path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            return None
        raise errors.Error(errors.OSERR, "node-local broadcast directory vanished", path)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP):
            raise errors.Error(errors.NOPERM, "node-local broadcast directory is not this user's own (%s)"
                               % e.strerror, path)
        raise errors.Error(errors.OSERR, "cannot open the node-local broadcast directory: %s" % e.strerror, path)
    st = os.fstat(fd)
    if st.st_uid != uid or st.st_mode & 0o022:
        os.close(fd)
        raise errors.Error(errors.NOPERM, "node-local broadcast directory is not private to this user "
                           "(owner %d, mode %o)" % (st.st_uid, st.st_mode & 0o7777), path)
    if create and not os.access(path, os.W_OK):
        os.close(fd)
        raise errors.Error(errors.OSERR, "node-local broadcast directory is not writable", path)
    return fd


def clean(where):
    """Remove the copies (and half-written ones) of one directory; a job's
    directory goes too.  Idempotent: every task of a node may call it."""
    if where is None:
        return 0
    try:
        for entry in os.listdir(where.fd):
            if _ours(entry):
                _unlink(where.fd, entry)
    finally:
        os.close(where.fd)
    if where.job:
        try:
            os.rmdir(where.path)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise errors.Error(errors.OSERR, "cannot remove the job's broadcast directory: %s" % e.strerror,
                                   where.path)
    return 0


def _ours(entry):
    return entry.endswith(".sqfs") and (entry.startswith("sha256_") or entry.startswith("src_")
                                        or entry.startswith(".tmp."))


def _unlink(dir_fd, name):
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def node_key(where):
    """Ranks that see the same directory share one writer: host, boot, and the
    directory's device and inode (fake nodes on one host have their own /tmp)."""
    st = os.fstat(where.fd)
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return "%s %s %d %d" % (socket.gethostname(), boot, st.st_dev, st.st_ino)


# ----------------------------------------------------------- landing ---

class Landing:
    """One node's copy: .tmp.<pid>.<name>, hashed while written, renamed once all agree."""

    def __init__(self, where, name, size, alias=None):
        self.where, self.name, self.size, self.alias = where, name, size, alias
        self.tmp = ".tmp.%d.%s" % (os.getpid(), name)
        self.fd = None
        self.digest = None
        self.renamed = []

    def present(self):
        """The copy is here already: a regular file of ours, of the right size,
        under the source's link name (and its digest name, the same file)."""
        try:
            st = os.stat(self.alias or self.name, dir_fd=self.where.fd, follow_symlinks=False)
            same = os.stat(self.name, dir_fd=self.where.fd, follow_symlinks=False)
        except OSError:
            return False
        return (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_size == self.size
                and (same.st_dev, same.st_ino) == (st.st_dev, st.st_ino))

    def open(self):
        import hashlib
        self._remove_stale()
        vfs = os.fstatvfs(self.where.fd)
        if vfs.f_bavail * vfs.f_frsize < self.size:
            raise self._no_space(vfs)
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                              0o600, dir_fd=self.where.fd)
        except OSError as e:
            raise errors.Error(errors.OSERR, "cannot write to the node-local broadcast directory: %s"
                               % e.strerror, self.where.path)
        self.digest = hashlib.sha256()

    def write(self, chunk, hashed=True):
        if hashed:
            self.digest.update(chunk)
        while chunk:
            try:
                n = os.write(self.fd, chunk)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise self._no_space(os.fstatvfs(self.fd))
                raise errors.Error(errors.OSERR, "cannot write the broadcast copy: %s" % e.strerror,
                                   self.where.path)
            chunk = chunk[n:]

    def finish(self, expected, actual=None):
        """Close; its sha256 (or `actual`, what the reader hashed of the
        same bytes on this node) must be `expected`."""
        os.close(self.fd)
        self.fd = None
        got = actual or self.digest.hexdigest()
        if got != expected:
            raise errors.Error(errors.DATA, "broadcast copy does not match: sha256 %s..., expected %s..."
                               % (got[:16], expected[:16]), self.where.path)

    def commit(self, digest_name):
        """Rename into place under its digest name, then link the source's name
        (the index a launch looks up) to it.  A copy of the same digest that is
        here already (another source's, verified when it landed) stays: other
        sources' links keep naming the same file."""
        try:
            st = os.stat(digest_name, dir_fd=self.where.fd, follow_symlinks=False)
            kept = stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_size == self.size
        except OSError:
            kept = False
        if kept:
            _unlink(self.where.fd, self.tmp)
        else:
            os.rename(self.tmp, digest_name, src_dir_fd=self.where.fd, dst_dir_fd=self.where.fd)
            self.renamed.append(digest_name)
        if self.alias:
            link_tmp = ".tmp.%d.%s" % (os.getpid(), self.alias)
            _unlink(self.where.fd, link_tmp)
            os.link(digest_name, link_tmp, src_dir_fd=self.where.fd, dst_dir_fd=self.where.fd)
            os.rename(link_tmp, self.alias, src_dir_fd=self.where.fd, dst_dir_fd=self.where.fd)
            self.renamed.append(self.alias)

    def abort(self):
        """Leave nothing: the half copy, and what this run renamed into place."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        _unlink(self.where.fd, self.tmp)
        if self.alias:
            _unlink(self.where.fd, ".tmp.%d.%s" % (os.getpid(), self.alias))
        for name in self.renamed:
            _unlink(self.where.fd, name)
        self.renamed = []

    def _remove_stale(self):
        """Half copies of broadcasts that were killed (their PID is gone)."""
        for entry in os.listdir(self.where.fd):
            if entry.startswith(".tmp.") and entry.endswith(".sqfs"):
                pid = entry.split(".")[2]
                if pid.isdigit() and not _alive(int(pid)):
                    _unlink(self.where.fd, entry)

    def _no_space(self, vfs):
        return errors.Error(errors.OSERR, "no space for the image's payload in the node-local broadcast directory "
                            "(%.1f MiB; %.1f MiB free): free space there or set broadcast_dir (docs/broadcast.md)"
                            % (self.size / 1048576.0, vfs.f_bavail * vfs.f_frsize / 1048576.0), self.where.path)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# ---------------------------------------------------------- the copy ---

class Source:
    """The image file, opened once; the payload read in chunks and hashed."""

    def __init__(self, path):
        import hashlib
        img = image.open_image(path)
        if img.kind == "dir":
            raise errors.Error(errors.USAGE, "a directory image has no file to broadcast", img.path)
        self.img = img
        self.fd = os.open(img.path, os.O_RDONLY | os.O_CLOEXEC)
        if imagefile.identity(img.kind, os.fstat(self.fd)) != img.ident:
            os.close(self.fd)
            raise errors.Error(errors.DATA, "image changed while it was being opened", img.path)
        self.digest = hashlib.sha256()
        self.off = img.offset
        self.left = img.size
        self.bytes_read = 0

    def describe(self):
        img = self.img
        d = {"path": img.path, "kind": img.kind, "offset": img.offset, "size": img.size, "ident": img.ident}
        if img.digest:
            d["sha256_claimed"] = img.digest
        if img.pin:
            d["pin"] = img.pin
        return d

    def read_into(self, view):
        """Fill view with the next bytes of the payload; returns how many."""
        n = 0
        want = min(len(view), self.left)
        while n < want:
            got = os.preadv(self.fd, [view[n:want]], self.off)
            if got <= 0:
                raise errors.Error(errors.DATA, "image shorter than its header says", self.img.path)
            n += got
            self.off += got
        self.left -= n
        self.bytes_read += n
        self.digest.update(view[:n])
        return n

    def final_digest(self):
        """The payload's sha256; an hpcrun image's must be its header's claim."""
        got = self.digest.hexdigest()
        if self.img.digest:
            imagefile.check_digest(self.img.path, self.img.digest, got)
        return got

    def close(self):
        os.close(self.fd)


def names(desc):
    """(digest name, or None when it is known only after reading; the source's
    link name, which launches look up: every kind has one)."""
    claimed = desc.get("sha256_claimed")
    return ("sha256_%s.sqfs" % claimed if claimed else None), stage.broadcast_name(desc)


def mpi4py_mpi():
    """mpi4py.MPI.  bin/hpcrun starts Python with -S (docs/install.md): mpi4py may be in a
    site directory other than hpcrun's own, which only site adds."""
    try:
        from mpi4py import MPI
        return MPI
    except ImportError:
        from hpcrun import entry
        entry.add_site_dirs()
    try:
        from mpi4py import MPI
        return MPI
    except ImportError:
        raise errors.Error(errors.UNAVAILABLE, "hpcrun broadcast under an MPI launcher needs mpi4py "
                           "(pip install mpi4py, or python3-mpi4py); --mpi no copies on this node only")


class Broadcast:
    def __init__(self, args):
        self.args = args
        self.chunk = args.chunk_mib << 20
        self.t0 = time.monotonic()

    # ---- alone: this node only
    def run_alone(self):
        tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or "1"
        if self.args.mpi == "auto" and tasks.isdigit() and int(tasks) > 1 and os.environ.get("SLURM_PROCID") == "0":
            # srun without an MPI plugin: no tree, every task reads the image
            sys.stderr.write("hpcrun broadcast: note: %s tasks without MPI (no PMI in the environment): each "
                             "reads the image; srun --mpi=pmix reads it once per job\n" % tasks)
        where = target(self.args)
        src = Source(self.args.image)
        desc = src.describe()
        if self.args.for_path:
            desc = self._as_named(src, desc)
        claimed, alias = names(desc)
        land = Landing(where, claimed or alias, desc["size"], alias)
        try:
            if land.present():
                self._say("%s: already on this node (%s)" % (desc["path"], os.path.join(where.path, land.name)))
                return 0
            land.open()
            buf = bytearray(min(self.chunk, max(desc["size"], 1)))
            view = memoryview(buf)
            while src.left:
                n = src.read_into(view)
                land.write(view[:n], hashed=False)      # the same bytes the reader hashed
            digest = src.final_digest()
            land.finish(digest, actual=digest)
            land.commit("sha256_%s.sqfs" % digest)
        except BaseException:
            land.abort()
            raise
        finally:
            src.close()
            os.close(where.fd)
        self._report(desc, digest, where.path, nodes=1, copied=1, read=src.bytes_read)
        return 0

    def _as_named(self, src, desc):
        """IMAGE is a node-local copy of the image that launches will name
        (--for): the copy is indexed under that image's name, and must be the
        same kind, payload size, claim and pin."""
        named = Source(self.args.for_path)
        try:
            want = named.describe()
        finally:
            named.close()
        if [want.get(k) for k in ("kind", "size", "sha256_claimed", "pin")] != \
                [desc.get(k) for k in ("kind", "size", "sha256_claimed", "pin")]:
            raise errors.Error(errors.DATA, "IMAGE is not a copy of the --for image (kind, size, digest or pin "
                               "differ)", "%s, %s" % (desc["path"], want["path"]))
        return dict(desc, path=want["path"], ident=want["ident"])

    # ---- under MPI: one reader, one writer per node-local directory
    def run_mpi(self):
        MPI = mpi4py_mpi()
        comm = MPI.COMM_WORLD
        rank = comm.Get_rank()
        host = socket.gethostname()
        where = land = src = None
        outcome = None
        try:
            # 1. every rank opens its node-local directory: which rank writes where
            where, err = _attempt(lambda: target(self.args))
            keys = comm.allgather(node_key(where) if where else None)
            self._agree(comm, err, host)
            leader = keys.index(keys[rank]) == rank
            leaders = comm.Split(0 if leader else MPI.UNDEFINED, rank)
            # 2. rank 0 opens the image; everyone learns what it is
            if rank == 0:
                src, err = _attempt(lambda: Source(self.args.image))
            else:
                err = None
            desc = comm.bcast(src.describe() if src else None, root=0)
            self._agree(comm, err, host)
            claimed, alias = names(desc)
            # 3. each leader: has it, or can take it (free space), or fails
            need = False
            if leader:
                land = Landing(where, claimed or alias, desc["size"], alias)
                if not land.present():
                    need = True
                    _, err = _attempt(land.open)
            self._agree(comm, err, host)
            nodes = len(set(keys))
            copied = sum(comm.allgather(1 if need else 0))
            if copied == 0:
                self._list_nodes(comm, leader, rank, host, where, False)
                outcome = ("done", desc, desc.get("sha256_claimed") or "", nodes, 0)
                return self._finish(comm, outcome, where)
            # 4. the stream: rank 0 reads, the leaders that need it receive
            stream = MPI.COMM_NULL
            if leader:
                stream = leaders.Split(0 if (need or rank == 0) else MPI.UNDEFINED, rank)
            err = None
            digest = None
            if stream != MPI.COMM_NULL:
                err, digest = self._stream(MPI, stream, src, land if need else None, desc)
            self._agree(comm, err, host)
            # 5. all copies complete and checked: rename, then agree again (undo on any failure)
            digest = comm.bcast(digest, root=0)
            if land is not None and need:
                _, err = _attempt(lambda: land.commit("sha256_%s.sqfs" % digest))
            self._agree(comm, err, host)
            self._list_nodes(comm, leader, rank, host, where, need)
            outcome = ("done", desc, digest, nodes, copied)
            return self._finish(comm, outcome, where, src)
        except _Failed as f:
            if land is not None:
                land.abort()
            if rank == 0:
                raise f.error
            return f.error.code
        finally:
            if src is not None:
                src.close()
            if where is not None:
                os.close(where.fd)

    def _stream(self, MPI, stream, src, land, desc):
        """Chunks from stream rank 0 (world rank 0) to the others.  A failure
        on one side does not stop the collective: it is remembered and said
        in the next agreement.  Returns (error or None, digest at rank 0)."""
        size = desc["size"]
        counts = [min(self.chunk, size - off) for off in range(0, size, self.chunk)]
        # Two buffers: chunk k+1 travels (Ibcast) while chunk k is hashed and
        # written; Test() between 1 MiB writes drives the transfer (Open MPI
        # progresses non-blocking collectives only inside MPI calls).
        views = [memoryview(bytearray(min(self.chunk, max(size, 1)))) for _ in range(min(2, len(counts)) or 1)]
        me = stream.Get_rank()
        state = {"err": None}

        def post(k):
            view = views[k % len(views)]
            if me == 0 and state["err"] is None:
                try:
                    src.read_into(view[:counts[k]])
                except errors.Error as e:
                    state["err"] = e
            return stream.Ibcast([view.obj, counts[k], MPI.BYTE], root=0)

        req = post(0) if counts else None
        for k, n in enumerate(counts):
            req.Wait()
            req = post(k + 1) if k + 1 < len(counts) else None
            if land is None or state["err"] is not None:
                continue
            chunk = views[k % len(views)][:n]
            try:
                for off in range(0, n, 1 << 20):
                    land.write(chunk[off:off + (1 << 20)], hashed=me != 0)
                    if req is not None:
                        req.Test()
            except errors.Error as e:
                state["err"] = e
        err = state["err"]
        digest = None
        if me == 0 and err is None:
            try:
                digest = src.final_digest()
            except errors.Error as e:
                err = e
        sent = stream.bcast(digest, root=0)
        if land is not None and err is None:
            try:
                if sent is None:
                    raise errors.Error(errors.DATA, "the image's reader failed", desc["path"])
                land.finish(sent, actual=digest if me == 0 else None)
            except errors.Error as e:
                err = e
        return err, digest

    def _list_nodes(self, comm, leader, rank, host, where, need):
        # every rank gathers (a collective), whatever its own -v: rank 0's decides
        said = comm.gather((rank, host, where.path, need) if leader else None, root=0)
        if self.args.verbose:
            for r, h, path, copied_here in (x for x in said or () if x):
                self._say("rank %d on %s: %s %s" % (r, h, "copied to" if copied_here else "had it in", path))

    def _agree(self, comm, err, host):
        """Every rank's outcome so far; on any failure every rank stops with
        the first one (rank 0 says it)."""
        said = comm.allgather(None if err is None else (err.code, err.what, err.subject, host))
        failed = [s for s in said if s is not None]
        if failed:
            code, what, subject, where = failed[0]
            more = " (and %d more ranks)" % (len(failed) - 1) if len(failed) > 1 else ""
            raise _Failed(errors.Error(code, "%s, on %s%s" % (what, where, more), subject))

    def _finish(self, comm, outcome, where, src=None):
        _, desc, digest, nodes, copied = outcome
        read = comm.bcast(src.bytes_read if src else 0, root=0)
        if comm.Get_rank() == 0:
            self._report(desc, digest, where.path, nodes, copied, read)
        return 0

    def _say(self, text):
        sys.stdout.write("hpcrun broadcast: %s\n" % text)
        sys.stdout.flush()

    def _report(self, desc, digest, path, nodes, copied, read):
        took = time.monotonic() - self.t0
        self._say("%s: %.1f MiB (sha256 %s) to %s on %d node(s): %d copied, %d had it; %d bytes read "
                  "from the image, %.2f s" % (desc["path"], desc["size"] / 1048576.0, digest[:16] or "-", path,
                                              nodes, copied, nodes - copied, read, took))


class _Failed(Exception):
    def __init__(self, error):
        super().__init__(error.what)
        self.error = error


def _attempt(fn):
    """(result, None) or (None, the hpcrun error); an unexpected OSError is an
    hpcrun error here, so that every rank can still agree on it."""
    try:
        return fn(), None
    except errors.Error as e:
        return None, e
    except OSError as e:
        return None, errors.Error(errors.OSERR, "broadcast failed: %s" % (e.strerror or e), e.filename)
