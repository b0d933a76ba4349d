"""Fake nodes with real node-local storage (tests/testbed/nodens.py): four slurmd
"nodes", each in a mount namespace of its own with its own tmpfs on /tmp and
/dev/shm; and, on top, images broadcast into that storage with Slurm's own
fan-out.  Real munged/slurmctld/slurmd, jobs as the unprivileged test user."""
import os
import re
import secrets
import shutil
import subprocess
import time

import pytest

import imagetools
from testbed import slurm
from testbed.cluster import Cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_DIR = os.path.join(ROOT, "plugins", "slurm")
NODES = ["n1", "n2", "n3", "n4"]
T = 120

pytestmark = pytest.mark.skipif(
    not (shutil.which("slurmctld") and shutil.which("munged") and os.path.exists("/usr/include/slurm/spank.h")
         and os.getuid() == 0),
    reason="needs root, slurmctld, slurmd, munge and libslurm-dev")


@pytest.fixture(scope="module")
def spank_plugin():
    subprocess.run(["make", "-s", "-C", PLUGIN_DIR], check=True, capture_output=True, timeout=120)
    return os.path.join(PLUGIN_DIR, "spank_hpcrun.so")


@pytest.fixture(scope="module")
def workdir(shared_dir, test_user):
    """The job user's directory on the shared file system."""
    d = os.path.join(shared_dir, "slurm-bcast")
    os.makedirs(d, exist_ok=True)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    return d


# sbcast maps the whole file (mmap) and sends it from there: a mapping counts as read.
TRACED = "read,pread64,readv,preadv,preadv2,sendfile,copy_file_range,splice,mmap,openat"


@pytest.fixture(scope="module")
def wrappers(workdir, hpcrun_bin):
    """hpcrun and sbcast that run under strace (one file per process, named by
    node) when HPCRUN_TEST_TRACE names a directory, else are the real ones."""
    d = os.path.join(workdir, "wrap")
    os.makedirs(d, exist_ok=True)
    for name, real in (("hpcrun", hpcrun_bin), ("sbcast", shutil.which("sbcast"))):
        with open(os.path.join(d, name), "w") as f:
            f.write('#!/bin/sh\n[ -n "$HPCRUN_TEST_TRACE" ] || exec %s "$@"\n'
                    'exec strace -f -ff -qq -y --seccomp-bpf -e trace=%s -o "$HPCRUN_TEST_TRACE/%s.${SLURMD_NODENAME:-submit}" '
                    '%s "$@"\n' % (real, TRACED, name, real))
        os.chmod(os.path.join(d, name), 0o755)
    return d


def start_cluster(spank_plugin, wrappers, shared_dir, plugin_args=(), **kw):
    return Cluster(nodes=4, plugin=spank_plugin,
                   plugin_args=["hpcrun=" + os.path.join(wrappers, "hpcrun")] + list(plugin_args),
                   cli_filter=os.path.join(PLUGIN_DIR, "cli_filter.lua"), shared=[shared_dir], **kw).start()


@pytest.fixture(scope="module")
def cluster4(spank_plugin, wrappers, shared_dir):
    c = start_cluster(spank_plugin, wrappers, shared_dir, cpus=2)
    yield c
    c.stop()


def as_user(cluster, test_user, workdir):
    """run(argv, env=None) as the test user, in workdir, against cluster."""
    from conftest import user_cmd

    def go(argv, env=None, **kw):
        e = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": test_user.pw_dir, "USER": test_user.pw_name,
             "LANG": "C.UTF-8", "SLURM_CONF": cluster.conf}
        e.update(env or {})
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", T)
        return subprocess.run(user_cmd(test_user, ["env"] + ["%s=%s" % kv for kv in e.items()] + list(argv)),
                              cwd=kw.pop("cwd", workdir), **kw)
    return go


@pytest.fixture(scope="module")
def run4(cluster4, test_user, workdir):
    return as_user(cluster4, test_user, workdir)


# -- the test bed: node-local /tmp and /dev/shm ------------------------------------------------

