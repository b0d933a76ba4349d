#!/usr/bin/env python3
"""Ping-pong latency and bandwidth (pingpong.c and pingpong.py), native vs hpcrun vs ch-run.

    python3 benchmarks/pingpong_run.py [--rounds N] [--quick]

Each round runs `mpirun -np 2 [LAUNCHER IMAGE] pingpong` once per variant, the
order rotating, so drift over the run hits every variant alike; per message size
the result is the median (and spread) over rounds.  Containers run the image's own
Open MPI and mpi4py (the hybrid model: host mpirun, MPI library from the image).
"""
import argparse
import json
import os
import sys

import common
import images

FULL_ARGS = ["-m", str(4 << 20), "-i", "1000", "-w", "100", "-I", "100", "-W", "10"]
QUICK_ARGS = ["-m", str(4 << 20), "-i", "100", "-w", "10", "-I", "10", "-W", "2"]
SMOKE_ARGS = ["-m", str(64 << 10), "-i", "20", "-w", "2", "-I", "5", "-W", "1"]
KINDS = ("native", "hpcrun", "ch-run")


def parse(text):
    """OSU-style output -> [(size, latency_us, bandwidth_MBps)]; comment lines skipped."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and not line.startswith("#"):
            try:
                rows.append((int(parts[0]), float(parts[1]), float(parts[2])))
            except ValueError:
                continue
    return rows


def programs(built, lang):
    """[Variant], program argv tail for lang 'c' or 'python'."""
    mpi = built["mpi"]
    vs = common.variants(KINDS, mpi["img"], built["bin"])
    for v in vs:  # ch-run takes the same SquashFS file's payload (it cannot read hpcrun's header)
        if v.name == "ch-run":
            v.prefix[1] = mpi["sqfs"]
    if lang == "c":
        return vs, lambda v: v.argv("pingpong")
    native_py = sys.executable

    def py(v):
        if v.name == "native":
            return [native_py, os.path.join(built["bin"], "pingpong.py")]
        return v.prefix + ["/usr/bin/python3", "/bench/pingpong.py"]
    return vs, py


def run(built, langs=("c", "python"), rounds=3, args=FULL_ARGS, budget=None, log=print, timeout=180):
    budget = budget or common.Budget(None)
    env = common.bench_env()
    out = {"args": args, "rounds": rounds, "langs": {}}
    for lang in langs:
        vs, cmd = programs(built, lang)
        res = {v.name: {"argv": None, "runs": [], "errors": []} for v in vs}
        for r in range(rounds):
            if budget.exhausted():
                break
            k = r % len(vs)
            for v in vs[k:] + vs[:k]:
                if res[v.name]["errors"]:  # a failed or hung variant is not retried (a hang costs minutes)
                    continue
                argv = common.mpirun_argv(2) + cmd(v) + list(args)
                res[v.name]["argv"] = argv
                log("pingpong %s %s round %d" % (lang, v.name, r + 1))
                try:
                    dt, p = common.run_timed(argv, env=env, timeout=timeout)
                except Exception as e:  # a hang must not stop the other variants
                    res[v.name]["errors"].append(repr(e))
                    continue
                rows = parse(p.stdout)
                if p.returncode != 0 or not rows:
                    res[v.name]["errors"].append("exit %d: %s" % (p.returncode, common.tail(p.stderr, 3)))
                    continue
                res[v.name]["runs"].append(rows)
                if "different user namespaces" in p.stderr:
                    res[v.name]["note"] = "Open MPI: ranks in different user namespaces (no CMA single copy)"
        for v in res.values():
            v["sizes"] = _per_size(v.pop("runs"))
        out["langs"][lang] = res
    return out


def _per_size(runs):
    """[[rows of one run]] -> [{"size", "lat_us": summary, "bw_MBps": summary}]."""
    by = {}
    for rows in runs:
        for size, lat, bw in rows:
            by.setdefault(size, ([], []))
            by[size][0].append(lat)
            by[size][1].append(bw)
    return [{"size": s, "lat_us": common.summary(l), "bw_MBps": common.summary(b)} for s, (l, b) in sorted(by.items())]


def format_text(result):
    lines = []
    for lang, res in result["langs"].items():
        names = list(res)
        lines.append("# ping-pong (%s): latency us / bandwidth MB/s, median of %d rounds" % (lang, result["rounds"]))
        lines.append("%-10s" % "size" + "".join("%22s" % n for n in names))
        table = {n: {row["size"]: row for row in res[n]["sizes"]} for n in names}
        sizes = sorted({s for t in table.values() for s in t})
        for s in sizes:
            cells = []
            for n in names:
                row = table[n].get(s)
                cells.append("%22s" % ("%.2f / %.0f" % (row["lat_us"]["median"], row["bw_MBps"]["median"])
                                       if row else "-"))
            lines.append("%-10d" % s + "".join(cells))
        for n in names:
            for e in res[n]["errors"]:
                lines.append("%s FAILED: %s" % (n, e))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--build", default=common.DEFAULT_BUILD)
    ap.add_argument("--json")
    a = ap.parse_args()
    built = images.build(a.build, log=lambda m: print(m, file=sys.stderr))
    for name, why in common.preflight(built["light"]["sqfs"]).items():
        print("left out: %s (%s)" % (name, why), file=sys.stderr)
    result = run(built, rounds=a.rounds, args=QUICK_ARGS if a.quick else FULL_ARGS,
                 log=lambda m: print(m, file=sys.stderr))
    print(format_text(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
