#!/usr/bin/env python3
"""Staging an image on N fake nodes: every node reading the shared file vs one `hpcrun broadcast`.

A fake node here is a node-local directory (as root: a tmpfs of its own) that
holds the node's run_dir; the "shared file" is one image file all nodes read
(page cache warm: this host has no parallel file system, so its bandwidth is
not what limits here; docs/staging.md models that part).  For N = 1..4 nodes:

  shared      N concurrent cold launches (`hpcrun IMG true`, each with its node's
              run_dir, mount_strategy fuse): each keeper stages the payload from
              the shared file (read + sha256 + write), N reads of the file
  broadcast   `mpirun hpcrun broadcast` (one rank per node, MPMD with --to) and
              then the same N cold launches, which mount the nodes' copies

And, as root with the Slurm test bed and plugins/slurm built, the same N through
Slurm (run_slurm): `srun --container-image=IMG true` vs `... --container-bcast`.

Reported: wall time of each phase (median over rounds) and bytes of payload
read from the shared file (the broadcast says what it read; each staging
keeper reads the payload once, tests/test_broadcast.py counts it with strace).

    python3 benchmarks/broadcast.py [--mb 256] [--nodes 1,2,3,4] [--rounds 3] [--chunk-mib 8] [--no-slurm]
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import common  # noqa: E402
import imagetools  # noqa: E402


def make_image(d, mb):
    root = os.path.join(d, "root")
    imagetools.make_busybox_root(root)
    with open(os.path.join(root, "big"), "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    img = imagetools.make_image(root, os.path.join(d, "shared.img"))
    shutil.rmtree(root)
    return img


class Nodes:
    """n fake nodes under base: node<i>/ (a tmpfs as root), node<i>/run the
    run_dir, node<i>/hpcrun.conf pointing at it."""

    def __init__(self, base, n, size):
        self.dirs, self.mounted, self.confs = [], [], []
        for i in range(n):
            d = os.path.join(base, "node%d" % i)
            os.mkdir(d, 0o755)
            if os.getuid() == 0 and subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", "size=%d,mode=0755" % (3 * size + (64 << 20)),
                     "hpcrun-bench-node", d]).returncode == 0:
                self.mounted.append(d)
            os.mkdir(os.path.join(d, "run"), 0o700)
            conf = os.path.join(d, "hpcrun.conf")
            with open(conf, "w") as f:
                f.write("run_dir = %s/run\n" % d)
                if os.getuid() == 0:
                    f.write("mount_strategy = fuse\n")     # root would mount in place (kernel)
            self.dirs.append(d)
            self.confs.append(conf)

    def close(self):
        for d in self.mounted:
            subprocess.run(["umount", "--lazy", d])


def _env(conf):
    e = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "PBS_JOBID", "HPCRUN_CONF")}
    e.update(HPCRUN_CONF=conf, HPCRUN_LINGER="0")
    return e


def launch_all(hpcrun, img, nodes):
    """N cold launches at once, one per node; wall seconds until all are done."""
    t = time.monotonic()
    procs = [subprocess.Popen([hpcrun, img, "true"], env=_env(c), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for c in nodes.confs]
    errs = [p.communicate()[1] for p in procs]
    wall = time.monotonic() - t
    bad = [e.strip() for p, e in zip(procs, errs) if p.returncode != 0]
    if bad:
        raise RuntimeError("launch failed: %s" % bad[0][-300:])
    return wall


def wait_idle(nodes, timeout=30):
    """The keepers of the last launches are gone (linger 0) and took their staged copies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(f.endswith(".pid") or f.endswith(".sqfs")
                   for d in nodes.dirs for _, _, fs in os.walk(os.path.join(d, "run", "stage")) for f in fs) and \
                not any(n.endswith(".pid") for d in nodes.dirs for n in os.listdir(os.path.join(d, "run"))):
            return
        time.sleep(0.05)


