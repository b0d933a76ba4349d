"""Make the image's root filesystem appear at a directory, inside the keeper.

Strategies (config `mount_strategy`, docs/staging.md has the measurements):
  kernel   root only: a loop device at the payload's offset, read-only, nosuid, nodev.
  fuse     a FUSE daemon inside the user namespace: hpcrun's own
           (libexec/hpcrun-squashfuse, which install-entry builds from
           front/squashfuse.c: libsquashfuse without a request per open),
           else squashfuse_ll.  Debian 12's squashfuse
           (0.1.104/0.1.105) has no `-o offset=`, so an image whose SquashFS
           does not start at byte 0 (hpcrun images, SIF) is first staged:
           its payload is copied once per node into run_dir/stage/ (a
           copy_file_range, no decompression) and shared by every container
           using that image; the last one to leave deletes it.
  extract  unsquashfs into the keeper's tmpfs, i.e. RAM (sites without FUSE);
           4-10x slower than staging, see docs/staging.md.
  auto     kernel as root, fuse otherwise.
A payload that `hpcrun broadcast` put into the node-local broadcast
directory (docs/broadcast.md) is mounted from there instead, by every
strategy: no staging copy and no read of the shared file for the payload.
Directories (sandboxes) are bound as they are.
All of this runs in the keeper, after unshare: the mounts exist only in the
container's mount namespace and vanish with it.
"""
import fcntl
import os
import stat
import time

from hpcrun import errors, fdio, linux


def strategy(plan):
    s = plan["mount_strategy"]
    if plan["image"]["kind"] == "dir" or "offset" not in plan["image"]:
        return "dir"
    if s == "auto":
        return "kernel" if not plan["userns"] else "fuse"
    if s == "kernel" and plan["userns"]:
        raise errors.Error(errors.CONFIG, "mount_strategy=kernel needs root; use fuse or auto")
    if s not in ("kernel", "fuse", "extract"):
        raise errors.Error(errors.CONFIG, "unknown mount_strategy %r" % s)
    return s


_offset_support = None


def squashfuse_has_offset():
    global _offset_support
    if _offset_support is None:
        exe = _which("squashfuse")
        rc, out = _run([exe, "--help"]) if exe else (1, "")
        _offset_support = "offset" in out
    return _offset_support


# The keeper starts a few programs (mount, squashfuse, unsquashfs).  It does so
# with fork/exec rather than the subprocess module, whose import (locale, re,
# threading, selectors) was half of a keeper's start-up time.

class Child:
    """A started program: its pid and a pipe with its stderr (and its stdout
    when asked; else that goes to /dev/null)."""

    def __init__(self, argv, setup=None, stdout_too=False):
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(w if stdout_too else null, 1)
                os.dup2(w, 2)
                os.closerange(3, os.sysconf("SC_OPEN_MAX"))
                if setup:
                    setup()
                os.execv(argv[0], argv)
            except BaseException:
                pass
            os._exit(127)
        os.close(w)
        self.err_fd = r
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.005)
        return self.returncode

    def stderr(self):
        """What it wrote to stderr (call once it has exited)."""
        fd, self.err_fd = self.err_fd, None
        return fdio.read_all(fd).decode(errors="replace")

    def stop(self):
        if self.poll() is None:
            os.kill(self.pid, 15)
            if self.wait(5) is None:
                os.kill(self.pid, 9)
                self.wait()
        if self.err_fd is not None:
            os.close(self.err_fd)
            self.err_fd = None


def _run(argv):
    """Run argv to its end: (exit status, what it wrote to stdout and stderr)."""
    c = Child(argv, stdout_too=True)
    out = c.stderr()          # EOF when it exits
    return c.wait(), out


class Stage:
    """What the keeper holds while the image is mounted."""

    def __init__(self):
        self.children = []       # squashfuse processes
        self.program = None      # the FUSE daemon they run (fuse_program())
        self.stage_lock = None   # fd holding LOCK_SH on a shared staged payload
        self.stage_path = None
        self.extract_dir = None


