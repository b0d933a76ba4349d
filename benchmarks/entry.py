#!/usr/bin/env python3
"""Entry cost: one `X /bin/true` natively, with hpcrun, and with ch-run, on the same images.

    python3 benchmarks/entry.py [--runs N] [--user NAME]

Cases run interleaved (one of each per round, the order rotating) so machine drift
hits all of them alike.  Every case is run a few times first, unmeasured: the
goal (hpcrun <= 0.5 x ch-run on the same SquashFS file) is for a warm node stage,
i.e. hpcrun's per-node mount/keeper already there, while ch-run mounts per process.
With --user (when root) the measurement runs as that user: the unprivileged path.
"""
import argparse
import json
import os
import pwd
import subprocess
import sys

import common
import images

WARMUP = 3
GOAL = 0.5


def cases(light):
    """[(label, argv)] for the light image in its three forms."""
    hp = "hpcrun" not in common.DISABLED and common.find_hpcrun()
    ch = "ch-run" not in common.DISABLED and common.find_chrun()
    out = [("native /bin/true", ["/bin/true"]),
           ("python3 -I -S -c pass", [os.path.realpath("/usr/bin/python3"), "-I", "-S", "-c", "pass"])]
    if hp:
        out += [("hpcrun IMG.img", [hp, light["img"], "/bin/true"]),
                ("hpcrun IMG.sqfs", [hp, light["sqfs"], "/bin/true"]),
                ("hpcrun DIR", [hp, light["dir"], "/bin/true"])]
    if ch:
        out += [("ch-run IMG.sqfs", [ch, light["sqfs"], "--", "/bin/true"]),
                ("ch-run DIR", [ch, light["dir"], "--", "/bin/true"])]
    return out


RATIOS = [  # (name, numerator case, denominator case, goal)
    ("hpcrun/ch-run, SquashFS file", "hpcrun IMG.sqfs", "ch-run IMG.sqfs", GOAL),
    ("hpcrun/ch-run, directory", "hpcrun DIR", "ch-run DIR", None),
    ("hpcrun image file / native", "hpcrun IMG.img", "native /bin/true", None),
    ("hpcrun SquashFS / native", "hpcrun IMG.sqfs", "native /bin/true", None),
    ("ch-run SquashFS / native", "ch-run IMG.sqfs", "native /bin/true", None),
    ("hpcrun image file / python3 start", "hpcrun IMG.img", "python3 -I -S -c pass", None),
]


def _measure(case_list, runs, budget, env):
    """{label: {"argv", "ms": summary, "error"}}; a case failing its warm-up is reported, not timed."""
    res, live = {}, []
    for label, argv in case_list:
        res[label] = {"argv": argv}
        for _ in range(WARMUP):
            try:
                dt, p = common.run_timed(argv, env=env, timeout=30)
            except subprocess.TimeoutExpired:
                res[label]["error"] = "timeout after 30 s"
                break
            if p.returncode != 0:
                res[label]["error"] = "exit %d: %s" % (p.returncode, common.tail(p.stderr, 3))
                break
        else:
            live.append((label, argv))
    times = {label: [] for label, _ in live}
    for r in range(runs):
        if budget.exhausted():
            break
        k = r % max(len(live), 1)
        for label, argv in live[k:] + live[:k]:
            dt, rc = common.spawn_time(argv, env=env)
            if rc != 0 and "error" not in res[label]:
                res[label]["error"] = "exit %d in a timed run" % rc
            times[label].append(dt * 1e3)
    for label, t in times.items():
        res[label]["ms"] = common.summary(t)
    return res


def _as_user(user, fn):
    """Run fn() in a child that has become user; return its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups(os.getgrouplist(user.pw_name, user.pw_gid))
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            os.chdir(user.pw_dir if os.path.isdir(user.pw_dir) else "/")
            data = json.dumps(fn()).encode()
        except BaseException as e:  # report anything to the parent, never fall through
            data = json.dumps({"__error__": repr(e)}).encode()
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = json.loads(data or b'{"__error__": "child died"}')
    if "__error__" in out:
        raise RuntimeError("as user %s: %s" % (user.pw_name, out["__error__"]))
    return out


def run(built, runs=50, budget=None, user=None, log=print):
    """The entry benchmark; returns plain data (see docs/benchmarks.md)."""
    budget = budget or common.Budget(None)
    env = common.bench_env()
    if user:
        env.update(USER=user.pw_name, LOGNAME=user.pw_name, HOME=user.pw_dir)
    case_list = cases(built["light"])
    log("entry: %d cases x %d runs%s" % (len(case_list), runs, " as %s" % user.pw_name if user else ""))
    if user and user.pw_uid != os.getuid():
        res = _as_user(user, lambda: _measure(case_list, runs, budget, env))
    else:
        res = _measure(case_list, runs, budget, env)
    med = {k: v.get("ms", {}).get("median") for k, v in res.items() if "error" not in v}
    ratios = [{"name": n, "num": a, "den": b, "value": common.ratio(med.get(a), med.get(b)), "goal": g}
              for n, a, b, g in RATIOS]
    return {"user": user.pw_name if user else pwd.getpwuid(os.getuid()).pw_name,
            "runs": runs, "warmup": WARMUP, "cases": res, "ratios": ratios}


def format_text(result):
    lines = ["# entry: one X /bin/true, wall ms (user %s, %d runs, interleaved)" % (result["user"], result["runs"]),
             "%-26s %9s %9s %9s %9s %5s" % ("case", "median", "q1", "q3", "max", "n")]
    for label, c in result["cases"].items():
        if "error" in c and "ms" not in c:
            lines.append("%-26s FAILED: %s" % (label, c["error"]))
            continue
        s = c["ms"]
        lines.append("%-26s %9.2f %9.2f %9.2f %9.2f %5d" % (label, s["median"], s["q1"], s["q3"], s["max"], s["n"]))
    for r in result["ratios"]:
        if r["value"] is not None:
            goal = "" if r["goal"] is None else "  (goal <= %.2f: %s)" % (
                r["goal"], "met" if r["value"] <= r["goal"] else "NOT met")
            lines.append("ratio %-34s %6.2f%s" % (r["name"], r["value"], goal))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--build", default=common.DEFAULT_BUILD)
    ap.add_argument("--user", help="measure as this user (when root): the unprivileged path")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args()
    built = images.build(a.build, mpi=False, log=lambda m: print(m, file=sys.stderr))
    result = run(built, a.runs, user=pwd.getpwnam(a.user) if a.user else None,
                 log=lambda m: print(m, file=sys.stderr))
    print(format_text(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
