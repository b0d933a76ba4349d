"""Write one run's results: results.json, results.md (tables with ratios, median + spread), PNG plots."""
import json
import os

import common
import rankpath

PP_SIZES_SHOWN = (0, 8, 1024, 8192, 65536, 1 << 20, 4 << 20)


def _fmt(s, unit_scale=1.0, digits=2):
    """'median (q1–q3)' of a summary, or '—'."""
    if not s or not s.get("n"):
        return "—"
    f = "%%.%df" % digits
    return (f + " (" + f + "–" + f + ")") % (s["median"] * unit_scale, s["q1"] * unit_scale, s["q3"] * unit_scale)


def _r(x):
    return "—" if x is None else "%.2f" % x


def _med(s):
    return s.get("median") if s and s.get("n") else None


def markdown(res):
    m = res["meta"]
    out = ["# hpcrun benchmarks", "",
           "%s, %s, %d cores, user %s, mode %s, %.0f s. Cells: median (q1–q3) over repetitions; "
           "ratios are of medians." % (m["date"], m["host"], m["cores"], m["user"], m["mode"], m["elapsed_s"]), ""]
    out += ["- left out: %s (%s)" % (k, v.replace("\n", " ")) for k, v in m.get("left_out", {}).items()]
    if m.get("budget_exhausted"):
        out.append("- the time budget (%d s) ran out: later steps were skipped" % m["budget_s"])
    out.append("")
    e = res.get("entry")
    if e:
        out += ["## Entry: one `X /bin/true` (ms, %d interleaved runs, warm)" % e["runs"], "",
                "| case | median (q1–q3) ms | min–max | n | × native |", "|---|---|---|---|---|"]
        native = _med(e["cases"].get("native /bin/true", {}).get("ms"))
        for label, c in e["cases"].items():
            if "ms" not in c:
                out.append("| %s | failed: %s | | | |" % (label, c.get("error", "?").replace("|", "/")))
                continue
            s = c["ms"]
            out.append("| %s | %s | %.2f–%.2f | %d | %s |" % (label, _fmt(s), s["min"], s["max"], s["n"],
                                                           _r(common.ratio(_med(s), native))))
        out += ["", "| ratio | value | goal |", "|---|---|---|"]
        for r in e["ratios"]:
            goal = "" if r["goal"] is None else "≤ %.2f: %s" % (
                r["goal"], "—" if r["value"] is None else ("met" if r["value"] <= r["goal"] else "**not met**"))
            out.append("| %s | %s | %s |" % (r["name"], _r(r["value"]), goal))
        out.append("")
    rp = res.get("rankpath")
    if rp:
        out += ["## Rank path: one joining `hpcrun light.img /bin/true` (user %s)" % rp.get("user", "?"), "",
                "```"] + rankpath.format_text(rp).splitlines()[1:] + ["```", ""]
    pp = res.get("pingpong")
    if pp:
        for lang, vs in pp["langs"].items():
            names = list(vs)
            others = [n for n in names if n != "native"]
            for key, title, unit in (("lat_us", "latency", "µs"), ("bw_MBps", "bandwidth", "MB/s")):
                out += ["## Ping-pong %s, %s (%s, %d rounds)" % (lang, title, unit, pp["rounds"]), "",
                        "| size | " + " | ".join(names) + " | " + " | ".join("%s/native" % n for n in others) + " |",
                        "|---" * (1 + len(names) + len(others)) + "|"]
                rows = {n: {r["size"]: r for r in vs[n]["sizes"]} for n in names}
                sizes = sorted({s for t in rows.values() for s in t})
                for size in sizes:
                    if size not in PP_SIZES_SHOWN and size != sizes[-1]:
                        continue
                    cells = [_fmt(rows[n].get(size, {}).get(key), digits=2 if key == "lat_us" else 0) for n in names]
                    nat = _med(rows.get("native", {}).get(size, {}).get(key))
                    rat = [_r(common.ratio(_med(rows[n].get(size, {}).get(key)), nat)) for n in others]
                    out.append("| %s | %s | %s |" % (_size(size), " | ".join(cells), " | ".join(rat)))
                out.append("")
            for n in names:
                for err in vs[n]["errors"]:
                    out.append("- %s %s failed: `%s`" % (lang, n, err.replace("\n", " ")[:300]))
                if vs[n].get("note"):
                    out.append("- %s %s: %s" % (lang, n, vs[n]["note"]))
            out.append("")
    for lname, table in res.get("launch", {}).items():
        names = sorted({v for cell in table.values() if "skipped" not in cell for v in cell},
                       key=lambda v: ("native", "hpcrun", "ch-run").index(v) if v in ("native", "hpcrun", "ch-run") else 9)
        out += ["## Launch: `%s -n N hello` (s)" % lname, "",
                "| N | " + " | ".join(names) + " | hpcrun/native | ch-run/native | hpcrun/ch-run |",
                "|---" * (4 + len(names)) + "|"]
        for n, cell in table.items():
            if "skipped" in cell:
                out.append("| %s | skipped (%s) |" % (n, cell["skipped"]))
                continue
            med = {v: _med(cell[v]["s"]) for v in names if v in cell}
            cells = [_fmt(cell[v]["s"]) if cell[v]["s"].get("n") else "failed" for v in names]
            out.append("| %s | %s | %s | %s | %s |" % (n, " | ".join(cells),
                       _r(common.ratio(med.get("hpcrun"), med.get("native"))),
                       _r(common.ratio(med.get("ch-run"), med.get("native"))),
                       _r(common.ratio(med.get("hpcrun"), med.get("ch-run")))))
        errs = {(v, e) for cell in table.values() if "skipped" not in cell for v in cell for e in cell[v]["errors"]}
        out += ["- %s: `%s`" % (v, e.replace("\n", " ")[:300]) for v, e in sorted(errs)] + [""]
    sc = res.get("scale")
    if sc:
        out += ["## Entry at scale: N concurrent `X IMAGE readlink /proc/self/ns/mnt`", "",
                "| N | case | wall s | ms per launch | failed | mount namespaces | max squashfuse procs | "
                "max loop devices (before) |", "|---|---|---|---|---|---|---|---|"]
        for n, cell in sc["counts"].items():
            if "skipped" in cell:
                out.append("| %s | skipped (%s) | | | | | | |" % (n, cell["skipped"]))
                continue
            for case, c in cell.items():
                out.append("| %s | %s | %.2f | %.2f | %d | %d | %s | %s |" % (
                    n, case, c["wall_s"], c["wall_s"] * 1e3 / c["n"], c["failed"], c["mount_namespaces"],
                    c.get("max_squashfuse", "—"),
                    "%s (%s)" % (c["max_loop_devices"], c["loop_devices_before"]) if "max_loop_devices" in c else "—"))
        out += ["- %s" % e for e in sc["errors"]] + [""]
    if res.get("broadcast"):
        import broadcast
        out.append(broadcast.markdown(res["broadcast"]))
    return "\n".join(out)


