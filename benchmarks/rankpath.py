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

import common
import images

WARMUP = 3
GOAL_INSTALL_CALLS = 10     # issue 15: <= 10 metadata calls on hpcrun's install tree per joining rank
GOAL_CPU_MS = 9.0           # issue 15: <= 9 ms CPU per joining rank on the Python path
TRACED = ("open", "openat", "openat2", "stat", "lstat", "fstat", "newfstatat", "statx", "readlink",
          "readlinkat", "access", "faccessat", "faccessat2", "getdents64", "getcwd", "chdir", "fchdir")
_LINE = re.compile(r'^(?:\d+\s+)?(\w+)\((.*)$')
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_FD_PATH = re.compile(r'^\d+<([^>]*)>')


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
    return {"counts": counts, "by_call": by_call,
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


def cases(hp, light):
    py = _interpreter(hp)
    return [("native /bin/true", ["/bin/true"]),
            ("python -I -S -c pass", [py, "-I", "-S", "-c", "pass"]),
            ("hpcrun IMG.img (joining)", [hp, light["img"], "/bin/true"])]


def _measure(hp, light, runs, rounds, env, budget):
    t = trees(hp)
    case_list = cases(hp, light)
    for _, argv in case_list:            # warm: the node's container exists, caches are hot
        for _ in range(WARMUP):
            _, p = common.run_timed(argv, env=env, timeout=30)
            if p.returncode != 0:
                return {"error": "%s: exit %d: %s" % (" ".join(argv), p.returncode, common.tail(p.stderr, 3))}
    res = {"trees": t, "strace": strace_count(case_list[-1][1], env, t), "cpu_ms": {}, "runs": runs}
    # As an mpirun rank: a launcher variable makes the plan ask hpcrun.mpi (its own container key)
    mpi_env = dict(env, OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="1")
    for _ in range(WARMUP):
        common.run_timed(case_list[-1][1], env=mpi_env, timeout=30)
    res["strace_mpi"] = strace_count(case_list[-1][1], mpi_env, t)
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


def run(built, runs=20, rounds=5, budget=None, user=None, log=print):
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
    res = entry._as_user(user, fn) if user and user.pw_uid != os.getuid() else fn()
    res["user"] = user.pw_name if user else pwd.getpwuid(os.getuid()).pw_name
    res["rounds"] = rounds
    cpu = res.get("cpu_ms", {}).get("hpcrun IMG.img (joining)", {}).get("median")
    calls = res.get("strace", {}).get("counts", {}).get("install")
    res["goals"] = [{"name": "metadata calls on hpcrun's install tree", "value": calls, "goal": GOAL_INSTALL_CALLS},
                    {"name": "CPU ms per joining rank", "value": cpu, "goal": GOAL_CPU_MS}]
    return res


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
    lines.append("CPU (user+sys) ms per run, median (q1-q3) of %d rounds x %d runs:" % (res["rounds"], res["runs"]))
    for label, v in res["cpu_ms"].items():
        if v.get("n"):
            lines.append("  %-26s %6.2f (%.2f-%.2f)" % (label, v["median"], v["q1"], v["q3"]))
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
    a = ap.parse_args()
    built = images.build(a.build, mpi=False, log=lambda m: print(m, file=sys.stderr))
    res = run(built, a.runs, a.rounds, user=pwd.getpwnam(a.user) if a.user else None,
              log=lambda m: print(m, file=sys.stderr))
    print(format_text(res))
    if a.paths and "install_paths" in res.get("strace", {}):
        for path, n in res["strace"]["install_paths"]:
            print("  %3d %s" % (n, path))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
