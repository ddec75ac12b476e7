"""Scaling sweeps: the other benchmarks at 1, 2, 4, ... ranks, weak and strong.

    python -m hpctrain.bench scaling --ranks 1,2,4 --benchmarks allreduce,alltoallv,exchange
    python -m hpctrain.bench scaling --launcher srun --ranks-per-node 8 --ranks auto   # in sbatch

This command is not itself started under MPI: for every benchmark, mode and rank
count it launches ``mpiexec -n P python -m mpi4py -m hpctrain.bench NAME ... --json F``
(or ``srun --mpi=... -N nodes -n P ...`` inside a Slurm allocation), reads the JSON
the benchmark wrote, and writes one JSON per run into ``--out``::

    {benchmark: "scaling", target, mode, world_size, nodes, ranks_per_node, threads,
     versions, config: {command, args}, phases: {name: seconds per step},
     samples_per_s, efficiency, wall_s, result: <the benchmark's own JSON>}

Weak scaling keeps the batch per rank fixed, strong scaling the global batch; the
efficiency of P ranks is ``throughput(P) / (P / P0 * throughput(P0))`` against the
smallest rank count P0 of the sweep. Collective micro-benchmarks (allreduce,
alltoallv) keep the message per rank fixed; their throughput is the bus bandwidth
of the largest message, their efficiency is against the smallest multi-rank count.
A summary JSON and a PNG plot (throughput and efficiency vs ranks; needs
matplotlib, ``pip install 'hpctrain[bench]'``) close the sweep.
"""
import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time


@dataclasses.dataclass
class Target:
    """How to sweep one benchmark.

    Attributes:
        args: arguments always passed (the sweep's workload).
        batch_arg: the option setting the batch per rank (None: no batch, weak only).
        batch: default samples per rank (weak) / global batch is ``batch * max ranks``.
        extract: function(result JSON) -> (phases dict, samples/s, throughput label).
    """
    args: list
    batch_arg: str = None
    batch: int = 0
    extract: object = None


def _collective(doc):
    rows = doc.get("rows") or []
    if not rows:
        return {}, None, None
    big = max(rows, key=lambda r: r["bytes"])
    return ({f"{r['bytes']}B": r["hpctrain"]["p50"] for r in rows}, None,
            big.get("busbw_GBps"))


def _exchange(doc):
    res = doc["results"][0]
    return (dict(res["phases"], step=res["step"]["p50"]),
            res["samples_per_s_per_rank"] * res["ranks"], None)


def _table(doc):
    # every rank drives its own shard: the timed step (max over ranks) runs p-fold in parallel
    step = next(r for r in doc["results"] if r["op"].startswith("step"))
    features = doc["config"]["features"]
    phases = {r["op"]: r["p50_s"] for r in doc["results"]}
    return (dict(phases, step=step["p50_s"]),
            step["ids_per_s"] / features * doc["world_size"], None)


def _dense(doc):
    row = doc["rows"][0]
    return (dict(row["phases_mean"], step=row["step"]["p50"]),
            row["batch_per_rank"] * doc["world_size"] / row["step"]["p50"], None)


def _train(doc):
    res = doc["results"][0]
    # phases_s are seconds over the whole run (warm-up steps included), on rank 0
    n = res["steps"] + _TRAIN_WARMUP        # the sweep's --warmup (see TARGETS)
    phases = {k: v / max(n, 1) for k, v in res.get("phases_s", {}).items() if v}
    return dict(phases, step=res["median_step_s"]), res["samples_per_s"], None


_TRAIN_WARMUP = 2

TARGETS = {
    "allreduce": Target(["--max-bytes", "4M", "--rounds", "1", "--repeat", "10"],
                        extract=_collective),
    "alltoallv": Target(["--max-bytes", "1M", "--rounds", "1", "--repeat", "10"],
                        extract=_collective),
    "exchange": Target(["--dims", "16", "--repeat", "10"], "--batch", 4096, _exchange),
    "table": Target(["--dims", "16", "--optimizers", "adagrad", "--repeat", "10"], "--batch",
                    4096, _table),
    "dense": Target(["--dims", "16", "--repeat", "10"], "--batch", 4096, _dense),
    # the DLRM benchmark workload end to end: 4096 samples per rank (fixed by the benchmark
    # unless it offers --batch), one-hot, dim 16
    "train": Target(["--dim", "16", "--bag", "1", "--steps", "8", "--warmup", str(_TRAIN_WARMUP)],
                    "--batch", 4096, _train),
}


