"""Shared pieces of the benchmarks: tools, launch variants, timing, statistics.

A *variant* is how a program is started: natively, with hpcrun on an image, or
with Charliecloud's ch-run on the same image.  Programs live under /bench in the
images and under build/bin natively, so a variant maps a program name to argv.
"""
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
DEFAULT_BUILD = os.path.join(BENCH_DIR, "build")
DEFAULT_RESULTS = os.path.join(BENCH_DIR, "results")
IS_ROOT = os.getuid() == 0


def find_hpcrun():
    """$HPCRUN_BENCH_BIN (to measure another build), else this venv's console script, else PATH's."""
    if os.environ.get("HPCRUN_BENCH_BIN"):
        return os.environ["HPCRUN_BENCH_BIN"]
    here = os.path.join(os.path.dirname(sys.executable), "hpcrun")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("hpcrun")


def find_chrun():
    return shutil.which("ch-run")


def bench_env():
    """The environment every variant gets: ch-run refuses to start without $USER."""
    env = dict(os.environ)
    if "USER" not in env:
        import pwd
        env["USER"] = pwd.getpwuid(os.getuid()).pw_name
    return env


def mpirun_argv(np, extra=()):
    argv = ["mpirun", "--oversubscribe", "-np", str(np)]
    if IS_ROOT:
        argv.append("--allow-run-as-root")
    return argv + list(extra)


class Variant:
    """name: 'native', 'hpcrun', 'ch-run'; image: what the container runs (None natively)."""

    def __init__(self, name, prefix, bin_dir):
        self.name = name
        self.prefix = list(prefix)
        self.bin_dir = bin_dir

    def argv(self, program, args=()):
        """program: a name under bin_dir, or an absolute path inside the image/host."""
        path = program if program.startswith("/") else os.path.join(self.bin_dir, program)
        return self.prefix + [path] + list(args)

    def __repr__(self):
        return "Variant(%s)" % self.name


# launcher -> why it is left out of this run (set by preflight): one hang must not cost every part minutes
DISABLED = {}


def preflight(light_image, env=None, timeout=20):
    """Try `LAUNCHER light_image /bin/true` once per container launcher; record the ones that fail."""
    tries = [("hpcrun", find_hpcrun(), lambda t: [t, light_image, "/bin/true"]),
             ("ch-run", find_chrun(), lambda t: [t, light_image, "--", "/bin/true"])]
    for name, tool, argv in tries:
        if not tool:
            DISABLED[name] = "not installed"
            continue
        try:
            _, p = run_timed(argv(tool), env=env or bench_env(), timeout=timeout)
            if p.returncode != 0:
                DISABLED[name] = "preflight exit %d: %s" % (p.returncode, tail(p.stderr, 2))
        except subprocess.TimeoutExpired:
            DISABLED[name] = "preflight: `%s` timed out after %d s" % (" ".join(argv(tool)), timeout)
    return dict(DISABLED)


def variants(kinds, image, native_bin, image_bin="/bench"):
    """Variants for kinds (subset of native, hpcrun, ch-run) on one image; missing or disabled ones are skipped."""
    out = []
    for kind in kinds:
        if kind in DISABLED:
            continue
        if kind == "native":
            out.append(Variant("native", [], native_bin))
        elif kind == "hpcrun" and find_hpcrun():
            out.append(Variant("hpcrun", [find_hpcrun(), image], image_bin))
        elif kind == "ch-run" and find_chrun():
            out.append(Variant("ch-run", [find_chrun(), image, "--"], image_bin))
    return out


def spawn_time(argv, env=None, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30):
    """Wall time of one run from spawn to reap (posix_spawn: less harness overhead than subprocess).

    A run past timeout is killed (SIGALRM, so the timed path stays one blocking waitpid).
    """
    fds = {}
    for name, target in (("stdout", stdout), ("stderr", stderr)):
        fds[name] = os.open(os.devnull, os.O_WRONLY) if target == subprocess.DEVNULL else None
    actions = [(os.POSIX_SPAWN_DUP2, fds[n], fd) for n, fd in (("stdout", 1), ("stderr", 2)) if fds[n] is not None]
    try:
        t0 = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, env if env is not None else os.environ, file_actions=actions)
        old = signal.signal(signal.SIGALRM, lambda *_: os.kill(pid, signal.SIGKILL))
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            _, status = os.waitpid(pid, 0)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        dt = time.perf_counter() - t0
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)
    return dt, os.waitstatus_to_exitcode(status)


def run_timed(argv, env=None, timeout=None):
    """(seconds, CompletedProcess) of a run whose output we need.

    Output goes to temp files, not pipes: a daemon left behind (a keeper that kept
    an inherited fd) must not make us wait for EOF.  The run gets its own process
    group so that a timeout ends mpirun's ranks too, not only mpirun.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             start_new_session=True)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            _end_group(p)
            raise
        dt = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return dt, subprocess.CompletedProcess(argv, rc, out.read(), err.read())


def _end_group(p):
    """TERM then KILL the process group we started for p (its id is p.pid)."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 3)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        try:
            p.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


def summary(values):
    """Median and spread of a sample: min, max, quartiles, n."""
    v = sorted(values)
    if not v:
        return {"n": 0}
    if len(v) >= 2:
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    else:
        q1 = q3 = v[0]
    return {"n": len(v), "median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q1, "q3": q3}


def ratio(a, b):
    """a/b of two medians, None when either is missing."""
    if a is None or b in (None, 0):
        return None
    return a / b


def tail(text, lines=5):
    return "\n".join((text or "").strip().splitlines()[-lines:])


class Budget:
    """A wall-clock budget shared by all parts of one run: parts check it between steps."""

    def __init__(self, seconds):
        self.deadline = time.monotonic() + seconds if seconds else None

    def left(self):
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def exhausted(self):
        return self.left() <= 0
