"""hpcrun broadcast (docs/broadcast.md): the payload to node-local storage once,
verified and all-or-nothing, and the launch mounting that copy.

On one host a "node" is a node-local directory: mpirun's ranks that name the
same directory elect one writer, so an MPMD mpirun with three --to
directories is three nodes (one of them with two ranks).  The multi-node Slurm
test bed's own checks live with the test bed."""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import imagetools  # noqa: E402
from checks import assert_one_error, eventually, keepers_of  # noqa: E402

MPIRUN = ["mpirun", "--oversubscribe"]


def sha256_of(path, offset=0, size=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        h.update(f.read() if size is None else f.read(size))
    return h.hexdigest()


def landed(d, name):
    """What a broadcast leaves in d: the copy under its digest name and one
    link of the source's name (what launches look up) to the same file."""
    found = sorted(os.listdir(d))
    if len(found) != 2 or found[0] != name or not found[1].startswith("src_"):
        return False
    return os.stat(os.path.join(d, found[0])).st_ino == os.stat(os.path.join(d, found[1])).st_ino


def entries(*dirs):
    """Every file below the given directories (what a broadcast left)."""
    out = []
    for d in dirs:
        for base, _, files in os.walk(d):
            out += [os.path.join(base, f) for f in files]
    return sorted(out)


@pytest.fixture(scope="module")
def images(shared_dir, busybox_root):
    """An hpcrun image (a few MiB, its own content), its plain SquashFS, and a
    copy whose payload no longer matches its header."""
    d = tempfile.mkdtemp(prefix="bcast-img-", dir=shared_dir)
    os.chmod(d, 0o755)
    root = os.path.join(d, "root")
    shutil.copytree(busybox_root, root, symlinks=True)
    with open(os.path.join(root, "etc/bcast-token"), "wb") as f:
        f.write(os.urandom(2 << 20))        # incompressible: a payload of a few MiB
    img = imagetools.make_image(root, os.path.join(d, "app.img"))
    sqfs = imagetools.mksquashfs(root, os.path.join(d, "app.sqfs"))
    bad = os.path.join(d, "bad.img")
    shutil.copyfile(img, bad)
    os.chmod(bad, 0o755)
    size = os.path.getsize(img)
    with open(bad, "r+b") as f:
        f.seek(size - 100)
        f.write(b"\xff" * 16)
    shutil.rmtree(root)

    class Images:
        pass
    i = Images()
    i.img, i.sqfs, i.bad, i.dir = img, sqfs, bad, d
    head = open(img, "rb").read(4096).split(b"\n")[1].split()
    i.offset, i.size, i.sha = int(head[2]), int(head[3]), head[4].decode()
    i.name = "sha256_%s.sqfs" % i.sha
    return i


@pytest.fixture()
def node(shared_dir, test_user, as_user, images):
    """A private area of the test user: run_dir (and so broadcast_dir) set by a
    user HPCRUN_CONF; run(argv) runs as the user with it; dirs(n) names n
    "node-local" directories.  Its containers linger 0 s and are gone at the
    end, with their staged copies."""
    base = tempfile.mkdtemp(prefix="bcast-", dir=shared_dir)
    os.chown(base, test_user.pw_uid, test_user.pw_gid)
    os.chmod(base, 0o755)
    conf = os.path.join(base, "hpcrun.conf")
    with open(conf, "w") as f:
        f.write("run_dir = %s/run-%%u\n" % base)
    os.chmod(conf, 0o644)

    class Node:
        pass
    n = Node()
    n.base, n.run_dir = base, os.path.join(base, "run-%d" % test_user.pw_uid)
    n.bcast = os.path.join(n.run_dir, "bcast")
    n.env = {"HPCRUN_CONF": conf, "HPCRUN_LINGER": "0"}

    def run(argv, env=None, **kw):
        e = dict(n.env)
        e.update(env or {})
        return as_user(argv, env=e, **kw)
    n.run = run
    n.dirs = lambda count: [os.path.join(base, "node%d" % i) for i in range(count)]
    yield n
    assert eventually(lambda: not keepers_of(images.dir))
    assert not [f for f in entries(os.path.join(n.run_dir, "stage")) if f.endswith(".sqfs")]
    subprocess.run(["rm", "-rf", base])


def test_alone_lands_a_verified_copy_that_the_launch_mounts(node, images, hpcrun_bin):
    r = node.run([hpcrun_bin, "broadcast", images.img])
    assert r.returncode == 0, r.stderr
    copy = os.path.join(node.bcast, images.name)
    assert landed(node.bcast, images.name), entries(node.bcast)
    st = os.stat(copy)
    assert st.st_mode & 0o777 == 0o600 and os.stat(node.bcast).st_mode & 0o777 == 0o700
    assert st.st_size == images.size and sha256_of(copy) == images.sha
    assert "1 copied" in r.stdout
    again = node.run([hpcrun_bin, "broadcast", images.img])
    assert again.returncode == 0 and "already on this node" in again.stdout
    assert os.stat(copy).st_mtime_ns == st.st_mtime_ns
    # the keeper mounts the local copy: no staged copy, the token is the image's
    r = node.run([hpcrun_bin, "-v", images.img, "wc", "-c", "/etc/bcast-token"])
    assert r.returncode == 0 and r.stdout.split()[0] == str(2 << 20), r.stderr
    assert "node-local broadcast copy %s" % copy in r.stderr
    assert not entries(os.path.join(node.run_dir, "stage"))


def test_an_image_without_a_digest_is_found_by_its_source(node, images, hpcrun_bin):
    r = node.run([hpcrun_bin, "broadcast", images.sqfs])
    assert r.returncode == 0, r.stderr
    sha = sha256_of(images.sqfs)
    names = sorted(os.listdir(node.bcast))
    assert len(names) == 2 and names[0] == "sha256_%s.sqfs" % sha and names[1].startswith("src_")
    assert os.stat(os.path.join(node.bcast, names[0])).st_ino == os.stat(os.path.join(node.bcast, names[1])).st_ino
    r = node.run([hpcrun_bin, "-v", images.sqfs, "true"])
    assert r.returncode == 0 and "broadcast copy %s" % os.path.join(node.bcast, names[1]) in r.stderr, r.stderr


def test_a_copy_that_is_not_right_is_not_used(node, images, hpcrun_bin):
    """Wrong size or another user's file: the launch stages from the image as before."""
    os.makedirs(node.bcast)
    shutil.chown(node.run_dir, "hpcrun-test", "hpcrun-test")
    os.chmod(node.run_dir, 0o700)
    shutil.chown(node.bcast, "hpcrun-test", "hpcrun-test")
    os.chmod(node.bcast, 0o700)
    copy = os.path.join(node.bcast, images.name)
    with open(copy, "wb") as f:
        f.write(b"\0" * 4096)
    shutil.chown(copy, "hpcrun-test", "hpcrun-test")
    r = node.run([hpcrun_bin, "-v", images.img, "true"])
    assert r.returncode == 0 and "broadcast copy" not in r.stderr, r.stderr


def test_mpi_reads_the_image_once_and_every_node_gets_its_copy(node, images, hpcrun_bin):
    """Three node-local directories (one shared by two ranks): the image's
    payload is read by one process once (strace counts every read of the
    file by every process of the job), and each directory gets one verified
    copy."""
    dirs = node.dirs(3)
    log = os.path.join(node.base, "strace")
    argv = ["strace", "-f", "-ff", "-qq", "-y", "-e", "trace=read,pread64,readv,preadv,preadv2", "-o", log]
    argv += MPIRUN
    for d, n in zip(dirs, (1, 2, 1)):
        argv += ["-np", str(n), hpcrun_bin, "broadcast", "--chunk-mib", "1", "--to", d, images.img, ":"]
    r = node.run(argv[:-1], timeout=300)
    assert r.returncode == 0, r.stderr
    assert "on 3 node(s): 3 copied" in r.stdout, r.stdout
    for d in dirs:
        assert landed(d, images.name), entries(d)
        assert sha256_of(os.path.join(d, images.name)) == images.sha
    readers = {}
    pattern = re.compile(r"\w+\(\d+<%s>.*\)\s+=\s+(\d+)" % re.escape(images.img))
    for name in os.listdir(node.base):
        if name.startswith("strace."):
            with open(os.path.join(node.base, name), errors="replace") as f:
                got = sum(int(m.group(1)) for m in map(pattern.match, f) if m)
            if got:
                readers[name] = got
    # one process of the job read the file: the payload once, and its header
    assert len(readers) == 1 and images.size <= sum(readers.values()) < images.size + 65536, readers
    # a second broadcast: every node has it, the payload is not read at all
    r = node.run(MPIRUN + ["-np", "1", hpcrun_bin, "broadcast", "-v", "--to", dirs[0], images.img, ":",
                           "-np", "1", hpcrun_bin, "broadcast", "-v", "--to", dirs[1], images.img])
    assert r.returncode == 0 and "0 copied, 2 had it; 0 bytes read" in r.stdout, r.stdout + r.stderr
    # -v lists the nodes then too, and the digest is the image's (not its copy's file name)
    assert "had it in %s" % dirs[0] in r.stdout and "had it in %s" % dirs[1] in r.stdout, r.stdout
    assert "(sha256 %s)" % images.sha[:16] in r.stdout, r.stdout
    # one node lacks it (not the reader's): only that one receives
    os.unlink(os.path.join(dirs[2], images.name))
    argv = MPIRUN[:]
    for d in dirs:
        argv += ["-np", "1", hpcrun_bin, "broadcast", "-v", "--to", d, images.img, ":"]
    r = node.run(argv[:-1])
    assert r.returncode == 0 and "on 3 node(s): 1 copied, 2 had it" in r.stdout, r.stdout + r.stderr
    assert "copied to %s" % dirs[2] in r.stdout and "had it in %s" % dirs[0] in r.stdout, r.stdout
    assert sha256_of(os.path.join(dirs[2], images.name)) == images.sha


def _one_error_line(r, code, *fragments):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.startswith("hpcrun: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_mpi_a_payload_that_does_not_match_lands_nowhere(node, images, hpcrun_bin):
    dirs = node.dirs(2)
    r = node.run(MPIRUN + ["-np", "1", hpcrun_bin, "broadcast", "--to", dirs[0], images.bad, ":",
                           "-np", "2", hpcrun_bin, "broadcast", "--to", dirs[1], images.bad])
    _one_error_line(r, 65, "does not match its header")
    assert entries(*dirs) == []


def test_mpi_a_full_node_fails_all_and_leaves_nothing(node, images, hpcrun_bin, test_user):
    dirs = node.dirs(2)
    small = os.path.join(node.base, "small")
    os.mkdir(small)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700,uid=%d" % test_user.pw_uid,
                    "hpcrun-bcast-test", small], check=True)
    try:
        r = node.run(MPIRUN + ["-np", "1", hpcrun_bin, "broadcast", "--to", dirs[0], images.img, ":",
                               "-np", "1", hpcrun_bin, "broadcast", "--to", dirs[1], images.img, ":",
                               "-np", "1", hpcrun_bin, "broadcast", "--to", small, images.img])
        _one_error_line(r, 71, "no space", small)
        assert entries(dirs[0], dirs[1], small) == []
        r = node.run([hpcrun_bin, "broadcast", "--to", small, images.img])
        assert_one_error(r, 71, "no space", small)
        assert entries(small) == []
    finally:
        subprocess.run(["umount", small], check=True)


