"""A real OpenPBS on this machine, for the tests and `make demo-pbs`.

build() compiles OpenPBS from the vendored source archive once per machine into
/opt/pbs (the recipe of ../shared/vendor/openpbs/README.md) and keeps the
archive's sha256 in /opt/pbs/.hpcrun-testbed-stamp: a changed archive rebuilds.
start() runs server, scheduler, comm, mom and PBS's PostgreSQL on this host;
stop() ends them and puts /etc/hosts back.  PBS refuses a host name that
resolves only to loopback, so for the run the host name maps to this machine's
own interface address: traffic stays on this machine.

Only /opt/pbs stays between runs.  What PBS's postinstall sets up for a run
(/etc/pbs.conf, /etc/init.d/pbs, its systemd unit, PBS_HOME = /var/spool/pbs
with the datastore) is made by start() and removed by stop(), as is a crashed
run's at the next start().  A PBS that is not this test bed's (/etc/pbs.conf
naming another PBS_EXEC) is never touched.  One PBS per machine: a second
session waits on a lock.

    python3 tests/testbed/pbs.py build|start|stop|status
"""
import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
VENDOR = os.environ.get("HPCRUN_OPENPBS_DIR",
                        os.path.join(os.path.dirname(REPO), "shared", "vendor", "openpbs"))
PREFIX = "/opt/pbs"
STAMP = os.path.join(PREFIX, ".hpcrun-testbed-stamp")
CONF = "/etc/pbs.conf"
HOME = "/var/spool/pbs"
HOSTS = "/etc/hosts"
HOSTS_SAVED = "/etc/hosts.hpcrun-pbs-saved"     # the original, while PBS runs (and after a crash)
LOCK = "/run/lock/hpcrun-testbed-pbs.lock"
BIN = os.path.join(PREFIX, "bin")
INIT = os.path.join(PREFIX, "libexec", "pbs_init.d")
HOOK_NAMES = ("hpcrun_submit", "hpcrun_launch")
# Written by `make install` and pbs_postinstall outside the prefix: login shells' PATH,
# not needed here (the test bed calls PBS's programs by absolute path).
INSTALL_EXTRAS = ["/etc/profile.d/pbs.sh", "/etc/profile.d/pbs.csh"]
# Made by pbs_postinstall for a run, removed by stop(); PBS_HOME too.
RUN_FILES = [CONF, "/etc/init.d/pbs", "/lib/systemd/system/pbs.service",
             "/etc/systemd/system/multi-user.target.wants/pbs.service",
             "/var/tmp/pbs_boot_check", "/var/tmp/.pbs_last_query_0"] + INSTALL_EXTRAS

# OpenPBS's INSTALL, Debian section (build, then run).
BUILD_DEPS = ["gcc", "g++", "make", "libtool", "autoconf", "automake", "perl", "swig",
              "libhwloc-dev", "libx11-dev", "libxt-dev", "libedit-dev", "libical-dev",
              "libncurses-dev", "postgresql-server-dev-all", "python3-dev", "tcl-dev", "tk-dev",
              "libexpat1-dev", "libssl-dev", "libxext-dev", "libxft-dev", "libcjson-dev"]
RUN_DEPS = ["expat", "libedit2", "postgresql", "postgresql-contrib", "python3", "sudo", "tcl",
            "tk", "libical3", "libcjson1"]


class TestbedError(Exception):
    pass


def log(msg):
    print("testbed/pbs: %s" % msg, file=sys.stderr, flush=True)


def _run(argv, **kw):
    kw.setdefault("check", True)
    return subprocess.run(argv, **kw)


# --- build ------------------------------------------------------------------------------
def archive():
    found = sorted(glob.glob(os.path.join(VENDOR, "openpbs-*.tar.gz")))
    if not found:
        raise TestbedError("no OpenPBS source archive in %s" % VENDOR)
    return found[-1]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def built():
    """True when /opt/pbs holds a build of the current archive."""
    try:
        with open(STAMP) as f:
            return f.read().split()[0] == sha256(archive())
    except (OSError, IndexError):
        return False


