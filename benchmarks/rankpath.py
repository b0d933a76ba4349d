#!/usr/bin/env python3
"""The joining rank's own cost: file-system metadata calls (strace-counted) and CPU time.

    python3 benchmarks/rankpath.py [--runs N] [--rounds R] [--user NAME]

A *joining rank* is `hpcrun light.img /bin/true` with the node's container already
there (warmed first): what every rank but the first on a node does.  Two figures:
- metadata calls (open/openat/stat/lstat/newfstatat/statx/readlink/access/getdents...)
  from the console script's start to the program's execve, split by where they land:
  hpcrun's install tree (the venv/prefix it was installed into; `hpcrun package` is the
  part inside hpcrun/), Python's standard library, and the rest (/etc, /proc, the
  run directory, the image);
- CPU (user + sys) per rank: R rounds of N runs under one parent, read from its
  children's rusage, beside `python -I -S -c pass` (the interpreter's floor) and
  native /bin/true.  Median over rounds.
With --user (when root) both run as that user: the unprivileged path.
Where `hpcrun install-entry` compiled the join-only front (bin/hpcrun an ELF file, the Python
entry bin/hpcrun-py, docs/install.md), the Python path is measured through bin/hpcrun-py (the
rows as before) and the front in a row of its own: a joining rank it serves from its ticket
(the ticket is written by the warm-up's first run, a miss; the strace says whether the measured
run was served, i.e. did not exec hpcrun-py).
Two more, where they can run (images with MPI; plugins/slurm built):
- `mpirun --oversubscribe -np N hello` (MPI_Init + barrier), N = 16 and 32, native and
  hpcrun alternating: wall time and the ratio hpcrun/native (ranks share the cores, so
  every rank's CPU is wall time here);
- the Slurm task path: `srun -n N /bin/true` with and without `--container-image` (SPANK
  plugin -> hpcrun task entry) on the test bed's one-node Slurm (tests/testbed/cluster.py):
  the difference per task.
"""
import argparse
import json
import os
import pwd
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import common
import images

WARMUP = 3
GOAL_INSTALL_CALLS = 10     # issue 15: <= 10 metadata calls on hpcrun's install tree per joining rank
GOAL_CPU_MS = 9.0           # issue 15: <= 9 ms CPU per joining rank on the Python path
GOAL_FRONT_CPU_MS = 3.0     # issue 15: a compiled helper earns its place at <= 3 ms CPU per rank
GOAL_MPIRUN_RATIO = 1.10    # issue 15: mpirun -np N hello, hpcrun/native, N >= 16 on 2 cores
MPI_RANKS = (16, 32)
SLURM_TASKS = 8
TRACED = ("open", "openat", "openat2", "stat", "lstat", "fstat", "newfstatat", "statx", "readlink",
          "readlinkat", "access", "faccessat", "faccessat2", "getdents64", "getcwd", "chdir", "fchdir")
_LINE = re.compile(r'^(?:\d+\s+)?(\w+)\((.*)$')
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_FD_PATH = re.compile(r'^\d+<([^>]*)>')


def front_of(hp):
    """(the compiled front, the Python entry behind it) when hp is the front, else (None, hp)."""
    try:
        with open(hp, "rb") as f:
            elf = f.read(4) == b"\x7fELF"
    except OSError:
        elf = False
    if elf and os.path.isfile(hp + "-py"):
        return hp, hp + "-py"
    return None, hp


def _interpreter(hp):
    """The Python that runs the hpcrun script (its #! line)."""
    with open(hp, "rb") as f:
        first = f.readline().decode(errors="replace")
    return first[2:].strip().split()[0] if first.startswith("#!") else sys.executable


def _site_of(hp):
    """The SITE an installed entry (`hpcrun install-entry`, hpcrun/entry.py) names, else None."""
    with open(hp, "rb") as f:
        head = f.read(4096).decode(errors="replace")
    m = re.search(r"^SITE = (['\"])(.*?)\1$", head, re.M)
    return m.group(2) if m else None


