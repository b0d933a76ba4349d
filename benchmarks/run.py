#!/usr/bin/env python3
"""Run all benchmarks (`make bench`): containerized (hpcrun, ch-run) vs native, side by side.

    python3 benchmarks/run.py [--quick | --smoke] [--budget S] [--only entry,rankpath,pingpong,launch,scale,broadcast]
                              [--user NAME] [--out DIR] [--build DIR]

Builds what it needs (the C programs with mpicc, images from host files), runs
each part with native and container runs alternating within the run so drift
cancels, and writes results.json, results.md (median + spread, ratios) and PNG
plots to benchmarks/results/ (or --out).  Parts stop starting new steps when the
time budget is spent and say so in the results.  See docs/benchmarks.md.
"""
import argparse
import datetime
import os
import platform
import pwd
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import broadcast  # noqa: E402
import common  # noqa: E402
import entry  # noqa: E402
import images  # noqa: E402
import launch  # noqa: E402
import pingpong_run  # noqa: E402
import rankpath  # noqa: E402
import report  # noqa: E402

PARTS = ("entry", "rankpath", "pingpong", "launch", "scale", "broadcast")
MODES = {  # sized for a 2-core machine
    "full": dict(budget=1500, entry_runs=200, rp_runs=20, rp_rounds=10, pp_rounds=3, pp_args=pingpong_run.FULL_ARGS, langs=("c", "python"),
                 ranks=(2, 4, 8, 16, 32, 64), launch_rounds=3, scale=(64, 128, 256, 512), pp_timeout=180,
                 bcast_mb=256, bcast_nodes=(1, 2, 3, 4), bcast_rounds=3,
                 rp_mpi=(16, 32), rp_slurm=8),
    "quick": dict(budget=300, entry_runs=30, rp_runs=10, rp_rounds=3, pp_rounds=1, pp_args=pingpong_run.QUICK_ARGS, langs=("c", "python"),
                  ranks=(2, 4, 8), launch_rounds=1, scale=(64,), pp_timeout=60,
                  bcast_mb=64, bcast_nodes=(1, 2, 4), bcast_rounds=1, rp_mpi=(16,), rp_slurm=0),
    "smoke": dict(budget=120, entry_runs=5, rp_runs=3, rp_rounds=1, pp_rounds=1, pp_args=pingpong_run.SMOKE_ARGS, langs=("c", "python"),
                  ranks=(2,), launch_rounds=1, scale=(8,), pp_timeout=30,
                  bcast_mb=4, bcast_nodes=(1, 2), bcast_rounds=1, rp_mpi=(), rp_slurm=0),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="CI-sized run (a few minutes)")
    g.add_argument("--smoke", action="store_true", help="smallest run: checks that everything works")
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default per mode)")
    ap.add_argument("--only", help="comma list of parts: " + ",".join(PARTS))
    ap.add_argument("--user", help="when root: run the entry benchmark as this user (the unprivileged path)")
    ap.add_argument("--slurm", choices=("auto", "yes", "no"), default="auto", help="also time srun -n N")
    ap.add_argument("--out", default=common.DEFAULT_RESULTS)
    ap.add_argument("--build", default=common.DEFAULT_BUILD)
    a = ap.parse_args(argv)
    mode = "quick" if a.quick else "smoke" if a.smoke else "full"
    cfg = MODES[mode]
    parts = a.only.split(",") if a.only else list(PARTS)
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error("unknown part(s): %s" % ",".join(sorted(unknown)))
    t0 = time.monotonic()

    def log(msg):
        print("[%6.1fs] %s" % (time.monotonic() - t0, msg), file=sys.stderr, flush=True)

    rp_mpi = cfg["rp_mpi"] if "rankpath" in parts else ()
    built = images.build(a.build, mpi=bool({"pingpong", "launch"} & set(parts) or rp_mpi), log=log)
    budget = common.Budget(a.budget or cfg["budget"])
    disabled = common.preflight(built["light"]["sqfs"])
    for name, why in disabled.items():
        log("left out: %s (%s)" % (name, why))
    res = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
                    "kernel": platform.release(), "cores": os.cpu_count(), "mode": mode,
                    "user": pwd.getpwuid(os.getuid()).pw_name, "budget_s": budget_s(a, cfg), "parts": parts,
                    "hpcrun": common.find_hpcrun(), "ch-run": common.find_chrun(), "left_out": disabled,
                    "images": built}}
    if "entry" in parts:
        res["entry"] = entry.run(built, cfg["entry_runs"], budget,
                                 user=pwd.getpwnam(a.user) if a.user else None, log=log)
    if "rankpath" in parts:
        res["rankpath"] = rankpath.run(built, cfg["rp_runs"], cfg["rp_rounds"], budget,
                                       user=pwd.getpwnam(a.user) if a.user else None, log=log,
                                       mpi_ranks=rp_mpi, slurm_tasks=cfg["rp_slurm"])
        print(rankpath.format_text(res["rankpath"]), file=sys.stderr)
    if "pingpong" in parts:
        res["pingpong"] = pingpong_run.run(built, cfg["langs"], cfg["pp_rounds"], cfg["pp_args"], budget, log,
                                             timeout=cfg["pp_timeout"])
    if "launch" in parts:
        use_srun = a.slurm == "yes" or (a.slurm == "auto" and launch.slurm_available())
        res["launch"] = launch.mpirun_launch(built, cfg["ranks"], cfg["launch_rounds"], budget, log, use_srun)
    if "scale" in parts:
        res["scale"] = launch.entry_at_scale(built, cfg["scale"], budget, log)
    if "broadcast" in parts:
        res["broadcast"] = broadcast.run(a.build, cfg["bcast_mb"], cfg["bcast_nodes"], cfg["bcast_rounds"], budget,
                                         log)
    res["meta"]["elapsed_s"] = time.monotonic() - t0
    res["meta"]["budget_exhausted"] = budget.exhausted()
    files = report.write(res, a.out)
    print(report.markdown(res))
    log("wrote " + ", ".join(files))
    return 0


def budget_s(a, cfg):
    return a.budget or cfg["budget"]


if __name__ == "__main__":
    sys.exit(main())