def broadcast(hpcrun, img, nodes, chunk_mib):
    argv = ["mpirun", "--oversubscribe"] + (["--allow-run-as-root"] if os.getuid() == 0 else [])
    for d in nodes.dirs:
        argv += ["-np", "1", hpcrun, "broadcast", "--no-job", "--chunk-mib", str(chunk_mib),
                 "--to", os.path.join(d, "run", "bcast"), img, ":"]
    env = _env(nodes.confs[0])
    t = time.monotonic()
    r = subprocess.run(argv[:-1], env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t
    if r.returncode != 0:
        raise RuntimeError("broadcast failed: %s" % r.stderr.strip()[-300:])
    m = re.search(r"(\d+) bytes read from the image", r.stdout)
    return wall, int(m.group(1)) if m else None


def clean(hpcrun, nodes):
    for d, c in zip(nodes.dirs, nodes.confs):
        subprocess.run([hpcrun, "broadcast", "--clean", "--no-job", "--to", os.path.join(d, "run", "bcast")],
                       env=_env(c), check=True)


def run(build_dir, mb, counts, rounds, budget, log, chunk_mib=8, slurm=True):
    hpcrun = common.find_hpcrun()
    os.makedirs(build_dir, exist_ok=True)
    base = tempfile.mkdtemp(prefix="bench-bcast-", dir=build_dir)
    res = {"mb": mb, "rounds": rounds, "chunk_mib": chunk_mib, "counts": {}, "errors": []}
    try:
        img = make_image(base, mb)
        with open(img, "rb") as f:
            size = int(f.read(4096).split(b"\n")[1].split()[3])
        res["payload_bytes"] = size
        for n in counts:
            if budget.exhausted():
                res["counts"][str(n)] = {"skipped": "time budget"}
                continue
            os.mkdir(os.path.join(base, "n%d" % n))
            nodes = Nodes(os.path.join(base, "n%d" % n), n, size)
            shared, bcast, launches, read = [], [], [], None
            try:
                for _ in range(rounds):
                    shared.append(launch_all(hpcrun, img, nodes))
                    wait_idle(nodes)
                    w, read = broadcast(hpcrun, img, nodes, chunk_mib)
                    bcast.append(w)
                    launches.append(launch_all(hpcrun, img, nodes))
                    wait_idle(nodes)
                    clean(hpcrun, nodes)
            except (RuntimeError, subprocess.SubprocessError) as e:
                res["errors"].append("%d nodes: %s" % (n, e))
            finally:
                nodes.close()
            res["counts"][str(n)] = {
                "shared_s": common.summary(shared), "broadcast_s": common.summary(bcast),
                "launch_after_broadcast_s": common.summary(launches),
                "bytes_read_shared": n * size, "bytes_read_broadcast": read}
            log("broadcast bench, %d node(s): shared %s s, broadcast %s + launch %s s" % (
                n, _m(shared), _m(bcast), _m(launches)))
        if slurm and not budget.exhausted():
            res["slurm"] = run_slurm(base, img, size, counts, rounds, budget, log)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return res


def run_slurm(base, img, size, counts, rounds, budget, log):
    """The Slurm path on the test bed's fake nodes (tests/testbed/cluster.py: each
    slurmd with its own tmpfs /tmp): per N, `srun -N N --container-image=IMG true`
    (each node's keeper stages from the shared file) vs the same with
    --container-bcast (sbcast once down Slurm's tree, each node lands its copy,
    the launches mount it; the job epilog removes it).  Wall time of the srun."""
    plugin = os.path.join(common.REPO, "plugins", "slurm", "spank_hpcrun.so")
    if not os.path.exists(plugin):
        return {"error": "plugins/slurm/spank_hpcrun.so is not built (make plugins)"}
    if not shutil.which("slurmd") or os.getuid() != 0:
        return {"error": "needs root and Slurm's daemons (the test bed)"}
    sys.path.insert(0, os.path.join(common.REPO, "tests"))
    from testbed.cluster import Cluster
    conf = os.path.join(base, "slurm-bench.conf")
    with open(conf, "w") as f:
        f.write("mount_strategy = fuse\n")     # root would mount the shared file in place (kernel)
    out = {"counts": {}, "errors": []}
    tmp = "%dm" % ((3 * size >> 20) + 64)      # sbcast's file + the landed copy, or one staged copy
    with Cluster(nodes=max(counts), cpus=1, plugin=plugin, plugin_args=["hpcrun=" + common.find_hpcrun()],
                 shared=[base], node_tmp_size=tmp) as c:
        env = c.env(_env(conf))
        for n in counts:
            if budget.exhausted():
                out["counts"][str(n)] = {"skipped": "time budget"}
                continue
            times = {"shared": [], "bcast": []}
            try:
                for _ in range(rounds):
                    for mode, extra in (("shared", []), ("bcast", ["--container-bcast"])):
                        c.wait_idle()      # the last job's epilog has run: its copies are gone
                        t = time.monotonic()
                        r = subprocess.run(["srun", "-N%d" % n, "-n%d" % n, "--container-image=" + img] + extra
                                           + ["true"], env=env, cwd=base, capture_output=True, text=True,
                                           timeout=600)
                        if r.returncode != 0:
                            raise RuntimeError("%s: %s" % (mode, r.stderr.strip()[-300:]))
                        times[mode].append(time.monotonic() - t)
            except (RuntimeError, subprocess.SubprocessError) as e:
                out["errors"].append("slurm, %d nodes: %s" % (n, e))
            out["counts"][str(n)] = {"shared_s": common.summary(times["shared"]),
                                     "bcast_s": common.summary(times["bcast"]),
                                     "bytes_read_shared": n * size, "bytes_read_bcast": os.path.getsize(img)}
            log("broadcast bench, Slurm, %d node(s): srun staging from the shared file %s s, "
                "--container-bcast %s s" % (n, _m(times["shared"]), _m(times["bcast"])))
    return out


def markdown_slurm(res):
    if not res or "error" in res:
        return ["Slurm (`--container-bcast`): not run: %s" % (res or {}).get("error", "not asked"), ""]
    out = ["### The same through Slurm: `srun --container-image=IMG true` vs `... --container-bcast`", "",
           "Test-bed nodes (tests/testbed/cluster.py: each slurmd with its own tmpfs /tmp); the srun's wall time, "
           "seconds, median (q1–q3). With `--container-bcast` it includes sbcast (one mapping of the file, "
           "Slurm's tree), the nodes' landing step and the launches.", "",
           "| nodes | every node stages from the shared file | `--container-bcast` | "
           "bytes read from the shared file: staging / sbcast |", "|---|---|---|---|"]

    def f(s):
        return "—" if not s or not s.get("n") else "%.3f (%.3f–%.3f)" % (s["median"], s["q1"], s["q3"])
    for n, c in res["counts"].items():
        if "skipped" in c:
            out.append("| %s | skipped (%s) | | |" % (n, c["skipped"]))
            continue
        out.append("| %s | %s | %s | %s / %s |" % (n, f(c["shared_s"]), f(c["bcast_s"]), c["bytes_read_shared"],
                                                    c["bytes_read_bcast"]))
    return out + ["- %s" % e for e in res["errors"]] + [""]


def _m(v):
    return "%.3f" % statistics.median(v) if v else "-"


def markdown(res):
    out = ["## Staging on N fake nodes: every node reads the shared file vs `hpcrun broadcast`", "",
           "%d MiB payload (%d bytes), %d round(s), %d MiB chunks; page cache warm; seconds, median (q1–q3)."
           % (res["mb"], res.get("payload_bytes", 0), res["rounds"], res["chunk_mib"]), "",
           "| nodes | every node stages from the shared file | broadcast | then N cold launches | "
           "broadcast + launches | payload bytes read from the shared file: staging / broadcast |",
           "|---|---|---|---|---|---|"]

    def f(s):
        return "—" if not s or not s.get("n") else "%.3f (%.3f–%.3f)" % (s["median"], s["q1"], s["q3"])
    for n, c in res["counts"].items():
        if "skipped" in c:
            out.append("| %s | skipped (%s) | | | | |" % (n, c["skipped"]))
            continue
        both = (c["broadcast_s"]["median"] + c["launch_after_broadcast_s"]["median"]
                if c["broadcast_s"].get("n") and c["launch_after_broadcast_s"].get("n") else None)
        out.append("| %s | %s | %s | %s | %s | %s / %s |" % (
            n, f(c["shared_s"]), f(c["broadcast_s"]), f(c["launch_after_broadcast_s"]),
            "—" if both is None else "%.3f" % both, c["bytes_read_shared"], c["bytes_read_broadcast"]))
    out += ["- %s" % e for e in res["errors"]] + [""]
    if "slurm" in res:
        out += markdown_slurm(res["slurm"])
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--nodes", default="1,2,3,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk-mib", type=int, default=8)
    ap.add_argument("--build", default=common.DEFAULT_BUILD)
    ap.add_argument("--no-slurm", action="store_true", help="skip the Slurm part (test-bed cluster, root)")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    res = run(a.build, a.mb, [int(x) for x in a.nodes.split(",")], a.rounds, common.Budget(None),
              lambda m: print("[%6.1fs] %s" % (time.monotonic() - t0, m), file=sys.stderr, flush=True),
              a.chunk_mib, slurm=not a.no_slurm)
    print(markdown(res))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