def apt_install(packages):
    missing = [p for p in packages
               if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return
    log("apt-get install %s" % " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]
    # the package lists may be stale on a fresh machine: update once and retry
    if subprocess.run(apt + ["install", "-y", "-qq", "--no-install-recommends"] + missing, env=env,
                      stdout=subprocess.DEVNULL).returncode != 0:
        _run(apt + ["update", "-qq"], env=env)
        _run(apt + ["install", "-y", "-qq", "--no-install-recommends"] + missing, env=env,
             stdout=subprocess.DEVNULL)


def build(force=False):
    """Build and install OpenPBS into /opt/pbs unless the current archive is built."""
    with _locked(LOCK + ".build"):
        if built() and not force:
            return
        if os.getuid() != 0:
            raise TestbedError("building OpenPBS into %s needs root" % PREFIX)
        src = archive()
        digest = sha256(src)
        apt_install(BUILD_DEPS + RUN_DEPS)
        work = tempfile.mkdtemp(prefix="hpcrun-openpbs-build-")
        logfile = os.path.join(work, "build.log")
        t0 = time.monotonic()
        log("building %s in %s (a few minutes; log: %s)" % (os.path.basename(src), work, logfile))
        try:
            _run(["tar", "xzf", src, "-C", work])
            top = [d for d in os.listdir(work) if os.path.isdir(os.path.join(work, d))][0]
            tree = os.path.join(work, top)
            jobs = str(os.cpu_count() or 2)
            steps = [["./autogen.sh"],
                     # --with-python=/usr: not whichever python3 comes first on PATH (a venv)
                     ["./configure", "--prefix=" + PREFIX, "--with-python=/usr"],
                     ["make", "-j" + jobs]]
            env = dict(os.environ, PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            with open(logfile, "w") as out:
                for step in steps:
                    if subprocess.run(step, cwd=tree, stdout=out, stderr=subprocess.STDOUT,
                                      env=env).returncode != 0:
                        raise TestbedError("OpenPBS build failed at %s" % " ".join(step))
                if os.path.isdir(PREFIX):
                    stop_daemons()
                    shutil.rmtree(PREFIX)
                if subprocess.run(["make", "install"], cwd=tree, stdout=out, stderr=subprocess.STDOUT,
                                  env=env).returncode != 0:
                    raise TestbedError("OpenPBS make install failed")
            for extra in INSTALL_EXTRAS:
                if os.path.exists(extra):
                    os.unlink(extra)
            with open(STAMP, "w") as f:
                f.write("%s  %s\n" % (digest, os.path.basename(src)))
        except BaseException:
            # keep the log, not the tree (hundreds of MB)
            kept = os.path.join(tempfile.gettempdir(), "hpcrun-openpbs-build.log")
            if os.path.exists(logfile):
                shutil.copy(logfile, kept)
            log("build failed; log kept in %s" % kept)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log("built in %.0f s" % (time.monotonic() - t0))


# --- host name ----------------------------------------------------------------------------
def host_address():
    """This machine's own non-loopback IPv4 address (the one a default route uses)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                         text=True).stdout
    for line in out.split("\n"):
        words = line.split()
        if "inet" in words:
            return words[words.index("inet") + 1].split("/")[0]
    raise TestbedError("no non-loopback IPv4 address on this machine: PBS cannot run here")


def _is_loopback(addr):
    return addr.startswith("127.") or addr == "::1"


def map_hostname():
    """/etc/hosts: the host name to the interface address instead of loopback.
    The original is kept in HOSTS_SAVED until restore_hosts()."""
    restore_hosts()                      # a crashed run's change first
    name = socket.gethostname()
    with open(HOSTS) as f:
        original = f.read()
    lines = []
    for line in original.splitlines():
        words = line.split("#")[0].split()
        if len(words) >= 2 and _is_loopback(words[0]) and name in words[1:]:
            kept = [w for w in words[1:] if w != name]
            if kept:
                lines.append(" ".join([words[0]] + kept))
            continue
        lines.append(line)
    lines.append("%s %s   # hpcrun PBS test bed (restored after the run)" % (host_address(), name))
    with open(HOSTS_SAVED, "w") as f:
        f.write(original)
    # in place: /etc/hosts may be a bind mount that a rename would not replace
    with open(HOSTS, "w") as f:
        f.write("\n".join(lines) + "\n")


def restore_hosts():
    if not os.path.exists(HOSTS_SAVED):
        return
    with open(HOSTS_SAVED) as f:
        original = f.read()
    with open(HOSTS, "w") as f:
        f.write(original)
    os.unlink(HOSTS_SAVED)


# --- daemons --------------------------------------------------------------------------------
class _locked:
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def pbs_env(extra=None):
    env = {"PATH": "%s:/usr/sbin:/usr/bin:/sbin:/bin" % BIN, "LANG": "C.UTF-8", "HOME": "/root"}
    env.update(extra or {})
    return env


def _conf_set(key, value):
    with open(CONF) as f:
        lines = [l for l in f.read().splitlines() if not l.startswith(key + "=")]
    lines.append("%s=%s" % (key, value))
    with open(CONF, "w") as f:
        f.write("\n".join(lines) + "\n")


def ours():
    """True unless /etc/pbs.conf belongs to another PBS installation."""
    try:
        with open(CONF) as f:
            conf = dict(l.strip().split("=", 1) for l in f if "=" in l)
    except FileNotFoundError:
        return True
    return conf.get("PBS_EXEC", PREFIX) == PREFIX


def remove_run_files():
    for path in RUN_FILES:
        if os.path.lexists(path):
            os.unlink(path)
    shutil.rmtree(HOME, ignore_errors=True)


def configure():
    """pbs_postinstall (/etc/pbs.conf, PBS_HOME), then the settings of this test bed."""
    remove_run_files()             # a crashed run's
    _run([os.path.join(PREFIX, "libexec", "pbs_postinstall")], env=pbs_env(),
         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _conf_set("PBS_SERVER", socket.gethostname())
    _conf_set("PBS_START_MOM", "1")
    for prog in ("pbs_iff", "pbs_rcp"):
        os.chmod(os.path.join(PREFIX, "sbin", prog), 0o4755)
    # job output files are local paths: copy, no rcp/scp
    with open(os.path.join(HOME, "mom_priv", "config"), "a") as f:
        f.write("$usecp *:/ /\n")


def stop_daemons():
    if os.path.exists(INIT) and os.path.exists(CONF):
        subprocess.run([INIT, "stop"], env=pbs_env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


class Pbs:
    """A running PBS: qmgr as root, jobs submitted as a user, outcomes read back."""

    def __init__(self):
        self.host = socket.gethostname()
        self.home = HOME
        self.bin = BIN

    # -- administration
    def qmgr(self, command, check=True):
        p = subprocess.run([os.path.join(BIN, "qmgr"), "-c", command], capture_output=True,
                           text=True, env=pbs_env())
        if check and p.returncode != 0:
            raise TestbedError("qmgr -c %r: rc %d: %s%s" % (command, p.returncode, p.stdout, p.stderr))
        return p

    def cmd(self, argv, **kw):
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run([os.path.join(BIN, argv[0])] + list(argv[1:]), env=pbs_env(), **kw)

    def install_hooks(self, config=None, resource=None):
        """plugins/pbs/install.sh --run, as an admin installs the hooks."""
        argv = [os.path.join(REPO, "plugins", "pbs", "install.sh"), "--run"]
        if config:
            argv += ["--config", config]
        if resource:
            argv += ["--resource", resource]
        r = subprocess.run(argv, capture_output=True, text=True, env=pbs_env())
        if r.returncode == 0:
            self.wait_for_mom_hooks()
        return r

    def wait_for_mom_hooks(self, timeout=60):
        """The server sends a changed execjob hook (its script and config) and
        the resource definitions to the moms on its own time; qmgr returns
        before that.  A job started in
        between runs the mom's old copy (seen: a job without its image)."""
        server = os.path.join(HOME, "server_priv", "hooks")
        mom = os.path.join(HOME, "mom_priv", "hooks")
        deadline = time.monotonic() + timeout
        while True:
            stale = []
            # the execjob hook's script and config, and the custom resources (flag=m) it reads
            for name in ("hpcrun_launch.PY", "hpcrun_launch.CF", "resourcedef"):
                want = _read_or_none(os.path.join(server, name))
                if want is not None and _read_or_none(os.path.join(mom, name)) != want:
                    stale.append(name)
            if not stale:
                return
            if time.monotonic() > deadline:
                raise TestbedError("the mom did not receive the hooks within %d s: %s" % (timeout, stale))
            time.sleep(0.2)

    def remove_hooks(self):
        for name in HOOK_NAMES:
            self.qmgr("delete hook %s" % name, check=False)

    def purge_jobs(self):
        """Every job, finished ones in the history too (a resource in use cannot change)."""
        ids = self.cmd(["qselect", "-x"]).stdout.split()
        if ids:
            self.cmd(["qdel", "-x", "-W", "force"] + ids)
        for _ in range(100):
            if not self.cmd(["qselect", "-x"]).stdout.split():
                return
            time.sleep(0.2)
        raise TestbedError("jobs left after qdel -x: %s" % self.cmd(["qselect", "-x"]).stdout)

    def reset(self):
        """No jobs, no hpcrun hooks, no container resources: as after a fresh install."""
        self.purge_jobs()
        self.remove_hooks()
        out = self.qmgr("list resource", check=False).stdout
        for line in out.splitlines():
            if line.startswith("Resource ") and line.split()[1] in ("container_image", "hpcrun_image"):
                self.qmgr("delete resource %s" % line.split()[1])

    # -- users' side
    def user_env(self, user, extra=None):
        env = {"PATH": "%s:/usr/local/bin:/usr/bin:/bin" % BIN, "HOME": user.pw_dir,
               "USER": user.pw_name, "LOGNAME": user.pw_name, "LANG": "C.UTF-8", "SHELL": "/bin/sh"}
        env.update(extra or {})
        return env

    def as_user(self, user, argv, cwd, env=None, **kw):
        wrapped = list(argv)
        if os.getuid() != user.pw_uid:
            wrapped = ["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid,
                       "--init-groups", "--reset-env", "--", "env"] + \
                      ["%s=%s" % kv for kv in self.user_env(user, env).items()] + wrapped
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(wrapped, cwd=cwd, env=self.user_env(user, env), **kw)

    def qsub(self, user, cwd, script=None, args=(), env=None):
        """qsub [args] [script file] as `user` from `cwd`; returns (CompletedProcess, jobid or None)."""
        argv = [os.path.join(BIN, "qsub")] + list(args)
        path = None
        if script is not None:
            fd, path = tempfile.mkstemp(prefix="job-", suffix=".sh", dir=cwd)
            with os.fdopen(fd, "w") as f:
                f.write(script)
            os.chown(path, user.pw_uid, user.pw_gid)
            argv.append(path)
        try:
            p = self.as_user(user, argv, cwd, env=env)
        finally:
            if path:
                os.unlink(path)
        jobid = p.stdout.strip() if p.returncode == 0 else None
        return p, jobid

    def job(self, jobid):
        p = self.cmd(["qstat", "-x", "-f", "-F", "json", jobid])
        if p.returncode != 0:
            raise TestbedError("qstat -x -f %s: %s" % (jobid, p.stderr.strip()))
        return json.loads(p.stdout)["Jobs"][jobid]

    def wait(self, jobid, states="F", timeout=120):
        """The job's attributes once its state is one of `states` (F: finished)."""
        deadline = time.monotonic() + timeout
        while True:
            attrs = self.job(jobid)
            if attrs["job_state"] in states:
                return attrs
            if time.monotonic() > deadline:
                raise TestbedError("job %s still %s after %d s:\n%s" % (
                    jobid, attrs["job_state"], timeout, self.tracejob(jobid)))
            time.sleep(0.3)

    def tracejob(self, jobid):
        return self.cmd(["tracejob", "-n", "2", jobid]).stdout

    def log(self, daemon="server"):
        """Today's log of `daemon` (server, mom, sched, comm)."""
        d = {"server": "server_logs", "mom": "mom_logs", "sched": "sched_logs", "comm": "comm_logs"}[daemon]
        path = os.path.join(HOME, d, time.strftime("%Y%m%d"))
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


def _wait_ready(pbs, timeout=120):
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        p = pbs.cmd(["pbsnodes", "-a", "-F", "json"])
        if p.returncode == 0:
            nodes = json.loads(p.stdout).get("nodes", {})
            if not nodes:
                pbs.qmgr("create node %s" % pbs.host, check=False)
            elif any(n.get("state") == "free" for n in nodes.values()):
                return
            last = p.stdout
        else:
            last = p.stderr
        time.sleep(0.5)
    raise TestbedError("PBS not ready after %d s: %s" % (timeout, last.strip()[-500:]))


def start():
    """Build if needed, start PBS on this host, clear it; returns a Pbs.  The
    caller must call stop() (it also puts /etc/hosts back)."""
    if os.getuid() != 0:
        raise TestbedError("the PBS test bed needs root")
    build()
    lock = _locked(LOCK).__enter__()
    if not ours():
        lock.__exit__()
        raise TestbedError("%s belongs to another PBS installation: the test bed leaves it alone" % CONF)
    try:
        stop_daemons()            # a crashed run's daemons
        map_hostname()
        configure()
        t0 = time.monotonic()
        p = subprocess.run([INIT, "start"], env=pbs_env(), capture_output=True, text=True)
        if p.returncode != 0:
            raise TestbedError("pbs start failed: %s%s" % (p.stdout, p.stderr))
        pbs = Pbs()
        _wait_ready(pbs)
        pbs.qmgr("set server job_history_enable = True")
        pbs.qmgr("set server scheduler_iteration = 5")
        pbs.reset()
        pbs.started_in = time.monotonic() - t0
        pbs._lock = lock
        return pbs
    except BaseException:
        stop_daemons()
        remove_run_files()
        restore_hosts()
        lock.__exit__()
        raise


def stop(pbs=None):
    """Stop every PBS daemon and put /etc/hosts back."""
    try:
        if ours():
            stop_daemons()
            remove_run_files()
    finally:
        restore_hosts()
        if pbs is not None and getattr(pbs, "_lock", None):
            pbs._lock.__exit__()
            pbs._lock = None


def running_daemons():
    """PIDs of PBS's daemons: programs of this installation, and the PostgreSQL
    (Debian's binaries) that serves PBS_HOME's datastore."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            exe = os.readlink("/proc/%s/exe" % pid)
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if exe.startswith(PREFIX + "/") or os.path.join(HOME, "datastore").encode() in cmdline:
            pids.append(int(pid))
    return pids


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "build"
    try:
        if what == "build":
            build()
        elif what == "start":
            pbs = start()
            pbs._lock.__exit__()
            print("PBS running on %s (started in %.1f s)" % (pbs.host, pbs.started_in))
        elif what == "stop":
            stop()
        elif what == "status":
            print("built" if built() else "not built", running_daemons())
        else:
            raise SystemExit("usage: pbs.py build|start|stop|status")
    except TestbedError as err:
        raise SystemExit("testbed/pbs: error: %s" % err)


def _read_or_none(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None