def test_clear_errors_alone(node, images, hpcrun_bin, busybox_root, test_user):
    r = node.run([hpcrun_bin, "broadcast", "--to", "/nonexistent-hpcrun/bcast", images.img])
    assert_one_error(r, 71, "parent does not exist", "/nonexistent-hpcrun/bcast")
    other = os.path.join(node.base, "roots")
    os.mkdir(other, 0o755)              # root's: not the user's
    r = node.run([hpcrun_bin, "broadcast", "--to", other, images.img])
    assert_one_error(r, 77, "not private to this user", other)
    link = os.path.join(node.base, "link")
    os.symlink("/tmp", link)
    r = node.run([hpcrun_bin, "broadcast", "--to", link, images.img])
    assert_one_error(r, 77, link)
    r = node.run([hpcrun_bin, "broadcast", "--to", os.path.join(node.base, "d"), busybox_root])
    assert_one_error(r, 64, "directory image")
    r = node.run([hpcrun_bin, "broadcast", "--to", os.path.join(node.base, "d"), images.bad])
    assert_one_error(r, 65, "does not match its header")
    assert entries(os.path.join(node.base, "d")) == []
    r = node.run([hpcrun_bin, "broadcast", "--job", "../x", images.img])
    assert_one_error(r, 64, "--job")
    # srun's tasks without an MPI plugin: each copies alone, and the first says what that costs
    r = node.run([hpcrun_bin, "broadcast", "--to", os.path.join(node.base, "s"), images.img],
                 env={"SLURM_NTASKS": "4", "SLURM_PROCID": "0"})
    assert r.returncode == 0 and "4 tasks without MPI" in r.stderr and "srun --mpi=pmix" in r.stderr, r.stderr
    # under an MPI launcher without mpi4py: one line, 69, before anything is made
    code = ("import sys; sys.modules['mpi4py'] = None; from hpcrun import cli; "
            "sys.exit(cli.main(['broadcast', '--mpi', 'yes', '--to', %r, %r]))"
            % (os.path.join(node.base, "e"), images.img))
    r = node.run([os.path.join(os.path.dirname(hpcrun_bin), "python3"), "-c", code])
    assert_one_error(r, 69, "mpi4py")
    assert not os.path.exists(os.path.join(node.base, "e"))