def _size(b):
    for unit, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= k and b % k == 0:
            return "%d %s" % (b // k, unit)
    return "%d B" % b


def plots(res, out_dir):
    """PNG files written; matplotlib is optional (the JSON and Markdown are the results)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    pp = res.get("pingpong")
    if pp:
        for key, title, unit, fname in (("lat_us", "Ping-pong latency", "µs", "pingpong_latency.png"),
                                        ("bw_MBps", "Ping-pong bandwidth", "MB/s", "pingpong_bandwidth.png")):
            langs = list(pp["langs"])
            fig, axes = plt.subplots(1, len(langs), figsize=(6 * len(langs), 4.5), squeeze=False)
            for ax, lang in zip(axes[0], langs):
                for name, v in pp["langs"][lang].items():
                    pts = [(r["size"], r[key]) for r in v["sizes"] if r["size"] > 0 and r[key].get("n")]
                    if not pts:
                        continue
                    xs = [p[0] for p in pts]
                    ax.plot(xs, [p[1]["median"] for p in pts], marker="o", ms=3, label=name)
                    ax.fill_between(xs, [p[1]["q1"] for p in pts], [p[1]["q3"] for p in pts], alpha=0.2)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("message size (bytes)")
                ax.set_ylabel(unit)
                ax.set_title("%s (%s)" % (title, lang))
                ax.grid(True, which="both", alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend()
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, fname), dpi=100)
            plt.close(fig)
            written.append(fname)
    if res.get("launch") or res.get("scale"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for lname, table in res.get("launch", {}).items():
            series = {}
            for n, cell in table.items():
                for v, c in ({} if "skipped" in cell else cell).items():
                    if c["s"].get("n"):
                        series.setdefault(v, []).append((int(n), c["s"]))
            for v, pts in series.items():
                axes[0].errorbar([p[0] for p in pts], [p[1]["median"] for p in pts],
                                 yerr=[[p[1]["median"] - p[1]["min"] for p in pts],
                                       [p[1]["max"] - p[1]["median"] for p in pts]],
                                 marker="o", ms=3, capsize=3, label="%s %s" % (lname, v))
        axes[0].set(xscale="log", yscale="log", xlabel="ranks", ylabel="wall s", title="MPI hello launch")
        series = {}
        for n, cell in res.get("scale", {}).get("counts", {}).items():
            for case, c in ({} if "skipped" in cell else cell).items():
                series.setdefault(case, []).append((int(n), c["wall_s"]))
        for case, pts in series.items():
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=case)
        axes[1].set(xscale="log", xlabel="concurrent launches", ylabel="wall s", title="Entry at scale")
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        axes[0].xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axes[1].xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "launch.png"), dpi=100)
        plt.close(fig)
        written.append("launch.png")
    return written


def write(res, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    res["plots"] = plots(res, out_dir)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(res) + "\n")
    return [os.path.join(out_dir, n) for n in ["results.json", "results.md"] + res["plots"]]


