#!/usr/bin/env python3
"""This tree against a previous version, in one run: exchange step and training step.

Usage (from the repository root)::

    python benchmarks/compare_versions.py --ref 36f2aa3 [--rounds 5] [--json PATH]

The previous version is checked out into a git worktree (``--old-tree``, default
``/tmp/hpctrain-<ref>``) and its kernels are built there once. Each round runs, in
alternation (old, new, new, old, ...), the same two benchmarks as fresh 2-rank jobs:

* ``python -m hpctrain.bench exchange`` (sharded embedding step, dims 16 and 64):
  the step's p50;
* ``python -m hpctrain.bench train`` (the DLRM benchmark, dim 16, one-hot): the median
  training step.

A round's ratio is new / old of the pair run back to back, so load swings of the
machine cancel; the table reports the median ratio over rounds and its range.
``--new-ref`` compares two past versions (both checked out and built). Building a
worktree needs the build requirements (Cython, NumPy) importable by this Python.
A ratio above 1 means the new version is slower.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hpctrain.versions import cpu_model  # noqa: E402  (this tree's; the timed trees run apart)


def _worktree(ref, path):
    if not os.path.isdir(path):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", path, ref],
                       check=True)
    if not any(f.startswith("table") and f.endswith(".so")
               for f in os.listdir(os.path.join(path, "hpctrain", "_kernels"))):
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=path,
                       check=True, stdout=subprocess.DEVNULL)


def _run(tree, args, out):
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", HPCTRAIN_NUM_THREADS="1")
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    cmd = [mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "hpctrain.bench",
           *args, "--json", out]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL,
                   timeout=900)
    with open(out) as f:
        return json.load(f)


BENCHES = {
    "exchange": (["exchange", "--threads", "1", "--batch", "4096", "--features", "26",
                  "--vocab", "1000000", "--zipf", "1.05", "--dims", "16,64", "--warmup", "3",
                  "--repeat", "15", "--exchange-repeat", "3"],
                 lambda r: {f"exchange step dim {x['dim']}": x["step"]["p50"]
                            for x in r["results"]}),
    "train": (["train", "--dim", "16", "--bag", "1", "--steps", "30", "--warmup", "3"],
              lambda r: {f"train step dim {x['dim']}": x["median_step_s"]
                         for x in r["results"]}),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", required=True, help="git ref of the previous version")
    p.add_argument("--old-tree", default=None)
    p.add_argument("--new-ref", default=None,
                   help="compare against this git ref instead of the working tree")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=os.path.join(ROOT, "bench-results", "versions.json"))
    args = p.parse_args(argv)
    old = args.old_tree or os.path.join(tempfile.gettempdir(), f"hpctrain-{args.ref}")
    _worktree(args.ref, old)
    new = ROOT
    if args.new_ref:
        new = os.path.join(tempfile.gettempdir(), f"hpctrain-{args.new_ref}")
        _worktree(args.new_ref, new)
    pairs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for name, (bench_args, pick) in BENCHES.items():
                order = [("old", old), ("new", new)]
                if rnd % 2:
                    order.reverse()
                got = {}
                for tag, tree in order:
                    got[tag] = pick(_run(tree, bench_args, os.path.join(tmp, f"{tag}.json")))
                for k in got["new"]:
                    pairs.setdefault(k, []).append((got["old"][k], got["new"][k]))
                print(f"round {rnd + 1}/{args.rounds} {name}: " + ", ".join(
                    f"{k} {got['new'][k] / got['old'][k]:.3f}" for k in got["new"]), flush=True)
    rows = []
    print(f"\n{'measure':<26} {'old p50 ms':>10} {'new p50 ms':>10} {'new/old':>8} {'range':>13}")
    for k, v in pairs.items():
        ratios = [n / o for o, n in v]
        row = {"measure": k, "old_s": statistics.median(o for o, _ in v),
               "new_s": statistics.median(n for _, n in v),
               "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
               "ratio_max": max(ratios), "rounds": len(v)}
        rows.append(row)
        print(f"{k:<26} {row['old_s'] * 1e3:>10.2f} {row['new_s'] * 1e3:>10.2f} "
              f"{row['ratio_median']:>8.3f} {row['ratio_min']:>6.3f}-{row['ratio_max']:.3f}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"ref": args.ref, "new": args.new_ref or "working tree", "cpu": cpu_model(), "cores": os.cpu_count(),
                   "ranks": 2, "threads_per_rank": 1, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