def test_job_directories_and_clean(node, images, hpcrun_bin, test_user):
    for job in ("101", "102"):
        r = node.run([hpcrun_bin, "broadcast", images.img], env={"SLURM_JOB_ID": job})
        assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(node.bcast)) == ["job-101", "job-102"]
    # a launch in job 101 finds its job's copy
    r = node.run([hpcrun_bin, "-v", images.img, "true"], env={"SLURM_JOB_ID": "101"})
    assert "%s/job-101/%s" % (node.bcast, images.name) in r.stderr, r.stderr
    r = node.run([hpcrun_bin, "broadcast", "--clean"], env={"SLURM_JOB_ID": "101"})
    assert r.returncode == 0 and r.stdout == r.stderr == ""
    assert os.listdir(node.bcast) == ["job-102"]
    r = node.run([hpcrun_bin, "broadcast", "--clean", "--job", "102"], env={"PBS_JOBID": "7.pbs"})
    assert r.returncode == 0 and os.listdir(node.bcast) == []
    r = node.run([hpcrun_bin, "broadcast", "--clean", "--job", "102"])     # again: nothing to do
    assert r.returncode == 0
    # a job epilogue as root cleans the user's job directory (owner checked as the user's)
    assert node.run([hpcrun_bin, "broadcast", images.img], env={"SLURM_JOB_ID": "103"}).returncode == 0
    r = subprocess.run([hpcrun_bin, "broadcast", "--clean", "--uid", str(test_user.pw_uid), "--job", "103"],
                       env=dict(os.environ, HPCRUN_CONF=node.env["HPCRUN_CONF"]), capture_output=True, text=True)
    assert r.returncode == 0 and os.listdir(node.bcast) == [], r.stderr
    r = node.run([hpcrun_bin, "broadcast", "--clean", "--uid", "0"])
    assert_one_error(r, 64, "--uid")


