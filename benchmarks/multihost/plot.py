"""Predicted against measured across emulated hosts: one plot and one Markdown table.

    python benchmarks/multihost/plot.py --out benchmarks/multihost.png \\
        10gbit=bench-results/multihost/10gbit/costmodel.json 1gbit=...

Reads the ``costmodel --json`` output of each link profile (its ``points``: every measured
step and collective size with the model's prediction) and draws, per profile, the step
times against the number of nodes (measured: markers, predicted: lines) and the
collectives over several nodes against the message size. Prints the steps as a Markdown
table (benchmark, mode, measured / predicted / error at each node count).
"""
import argparse
import json
import math
import sys

STEPS = (("exchange-shm", "exchange (shared window in the node)"),
         ("exchange", "exchange (all Alltoallv)"), ("train", "train (DLRM step)"))


def load(specs):
    """``[(profile, points)]`` from ``NAME=PATH`` arguments."""
    out = []
    for spec in specs:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"plot: expected NAME=costmodel.json, got {spec!r}")
        with open(path) as f:
            out.append((name, json.load(f)["points"]))
    return out


def step_rows(profiles):
    """Markdown rows: one per (benchmark, mode, profile)."""
    rows = []
    for kind, label in STEPS:
        for mode in ("weak", "strong"):
            for name, points in profiles:
                pts = sorted((p for p in points if p["benchmark"] == kind and p["mode"] == mode),
                             key=lambda p: p["nodes"])
                if not pts:
                    continue

                def cell(fmt):
                    return " / ".join(fmt(p) + ("*" if p.get("oversubscribed") else "")
                                      for p in pts)
                nodes = " / ".join(str(p["nodes"]) for p in pts)
                measured = cell(lambda p: "%.1f" % (p["measured_s"] * 1e3))
                predicted = cell(lambda p: "%.1f%s" % (p["predicted_s"] * 1e3,
                                                       " c" if p.get("calibration") else ""))
                error = cell(lambda p: "%+.0f%%" % (p["rel_error"] * 100))
                rows.append(f"| {label} | {mode} | {name} | {nodes} | {measured} | {predicted} "
                            f"| {error} |")
    return rows


def summary(profiles):
    """Lines: |error| statistics per profile: all points, ranks <= cores, oversubscribed."""
    lines = []
    for name, points in profiles:
        for label, sel in (("all", lambda p: True),
                           ("ranks <= cores", lambda p: not p.get("oversubscribed")),
                           ("oversubscribed", lambda p: p.get("oversubscribed"))):
            for what, kinds in (("steps", {k for k, _ in STEPS}),
                                ("collective sizes", {"allreduce", "alltoallv"})):
                errs = [abs(p["rel_error"]) for p in points
                        if p["benchmark"] in kinds and sel(p) and not p.get("calibration")]
                if errs:
                    errs.sort()
                    lines.append(f"{name}, {what}, {label}: {len(errs)} points (calibration "
                                 f"left out), median |error| {errs[len(errs) // 2] * 100:.1f}%,"
                                 f" max {errs[-1] * 100:.1f}%, "
                                 f"{sum(e <= 0.25 for e in errs)} within 25%")
    return lines


def plot(profiles, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(profiles), 2, figsize=(11, 3.8 * len(profiles)), squeeze=False)
    for (name, points), (ax1, ax2) in zip(profiles, axes):
        for i, (kind, label) in enumerate(STEPS):
            for mode, style in (("weak", "-"), ("strong", "--")):
                pts = sorted((p for p in points if p["benchmark"] == kind and p["mode"] == mode),
                             key=lambda p: p["nodes"])
                if not pts:
                    continue
                x = [p["nodes"] for p in pts]
                line, = ax1.plot(x, [p["predicted_s"] * 1e3 for p in pts], style,
                                 color=f"C{i}", label=f"{label}, {mode}: predicted")
                ax1.plot(x, [p["measured_s"] * 1e3 for p in pts], "o" if mode == "weak" else "s",
                         color=line.get_color(), mfc="none" if mode == "strong" else None,
                         label=f"{label}, {mode}: measured")
        ax1.set_xscale("log", base=2)
        ax1.set_yscale("log")
        ax1.set_xticks([1, 2, 4], ["1", "2", "4"])
        ax1.axvspan(math.sqrt(2 * 4), 4.6, color="grey", alpha=0.12)
        ax1.set_xlabel("emulated nodes (1 rank each; shaded: more ranks than the 2 cores)")
        ax1.set_ylabel("step ms")
        ax1.set_title(f"{name}: steps, predicted (lines) vs measured (markers)")
        ax1.grid(True, alpha=0.3)
        ax1.legend(fontsize=6)
        for i, kind in enumerate(("alltoallv", "allreduce")):
            for nodes, marker in ((2, "o"), (4, "^")):
                pts = sorted((p for p in points if p["benchmark"] == kind
                              and p.get("nodes") == nodes), key=lambda p: p["bytes"])
                if not pts:
                    continue
                x = [p["bytes"] for p in pts]
                ax2.plot(x, [p["measured_s"] * 1e3 for p in pts], marker, color=f"C{i}",
                         mfc="none" if nodes == 4 else None,
                         label=f"{kind}, {nodes} nodes"
                               + ("*" if pts[0].get("oversubscribed") else "") + ": measured")
                ax2.plot(x, [p["predicted_s"] * 1e3 for p in pts], "-" if nodes == 2 else ":",
                         color=f"C{i}", label=f"{kind}, {nodes} nodes: model")
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("bytes (alltoallv: per peer; allreduce: buffer)")
        ax2.set_ylabel("ms")
        ax2.set_title(f"{name}: collectives across nodes (* oversubscribed)")
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profiles", nargs="+", help="NAME=costmodel.json, one per link profile")
    p.add_argument("--out", default=None, help="PNG path (needs matplotlib)")
    args = p.parse_args(argv)
    profiles = load(args.profiles)
    print("| benchmark | mode | link | nodes | measured ms | predicted ms | error |")
    print("|-----------|------|------|-------|-------------|--------------|-------|")
    for row in step_rows(profiles):
        print(row)
    for line in summary(profiles):
        print(line)
    if args.out:
        try:
            plot(profiles, args.out)
        except ImportError:
            print("plot: matplotlib not installed, no plot (pip install 'hpctrain[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
