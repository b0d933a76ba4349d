"""A real Slurm cluster on loopback, started from a temporary directory.

munged, slurmctld and N slurmd "nodes" (``slurmd -N nK``) run in the
foreground as our children, with their own key, socket, ports, spool, state
and logs under one directory, so nothing of the host's Slurm or munge is
touched.  Used by tests/test_slurm*.py and ``make demo-slurm``:

    with Cluster(nodes=2, plugin="plugins/slurm/spank_hpcrun.so",
                 plugin_args=["hpcrun=/usr/bin/hpcrun"]) as c:
        subprocess.run(["srun", "-N2", "hostname"], env=c.env())

Node-local storage (node_local=True, the default): each slurmd runs in a
mount namespace of its own (testbed/nodens.py) with its own tmpfs on /tmp and
/dev/shm, as real nodes have, so a file a task writes in /tmp on n1 is not on
n2 nor on the host, and hpcrun's run_dir (/tmp/hpcrun-%u) is per node.  The
"shared file system" is what the nodes still see of the host's /tmp: the
cluster's own directory (config, munge socket, spool, logs) and the paths
given as ``shared=``, bound in at start; ``share(path)`` adds one later (a file
system mounted after the nodes started).  Everything else under /tmp is the
host's alone.  ``in_node(name, argv)`` runs a command as root in a node's view.

Details that matter on one host (docs/slurm.md, ../shared/reference/slurm.md):
TmpFS is per node (PMIx's app dirs collide otherwise) and a TaskProlog gives
every node its own Open MPI vader backing directory (shared-memory segment
names collide across fake nodes otherwise).  MessageTimeout is long because a
loaded 2-core machine misses the default.
"""
import json
import os
import sys
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

SBIN = "/usr/sbin"
MARK = "HPCRUN_TESTBED"   # set in the daemons' environment: finds their leftover children
NODENS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nodens.py")


def _free_port_range(count, tries=200):
    """A base port such that base..base+count-1 are free on 127.0.0.1."""
    for _ in range(tries):
        base = random.randint(20000, 60000 - count)
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range of %d" % count)