def test_a_killed_broadcasts_half_copy_is_removed_by_the_next(node, images, hpcrun_bin, test_user):
    d = node.bcast
    for x in (node.run_dir, d):
        os.mkdir(x, 0o700)
        os.chown(x, test_user.pw_uid, test_user.pw_gid)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = os.path.join(d, ".tmp.%d.%s" % (dead.pid, images.name))
    with open(stale, "wb") as f:
        f.write(b"half")
    os.chown(stale, test_user.pw_uid, test_user.pw_gid)
    r = node.run([hpcrun_bin, "-v", images.img, "true"])
    assert r.returncode == 0 and "broadcast copy" not in r.stderr      # a launch never takes a .tmp
    r = node.run([hpcrun_bin, "broadcast", "--no-job", images.img])
    assert r.returncode == 0 and landed(d, images.name), (r.stderr, entries(d))


def test_a_node_step_after_sbcast_indexes_the_shared_image(node, images, hpcrun_bin):
    """--for: a node-local copy of the file (what sbcast leaves) lands under the
    names a launch of the shared path looks for; another image is refused."""
    local = os.path.join(node.base, "local.sqfs")
    shutil.copyfile(images.sqfs, local)
    os.chmod(local, 0o644)
    r = node.run([hpcrun_bin, "broadcast", "--mpi", "no", "--for", images.sqfs, local])
    assert r.returncode == 0, r.stderr
    r = node.run([hpcrun_bin, "-v", images.sqfs, "true"])
    assert r.returncode == 0 and "node-local broadcast copy %s/src_" % node.bcast in r.stderr, r.stderr
    r = node.run([hpcrun_bin, "broadcast", "--mpi", "no", "--no-job", "--to", os.path.join(node.base, "x"),
                  "--for", images.img, local])
    assert_one_error(r, 65, "not a copy of the --for image")
    assert entries(os.path.join(node.base, "x")) == []