def mount_image(plan, target, run_dir_fd, run_dir, bcast=None, verify_bcast=False):
    """bcast: the node-local broadcast copy of the payload (find_broadcast),
    mounted at offset 0 instead of the image file; verify_bcast: hash it
    against the header's claim first (the signature policy's payload check)."""
    img = plan["image"]
    how = strategy(plan)
    st = Stage()
    flags = linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV
    if img["kind"] == "hpcrun":
        _check_header(img)
    if bcast and how != "dir":
        _check_identity(img)          # the source is still the file the plan named
        if verify_bcast:
            _verify_copy(bcast, img)
        if how == "kernel":
            _loop_mount(dict(img, path=bcast, offset=0), target)
        elif how == "fuse":
            _squashfuse(bcast, target, [], st)
        else:
            _extract(bcast, target, st)
        plan["stage"] = {"strategy": how, "source": bcast, "offset": 0, "broadcast": True}
        if st.program:
            plan["stage"]["program"] = st.program
        plan.setdefault("notes", []).append("image mounted from its node-local broadcast copy %s (%s)" % (bcast, how))
        return st
    if how == "dir":
        linux.mount(img["path"], target, None, linux.MS_BIND | linux.MS_REC)
        linux.mount(None, target, None, linux.MS_REMOUNT | linux.MS_BIND | flags)
    elif how == "kernel":
        _check_identity(img)
        _loop_mount(img, target)
    elif how == "fuse":
        source = img["path"]
        opts = []
        if img["offset"]:
            if squashfuse_has_offset():
                opts = ["-o", "offset=%d" % img["offset"]]
            else:
                source = _staged_payload(img, st, run_dir_fd, run_dir)
        if source == img["path"]:
            _check_identity(img)
        _squashfuse(source, target, opts, st)
    elif how == "extract":
        source = _staged_payload(img, st, run_dir_fd, run_dir) if img["offset"] else img["path"]
        _extract(source, target, st)
    plan["stage"] = {"strategy": how, "source": st.stage_path or img["path"],
                     "offset": 0 if st.stage_path else img.get("offset", 0)}
    if st.program:
        plan["stage"]["program"] = st.program
    return st


# ----------------------------------------------------- broadcast copies ---
# Contract (docs/broadcast.md): <broadcast_dir>[/job-<ID>]/<name>, name from
# broadcast_name(); written by `hpcrun broadcast` as .tmp.<pid>.<name> and
# renamed only after its sha256 matched; the directories private to the user.

def broadcast_root(cfg, run_dir, uid):
    """The node-local broadcast directory (config broadcast_dir; default run_dir/bcast)."""
    value = cfg.get("broadcast_dir") if cfg is not None else None
    return (value or os.path.join(run_dir, "bcast")).replace("%u", str(uid))


def job_id(environ):
    """The batch job a broadcast belongs to (its copies live in job-<ID>/,
    removed at job end), or None; an ID that is not a plain name is refused."""
    job = environ.get("SLURM_JOB_ID") or environ.get("PBS_JOBID")
    return job if job and valid_job_id(job) else None


def valid_job_id(job):
    ok = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
    return 0 < len(job) <= 128 and job[0] not in ".-" and all(c in ok for c in job)


def source_key(path, ident, pin):
    """What names an image that claims no digest (plain SquashFS, SIF) across
    nodes: its real path, size, mtime and pin (device, inode and ctime differ
    from node to node on a shared file system)."""
    try:
        from _sha256 import sha256
    except ImportError:
        from hashlib import sha256
    fields = ident.split(":")
    text = "%s\0%s\0%s\0%s" % (os.path.realpath(path), fields[3], fields[4], pin or "")
    return sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def broadcast_name(img):
    """img: the plan's image.  The name a launch looks up: a link named from
    source_key(), made only by a broadcast that read this source's payload and
    hashed it.  (The copy itself is named by its verified digest; looking that
    up by the digest a header claims would give a header that copies another
    image's digest that image's copy.)"""
    return "src_%s.sqfs" % source_key(img["path"], img["ident"], img.get("pin"))


def foreign_ancestor(path, uid):
    """The first directory above path (its real location) whose entries a user
    other than uid and root could rename, or None.  A path is re-resolved when
    the copy is mounted: a directory of another user on the way (or one that
    others may write, without the sticky bit) could swap the checked copy for
    theirs in between."""
    real = os.path.realpath(path)
    here = "/"
    for name in [""] + real.split("/")[1:-1]:
        here = os.path.join(here, name)
        try:
            st = os.lstat(here)
        except OSError:
            return None         # not there, or not ours to see: opening it says which
        if (not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, uid)
                or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX)):
            return here
    return None