@pytest.mark.parametrize("top", ["/tmp", "/dev/shm"])
def test_node_local_storage_is_per_node(cluster4, run4, top):
    token = "hpcrun-nodes-%s" % secrets.token_hex(4)
    # Every node writes <token>.<its name>, then, in a second step, lists what it has.
    r = run4(["srun", "-N4", "-n4", "sh", "-c", 'echo "$SLURMD_NODENAME" > %s/%s.$SLURMD_NODENAME' % (top, token)])
    assert r.returncode == 0, r.stderr
    r = run4(["srun", "-N4", "-n4", "sh", "-c", 'echo "$SLURMD_NODENAME:" $(ls %s | grep %s)' % (top, token)])
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["%s: %s.%s" % (n, token, n) for n in NODES], r.stdout
    assert not [f for f in os.listdir(top) if token in f]       # nor on the host
    for n in NODES:                                             # each node's own view, as root
        assert cluster4.in_node(n, ["cat", "%s/%s.%s" % (top, token, n)]).stdout.strip() == n


def test_shared_paths_stay_shared(cluster4, run4, workdir):
    mark = os.path.join(workdir, "from-n3-%s" % secrets.token_hex(4))
    r = run4(["srun", "-w", "n3", "-N1", "sh", "-c", "echo written-on-n3 > '%s'" % mark])
    assert r.returncode == 0, r.stderr
    with open(mark) as f:                                      # the host sees it ...
        assert f.read() == "written-on-n3\n"
    r = run4(["srun", "-N4", "-n4", "cat", mark])              # ... and so does every node
    assert r.stdout.split("\n").count("written-on-n3") == 4, r.stdout + r.stderr
    os.unlink(mark)


def test_stop_leaves_no_mounts_and_no_processes(shared_dir):
    c = Cluster(nodes=4, cpus=1, shared=[shared_dir]).start()
    try:
        # A task that outlives its step on purpose, and files in the node-local tmpfs.
        r = subprocess.run(["srun", "-N4", "-n4", "sh", "-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=2 "
                            "2>/dev/null; setsid sleep 300 </dev/null >/dev/null 2>&1 &"],
                           env=c.env(), capture_output=True, text=True, timeout=T)
        assert r.returncode == 0, r.stderr
        running = c.leftovers()
        # The check can see what it looks for: four namespaces with their tmpfs mounts.
        assert sum("sees" in line for line in running) >= 8, running
        assert len(set(c.node_ns.values())) == 4
    finally:
        c.stop()
    left = c.leftovers()
    assert left == [], left