class Cluster:
    def __init__(self, nodes=2, cpus=4, plugin=None, plugin_args=(), cli_filter=None,
                 mpi_default="pmix", workdir=None, extra_conf=(), task_prolog_lines=(),
                 node_local=True, node_tmp_size="1g", shared=()):
        self.nodes = ["n%d" % (i + 1) for i in range(nodes)]
        self.cpus = cpus
        self.plugin = os.path.abspath(plugin) if plugin else None
        self.plugin_args = list(plugin_args)
        self.cli_filter = cli_filter
        self.mpi_default = mpi_default
        self.extra_conf = list(extra_conf)
        self.task_prolog_lines = list(task_prolog_lines)
        self._workdir = workdir
        self.node_local = node_local
        self.node_tmp_size = node_tmp_size
        self.shared = [os.path.abspath(p) for p in shared]
        self.node_ns = {}        # node name -> inode of its mount namespace (while it runs)
        self.node_labels = {}    # node name -> source name of its tmpfs mounts (leak checks)
        self.dir = None
        self.procs = []          # (name, Popen), started in order, stopped in reverse

    # -- paths -------------------------------------------------------------
    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    @property
    def conf(self):
        return self.path("etc", "slurm.conf")

    def env(self, base=None, **extra):
        """Environment for Slurm client commands talking to this cluster."""
        e = dict(os.environ if base is None else base)
        e["SLURM_CONF"] = self.conf
        for k in list(e):
            # An outer allocation's variables would confuse srun/sbatch here.
            if k.startswith(("SLURM_", "SRUN_", "SBATCH_", "SALLOC_")) and k != "SLURM_CONF":
                del e[k]
        e.update(extra)
        return e

    # -- start ---------------------------------------------------------------
    def start(self, timeout=60):
        self.dir = tempfile.mkdtemp(prefix="hpcrun-slurm-", dir=self._workdir)
        os.chmod(self.dir, 0o755)   # job users must reach the config and munge socket
        try:
            self._write_files()
            self._start_munge()
            self._start_slurm()
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_files(self):
        for d in ("etc", "munge", "log", "run", "state", "spool", "tmp"):
            os.makedirs(self.path(d), mode=0o755, exist_ok=True)
        os.chmod(self.path("munge"), 0o700)
        os.chmod(self.path("log"), 0o700)
        for n in self.nodes:
            # TmpFS and vader backing dirs: per node, writable by every job user.
            t = self.path("tmp", n)
            os.makedirs(t, exist_ok=True)
            os.chmod(t, 0o1777)
        base = _free_port_range(len(self.nodes) + 1)
        self.ctld_port = base
        hostname = socket.gethostname()
        lines = [
            "ClusterName=hpcrun%d" % base,
            "SlurmctldHost=%s(127.0.0.1)" % hostname,
            "SlurmctldPort=%d" % base,
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            "AuthInfo=socket=%s" % self.path("munge", "munge.socket.2"),
            "StateSaveLocation=%s" % self.path("state"),
            "SlurmdSpoolDir=%s" % self.path("spool", "%n"),
            "SlurmctldPidFile=%s" % self.path("run", "slurmctld.pid"),
            "SlurmdPidFile=%s" % self.path("run", "slurmd-%n.pid"),
            "SlurmctldLogFile=%s" % self.path("log", "slurmctld.log"),
            "SlurmdLogFile=%s" % self.path("log", "slurmd-%n.log"),
            "SlurmdDebug=info", "SlurmctldDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin", "SchedulerParameters=sched_interval=1",
            "MpiDefault=%s" % self.mpi_default,
            "MessageTimeout=60", "ReturnToService=2", "KillWait=5", "InactiveLimit=0",
            "SlurmdParameters=config_overrides",
            "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            "TmpFS=%s" % self.path("tmp", "%n"),
            "TaskProlog=%s" % self.path("etc", "task_prolog.sh"),
            "PlugStackConfig=%s" % self.path("etc", "plugstack.conf"),
        ]
        if self.cli_filter:
            lines.append("CliFilterPlugins=cli_filter/lua")
            # cli_filter/lua reads cli_filter.lua from beside slurm.conf.
            shutil.copy(self.cli_filter, self.path("etc", "cli_filter.lua"))
        lines += self.extra_conf
        last = base + len(self.nodes)
        lines.append("NodeName=n[1-%d] NodeHostname=%s NodeAddr=127.0.0.1 Port=[%d-%d] CPUs=%d "
                     "State=UNKNOWN" % (len(self.nodes), hostname, base + 1, last, self.cpus))
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(self.path("etc", "plugstack.conf"), "w") as f:
            if self.plugin:
                f.write("required %s %s\n" % (self.plugin, " ".join(self.plugin_args)))
        prolog = self.path("etc", "task_prolog.sh")
        with open(prolog, "w") as f:
            f.write("#!/bin/sh\n"
                    "echo export OMPI_MCA_btl_vader_backing_directory=%s/$SLURMD_NODENAME\n"
                    % self.path("tmp"))
            for line in self.task_prolog_lines:
                f.write(line + "\n")
        os.chmod(prolog, 0o755)

    def _spawn(self, name, argv):
        env = dict(os.environ, SLURM_CONF=self.conf)
        env[MARK] = self.dir
        log = open(self.path("log", name + ".out"), "wb")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True)
        log.close()
        self.procs.append((name, p))
        return p

    def _start_munge(self):
        key = self.path("munge", "munge.key")
        subprocess.run(["mungekey", "-c", "-k", key], check=True, capture_output=True)
        os.chmod(key, 0o400)
        sock = self.path("munge", "munge.socket.2")
        self._spawn("munged", [SBIN + "/munged", "-F", "--force", "--key-file=" + key,
                               "--socket=" + sock, "--pid-file=" + self.path("munge", "munged.pid"),
                               "--log-file=" + self.path("log", "munged.log"),
                               "--seed-file=" + self.path("munge", "munged.seed")])
        self._wait(lambda: os.path.exists(sock), 15, "munged socket")
        # Munge refuses clients that cannot reach the socket: job users need it.
        os.chmod(self.path("munge"), 0o755)

    def tmpfs_label(self, node):
        """Source name of a node's tmpfs mounts: unique to this cluster and node."""
        return "%s-%s" % (os.path.basename(self.dir), node)

    def _start_slurm(self):
        self._spawn("slurmctld", [SBIN + "/slurmctld", "-D", "-c", "-i", "-f", self.conf])
        for n in self.nodes:
            argv = [SBIN + "/slurmd", "-D", "-N", n, "-f", self.conf]
            if self.node_local:
                shared = [a for p in [self.dir] + self.shared for a in ("--shared", p)]
                self.node_labels[n] = self.tmpfs_label(n)
                argv = [sys.executable, NODENS, "--name", self.node_labels[n], "--size",
                        self.node_tmp_size] + shared + ["--"] + argv
            p = self._spawn("slurmd-" + n, argv)
            if self.node_local:
                self._wait(lambda: self._ns_of(p.pid) != self._ns_of(os.getpid()), 15, "%s's namespace" % n)
                self.node_ns[n] = self._ns_of(p.pid)

    @staticmethod
    def _ns_of(pid):
        try:
            return os.stat("/proc/%d/ns/mnt" % pid).st_ino
        except OSError:
            return None

    def node_pid(self, node):
        return dict(self.procs)["slurmd-" + node].pid

    def share(self, path):
        """Make a host path (e.g. a file system mounted after start) visible on every node."""
        path = os.path.abspath(path)
        self.shared.append(path)
        if self.node_local:
            for n in self.nodes:
                subprocess.run([sys.executable, NODENS, "--join", str(self.node_pid(n)), "--shared", path],
                               check=True, capture_output=True, timeout=30)

    def in_node(self, node, argv, **kw):
        """subprocess.run(argv) as root in the node's mount namespace (the host's without node_local)."""
        if self.node_local:
            argv = ["nsenter", "--mount", "--target", str(self.node_pid(node))] + list(argv)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(argv, **kw)

    def leftovers(self):
        """What a stopped cluster must not leave: processes still in a node's mount
        namespace and mounts of a node's tmpfs seen anywhere (pids and mountinfo lines).
        Works after stop() too: it keeps what it started with."""
        return _leftovers(list(self.node_labels.values()))

    def _wait(self, ok, timeout, what):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ok():
                return
            for name, p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError("%s exited (%s); logs in %s" % (name, p.returncode, self.path("log")))
            time.sleep(0.1)
        raise RuntimeError("timed out waiting for %s; logs in %s" % (what, self.path("log")))

    def node_states(self):
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env(),
                           capture_output=True, text=True, timeout=60)
        return dict(line.split() for line in r.stdout.splitlines() if line.strip())

    def wait_idle(self, timeout=60):
        """Until every node is idle: an srun before that just queues."""
        self._wait(lambda: all(s == "idle" for s in self.node_states().values())
                   and len(self.node_states()) == len(self.nodes), timeout, "idle nodes")

    # -- stop ----------------------------------------------------------------
    def _marked_pids(self):
        """PIDs of processes started by our daemons (slurmstepd, tasks left behind)."""
        want = ("%s=%s" % (MARK, self.dir)).encode()
        own = {p.pid for _, p in self.procs}
        pids = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) in own or int(d) == os.getpid():
                continue
            try:
                with open("/proc/%s/environ" % d, "rb") as f:
                    if want in f.read().split(b"\0"):
                        pids.append(int(d))
            except OSError:
                pass
        return pids

    def _pids_in_nodes(self):
        """Processes in a node's mount namespace or in one made from it (a container
        hpcrun started in a task): those whose mounts include a node's tmpfs."""
        return [int(line.split()[1]) for line in self.leftovers() if int(line.split()[1]) != os.getpid()]

    def stop(self):
        if self.dir is None:
            return
        if any(n == "slurmctld" and p.poll() is None for n, p in self.procs):
            try:   # every user's jobs, so their steps end before the daemons do
                ids = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True,
                                     text=True, timeout=30).stdout.split()
                if ids:
                    subprocess.run(["scancel", "--full"] + ids, env=self.env(), capture_output=True,
                                   timeout=30)
                # A slurmd stopped while a job completes (its epilog) lingers 15 s.
                end = time.monotonic() + 30
                while ids and time.monotonic() < end:
                    time.sleep(0.2)
                    ids = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True,
                                         text=True, timeout=30).stdout.split()
            except subprocess.TimeoutExpired:
                pass
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in reversed(self.procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # Our daemons' children, and whatever a task left in a node (a user's task
        # does not carry the marker; with node_local its namespace finds it).
        for _ in range(50):
            pids = self._marked_pids() + self._pids_in_nodes()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.1)
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def logs(self):
        """All daemon logs as one string (for failure messages)."""
        out = []
        for name in sorted(os.listdir(self.path("log"))):
            with open(self.path("log", name), errors="replace") as f:
                out.append("== %s ==\n%s" % (name, f.read()[-4000:]))
        return "\n".join(out)

    def __enter__(self):
        if self.dir is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def _describe(pid):
    """'comm state ppid: cmdline' of a process, for failure messages."""
    try:
        with open("/proc/%s/stat" % pid) as f:
            stat = f.read()
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        rest = stat[stat.rindex(")") + 2:].split()
        return "%s %s ppid %s: %s" % (stat[stat.index("(") + 1:stat.rindex(")")], rest[0], rest[1], cmd[:200])
    except (OSError, ValueError, IndexError):
        return "gone"


def _leftovers(labels):
    """'pid N (what) sees <mountinfo line>' for every process whose mount namespace
    holds a mount with one of the labels as its source: a node's namespace (its
    tmpfs mounts) or one made from it (a container started in a task).  Not by
    namespace inode: once a node's namespace is gone the kernel reuses its inode
    number for someone else's."""
    found, views = [], {}   # views: namespace inode -> its lines with our labels
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ns = os.stat("/proc/%s/ns/mnt" % d).st_ino
            if ns not in views:
                with open("/proc/%s/mountinfo" % d) as f:
                    views[ns] = [line.strip() for line in f if any(" %s " % label in line for label in labels)]
        except OSError:
            continue
        if views[ns]:
            what = _describe(d)
            found += ["pid %s (%s) sees %s" % (d, what, line) for line in views[ns]]
    return found


if __name__ == "__main__":   # quick manual check, from tests/: python -m testbed.cluster
    with Cluster() as c:
        print(json.dumps(c.node_states()))
        print(subprocess.run(["srun", "-N2", "hostname"], env=c.env(), capture_output=True,
                             text=True).stdout)