def _private_dir(name, dir_fd, uid):
    """A directory of ours that nobody else can write, or None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid != uid or st.st_mode & 0o022:
        os.close(fd)
        return None
    return fd


def find_broadcast(plan, cfg, run_dir, environ=os.environ):
    """The keeper's lookup: the path of this image's node-local broadcast
    copy (the job's directory first, then the broadcast directory itself),
    or None.  Only a regular file of ours, of the payload's size, in
    directories of ours that nobody else can write, counts."""
    img = plan["image"]
    if img["kind"] == "dir" or "offset" not in img:
        return None
    root = broadcast_root(cfg, run_dir, plan["uid"])
    if foreign_ancestor(root, plan["uid"]):
        return None
    root = os.path.realpath(root)       # what was checked is what the mount resolves
    name = broadcast_name(img)
    job = job_id(environ)
    top = _private_dir(root, None, plan["uid"])
    if top is None:
        return None
    try:
        for sub in (["job-" + job] if job else []) + [None]:
            fd = _private_dir(sub, top, plan["uid"]) if sub else top
            if fd is None:
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            finally:
                if fd != top:
                    os.close(fd)
            if (st.st_mode & 0o170000 == 0o100000 and st.st_uid == plan["uid"]
                    and st.st_size == img["size"] and not st.st_mode & 0o022):
                found = name
                if img.get("sha256_claimed"):       # said by its digest name, the same file
                    found = "sha256_%s.sqfs" % img["sha256_claimed"]
                    if not _same_file(st, found, root, sub):
                        continue
                return os.path.join(root, sub, found) if sub else os.path.join(root, found)
    finally:
        os.close(top)
    return None


def _same_file(st, name, root, sub):
    try:
        other = os.stat(os.path.join(root, sub, name) if sub else os.path.join(root, name),
                        follow_symlinks=False)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def _verify_copy(path, img):
    """The payload check the signature policy wants, on the node-local copy:
    its sha256 must be the header's claim (which the signature covers)."""
    import hashlib
    from hpcrun import imagefile
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while True:
            chunk = os.read(fd, COPY_BLOCK)
            if not chunk:
                break
            digest.update(chunk)
    finally:
        os.close(fd)
    imagefile.check_digest(path, img.get("sha256_claimed"), digest.hexdigest())


def _check_header(img):
    """Once per node, what a rank does not do (it must not import json): the
    header's metadata line must be a JSON object; and the header is still
    the one the rank read."""
    from hpcrun import imagefile
    h = imagefile.read_header(img["path"])
    imagefile.check_meta(img["path"], h)
    if (h.offset, h.size, h.sha256) != (img["offset"], img["size"], img.get("sha256_claimed")):
        raise errors.Error(errors.DATA, "image changed while its container was being started", img["path"])


def _check_identity(img):
    """An image mounted in place is the file the plan (and the key) named."""
    from hpcrun import imagefile
    try:
        same = imagefile.identity(img["kind"], os.stat(img["path"])) == img["ident"]
    except OSError:
        same = False
    if not same:
        raise errors.Error(errors.DATA, "image changed while its container was being started", img["path"])


def _loop_mount(img, target):
    opts = "loop,ro,nosuid,nodev,offset=%d,sizelimit=%d" % (img["offset"], img["size"])
    mount = _which("mount") or "/bin/mount"
    rc, err = _run([mount, "-t", "squashfs", "-o", opts, img["path"], target])
    if rc != 0:
        raise errors.Error(errors.OSERR, "kernel mount of the image failed: %s"
                           % (err.strip().splitlines() or ["?"])[-1], img["path"])


def own_fuse_program(package_dir=None):
    """Where `hpcrun install-entry` puts hpcrun's FUSE daemon (front/squashfuse.c), built or not."""
    return os.path.join(package_dir or os.path.dirname(os.path.abspath(__file__)), "libexec",
                        "hpcrun-squashfuse")


def fuse_program():
    """The FUSE daemon a keeper mounts with: hpcrun's own where install-entry built it (a rank's
    MPI_Init opens ~100 files; squashfuse_ll makes each a round trip to it), else squashfuse_ll."""
    own = own_fuse_program()
    if os.access(own, os.X_OK):
        return own
    return _which("squashfuse_ll") or _which("squashfuse")


def _squashfuse(source, target, opts, st):
    exe = fuse_program()
    if not exe:
        raise errors.Error(errors.UNAVAILABLE, "squashfuse is not installed (needed to mount images "
                           "unprivileged)", "apt-get install squashfuse fuse3")
    if not os.path.exists("/dev/fuse"):
        raise errors.Error(errors.UNAVAILABLE, "/dev/fuse is missing: FUSE not available on this host")

    def setup():
        # squashfuse must keep CAP_SYS_ADMIN (of our user namespace) across exec
        # to mount; and it must die with its keeper rather than outlive it.
        if os.getuid() != 0:
            linux.raise_ambient(linux.CAP_SYS_ADMIN)
        linux.prctl(linux.PR_SET_PDEATHSIG, 15)

    p = Child([exe, "-f"] + opts + [source, target], setup)
    st.children.append(p)
    st.program = exe
    # The mount is ready when the target's device changes; squashfuse exits on failure.
    parent_dev = os.stat(os.path.dirname(target)).st_dev
    deadline = time.monotonic() + 30
    while True:
        try:
            if os.stat(target).st_dev != parent_dev:
                return
        except OSError:
            pass
        if p.poll() is not None:
            err = p.stderr().strip().splitlines()
            raise errors.Error(errors.OSERR, "squashfuse failed: %s" % (err[-1] if err else "exit %d" % p.returncode),
                               source)
        if time.monotonic() > deadline:
            p.stop()
            raise errors.Error(errors.OSERR, "squashfuse did not mount within 30 s", source)
        time.sleep(0.002)


def staged_name(img):
    """A staged copy's name (img: the plan's image): the claimed digest for
    people to read, and a hash of the file's identity, so that only this
    file's payload, verified, is ever found under it.  Another image that
    claims the same digest gets another name, and its own check."""
    try:
        from _sha256 import sha256
    except ImportError:
        from hashlib import sha256
    ident = sha256(img["ident"].encode()).hexdigest()[:32]
    if img.get("sha256_claimed"):
        return "sha256_%s_%s" % (img["sha256_claimed"], ident)
    return "%s_%s" % (img["kind"], ident)


def _staged_payload(img, st, run_dir_fd, run_dir):
    """Copy the payload to run_dir/stage/<name>.sqfs once per node, checking
    the header's sha256 while copying; hold a shared lock on it for as long as
    this container lives.

    Containers with different keys (other binds, another job step) share one
    staged copy, and each holds LOCK_SH on it for its whole life, so a
    creator must never *wait* for LOCK_EX: it takes LOCK_SH, and only when the
    copy is missing tries a non-blocking upgrade to copy it."""
    stage_fd = _open_stage_dir(run_dir_fd, run_dir)
    try:
        name = staged_name(img)
        path = os.path.join(run_dir, "stage", name + ".sqfs")
        while True:
            lock_fd = fdio.lock_current(stage_fd, name + ".lock", fcntl.LOCK_SH)
            if _exists(name + ".sqfs", stage_fd):
                break
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:         # another stager is deciding too: back off
                os.close(lock_fd)
                time.sleep(0.005)
                continue
            try:
                if not _exists(name + ".sqfs", stage_fd):
                    _remove_stale_copies(stage_fd, name)
                    _copy_payload(img, stage_fd, name, path)
            except BaseException:
                # We hold it exclusively: nobody else uses this name now.
                _unlink_quietly(name + ".lock", stage_fd)
                os.close(lock_fd)
                raise
            fcntl.flock(lock_fd, fcntl.LOCK_SH)
            break
    finally:
        os.close(stage_fd)
    st.stage_lock, st.stage_path = lock_fd, path
    _holding.append(st)
    return path


def _open_stage_dir(run_dir_fd, run_dir):
    """run_dir/stage, ours and private: never followed through a symlink
    (a run directory prepared by someone else) nor shared with others."""
    try:
        os.mkdir("stage", 0o700, dir_fd=run_dir_fd)
    except FileExistsError:
        pass
    where = os.path.join(run_dir, "stage")
    try:
        fd = os.open("stage", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=run_dir_fd)
    except OSError as e:
        raise errors.Error(errors.NOPERM, "run directory's stage/ is not a directory of this user (%s)"
                           % e.strerror, where)
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        os.close(fd)
        raise errors.Error(errors.NOPERM, "run directory's stage/ is not private to this user "
                           "(owner %d, mode %o)" % (st.st_uid, st.st_mode & 0o7777), where)
    return fd


def _exists(name, dir_fd):
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _remove_stale_copies(stage_fd, name):
    """Half-written copies of stagers that were killed: we hold the lock
    exclusively, so nobody else is copying this payload now."""
    for entry in os.listdir(stage_fd):
        if entry.startswith(name + ".sqfs.") and entry.endswith(".tmp"):
            _unlink_quietly(entry, stage_fd)


# Blocks of 2 MiB and more made the copy 4x slower than 1 MiB (a fresh keeper
# writing to ext4, benchmarks/staging.py); the hash does not mind the size.
COPY_BLOCK = 1 << 20


def _copy_payload(img, stage_fd, name, path):
    """Copy the payload with read/write, hashing what is written.

    Not copy_file_range: that fails with EXDEV when the image lies on another
    file system than the run directory (images on shared storage, /tmp
    node-local), and the bytes must pass through here to be hashed anyway.
    One thread: a second one hashing while this one writes was faster in
    isolation but about 2x slower inside a keeper (benchmarks/staging.py,
    docs/staging.md).
    The file is opened once and must still be the file the plan named (its
    identity is in the key), so what is staged is what was checked."""
    import hashlib
    from hpcrun import imagefile
    claimed = img.get("sha256_claimed")
    tmp = "%s.sqfs.%d.tmp" % (name, os.getpid())
    src = dst = None
    try:
        src = os.open(img["path"], os.O_RDONLY | os.O_CLOEXEC)
        if imagefile.identity(img["kind"], os.fstat(src)) != img["ident"]:
            raise errors.Error(errors.DATA, "image changed while its container was being started", img["path"])
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=stage_fd)
        _reserve(dst, img["size"], path)
        digest = hashlib.sha256() if claimed else None
        view = memoryview(bytearray(min(COPY_BLOCK, img["size"])))
        left, off = img["size"], img["offset"]
        while left:
            n = os.preadv(src, [view[:min(left, len(view))]], off)
            if n <= 0:
                raise errors.Error(errors.DATA, "image shorter than its header says", img["path"])
            chunk = view[:n]
            if digest is not None:
                digest.update(chunk)
            while chunk:
                chunk = chunk[_write(dst, chunk, path):]
            left -= n
            off += n
        if digest is not None:
            imagefile.check_digest(img["path"], claimed, digest.hexdigest())
        os.close(dst)
        dst = None
        os.rename(tmp, name + ".sqfs", src_dir_fd=stage_fd, dst_dir_fd=stage_fd)
    except BaseException:
        _unlink_quietly(tmp, stage_fd)
        raise
    finally:
        for fd in (src, dst):
            if fd is not None:
                os.close(fd)