def test_hpcrun_itself_is_not_wrapped(run4, wrappers, bcast_images):
    # e.g. `srun --ntasks-per-node=1 hpcrun broadcast IMG` in a job that has an image
    r = run4(["srun", "-N2", "--container-image=small.img", "hpcrun", "--version"],
             env={"PATH": wrappers + ":/usr/local/bin:/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.count("hpcrun") == 2, r.stdout + r.stderr


# -- --container-bcast: sbcast into node-local storage, the tasks mount the local copy ----------

@pytest.fixture(scope="module")
def bcast_images(workdir, busybox_root):
    """{name: path} on the shared file system: busybox with incompressible filler
    of 3 MiB ("small") and 7 MiB ("large")."""
    out = {}
    for name, mib in (("small", 3), ("large", 7)):
        root = os.path.join(workdir, "root-" + name)
        shutil.copytree(busybox_root, root, symlinks=True)
        with open(os.path.join(root, "filler"), "wb") as f:
            f.write(os.urandom(mib << 20))
        out[name] = imagetools.make_image(root, os.path.join(workdir, name + ".img"))
        shutil.rmtree(root)
    return out


def bytes_read(trace_dir, path):
    """{trace file: bytes that process read from path}, for the processes that read any."""
    call = re.compile(r"^(\w+)\((.*)\)\s+=\s+(\w+)")
    tag = "<%s>" % path
    readers = {}
    for name in os.listdir(trace_dir):
        got = 0
        with open(os.path.join(trace_dir, name), errors="replace") as f:
            for m in map(call.match, f):
                if not m or tag not in m.group(2) or m.group(1) == "openat":
                    continue
                got += int(m.group(2).split(", ")[1]) if m.group(1) == "mmap" else int(m.group(3))
        if got:
            readers[name] = got
    return readers


def traced(workdir, test_user):
    d = os.path.join(workdir, "trace-" + secrets.token_hex(4))
    os.mkdir(d)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    return d


def node_files(cluster, node, *dirs):
    r = cluster.in_node(node, ["find"] + list(dirs) + ["-mindepth", "1"])
    return sorted(line for line in r.stdout.splitlines() if line)


def wait_for(check, timeout=30):
    end = time.monotonic() + timeout
    while not check() and time.monotonic() < end:
        time.sleep(0.2)
    return check()


def test_container_bcast_reads_the_image_once_and_every_node_mounts_its_copy(
        cluster4, run4, workdir, wrappers, bcast_images, test_user):
    img = bcast_images["small"]
    size = os.path.getsize(img)
    # HPCRUN_LINGER=0: strace -f waits for the keeper, which would linger after the task.
    env = {"PATH": wrappers + ":/usr/local/bin:/usr/bin:/bin", "HPCRUN_LINGER": "0"}
    # Without a broadcast every node's launch reads the payload from the shared file.
    env["HPCRUN_TEST_TRACE"] = before = traced(workdir, test_user)
    r = run4(["srun", "-N4", "-n4", "--container-image=small.img", "true"], env=env)
    assert r.returncode == 0, r.stderr
    per_node = {}
    for name, got in bytes_read(before, img).items():
        per_node[name.split(".")[1]] = per_node.get(name.split(".")[1], 0) + got
    assert sorted(per_node) == NODES and min(per_node.values()) >= size - 65536, per_node

    # With --container-bcast: sbcast reads it once; the launches read its header only.
    env["HPCRUN_TEST_TRACE"] = after = traced(workdir, test_user)
    r = run4(["srun", "-N4", "-n4", "--container=small.img", "--container-bcast", "sh", "-c",
              'echo "$SLURM_JOB_ID"'], env=env)
    assert r.returncode == 0, r.stderr
    job = r.stdout.split()[0]
    readers = bytes_read(after, img)
    sbcast = {k: v for k, v in readers.items() if k.startswith("sbcast.")}
    assert list(sbcast.values()) == [size], readers               # one process read it, once
    others = {k: v for k, v in readers.items() if k not in sbcast}
    assert all(v < 65536 for v in others.values()), others          # the launches: header and signature
    # Every node's launch opened its own node-local copy, in the job's directory.
    copy = re.compile(r"openat\(.*\"(/tmp/hpcrun-%d/bcast/job-%s/sha256_[0-9a-f]{64}\.sqfs)\"" % (
        test_user.pw_uid, job))
    opened = {}
    for name in os.listdir(after):
        if name.startswith("hpcrun."):
            with open(os.path.join(after, name), errors="replace") as f:
                for m in filter(None, map(copy.search, f)):
                    opened.setdefault(name.split(".")[1], set()).add(m.group(1))
    assert sorted(opened) == NODES, opened
    # Job end (the plugin's job epilog): the copies and the sbcast files are gone on every node.
    for n in NODES:
        assert wait_for(lambda: node_files(cluster4, n, "/tmp/hpcrun-%d/bcast" % test_user.pw_uid) == []), \
            node_files(cluster4, n, "/tmp/hpcrun-%d/bcast" % test_user.pw_uid)
        assert not [f for f in node_files(cluster4, n, "/tmp") if ".hpcrun-sbcast." in f]
    shutil.rmtree(before)
    shutil.rmtree(after)


def one_error(r):
    assert r.returncode != 0, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("hpcrun: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_container_bcast_errors_are_one_clear_line_and_leave_nothing(
        spank_plugin, wrappers, shared_dir, workdir, bcast_images, test_user):
    """Nodes with 6 MiB of /tmp: sbcast's directory (bcast_tmp=) missing; the
    large image does not fit for sbcast; the small one fits for sbcast but not
    beside its landed copy; a broadcast directory whose parent is missing."""
    c = start_cluster(spank_plugin, wrappers, shared_dir, plugin_args=["bcast_tmp=/tmp/sbcast-in"], cpus=1,
                      node_tmp_size="6m")
    try:
        run = as_user(c, test_user, workdir)
        line = one_error(run(["srun", "-N1", "--container-bcast", "true"]))
        assert line == "hpcrun: error: --container-bcast: no image (--container-image, --container or HPCRUN_IMAGE)"
        line = one_error(run(["srun", "-N4", "--container-image=small.img", "--container-bcast", "true"]))
        assert "sbcast of %s to node-local /tmp/sbcast-in failed: n" % bcast_images["small"] in line, line
        assert ": no directory /tmp/sbcast-in" in line, line
        for n in NODES:
            assert c.in_node(n, ["mkdir", "-m", "1777", "/tmp/sbcast-in"]).returncode == 0
        r = run(["srun", "-N4", "--container-image=large.img", "--container-bcast", "echo", "ran"])
        line = one_error(r)
        assert "ran" not in r.stdout and r.returncode == 1, r.stdout     # no task ran the program
        assert "sbcast of %s to node-local /tmp/sbcast-in failed" % bcast_images["large"] in line, line
        assert "KiB free in /tmp/sbcast-in, the image needs %d KiB" % ((os.path.getsize(bcast_images["large"]) + 1023) // 1024) \
            in line, line
        line = one_error(run(["srun", "-N4", "--container-image=small.img", "--container-bcast", "true"]))
        assert "no space for the image's payload in the node-local broadcast directory" in line, line
        # Above, 6 MiB held small.img's sbcast file but not its copy beside it, on every node.  With
        # 10 MiB n1..n3 land theirs and n4 cannot: none may keep a copy (all or nothing).
        # In a batch script, so that a later step (before the job epilog) looks.
        for n in NODES[:3]:
            c.in_node(n, ["mount", "-o", "remount,size=10m", "/tmp"], check=True)
        with open(os.path.join(workdir, "partial.sh"), "w") as f:
            f.write("#!/bin/sh\n#SBATCH -N4 --ntasks-per-node=1\n"
                    "srun --container-image=small.img --container-bcast true; echo \"bcast rc=$?\"\n"
                    "srun sh -c 'echo \"$SLURMD_NODENAME has $(ls /tmp/hpcrun-%d/bcast/job-$SLURM_JOB_ID | wc -l)\"'\n"
                    % test_user.pw_uid)
        r = run(["sbatch", "--parsable", "-o", "partial.out", "partial.sh"])
        assert r.returncode == 0, r.stderr
        slurm.wait(int(r.stdout.strip().split(";")[0]), timeout=T, env=c.env())
        with open(os.path.join(workdir, "partial.out")) as f:
            out = f.read().splitlines()
        # the step failed (its tasks did not run) and the next one was not kept waiting for its CPUs
        assert "bcast rc=1" in out and sorted(line for line in out if " has " in line) == [
            "%s has 0" % n for n in NODES], out
        assert len([line for line in out if line.startswith("hpcrun: error: no space")]) == 1, out
        conf = os.path.join(workdir, "missing-bcast.conf")
        with open(conf, "w") as f:
            f.write("broadcast_dir = /tmp/no-such-dir-%s/bcast\n" % secrets.token_hex(4))
        line = one_error(run(["srun", "-N4", "--container-image=small.img", "--container-bcast", "true"],
                             env={"HPCRUN_CONF": conf}))
        assert "no-such-dir" in line, line
        for n in NODES:   # no copy, no sbcast file, no .tmp: only the (empty) broadcast directory
            left = [f for f in node_files(c, n, "/tmp") if "/hpcrun-slurm-" not in f and "/hpcrun-tests-" not in f]
            assert not [f for f in left if ".sqfs" in f or ".hpcrun-sbcast" in f or ".tmp." in f], left
    finally:
        c.stop()
    left = c.leftovers()
    assert left == [], left


def test_sbatch_container_bcast_broadcasts_once_per_job(cluster4, run4, workdir, wrappers, bcast_images, test_user):
    """#SBATCH --container-bcast: the first srun broadcasts, a later one with the
    same image finds the job's copies (sbcast reads the file once per job)."""
    env = {"PATH": wrappers + ":/usr/local/bin:/usr/bin:/bin", "HPCRUN_TEST_TRACE": traced(workdir, test_user),
           "HPCRUN_LINGER": "0"}
    with open(os.path.join(workdir, "bcast-job.sh"), "w") as f:
        f.write("#!/bin/sh\n#SBATCH -N4 --ntasks-per-node=1\n#SBATCH --container-image=small.img\n"
                "#SBATCH --container-bcast\n"
                "srun sh -c 'echo \"step1 $(echo $(ls /tmp/hpcrun-%d/bcast/job-$SLURM_JOB_ID))\"'\n"
                "srun sh -c 'echo \"step2 $(echo $(ls /tmp/hpcrun-%d/bcast/job-$SLURM_JOB_ID))\"'\n"
                % (test_user.pw_uid, test_user.pw_uid))
    r = run4(["sbatch", "--parsable", "-o", "bcast-job.out", "bcast-job.sh"], env=env)
    assert r.returncode == 0, r.stderr
    info = slurm.wait(int(r.stdout.strip().split(";")[0]), timeout=T, env=cluster4.env())
    with open(os.path.join(workdir, "bcast-job.out")) as f:
        out = f.read()
    assert info["state"] == "COMPLETED", out
    copy = re.compile(r"^step[12] sha256_[0-9a-f]{64}\.sqfs src_[0-9a-f]{40}\.sqfs ?$")
    assert sorted(line.split()[0] for line in out.splitlines() if copy.match(line)) == ["step1"] * 4 + ["step2"] * 4
    readers = bytes_read(env["HPCRUN_TEST_TRACE"], bcast_images["small"])
    assert sum(v for k, v in readers.items() if k.startswith("sbcast.")) == os.path.getsize(bcast_images["small"])
    for n in NODES:
        assert wait_for(lambda: node_files(cluster4, n, "/tmp/hpcrun-%d/bcast" % test_user.pw_uid) == [])
        assert not [f for f in node_files(cluster4, n, "/tmp") if ".hpcrun-sbcast." in f]
    shutil.rmtree(env["HPCRUN_TEST_TRACE"])


def test_another_users_file_in_bcast_tmp_does_not_stop_a_broadcast(cluster4, run4, bcast_images, test_user):
    """bcast_tmp is world-writable (/tmp): another user who guesses the next
    job's sbcast file name and makes it first (job ids count up) must not
    make the step fail, nor have their file used or removed."""
    r = run4(["srun", "-N1", "sh", "-c", 'echo "$SLURM_JOB_ID"'])
    assert r.returncode == 0, r.stderr
    job = int(r.stdout.split()[0]) + 1
    theirs = ["/tmp/.hpcrun-sbcast.%d.%d.%s" % (test_user.pw_uid, job, s) for s in ("0", "done")]
    for n in NODES:
        for f in theirs:
            cluster4.in_node(n, ["sh", "-c", 'echo theirs > "$0" && chown 65534:65534 "$0" && chmod 666 "$0"', f],
                             check=True)
    try:
        r = run4(["srun", "-N4", "--container-image=small.img", "--container-bcast", "sh", "-c",
                  'echo "$SLURM_JOB_ID $(echo $(ls /tmp/hpcrun-%d/bcast/job-$SLURM_JOB_ID))"' % test_user.pw_uid])
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split("\n")
        assert sorted(line.split()[0] for line in lines if line) == [str(job)] * 4, r.stdout
        assert all(re.match(r"^\d+ sha256_[0-9a-f]{64}\.sqfs src_[0-9a-f]{40}\.sqfs$", line)
                   for line in lines if line), r.stdout
        for n in NODES:
            for f in theirs:
                got = cluster4.in_node(n, ["stat", "-c", "%u %s", f])
                assert got.stdout.split() == ["65534", "7"], (n, f, got.stdout)
    finally:
        for n in NODES:
            cluster4.in_node(n, ["rm", "-f"] + theirs)