def test_checks_still_apply_to_a_broadcast_copy(node, images, hpcrun_bin, site_config, test_user):
    """require_signature: the signature is read from the image file, and the
    keeper hashes the local copy against the signed claim (a copy changed
    after landing is 65); a pin is checked against the image file."""
    img = os.path.join(node.base, "signed.img")
    shutil.copyfile(images.img, img)
    os.chown(img, test_user.pw_uid, test_user.pw_gid)
    os.chmod(img, 0o755)
    key = os.path.join(node.base, "key")
    r = node.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@site", "-f", key])
    assert r.returncode == 0, r.stderr
    assert node.run([hpcrun_bin, "sign", "-k", key, img]).returncode == 0
    signers = os.path.join(node.base, "allowed_signers")
    with open(signers, "w") as f:
        f.write('alice@site namespaces="hpcrun-image" %s\n' % open(key + ".pub").read().strip())
    policy = site_config("require_signature = yes\nallowed_signers = %s\n" % signers)
    assert node.run([hpcrun_bin, "broadcast", img]).returncode == 0
    copy = os.path.join(node.bcast, images.name)
    r = node.run([hpcrun_bin, "-v", "--image-digest", "sha256:" + images.sha, img, "true"], prefix=policy)
    assert r.returncode == 0 and "broadcast copy %s" % copy in r.stderr, r.stderr
    r = node.run([hpcrun_bin, "--image-digest", "sha256:" + "0" * 64, img, "true"], prefix=policy)
    assert_one_error(r, 65, "not the one pinned")
    assert eventually(lambda: not keepers_of(img))
    with open(copy, "r+b") as f:
        f.seek(images.size - 100)
        f.write(b"\xff" * 16)
    r = node.run([hpcrun_bin, img, "true"], prefix=policy)
    assert_one_error(r, 65, "does not match its header", copy)