def trees(hp):
    """{"install": tree, "package": hpcrun's package dir, "stdlib": [dirs]} of the hpcrun measured.
    The install tree holds both the script and the package (a venv, a --prefix, /usr/local)."""
    py = _interpreter(hp)
    code = ("import json, sys, sysconfig, os\n"
            "site = sys.argv[1]\n"
            "if site: sys.path.append(site)\n"
            "import importlib.util as u; s = u.find_spec('hpcrun')\n"
            "print(json.dumps({'package': os.path.dirname(s.origin),"
            " 'stdlib': sorted({sysconfig.get_path('stdlib'), sysconfig.get_path('platstdlib')})}))")
    site = _site_of(hp)
    out = json.loads(subprocess.run([py, "-I"] + (["-S"] if site else []) + ["-c", code, site or ""],
                                    capture_output=True, text=True, check=True, cwd="/").stdout)
    package = os.path.realpath(out["package"])
    install = os.path.commonpath([os.path.dirname(os.path.realpath(hp)), os.path.dirname(package)])
    return {"install": install, "package": package, "stdlib": [os.path.realpath(p) for p in out["stdlib"]]}


def _path_of(call, args):
    """The path a traced call is about: its first quoted string, or the fd's path (strace -y)."""
    m = _FD_PATH.match(args)
    q = _QUOTED.search(args)
    if call in ("getdents64", "fstat", "fchdir") or (q and q.group(1) == "" and m):
        return m.group(1) if m else ""
    if q and m and not q.group(1).startswith("/"):             # openat(3</dir>, "name")
        return os.path.join(m.group(1), q.group(1))
    return q.group(1) if q else ""


def classify(lines, t):
    """Count the traced calls made before the last execve (the program's), by tree and by call."""
    calls = []
    for line in lines:
        m = _LINE.match(line)
        if not m:
            continue
        name, args = m.groups()
        if name == "execve":
            if "= 0" in line.rsplit(")", 1)[-1]:
                calls.append(("execve", ""))
            continue
        if name in TRACED:
            calls.append((name, _path_of(name, args)))
    python_execs = sum(1 for ln in lines if ln.startswith("execve(") and "hpcrun-py" in ln.split(",", 1)[0])
    last_exec = max((i for i, c in enumerate(calls) if c[0] == "execve"), default=len(calls))
    counts = {"install": 0, "package": 0, "stdlib": 0, "rest": 0, "total": 0}
    by_call, install_paths = {}, {}
    for name, path in calls[:last_exec]:
        if name == "execve":
            continue
        rp = os.path.normpath(path) if path.startswith("/") else path
        if rp.startswith(t["install"] + "/") or rp == t["install"]:
            where = "install"
            install_paths[rp] = install_paths.get(rp, 0) + 1
            if rp.startswith(t["package"] + "/") or rp == t["package"]:
                counts["package"] += 1
        elif any(rp.startswith(s + "/") or rp == s for s in t["stdlib"]):
            where = "stdlib"
        else:
            where = "rest"
        counts[where] += 1
        counts["total"] += 1
        by_call[name] = by_call.get(name, 0) + 1
    return {"counts": counts, "by_call": by_call, "python_execs": python_execs,
            "install_paths": sorted(install_paths.items(), key=lambda kv: -kv[1])[:40]}


def strace_count(argv, env, t):
    """One traced run of argv (already warm): the classified counts."""
    strace = shutil.which("strace")
    if not strace:
        return {"error": "strace is not installed"}
    with tempfile.NamedTemporaryFile("r", prefix="rankpath-", suffix=".strace") as out:
        p = subprocess.run([strace, "-qq", "-y", "-e", "trace=" + ",".join(TRACED + ("execve",)),
                            "-o", out.name] + argv, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, timeout=60)
        if p.returncode != 0:
            return {"error": "exit %d: %s" % (p.returncode, common.tail(p.stderr, 3))}
        return classify(out.read().splitlines(), t)


