"""hpcrun's FUSE daemon (hpcrun/front/squashfuse.c, installed as hpcrun/libexec/hpcrun-squashfuse;
docs/staging.md "The FUSE daemon").

`make venv` ran install-entry with libsquashfuse-dev and libfuse3-dev installed (make deps), so the
installed package holds the daemon and an unprivileged keeper mounts images with it.  What it
promises, each tried here against Debian's squashfuse_ll on the same file:
- the same tree (names, types, modes, owners, sizes, link targets, contents), read-only, nosuid, nodev;
- an open or a directory listing the kernel has seen once costs no request to the daemon;
- a file that is not SquashFS is refused with a line, and nothing stays mounted;
- where it is not installed (install-entry --no-squashfuse), keepers mount with squashfuse_ll.
"""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

import hpcrun
from hpcrun import image as image_mod
from conftest import user_cmd
from imagetools import is_elf, make_image

PKG = os.path.dirname(os.path.abspath(hpcrun.__file__))
DAEMON = os.path.join(PKG, "libexec", "hpcrun-squashfuse")
SQUASHFUSE_LL = shutil.which("squashfuse_ll")

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="mounts on the host: root only (CI runs as root)")


def test_the_installed_package_holds_the_daemon_and_check_names_it(as_user, hpcrun_bin):
    assert is_elf(DAEMON) and os.access(DAEMON, os.X_OK), "install-entry did not build %s" % DAEMON
    r = as_user([hpcrun_bin, "check"])
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("image mount:")]
    assert line and DAEMON in line[0] and "[ok]" in line[0], r.stdout


class Mount:
    """IMAGE mounted at a fresh directory by `program` (the daemon or squashfuse_ll), in the
    foreground, so that its pid is ours to strace and to stop."""

    def __init__(self, program, image, where, offset=0):
        self.target = str(where)
        os.mkdir(self.target)
        argv = [program, "-f"] + (["-o", "offset=%d" % offset] if offset else []) + [image, self.target]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        parent = os.stat(os.path.dirname(self.target)).st_dev
        deadline = time.monotonic() + 30
        while os.stat(self.target).st_dev == parent:
            assert self.proc.poll() is None, "%s exited %s: %s" % (program, self.proc.returncode,
                                                                   self.proc.stderr.read())
            assert time.monotonic() < deadline, "%s did not mount" % program
            time.sleep(0.01)

    def mountinfo(self):
        with open("/proc/self/mountinfo") as f:
            return [ln.split() for ln in f if ln.split()[4] == self.target]

    def close(self):
        subprocess.run(["fusermount3", "-u", self.target], check=True)
        self.proc.wait(timeout=30)
        assert self.mountinfo() == []
        os.rmdir(self.target)


@pytest.fixture
def mounts(tmp_path):
    made = []

    def mount(program, image, name, offset=0):
        m = Mount(program, image, tmp_path / name, offset)
        made.append(m)
        return m
    yield mount
    for m in made:
        if m.proc.poll() is None:
            m.close()


def tree(root):
    """Everything a program could read of the tree, by relative path."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = os.path.join(d, name)
            st = os.lstat(p)
            what = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISLNK(st.st_mode):
                what += (os.readlink(p),)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    what += (st.st_size, f.read())
            out[os.path.relpath(p, root)] = what
        dirs.sort()
    return out


def test_the_tree_is_the_images_and_read_only(shared_dir, busybox_root, busybox_squashfs, mounts):
    ours = mounts(DAEMON, busybox_squashfs, "ours")
    theirs = mounts(SQUASHFUSE_LL, busybox_squashfs, "theirs")
    t = tree(ours.target)
    assert len(t) > 50 and t == tree(theirs.target)
    assert sorted(os.listdir(ours.target)) == sorted(os.listdir(busybox_root))
    [info] = ours.mountinfo()
    assert {"ro", "nosuid", "nodev"} <= set(info[5].split(",")), info
    for attempt in (lambda: open(os.path.join(ours.target, "new"), "w"),
                    lambda: open(os.path.join(ours.target, "bin", "busybox"), "r+b"),
                    lambda: os.mkdir(os.path.join(ours.target, "d")),
                    lambda: os.chmod(os.path.join(ours.target, "bin", "busybox"), 0o4755)):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == 30, e.value             # EROFS: refused before the daemon


def test_an_hpcrun_image_at_its_offset(shared_dir, busybox_root, busybox_squashfs, mounts):
    img = make_image(busybox_root, os.path.join(shared_dir, "squashfuse-offset.img"))
    offset = image_mod.open_image(img).offset
    assert offset > 0
    at_offset = mounts(DAEMON, img, "offset", offset=offset)
    plain = mounts(DAEMON, busybox_squashfs, "plain")
    assert tree(at_offset.target) == tree(plain.target)


def requests_during(m, action):
    """How many requests the daemon answered while action() ran (its writev()s on /dev/fuse)."""
    log = os.path.join(os.path.dirname(m.target), "strace-%d" % m.proc.pid)
    s = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=writev", "-o", log, "-p", str(m.proc.pid)],
                         stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)                       # attached (strace says nothing with -qq)
        action()
        time.sleep(0.5)
    finally:
        s.send_signal(signal.SIGINT)
        s.wait(timeout=30)
    with open(log) as f:
        return sum(1 for ln in f if "writev(" in ln)


@pytest.mark.parametrize("program", ["hpcrun-squashfuse", "squashfuse_ll"])
def test_opens_and_listings_seen_once_cost_no_request(busybox_squashfs, mounts, program):
    m = mounts(DAEMON if program == "hpcrun-squashfuse" else SQUASHFUSE_LL, busybox_squashfs, program)
    busybox = os.path.join(m.target, "bin", "busybox")

    def use():                    # what a rank's loader does: open, read; list plugin directories
        for _ in range(20):       # (os.open: Python's open() asks isatty, an ioctl each daemon answers)
            fd = os.open(busybox, os.O_RDONLY)
            os.read(fd, 4096)
            os.close(fd)
            os.listdir(os.path.join(m.target, "bin"))
    use()                         # the kernel has seen every name, page and listing once
    n = requests_during(m, use)
    if program == "hpcrun-squashfuse":
        assert n == 0, "%d requests for opens and listings the kernel had seen" % n
    else:
        assert n >= 40, n         # an OPEN and a RELEASE per open: what the daemon saves


def test_a_file_that_is_not_squashfs_is_refused(tmp_path):
    bad = tmp_path / "not.sqfs"
    bad.write_bytes(b"hsqs" + os.urandom(8188))
    target = tmp_path / "mnt"
    target.mkdir()
    r = subprocess.run([DAEMON, str(bad), str(target)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.strip(), r
    assert len(r.stderr.strip().splitlines()) <= 2, r.stderr
    with open("/proc/self/mountinfo") as f:
        assert str(target) not in f.read()
    r = subprocess.run([DAEMON, "-o", "offset=-1", str(bad), str(target)], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stderr) == (2, "usage: hpcrun-squashfuse [-f] [-o offset=N] IMAGE MOUNTPOINT\n")


def _daemons_for(key):
    """argv of the FUSE daemons mounting the container `key` (their last argument: key.d/image)."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")[:-1]
        except OSError:
            continue
        if argv and argv[-1].decode(errors="replace").endswith("/%s.d/image" % key):
            out.append([a.decode(errors="replace") for a in argv])
    return out


