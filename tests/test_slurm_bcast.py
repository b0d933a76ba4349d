"""Fake nodes with real node-local storage (tests/testbed/nodens.py): four slurmd
"nodes", each in a mount namespace of its own with its own tmpfs on /tmp and
/dev/shm; and, on top, images broadcast into that storage with Slurm's own
fan-out.  Real munged/slurmctld/slurmd, jobs as the unprivileged test user."""
import os
import secrets
import shutil
import subprocess

import pytest

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


@pytest.fixture(scope="module")
def cluster4(spank_plugin, hpcrun_bin, shared_dir):
    with Cluster(nodes=4, cpus=2, plugin=spank_plugin, plugin_args=["hpcrun=" + hpcrun_bin],
                 cli_filter=os.path.join(PLUGIN_DIR, "cli_filter.lua"), shared=[shared_dir]) as c:
        yield c


@pytest.fixture(scope="module")
def run4(cluster4, test_user, workdir):
    """run(argv, env=None) as the test user, in workdir, against the 4-node cluster."""
    from conftest import user_cmd

    def go(argv, env=None, **kw):
        e = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": test_user.pw_dir, "USER": test_user.pw_name,
             "LANG": "C.UTF-8", "SLURM_CONF": cluster4.conf}
        e.update(env or {})
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", T)
        return subprocess.run(user_cmd(test_user, ["env"] + ["%s=%s" % kv for kv in e.items()] + list(argv)),
                              cwd=kw.pop("cwd", workdir), **kw)
    return go


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
    assert c.leftovers() == []