def supports(name, option):
    """Whether ``python -m hpctrain.bench NAME`` takes ``option`` (asks its --help)."""
    try:
        out = subprocess.run([sys.executable, "-m", "hpctrain.bench", name, "--help"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return f"{option} " in out or f"{option}=" in out or f"{option}\n" in out


def launcher_command(args, nranks):
    """The launcher prefix that starts ``nranks`` ranks."""
    if args.launcher == "srun":
        nodes = math.ceil(nranks / args.ranks_per_node)
        return ["srun", f"--mpi={args.srun_mpi or srun_mpi_plugin()}", f"--nodes={nodes}",
                f"--ntasks={nranks}", f"--cpus-per-task={args.threads}", "--kill-on-bad-exit=1"]
    mpiexec = args.mpiexec or _default_mpiexec()
    if mpiexec is None:
        raise SystemExit("scaling: no mpiexec found (install with pip install 'hpctrain[mpich]' "
                         "or pass --mpiexec PATH)")
    flags = ["--oversubscribe"] if _is_open_mpi(mpiexec) else []
    return [mpiexec, *flags, "-n", str(nranks)]


def _default_mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.access(here, os.X_OK) else shutil.which("mpiexec")


def _is_open_mpi(mpiexec):
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Open MPI" in out or "OpenRTE" in out


def srun_mpi_plugin():
    """pmix for Open MPI, pmi2 for the MPICH family, from the library mpi4py uses."""
    import mpi4py
    mpi4py.rc.initialize = False
    from mpi4py import MPI
    return "pmix" if "Open MPI" in MPI.Get_library_version() else "pmi2"


def plan(args):
    """The runs of the sweep: dicts with target, mode, ranks, benchmark args."""
    runs = []
    for name in args.benchmarks:
        if name not in TARGETS:
            raise SystemExit(f"scaling: unknown benchmark {name!r} (known: {', '.join(TARGETS)})")
        tgt = TARGETS[name]
        if tgt.batch_arg and not supports(name, tgt.batch_arg):
            print(f"scaling: {name} has no {tgt.batch_arg} option: weak scaling at its own batch")
            tgt = dataclasses.replace(tgt, batch_arg=None)
        extra = shlex.split(getattr(args, f"{name}_args") or "")
        modes = [m for m in args.modes if tgt.batch_arg or m == "weak"] or ["weak"]
        for mode in modes:
            for p in args.ranks:
                bargs = []
                if tgt.batch_arg:
                    per_rank = args.batch or tgt.batch
                    b = per_rank if mode == "weak" else per_rank * max(args.ranks) // p
                    bargs = [tgt.batch_arg, str(b)]
                runs.append({"target": name, "mode": mode, "ranks": p,
                             "args": [*tgt.args, *bargs, "--threads", str(args.threads), *extra]})
    return runs


def best_of(results, extract):
    """The best of several trials of one run (a busy machine only ever slows a run down).

    Step benchmarks: the trial with the highest samples/s. Collectives: per message
    size, the row with the lowest p50.
    """
    scored = [(extract(r)[1], r) for r in results]
    if scored[0][0] is not None:
        return max(scored, key=lambda x: x[0])[1]
    best = dict(results[0])
    best["rows"] = [min(rows, key=lambda row: row["hpctrain"]["p50"])
                    for rows in zip(*(r["rows"] for r in results))]
    return best


def launch(args, run):
    """Run one benchmark once; returns (its JSON document, None) or (None, error text)."""
    name, p = run["target"], run["ranks"]
    out = os.path.join(args.out, f"{name}-{run['mode']}-{p}.result.json")
    cmd = [*launcher_command(args, p), sys.executable, "-m", "mpi4py", "-m", "hpctrain.bench",
           name, *run["args"], "--json", out]
    run["command"] = cmd
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               HPCTRAIN_NUM_THREADS=str(args.threads))
    print(f"scaling: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {args.timeout}s"
    run["wall_s"] = run.get("wall_s", 0.0) + time.monotonic() - t0
    if proc.returncode != 0 or not os.path.exists(out):
        return None, f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}"
    with open(out) as f:
        doc = json.load(f)
    os.remove(out)
    return doc, None


def run_all(args, runs):
    """Every run ``--trials`` times, trial after trial over the whole sweep (so the trials
    of one point are minutes apart, not back to back); returns one record per run."""
    results, errors = [[] for _ in runs], [None] * len(runs)
    for _ in range(args.trials):
        for i, run in enumerate(runs):
            if errors[i] is None:
                doc, errors[i] = launch(args, run)
                if doc is not None:
                    results[i].append(doc)
    records = []
    for run, docs, err in zip(runs, results, errors):
        rec = {"benchmark": "scaling", "target": run["target"], "mode": run["mode"],
               "world_size": run["ranks"], "threads": args.threads, "trials": len(docs),
               "wall_s": run.get("wall_s"),
               "config": {"command": run.get("command"), "args": run["args"],
                          "launcher": args.launcher}}
        if err is not None:
            records.append(dict(rec, error=err))
            continue
        extract = TARGETS[run["target"]].extract
        result = best_of(docs, extract)
        phases, sps, busbw = extract(result)
        rec.update({"date": result.get("date"), "nodes": result.get("nodes"),
                    "ranks_per_node": result.get("ranks_per_node"),
                    "versions": result.get("versions"), "phases": phases,
                    "samples_per_s": sps, "busbw_GBps": busbw, "result": result})
        records.append(rec)
    return records


def add_efficiency(records):
    """Fill ``throughput`` and ``efficiency`` per (target, mode) series."""
    series = {}
    for r in records:
        if "error" not in r:
            series.setdefault((r["target"], r["mode"]), []).append(r)
    for rs in series.values():
        rs.sort(key=lambda r: r["world_size"])
        for r in rs:
            r["throughput"] = r["samples_per_s"] if r["samples_per_s"] is not None else r["busbw_GBps"]
        if rs[0]["samples_per_s"] is not None:
            base = rs[0]
        else:  # collectives: a 1-rank "collective" moves nothing
            multi = [r for r in rs if r["world_size"] > 1 and r["throughput"]]
            base = multi[0] if multi else None
        for r in rs:
            if base is None or not r["throughput"] or r["world_size"] < base["world_size"]:
                r["efficiency"] = None
            elif r["samples_per_s"] is not None:
                r["efficiency"] = r["throughput"] / (r["world_size"] / base["world_size"]
                                                     * base["throughput"])
            else:
                r["efficiency"] = r["throughput"] / base["throughput"]
    return series


def plot(series, path):
    """Throughput and efficiency vs ranks; returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("scaling: matplotlib not installed, no plot (pip install 'hpctrain[bench]')")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, mode), rs in sorted(series.items()):
        x = [r["world_size"] for r in rs]
        label = f"{name} ({mode})"
        thr = [r["throughput"] for r in rs]
        if rs[0]["samples_per_s"] is not None:
            ax1.plot(x, [t / thr[0] for t in thr], "o-", label=label + ", samples/s")
        else:   # collectives: bus bandwidth against the first multi-rank run
            pts = [(xi, t) for xi, t in zip(x, thr) if xi > 1 and t]
            if pts:
                ax1.plot([xi for xi, _ in pts], [t / pts[0][1] for _, t in pts], "s--",
                         label=label + ", busbw")
        ax2.plot(x, [r["efficiency"] if r["efficiency"] is not None else float("nan")
                     for r in rs], "s--" if rs[0]["samples_per_s"] is None else "o-", label=label)
    xs = sorted({r["world_size"] for rs in series.values() for r in rs})
    ax1.plot(xs, [x / xs[0] for x in xs], ":", color="grey", label="ideal (samples/s)")
    for ax, title in ((ax1, "throughput, relative to the first point"),
                      (ax2, "parallel efficiency")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("ranks")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    cores = {(r.get("versions") or {}).get("cpu_count") for rs in series.values() for r in rs}
    cores = min((c for c in cores if c), default=None)
    if cores and cores < xs[-1]:
        left = (cores * min(x for x in xs if x > cores)) ** 0.5   # half-way on the log axis
        for ax in (ax1, ax2):   # to the right, ranks share cores: outside the cost model
            ax.axvspan(left, xs[-1] * 1.15, color="grey", alpha=0.12,
                       label=f"more ranks than the {cores} cores" if ax is ax1 else None)
    ax2.axhline(1.0, color="grey", linestyle=":")
    ax2.set_ylim(bottom=0)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"scaling: wrote {path}")
    return path


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m hpctrain.bench scaling",
                                description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2,4",
                   help="rank counts, comma separated, or 'auto' = powers of two up to "
                        "SLURM_NTASKS (inside an allocation)")
    p.add_argument("--benchmarks", default="allreduce,alltoallv,exchange",
                   help=f"comma separated, of {', '.join(TARGETS)}")
    p.add_argument("--modes", default="weak,strong", help="weak, strong or both")
    p.add_argument("--batch", type=int, default=None,
                   help="samples per rank (weak); strong uses batch x max ranks in total")
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank")
    p.add_argument("--launcher", choices=["mpiexec", "srun"], default="mpiexec")
    p.add_argument("--mpiexec", default=None, help="launcher path (default: beside python)")
    p.add_argument("--srun-mpi", default=None, help="srun --mpi plugin (default: detected)")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="srun: ranks per node (default SLURM_NTASKS_PER_NODE or all on one)")
    p.add_argument("--out", default=os.path.join("bench-results", "scaling"))
    p.add_argument("--plot", default=None, help="PNG path (default OUT/scaling.png)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--trials", type=int, default=1,
                   help="run every point this many times and keep the best (noisy machines)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    for name in TARGETS:
        p.add_argument(f"--{name}-args", default="", help=f"extra arguments for {name}")
    args = p.parse_args(argv)
    args.benchmarks = [b for b in args.benchmarks.split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    if any(m not in ("weak", "strong") for m in args.modes):
        p.error(f"--modes takes weak and/or strong, got {args.modes}")
    if args.ranks == "auto":
        total = int(os.environ.get("SLURM_NTASKS", "0") or 0) or os.cpu_count()
        args.ranks = [2 ** k for k in range(int(math.log2(total)) + 1)]
        if args.ranks[-1] != total:
            args.ranks.append(total)
    else:
        args.ranks = sorted({int(r) for r in args.ranks.split(",")})
    if args.ranks_per_node is None:
        per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        args.ranks_per_node = int(per_node) if per_node.isdigit() else max(args.ranks)
    return args


def main(argv=None):
    args = parse_args(argv)
    runs = plan(args)
    if args.dry_run:
        for run in runs:
            print(" ".join(shlex.quote(c) for c in
                           [*launcher_command(args, run["ranks"]), sys.executable, "-m",
                            "mpi4py", "-m", "hpctrain.bench", run["target"], *run["args"]]))
        return 0
    os.makedirs(args.out, exist_ok=True)
    records = run_all(args, runs)
    series = add_efficiency(records)
    for r in records:
        path = os.path.join(args.out, f"{r['target']}-{r['mode']}-{r['world_size']}.json")
        with open(path, "w") as f:
            json.dump(r, f, indent=1)
    _print_summary(records)
    summary = [{k: r.get(k) for k in ("target", "mode", "world_size", "nodes", "ranks_per_node",
                                      "threads", "samples_per_s", "busbw_GBps", "efficiency",
                                      "phases", "error")} for r in records]
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"benchmark": "scaling", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "ranks": args.ranks, "threads": args.threads, "runs": summary}, f, indent=1)
    if series:
        plot(series, args.plot or os.path.join(args.out, "scaling.png"))
    failed = [r for r in records if "error" in r]
    for r in failed:
        print(f"scaling: FAILED {r['target']} {r['mode']} {r['world_size']} ranks: {r['error']}",
              file=sys.stderr)
    return 1 if failed else 0


def _print_summary(records):
    from hpctrain.bench.common import print_table
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["target"], r["mode"], r["world_size"], "-", "-", "-", "FAILED"])
            continue
        step = r["phases"].get("step")
        rows.append([r["target"], r["mode"], r["world_size"], r.get("nodes") or "-",
                     f"{r['samples_per_s']:.4g} samples/s" if r["samples_per_s"] is not None
                     else f"{r['busbw_GBps']:.3g} GB/s busbw",
                     step * 1e3 if step is not None else "-",
                     "-" if r.get("efficiency") is None else f"{r['efficiency']:.3f}"])
    print_table(["benchmark", "mode", "ranks", "nodes", "throughput", "step ms", "efficiency"],
                rows)