def _run_and_see_the_daemon(as_user, test_user, hpcrun, img):
    """Run img as the test user, through `hpcrun`: the program its keeper mounted the image with."""
    plan = json.loads(as_user([hpcrun, "--dry-run", img, "true"], cwd="/").stdout)
    proc = subprocess.Popen(user_cmd(test_user, ["env", "PATH=/usr/bin:/bin", "HOME=" + test_user.pw_dir,
                                                 "HPCRUN_LINGER=0", hpcrun, img, "sh", "-c", "echo up; read x"]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd="/")
    try:
        assert proc.stdout.readline() == "up\n", proc.stderr.read()
        daemons = _daemons_for(plan["key"])
    finally:
        out, err = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0, err
    deadline = time.monotonic() + 30
    while _daemons_for(plan["key"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _daemons_for(plan["key"]) == [], "the daemon outlived its keeper"
    assert plan["stage"]["strategy"] == "fuse" and len(daemons) == 1, daemons
    assert plan["stage"]["program"] == daemons[0][0]
    return daemons[0][0]


def test_a_keeper_mounts_with_the_daemon(shared_dir, busybox_root, as_user, test_user, hpcrun_bin):
    img = make_image(busybox_root, os.path.join(shared_dir, "squashfuse-keeper.img"))
    assert _run_and_see_the_daemon(as_user, test_user, hpcrun_bin, img) == DAEMON


def test_without_the_daemon_keepers_mount_with_squashfuse_ll(shared_dir, busybox_root, as_user, test_user):
    """install-entry --no-squashfuse (or no libsquashfuse-dev): the install holds no daemon, and its
    keepers run Debian's squashfuse_ll, as before the daemon existed."""
    site = os.path.join(shared_dir, "site-no-squashfuse")
    bin_dir = os.path.join(site, "bin")
    shutil.copytree(PKG, os.path.join(site, "hpcrun"), ignore=shutil.ignore_patterns("__pycache__", "libexec"))
    os.mkdir(bin_dir)
    code = "import sys; sys.path.insert(0, sys.argv[1]); from hpcrun.cli import main; sys.exit(main(sys.argv[2:]))"
    python = os.path.realpath(sys.executable)

    def install(*extra):
        r = subprocess.run([python, "-I", "-S", "-c", code, site, "install-entry", "--bin", bin_dir] + list(extra),
                           capture_output=True, text=True, timeout=300, cwd="/")
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout
    out = install()
    assert "libexec/hpcrun-squashfuse: the FUSE daemon" in out, out
    out = install("--no-squashfuse")
    assert "images mount with squashfuse_ll (--no-squashfuse)" in out, out
    assert not os.path.exists(os.path.join(site, "hpcrun", "libexec", "hpcrun-squashfuse"))
    img = make_image(busybox_root, os.path.join(shared_dir, "squashfuse-fallback.img"))
    assert _run_and_see_the_daemon(as_user, test_user, os.path.join(bin_dir, "hpcrun"), img) == SQUASHFUSE_LL
