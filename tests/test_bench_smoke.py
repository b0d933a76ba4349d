"""Smoke test of benchmarks/ (`make bench`): the smallest run produces well-formed results.

Checks that every part ran and wrote what it should (JSON, Markdown, PNGs), not
the numbers: timing goals are for `make bench` on a quiet machine.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "benchmarks", "run.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `run.py --smoke` into a temp dir (its own build dir: nothing left in the tree)."""
    base = tmp_path_factory.mktemp("bench")
    out, build = base / "results", base / "build"
    p = subprocess.run([sys.executable, RUN, "--smoke", "--out", str(out), "--build", str(build)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out / "results.json") as f:
        res = json.load(f)
    return {"out": out, "build": build, "res": res, "stdout": p.stdout, "stderr": p.stderr}


def _summary_ok(s):
    return s["n"] >= 1 and s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]


def test_every_part_ran_in_smoke_mode(smoke):
    res = smoke["res"]
    assert res["meta"]["mode"] == "smoke"
    assert set(res) >= {"meta", "entry", "pingpong", "launch", "scale", "broadcast"}
    assert not res["meta"]["budget_exhausted"], "smoke run hit its time budget: %s" % smoke["stderr"][-2000:]


def test_entry_results(smoke):
    e = smoke["res"]["entry"]
    native = e["cases"]["native /bin/true"]
    assert "error" not in native and _summary_ok(native["ms"]) and native["ms"]["n"] == e["runs"]
    names = {r["name"] for r in e["ratios"]}
    assert "hpcrun/ch-run, SquashFS file" in names
    assert all(r["value"] is None or r["value"] > 0 for r in e["ratios"])


def test_pingpong_results_cover_all_sizes(smoke):
    pp = smoke["res"]["pingpong"]
    max_size = int(pp["args"][pp["args"].index("-m") + 1])
    expected = [0] + [1 << k for k in range(max_size.bit_length())]
    for lang in ("c", "python"):
        native = pp["langs"][lang]["native"]
        assert native["errors"] == []
        assert [r["size"] for r in native["sizes"]] == expected
        assert all(_summary_ok(r["lat_us"]) and r["lat_us"]["median"] > 0 for r in native["sizes"])


def test_launch_and_scale_results(smoke):
    cell = smoke["res"]["launch"]["mpirun"]["2"]
    assert cell["native"]["errors"] == [] and _summary_ok(cell["native"]["s"])
    for n, by_case in smoke["res"]["scale"]["counts"].items():
        native = by_case["native"]
        assert native["n"] == int(n) and native["failed"] == 0
        assert native["mount_namespaces"] == 1  # every native process is in the host's namespace


def test_containers_were_measured(smoke):
    """hpcrun and ch-run really ran in every part (a broken launcher fails here, not silently)."""
    res = smoke["res"]
    assert res["meta"]["left_out"] == {}
    for label in ("hpcrun IMG.img", "hpcrun IMG.sqfs", "hpcrun DIR", "ch-run IMG.sqfs", "ch-run DIR"):
        assert "error" not in res["entry"]["cases"][label], res["entry"]["cases"][label]
    for lang in ("c", "python"):
        for v in ("hpcrun", "ch-run"):
            assert res["pingpong"]["langs"][lang][v]["errors"] == [], (lang, v)
    for v in ("hpcrun", "ch-run"):
        assert res["launch"]["mpirun"]["2"][v]["errors"] == [], v
    for case in ("hpcrun IMG.img", "hpcrun IMG.sqfs"):
        for c in [by_case[case] for by_case in res["scale"]["counts"].values()]:
            assert c["failed"] == 0 and c["mount_namespaces"] == 1, (case, c)  # one container per node


def test_broadcast_results(smoke):
    b = smoke["res"]["broadcast"]
    assert b["errors"] == [] and b["counts"], b
    for n, c in b["counts"].items():
        assert _summary_ok(c["shared_s"]) and _summary_ok(c["broadcast_s"]), c
        # every node staging reads the payload N times; the broadcast once
        assert (c["bytes_read_shared"], c["bytes_read_broadcast"]) == (int(n) * b["payload_bytes"], b["payload_bytes"])
    assert "Staging on N fake nodes" in (smoke["out"] / "results.md").read_text()
    s = b.get("slurm", {})
    if "counts" in s:   # root, Slurm's daemons and plugins/slurm built: --container-bcast on the test bed
        assert s["errors"] == [] and all(_summary_ok(c["bcast_s"]) for c in s["counts"].values()), s


def test_markdown_and_plots_written(smoke):
    out = smoke["out"]
    md = (out / "results.md").read_text()
    for heading in ("## Entry", "## Ping-pong c, latency", "## Ping-pong python, bandwidth",
                    "## Launch: `mpirun -n N hello`", "## Entry at scale"):
        assert heading in md
    assert "| native /bin/true |" in md
    assert md.strip() == smoke["stdout"].strip()
    assert sorted(smoke["res"]["plots"]) == ["launch.png", "pingpong_bandwidth.png", "pingpong_latency.png"]
    for name in smoke["res"]["plots"]:
        with open(out / name, "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_pingpong_c_prints_osu_style_output(smoke):
    """The C benchmark on its own: OSU-like header, one row per size, three numeric columns."""
    prog = smoke["build"] / "bin" / "pingpong"
    argv = ["mpirun", "--oversubscribe", "-np", "2"] + (["--allow-run-as-root"] if os.getuid() == 0 else [])
    p = subprocess.run(argv + [str(prog), "-m", "1024", "-i", "10", "-w", "1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("# OSU-style MPI ping-pong")
    assert "Latency (us)" in lines[2] and "Bandwidth (MB/s)" in lines[2]
    rows = [line.split() for line in lines[3:]]
    assert [int(r[0]) for r in rows] == [0] + [1 << k for k in range(11)]
    assert all(len(r) == 3 and float(r[1]) > 0 for r in rows)