def cpu_per_run(argv, env, runs):
    """(ms of user+sys per run, failures) over `runs` runs, from this process's children's rusage."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    bad = 0
    for _ in range(runs):
        _, rc = common.spawn_time(argv, env=env)
        bad += rc != 0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu * 1e3 / runs, bad


FRONT_CASE = "hpcrun IMG.img (C front)"


def cases(hp, light, front=None):
    py = _interpreter(hp)
    return [("native /bin/true", ["/bin/true"]),
            ("python -I -S -c pass", [py, "-I", "-S", "-c", "pass"]),
            ("hpcrun IMG.img (joining)", [hp, light["img"], "/bin/true"])] + (
            [(FRONT_CASE, [front, light["img"], "/bin/true"])] if front else [])


def _measure(hp, light, runs, rounds, env, budget):
    front, hp = front_of(hp)
    t = trees(hp)
    case_list = cases(hp, light, front)
    for _, argv in case_list:            # warm: the node's container exists, caches are hot
        for _ in range(WARMUP):
            _, p = common.run_timed(argv, env=env, timeout=30)
            if p.returncode != 0:
                return {"error": "%s: exit %d: %s" % (" ".join(argv), p.returncode, common.tail(p.stderr, 3))}
    res = {"trees": t, "strace": strace_count(case_list[2][1], env, t), "cpu_ms": {}, "runs": runs}
    if front:
        res["strace_front"] = strace_count(case_list[3][1], env, t)
    # As an mpirun rank: a launcher variable makes the plan ask hpcrun.mpi (its own container key)
    mpi_env = dict(env, OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="1")
    for _ in range(WARMUP):
        common.run_timed(case_list[2][1], env=mpi_env, timeout=30)
    res["strace_mpi"] = strace_count(case_list[2][1], mpi_env, t)
    samples = {label: [] for label, _ in case_list}
    failures = 0
    for r in range(rounds):
        if budget.exhausted():
            break
        k = r % len(case_list)
        for label, argv in case_list[k:] + case_list[:k]:
            ms, bad = cpu_per_run(argv, env, runs)
            samples[label].append(ms)
            failures += bad
    res["cpu_ms"] = {label: common.summary(v) for label, v in samples.items()}
    res["failures"] = failures
    return res


def _timed_rounds(cases, rounds, env, timeout, budget, log, ok):
    """{label: summary of wall seconds} over rounds, cases rotating; a case that fails stops."""
    times = {label: [] for label, _ in cases}
    errors = {}
    for r in range(rounds):
        if budget.exhausted():
            break
        k = r % len(cases)
        for label, argv in cases[k:] + cases[:k]:
            if label in errors:
                continue
            log("%s round %d" % (label, r + 1))
            try:
                dt, p = common.run_timed(argv, env=env, timeout=timeout)
            except subprocess.TimeoutExpired:
                errors[label] = "timeout after %d s" % timeout
                continue
            if p.returncode != 0 or not ok(p):
                errors[label] = "exit %d: %s" % (p.returncode, common.tail(p.stderr, 3))
                continue
            times[label].append(dt)
    out = {label: common.summary(v) for label, v in times.items()}
    for label, e in errors.items():
        out[label]["error"] = e
    return out


def mpirun_hello(built, ranks, rounds, env, budget, log):
    """{N: {"native": summary, "hpcrun": summary, "ratio": hpcrun/native}} of `mpirun -np N hello`."""
    vs = common.variants(("native", "hpcrun"), built["mpi"]["img"], built["bin"])
    if len(vs) < 2:
        return {"error": "hpcrun or native left out"}
    front, py_entry = front_of(vs[1].prefix[0])
    if front:                                         # the Python path, beside the front
        vs.append(common.Variant("hpcrun-py", [py_entry] + vs[1].prefix[1:], vs[1].bin_dir))
    out = {}
    for n in ranks:
        for v in vs:                                  # warm: the hpcrun variant's container is made
            common.run_timed(common.mpirun_argv(n) + v.argv("hello"), env=env, timeout=120)
        cell = _timed_rounds([(v.name, common.mpirun_argv(n) + v.argv("hello")) for v in vs], rounds, env,
                             60 + 2 * n, budget, lambda m: log("mpirun -np %d %s" % (n, m)),
                             lambda p: ("hello from %d ranks" % n) in p.stdout)
        cell["ratio"] = common.ratio(cell["hpcrun"].get("median"), cell["native"].get("median"))
        if front:
            cell["front"] = True
            cell["ratio_py"] = common.ratio(cell["hpcrun-py"].get("median"), cell["native"].get("median"))
        out[str(n)] = cell
    return out


FUSE_DAEMONS = ("hpcrun-squashfuse", "squashfuse_ll", "squashfuse")


def fuse_requests(built, n, env, user):
    """Requests the keeper's FUSE daemon answers during one warm `mpirun -np n hello` as `user`
    (root strace's the daemon: its writev()s on /dev/fuse; docs/staging.md "The FUSE daemon")."""
    if os.getuid() != 0 or not shutil.which("strace"):
        return {"error": "needs root and strace"}
    hp = common.find_hpcrun()
    img = built["mpi"]["img"]
    who = ["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid, "--init-groups", "--"]
    argv = who + common.mpirun_argv(n) + [hp, img, "/bench/hello"]
    _, p = common.run_timed(argv, env=env, timeout=120)              # warm: the container is made
    _, plan = common.run_timed(who + common.mpirun_argv(1) + [hp, "--dry-run", img, "/bench/hello"], env=env,
                               timeout=120)
    try:
        key = json.loads(plan.stdout)["key"]
    except ValueError:
        return {"error": "no plan: %s" % common.tail(plan.stderr, 2)}
    daemons = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().split(b"\0")[:-1]
        except OSError:
            continue
        if cmd and os.path.basename(cmd[0]).decode() in FUSE_DAEMONS and cmd[-1].endswith(
                ("/%s.d/image" % key).encode()):
            daemons.append((int(pid), cmd[0].decode()))
    if len(daemons) != 1:
        return {"error": "the container's FUSE daemon not found (%d)" % len(daemons)}
    pid, program = daemons[0]
    with tempfile.NamedTemporaryFile("r", prefix="fuse-strace-") as log:
        st = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=writev", "-o", log.name, "-p", str(pid)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)                                              # attached
        _, p = common.run_timed(argv, env=env, timeout=120)
        time.sleep(0.5)
        st.terminate()
        st.wait(30)
        count = sum(1 for ln in log if "writev(" in ln)
    if ("hello from %d ranks" % n) not in p.stdout:
        return {"error": "mpirun failed: %s" % common.tail(p.stderr, 2)}
    return {"ranks": n, "program": program, "requests": count}


def slurm_task_path(hp, img, ntasks, rounds, env, user, budget, log):
    """srun -N1 -n ntasks /bin/true, natively and in img through the SPANK plugin, on a one-node
    test-bed Slurm: {"native", "hpcrun": summary, "per_task_ms": the difference per task}."""
    plugin = os.path.join(common.REPO, "plugins", "slurm", "spank_hpcrun.so")
    if not os.path.exists(plugin):
        return {"error": "plugins/slurm/spank_hpcrun.so is not built (make plugins)"}
    if not shutil.which("slurmd") or os.getuid() != 0:
        return {"error": "needs root and Slurm's daemons (the test bed)"}
    sys.path.insert(0, os.path.join(common.REPO, "tests"))
    from testbed.cluster import Cluster
    as_user = ["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid, "--init-groups",
               "--"] if user and user.pw_uid != 0 else []
    srun = ["srun", "-N1", "-n", str(ntasks)]
    # shared: the image may lie under /tmp (--build), which a test-bed node has its own of
    with Cluster(nodes=1, cpus=ntasks, plugin=plugin, plugin_args=["hpcrun=" + hp],
                 shared=[os.path.dirname(os.path.abspath(img))]) as c:
        e = c.env(env)
        cases = [("native", as_user + srun + ["/bin/true"]),
                 ("hpcrun", as_user + srun + ["--container-image=" + img, "/bin/true"])]
        # warm, and a check that the second case runs in the image: another mount namespace
        ns = [common.run_timed(argv[:-1] + ["readlink", "/proc/self/ns/mnt"], env=e, timeout=120)[1]
              for _, argv in cases]
        if any(p.returncode for p in ns) or len({p.stdout for p in ns}) != 2:
            return {"error": "srun --container-image did not run the task in the image: %s" % "; ".join(
                "%s exit %d %s %s" % (label, p.returncode, p.stdout.strip()[:60], common.tail(p.stderr, 2))
                for (label, _), p in zip(cases, ns))}
        out = _timed_rounds(cases, rounds, e, 120, budget, lambda m: log("srun -n %d %s" % (ntasks, m)),
                            lambda p: True)
    h, n = out["hpcrun"].get("median"), out["native"].get("median")
    out["ntasks"] = ntasks
    out["per_task_ms"] = (h - n) * 1e3 / ntasks if h is not None and n is not None else None
    return out


def run(built, runs=20, rounds=5, budget=None, user=None, log=print, mpi_ranks=(), mpi_rounds=3,
        slurm_tasks=0):
    """The rank-path benchmark; returns plain data (see docs/benchmarks.md)."""
    budget = budget or common.Budget(None)
    hp = "hpcrun" not in common.DISABLED and common.find_hpcrun()
    if not hp:
        return {"error": "hpcrun is left out of this run"}
    env = common.bench_env()
    if user:
        env.update(USER=user.pw_name, LOGNAME=user.pw_name, HOME=user.pw_dir)
    log("rankpath: strace + %d rounds x %d runs%s" % (rounds, runs, " as %s" % user.pw_name if user else ""))
    import entry
    fn = lambda: _measure(hp, built["light"], runs, rounds, env, budget)  # noqa: E731
    as_user = (lambda f: entry._as_user(user, f)) if user and user.pw_uid != os.getuid() else (lambda f: f())
    res = as_user(fn)
    res["user"] = user.pw_name if user else pwd.getpwuid(os.getuid()).pw_name
    if mpi_ranks and "mpi" in built:
        res["mpirun"] = as_user(lambda: mpirun_hello(built, mpi_ranks, mpi_rounds, env, budget, log))
        if user and user.pw_uid != os.getuid() and os.getuid() == 0:
            # As root the image is a kernel loop mount, not squashfuse: the launcher's own cost, apart
            # from what reading an image through FUSE costs every rank's MPI_Init (docs/benchmarks.md)
            res["mpirun_root"] = mpirun_hello(built, mpi_ranks, mpi_rounds, common.bench_env(), budget,
                                              lambda m: log("as root: " + m))
            res["fuse_requests"] = fuse_requests(built, mpi_ranks[0], env, user)
    if slurm_tasks:
        try:
            res["slurm"] = slurm_task_path(hp, built["light"]["img"], slurm_tasks, mpi_rounds, env, user,
                                           budget, log)
        except Exception as e:                      # the test bed did not come up: say so, keep the rest
            res["slurm"] = {"error": "%s: %s" % (type(e).__name__, e)}
    res["rounds"] = rounds
    cpu = res.get("cpu_ms", {}).get("hpcrun IMG.img (joining)", {}).get("median")
    calls = res.get("strace", {}).get("counts", {}).get("install")
    res["goals"] = [{"name": "metadata calls on hpcrun's install tree", "value": calls, "goal": GOAL_INSTALL_CALLS},
                    {"name": "CPU ms per joining rank", "value": cpu, "goal": GOAL_CPU_MS}]
    front = res.get("strace_front", {})
    if "counts" in front and not front["python_execs"]:       # only a served run measures the front
        res["goals"] += [
            {"name": "C front: install-tree calls (served)", "value": front["counts"]["install"],
             "goal": GOAL_INSTALL_CALLS},
            {"name": "C front: CPU ms per joining rank", "value": res["cpu_ms"].get(FRONT_CASE, {}).get("median"),
             "goal": GOAL_FRONT_CPU_MS}]
    for key, who in (("mpirun", ""), ("mpirun_root", " (root)")):
        for n, cell in sorted(res.get(key, {}).items()):
            if isinstance(cell, dict) and cell.get("ratio") is not None:
                res["goals"].append({"name": "mpirun -np %s hello, %s/native%s" % (
                    n, "C front" if cell.get("front") else "hpcrun", who), "value": cell["ratio"],
                    "goal": GOAL_MPIRUN_RATIO})
            if isinstance(cell, dict) and cell.get("ratio_py") is not None:
                res["goals"].append({"name": "mpirun -np %s hello, hpcrun-py/native%s" % (n, who),
                                     "value": cell["ratio_py"], "goal": GOAL_MPIRUN_RATIO})
    return res


def _format_mpirun(lines, mp, who):
    if not mp:
        return
    if "error" in mp:
        lines.append("mpirun hello%s: FAILED: %s" % (who, mp["error"]))
    for n, cell in sorted(mp.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        if not isinstance(cell, dict):
            continue
        parts = []
        for v in ("native", "hpcrun") + (("hpcrun-py",) if cell.get("front") else ()):
            c = cell.get(v, {})
            parts.append("%s %s" % (v, "%.3f s (%.3f-%.3f)" % (c["median"], c["q1"], c["q3"]) if c.get("n")
                                    else c.get("error", "no runs")))
        lines.append("mpirun -np %s hello%s: %s; hpcrun/native %s" % (
            n, who, ", ".join(parts), "%.3f" % cell["ratio"] if cell.get("ratio") else "-")
            + ("; hpcrun-py/native %s (hpcrun: the C front)" % (
                "%.3f" % cell["ratio_py"] if cell.get("ratio_py") else "-") if cell.get("front") else ""))


def format_text(res):
    if "error" in res:
        return "# rankpath: FAILED: %s" % res["error"]
    lines = ["# rank path: one joining `hpcrun light.img /bin/true` (user %s)" % res["user"]]
    s = res["strace"]
    if "error" in s:
        lines.append("metadata calls: FAILED: %s" % s["error"])
    else:
        c = s["counts"]
        lines.append("metadata calls before the program's execve: %d; install tree %d (hpcrun package %d), "
                     "stdlib %d, rest %d" % (c["total"], c["install"], c["package"], c["stdlib"], c["rest"]))
        lines.append("  by call: " + ", ".join("%s %d" % kv for kv in sorted(s["by_call"].items())))
    m = res.get("strace_mpi", {})
    if "counts" in m:
        c = m["counts"]
        lines.append("  the same as an mpirun rank (OMPI_COMM_WORLD_RANK set): %d; install tree %d "
                     "(hpcrun package %d), stdlib %d, rest %d" % (c["total"], c["install"], c["package"],
                                                                  c["stdlib"], c["rest"]))
    f = res.get("strace_front", {})
    if "counts" in f:
        lines.append("  through the C front (bin/hpcrun; the rows above: bin/hpcrun-py): %s; %d calls, install "
                     "tree %d" % ("served without Python" if not f["python_execs"] else
                                  "NOT served (it ran hpcrun-py: no ticket?)", f["counts"]["total"],
                                  f["counts"]["install"]))
    elif "error" in f:
        lines.append("  through the C front: FAILED: %s" % f["error"])
    lines.append("CPU (user+sys) ms per run, median (q1-q3) of %d rounds x %d runs:" % (res["rounds"], res["runs"]))
    for label, v in res["cpu_ms"].items():
        if v.get("n"):
            lines.append("  %-26s %6.2f (%.2f-%.2f)" % (label, v["median"], v["q1"], v["q3"]))
    for key, who in (("mpirun", " (user %s)" % res["user"]), ("mpirun_root", " (root: a kernel mount)")):
        _format_mpirun(lines, res.get(key), who)
    fr = res.get("fuse_requests")
    if fr:
        lines.append("FUSE requests to the keeper's daemon during a warm mpirun -np %s hello (user): %s" % (
            fr.get("ranks", "?"), fr["error"] if "error" in fr else "%d (%s)" % (fr["requests"], fr["program"])))
    sl = res.get("slurm")

    if sl:
        if "error" in sl:
            lines.append("Slurm task path: not measured: %s" % sl["error"])
        else:
            parts = ["%s %s" % (v, "%.3f s" % sl[v]["median"] if sl[v].get("n") else sl[v].get("error", "-"))
                     for v in ("native", "hpcrun")]
            lines.append("Slurm task path, srun -N1 -n %d /bin/true: %s; per task %s" % (
                sl["ntasks"], ", ".join(parts),
                "%.1f ms more with hpcrun" % sl["per_task_ms"] if sl["per_task_ms"] is not None else "-"))
    for g in res["goals"]:
        if g["value"] is not None:
            lines.append("goal %-40s %7.2f (goal <= %g: %s)" % (
                g["name"], g["value"], g["goal"], "met" if g["value"] <= g["goal"] else "NOT met"))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="runs per round (default 20)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, cases interleaved (default 5)")
    ap.add_argument("--build", default=common.DEFAULT_BUILD)
    ap.add_argument("--user", help="measure as this user (when root): the unprivileged path")
    ap.add_argument("--paths", action="store_true", help="also list the install-tree paths touched")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--mpi-ranks", default=",".join(map(str, MPI_RANKS)),
                    help="N for `mpirun -np N hello` (default %(default)s; empty: skip)")
    ap.add_argument("--mpi-rounds", type=int, default=3, help="rounds of mpirun and srun (default 3)")
    ap.add_argument("--slurm-tasks", type=int, default=SLURM_TASKS,
                    help="tasks per srun on the test-bed Slurm (default %(default)s; 0: skip)")
    a = ap.parse_args()
    mpi_ranks = [int(n) for n in a.mpi_ranks.split(",") if n]
    built = images.build(a.build, mpi=bool(mpi_ranks), log=lambda m: print(m, file=sys.stderr))
    res = run(built, a.runs, a.rounds, user=pwd.getpwnam(a.user) if a.user else None,
              log=lambda m: print(m, file=sys.stderr), mpi_ranks=mpi_ranks, mpi_rounds=a.mpi_rounds,
              slurm_tasks=a.slurm_tasks)
    print(format_text(res))
    if a.paths and "install_paths" in res.get("strace", {}):
        for path, n in res["strace"]["install_paths"]:
            print("  %3d %s" % (n, path))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
