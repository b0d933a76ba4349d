#!/usr/bin/env python3
"""Launch cost at scale.

1. `mpirun -np N hello` (MPI_Init + barrier): native vs hpcrun vs ch-run, N = 2..64,
   rounds alternating the variants; `srun -n N` too when a Slurm cluster answers.
2. Entry at scale: N concurrent `X IMAGE readlink /proc/self/ns/mnt` started at once
   (no MPI: MPI_Init at hundreds of ranks on 2 cores takes minutes natively).  The
   payload prints its mount namespace, so the number of distinct namespaces is the
   number of containers (and image mounts) made; a sampler also counts squashfuse
   processes and loop devices backed by the image while the launches run.

    python3 benchmarks/launch.py [--quick]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import common
import images

KINDS = ("native", "hpcrun", "ch-run")


def _mpi_variants(built):
    vs = common.variants(KINDS, built["mpi"]["img"], built["bin"])
    for v in vs:
        if v.name == "ch-run":
            v.prefix[1] = built["mpi"]["sqfs"]
    return vs


def slurm_available():
    if not shutil.which("srun") or not shutil.which("sinfo"):
        return False
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in p.stdout.split())


def mpirun_launch(built, ranks, rounds, budget, log=print, use_srun=False):
    """{"mpirun": {N: {variant: {"s": summary, "errors": [...]}}}, "srun": ... (when used)}."""
    env = common.bench_env()
    vs = _mpi_variants(built)
    launchers = [("mpirun", common.mpirun_argv)]
    if use_srun:
        launchers.append(("srun", lambda n: ["srun", "-n", str(n), "--overcommit", "--mpi=pmix"]))
    out = {}
    for lname, launcher in launchers:
        table = out.setdefault(lname, {})
        broken = set()  # variants that failed once are not retried at larger N (a hang costs minutes)
        for n in ranks:
            if budget.exhausted():
                table[str(n)] = {"skipped": "time budget"}
                continue
            cell = {v.name: {"times": [], "errors": []} for v in vs}
            timeout = 60 + 2 * n
            for r in range(rounds):
                k = r % len(vs)
                for v in vs[k:] + vs[:k]:
                    if v.name in broken:
                        if not cell[v.name]["errors"]:
                            cell[v.name]["errors"].append("skipped: failed before")
                        continue
                    argv = launcher(n) + v.argv("hello")
                    log("%s -n %d %s round %d" % (lname, n, v.name, r + 1))
                    try:
                        dt, p = common.run_timed(argv, env=env, timeout=timeout)
                    except subprocess.TimeoutExpired:
                        cell[v.name]["errors"].append("timeout after %d s" % timeout)
                        broken.add(v.name)
                        continue
                    if p.returncode != 0 or ("hello from %d ranks" % n) not in p.stdout:
                        cell[v.name]["errors"].append("exit %d: %s" % (p.returncode, common.tail(p.stderr, 3)))
                        broken.add(v.name)
                        continue
                    cell[v.name]["times"].append(dt)
                if budget.exhausted():
                    break
            for c in cell.values():
                c["s"] = common.summary(c.pop("times"))
            table[str(n)] = cell
    return out


class _Sampler(threading.Thread):
    """Max concurrent squashfuse processes and loop devices backed by `image` while running."""

    def __init__(self, image):
        super().__init__(daemon=True)
        st = os.stat(image)
        self.image_id = (st.st_dev, st.st_ino)
        self.max_squashfuse = 0
        self.max_loops = 0
        self.stop = threading.Event()

    def _loops(self):
        n = 0
        for dev in os.listdir("/sys/block"):
            try:
                with open("/sys/block/%s/loop/backing_file" % dev) as f:
                    path = f.read().strip()
                st = os.stat(path)
                n += (st.st_dev, st.st_ino) == self.image_id
            except OSError:
                continue
        return n

    def _squashfuse(self):
        n = 0
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open("/proc/%s/comm" % pid) as f:
                        n += f.read().startswith("squashfuse")
                except OSError:
                    continue
        return n

    def run(self):
        self.base_loops = self._loops()  # attached before the run (e.g. a lingering keeper's mount)
        while not self.stop.is_set():
            self.max_squashfuse = max(self.max_squashfuse, self._squashfuse())
            self.max_loops = max(self.max_loops, self._loops())
            self.stop.wait(0.05)


def concurrent_entry(argv, n, image, env, timeout=120):
    """Start n copies of argv at once; wall time until all are reaped, failures, distinct mount ns."""
    tmp = tempfile.mkdtemp(prefix="hpcrun-bench-")
    try:
        out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        actions = [(os.POSIX_SPAWN_DUP2, out_fd, 1), (os.POSIX_SPAWN_DUP2, err_fd, 2)]
        sampler = _Sampler(image) if image else None
        if sampler:
            sampler.start()
        t0 = time.perf_counter()
        pids = [os.posix_spawn(argv[0], argv, env, file_actions=actions) for _ in range(n)]
        spawned = time.perf_counter() - t0
        failed, left, deadline = 0, set(pids), time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for pid in list(left):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    left.discard(pid)
                    failed += status != 0
            time.sleep(0.001)
        wall = time.perf_counter() - t0
        for pid in left:  # hung launches: ours, end them so the next case starts clean
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        if sampler:
            sampler.stop.set()
            sampler.join()
        os.close(out_fd)
        os.close(err_fd)
        with open(out_path) as f:
            namespaces = {line.strip() for line in f if line.startswith("mnt:")}
        with open(err_path) as f:
            err = f.read()
        res = {"n": n, "wall_s": wall, "spawn_s": spawned, "failed": failed + len(left), "hung": len(left),
               "mount_namespaces": len(namespaces), "stderr_tail": common.tail(err, 3)}
        if sampler:
            res.update(max_squashfuse=sampler.max_squashfuse,
                       max_loop_devices=sampler.max_loops, loop_devices_before=sampler.base_loops)
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def entry_at_scale(built, counts, budget, log=print):
    """{"counts": {N: {case: result}}, "errors": [...]} for native, hpcrun (image file, SquashFS) and ch-run (SquashFS)."""
    env = common.bench_env()
    light = built["light"]
    hp = "hpcrun" not in common.DISABLED and common.find_hpcrun()
    ch = "ch-run" not in common.DISABLED and common.find_chrun()
    payload = ["/bin/readlink", "/proc/self/ns/mnt"]
    out = {"counts": {}, "errors": []}
    cases = [("native", [shutil.which("readlink")] + payload[1:], None)]
    if hp:
        cases += [("hpcrun IMG.img", [hp, light["img"]] + payload, light["img"]),
                  ("hpcrun IMG.sqfs", [hp, light["sqfs"]] + payload, light["sqfs"])]
    if ch:
        cases.append(("ch-run IMG.sqfs", [ch, light["sqfs"], "--"] + payload, light["sqfs"]))
    # warm: one launch of each, so the keeper/stage exists as it would after a job's first step
    for case in list(cases):
        try:
            common.run_timed(case[1], env=env, timeout=30)
        except subprocess.TimeoutExpired:
            cases.remove(case)
            out["errors"].append("%s: timeout after 30 s" % case[0])
    for n in counts:
        if budget.exhausted():
            out["counts"][str(n)] = {"skipped": "time budget"}
            continue
        cell = out["counts"][str(n)] = {}
        for name, argv, image in cases:
            log("entry at scale: %d x %s" % (n, name))
            cell[name] = concurrent_entry(argv, n, image, env, timeout=30 + n // 5)
    return out


def format_text(result):
    lines = []
    for lname, table in result.get("launch", {}).items():
        lines.append("# %s -n N hello: wall s, median (min-max)" % lname)
        for n, cell in table.items():
            if "skipped" in cell:
                lines.append("%5s  skipped (%s)" % (n, cell["skipped"]))
                continue
            parts = []
            for v, c in cell.items():
                s = c["s"]
                parts.append("%s %s" % (v, "%.2f (%.2f-%.2f)" % (s["median"], s["min"], s["max"])
                                        if s["n"] else "FAILED " + "; ".join(c["errors"])[:200]))
            lines.append("%5s  " % n + "   ".join(parts))
    if "scale" in result:
        lines.append("# entry at scale: N concurrent launches, wall s / mount namespaces / failures")
        lines += ["error: " + e for e in result["scale"]["errors"]]
        for n, cell in result["scale"]["counts"].items():
            if "skipped" in cell:
                lines.append("%5s  skipped (%s)" % (n, cell["skipped"]))
                continue
            lines.append("%5s  " % n + "   ".join("%s %.2f / %d ns / %d failed" % (
                k, c["wall_s"], c["mount_namespaces"], c["failed"]) for k, c in cell.items()))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ranks", default=None, help="comma list, default 2,4,8,16,32,64")
    ap.add_argument("--scale", default=None, help="comma list, default 64,128,256,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--build", default=common.DEFAULT_BUILD)
    ap.add_argument("--json")
    a = ap.parse_args()
    ranks = [int(x) for x in (a.ranks or ("2,4" if a.quick else "2,4,8,16,32,64")).split(",")]
    scale = [int(x) for x in (a.scale or ("16" if a.quick else "64,128,256,512")).split(",")]
    built = images.build(a.build, log=lambda m: print(m, file=sys.stderr))
    for name, why in common.preflight(built["light"]["sqfs"]).items():
        print("left out: %s (%s)" % (name, why), file=sys.stderr)
    budget = common.Budget(None)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    result = {"launch": mpirun_launch(built, ranks, a.rounds, budget, log, use_srun=slurm_available()),
              "scale": entry_at_scale(built, scale, budget, log)}
    print(format_text(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