def _reserve(fd, size, path):
    """Fail before copying when the run directory's file system cannot hold
    the payload, not after filling it.  (Not posix_fallocate: on ext4 writes
    into the reserved, unwritten extents made the copy up to 2x slower.)"""
    vfs = os.fstatvfs(fd)
    if vfs.f_bavail * vfs.f_frsize < size:
        raise _no_space(fd, size, path)


def _write(fd, chunk, path):
    try:
        return os.write(fd, chunk)
    except OSError as e:
        if e.errno in (28, 122):
            raise _no_space(fd, len(chunk), path)
        raise errors.Error(errors.OSERR, "cannot stage the image's payload: %s" % e.strerror,
                           os.path.dirname(path))


def _no_space(fd, size, path):
    try:
        vfs = os.fstatvfs(fd)
        free = "%.1f MiB free" % (vfs.f_bavail * vfs.f_frsize / 1048576.0)
    except OSError:
        free = "no space left"
    return errors.Error(errors.OSERR, "no space to stage the image's payload (%.1f MiB; %s): free space there "
                        "or set run_dir (docs/staging.md)" % (size / 1048576.0, free), os.path.dirname(path))


def _unlink_quietly(name, dir_fd=None):
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _extract(source, target, st):
    tmp = target + ".x"
    exe = _which("unsquashfs")
    if not exe:
        raise errors.Error(errors.UNAVAILABLE, "unsquashfs is not installed", "apt-get install squashfs-tools")
    rc, err = _run([exe, "-no-xattrs", "-quiet", "-no-progress", "-d", tmp, source])
    if rc != 0:
        raise errors.Error(errors.OSERR, "unsquashfs failed: %s" % err.strip()[-200:], source)
    linux.mount(tmp, target, None, linux.MS_BIND | linux.MS_REC)
    st.extract_dir = tmp


_holding = []       # this process's Stages that hold a staged copy (a keeper has one)


def release(st, run_dir_fd):
    """Keeper teardown: stop squashfuse, drop the staged payload if we were its last user."""
    for p in st.children:
        p.stop()
    st.children = []
    if st in _holding:
        _holding.remove(st)
    if st.stage_lock is not None:
        fcntl.flock(st.stage_lock, fcntl.LOCK_UN)
        try:
            fcntl.flock(st.stage_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(st.stage_path)
            base = st.stage_path[:-5]
            os.unlink(base + ".lock")
        except OSError:
            pass
        os.close(st.stage_lock)
        st.stage_lock = None


def release_all(run_dir_fd):
    """Every staged copy this process still holds, e.g. when the keeper fails
    after the image was mounted (a bind that cannot be made): the last user
    of a staged copy removes it on every path."""
    for st in list(_holding):
        release(st, run_dir_fd)


def _which(name):
    for d in os.environ.get("PATH", "/usr/bin:/bin").split(":") + ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None