@pytest.mark.skipif(os.getuid() != 0, reason="root's kernel mount")
def test_root_kernel_mount_uses_the_copy(images, hpcrun_bin, shared_dir):
    base = tempfile.mkdtemp(prefix="bcast-root-", dir=shared_dir)
    conf = os.path.join(base, "hpcrun.conf")
    with open(conf, "w") as f:
        f.write("run_dir = %s/run\n" % base)
    env = dict(os.environ, HPCRUN_CONF=conf, HPCRUN_LINGER="0")
    try:
        r = subprocess.run([hpcrun_bin, "broadcast", images.img], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        copy = os.path.join(base, "run", "bcast", images.name)
        r = subprocess.run([hpcrun_bin, "-v", images.img, "wc", "-c", "/etc/bcast-token"], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.split()[0] == str(2 << 20), r.stderr
        assert "broadcast copy %s" % copy in r.stderr and "(kernel)" in r.stderr, r.stderr
        assert eventually(lambda: not keepers_of(images.img))
        assert subprocess.run(["losetup", "-j", copy], capture_output=True, text=True).stdout == ""
    finally:
        shutil.rmtree(base)


SLURM_OK = (shutil.which("slurmctld") and shutil.which("munged") and shutil.which("strace") and os.getuid() == 0)


@pytest.mark.skipif(not SLURM_OK, reason="needs root, slurmctld, munge and strace")
def test_srun_on_four_nodes_reads_once_and_every_node_mounts_its_copy(shared_dir, test_user, images, hpcrun_bin):
    """The Slurm test bed's four nodes, each with its own tmpfs /tmp: in one
    allocation `srun --mpi=pmix hpcrun broadcast` (strace on every task: one
    process reads the file), every node's launch mounts its own job copy, and
    --clean on every node removes it."""
    from testbed.cluster import Cluster
    from conftest import user_cmd
    work = tempfile.mkdtemp(prefix="bcast-slurm-", dir=shared_dir)
    os.chown(work, test_user.pw_uid, test_user.pw_gid)
    os.chmod(work, 0o755)
    trace = "strace -ff -qq -y -e trace=read,pread64,readv,preadv,preadv2 -o %s/st.$SLURM_PROCID" % work
    script = "; ".join([
        "set -e",
        "srun -N4 -n4 --mpi=pmix sh -c 'exec %s %s broadcast %s'" % (trace, hpcrun_bin, images.img),
        "srun -N4 -n4 sh -c '%s -v %s wc -c /etc/bcast-token 2>&1'" % (hpcrun_bin, images.img),
        "srun -N4 -n4 %s broadcast --clean" % hpcrun_bin,
        "srun -N4 -n4 sh -c 'echo left on $SLURMD_NODENAME: $(ls /tmp/hpcrun-%d/bcast)'" % test_user.pw_uid])
    with Cluster(nodes=4, cpus=2, shared=[shared_dir]) as c:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": test_user.pw_dir, "LANG": "C.UTF-8",
               "SLURM_CONF": c.conf, "HPCRUN_LINGER": "0"}
        r = subprocess.run(user_cmd(test_user, ["env"] + ["%s=%s" % kv for kv in env.items()]
                                    + ["salloc", "-N4", "-n4", "sh", "-c", script]),
                           cwd=work, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        job = re.search(r"job-(\d+)/", r.stdout).group(1)
    assert "on 4 node(s): 4 copied, 0 had it; %d bytes read" % images.size in r.stdout, r.stdout
    copy = "/tmp/hpcrun-%d/bcast/job-%s/%s (fuse)" % (test_user.pw_uid, job, images.name)
    assert r.stdout.count("node-local broadcast copy " + copy) == 4, r.stdout
    assert r.stdout.count("%d /etc/bcast-token" % (2 << 20)) == 4, r.stdout
    assert sorted(x for x in r.stdout.splitlines() if x.startswith("left on")) == \
        ["left on n%d:" % i for i in range(1, 5)], r.stdout
    readers = {}
    pattern = re.compile(r"\w+\(\d+<%s>.*\)\s+=\s+(\d+)" % re.escape(images.img))
    for name in os.listdir(work):
        if name.startswith("st."):
            with open(os.path.join(work, name), errors="replace") as f:
                got = sum(int(m.group(1)) for m in map(pattern.match, f) if m)
            if got:
                readers[name] = got
    assert len(readers) == 1 and images.size <= sum(readers.values()) < images.size + 65536, readers
    assert not os.path.exists("/tmp/hpcrun-%d/bcast/job-%s" % (test_user.pw_uid, job))   # not on the host
    shutil.rmtree(work)


def test_mpi_a_write_failing_midway_on_one_node_lands_nowhere(node, images, hpcrun_bin):
    """Free space passes, then one writer's writes fail part of the way (a file size limit:
    EFBIG after 1 MiB): it keeps receiving to the end, all agree, no copy and no .tmp anywhere."""
    dirs = node.dirs(3)
    r = node.run(MPIRUN + ["-np", "1", hpcrun_bin, "broadcast", "--chunk-mib", "1", "--to", dirs[0], images.img, ":",
                           "-np", "1", "prlimit", "--fsize=1048576", hpcrun_bin, "broadcast", "--chunk-mib", "1",
                           "--to", dirs[1], images.img, ":",
                           "-np", "1", hpcrun_bin, "broadcast", "--chunk-mib", "1", "--to", dirs[2], images.img])
    _one_error_line(r, 71, "cannot write the broadcast copy", dirs[1])
    assert entries(*dirs) == []
