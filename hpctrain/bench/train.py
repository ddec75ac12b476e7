"""End-to-end training benchmark: the DLRM workload, one-hot and multi-hot.

Each case runs a shipped benchmark config as shipped (``hpctrain/configs/``:
``bench_dlrm_dim16.toml``, ``bench_dlrm_dim64.toml``, ``bench_dlrm_multihot.toml``,
``bench_dlrm_multihot_dim64.toml``; another bag size is the one-hot config of its dim with
``data.synthetic.bag_size`` set), only the step count, batch, threads and device set from the command line. Workload (per rank):
batch 4096, 26 categorical features drawn Zipf(1.05) over 10^6 ids each, 13 dense
features, bottom MLP 13-512-256-64-16 at dim 16 and 13-512-256-64 at dim 64 (a last layer
of width d is appended only when the bottom's last width is not d), top 512-256-1, Adagrad
for embeddings and dense layers, overlap of the next batch's id exchange on. ``--warmup``
steps run first, then exactly ``--steps`` timed steps, each from the end of the previous
step's sparse update to the end of its own. Reports samples/s of the median step and of
all timed steps together, per-phase times, peak RSS per rank, the loss of every step
(``losses``; ``max_loss_vs_first``) and the reader's load (``reader_busy_share``:
CPU seconds of the prefetch thread over the wall seconds of the fit, max over ranks).

``--trace-every K`` also records, every K steps, the throughput of the last K steps, the
RSS summed over ranks and the rows stored (``trace``): with ``--steps 2000`` or more it is
the long run that shows rows still being created and memory growing long after a short
run ends.
The baseline measured in the same run is the dense model alone on the same
batches (what the step would cost if the sparse side were free), so the sparse
overhead is a ratio; and the dense step alone is set against its bare matrix products
plus a raw allreduce of the gradient buffer (``hpctrain.bench.dense``'s baseline).

``--device gpu`` trains the dense model on this rank's GPU (``device = "gpu"``): inputs
and gradients cross through pinned buffers on copy streams, the gradient allreduce is
NCCL, and per-phase device times come from CUDA events: H2D, dense (forward, backward,
update), NCCL, D2H, beside the host's sparse phases; ``copies hidden`` is the share of
the copies' time during which the compute stream was busy. Goals of the GPU run: dense
step <= 1.2 x (bare GEMMs + NCCL allreduce); copies hidden >= 80 %.

    mpiexec -n 2 python -m mpi4py -m hpctrain.bench train --dim 16 --dim 64
    mpiexec -n 2 python -m mpi4py -m hpctrain.bench train --dim 16 --bag 1 --steps 2000 \
        --trace-every 100
    mpiexec -n 2 python -m mpi4py -m hpctrain.bench train --device gpu --bag 1
"""
import copy
import io
import os
import time

import numpy as np

from hpctrain.bench import common
from hpctrain.memory import peak_rss_bytes


GPU_GOALS = {"dense_vs_bare": 1.2, "copies_hidden": 0.8}


#: The shipped config of each (dim, ids per bag) case; other cases derive from the one-hot
#: config of their dim with only ``data.synthetic.bag_size`` changed.
SHIPPED = {(16, 1): "bench_dlrm_dim16.toml", (64, 1): "bench_dlrm_dim64.toml",
           (16, 20): "bench_dlrm_multihot.toml", (64, 20): "bench_dlrm_multihot_dim64.toml"}


def shipped_config(dim, bag):
    """``(file name, dict as parsed, derived-by)`` of the benchmark's config for a case."""
    from importlib import resources

    from hpctrain.config.root import tomllib
    name = SHIPPED.get((dim, bag)) or SHIPPED.get((dim, 1))
    if name is None:
        raise ValueError(f"no shipped benchmark config for dim {dim}; shipped: "
                         f"{sorted(set(d for d, _ in SHIPPED))}")
    text = (resources.files("hpctrain") / "configs" / name).read_text(encoding="utf-8")
    d = tomllib.loads(text)
    derived = None
    if (dim, bag) not in SHIPPED:
        d["data"]["synthetic"]["bag_size"] = bag
        derived = f"data.synthetic.bag_size = {bag}"
    return name, d, derived


def workload(dim, batch_per_rank=4096, bag=1, steps=40, threads=None, device="cpu"):
    """The benchmark's config as a dict (``hpctrain.config.config_from_dict``): the shipped
    config of the case with only steps, batch, threads and device set."""
    _, d, _ = shipped_config(dim, bag)
    d = copy.deepcopy(d)
    d.update(steps=steps, batch_per_rank=batch_per_rank, device=device)
    if threads:
        d["threads"] = threads
    return d


class _StepClock:
    """Ends of steps: wraps the embedding's ``backward`` (the last work of every step) to
    record when each step ended, and every ``trace_every`` steps the RSS and rows stored."""

    def __init__(self, trainer, trace_every=0):
        self.ends = []
        self.trace, self.trace_every = [], trace_every
        self._emb = trainer.emb
        self._inner = trainer.emb.backward
        trainer.emb.backward = self

    def start(self):
        self.t0 = time.perf_counter()

    def __call__(self, *args, **kwargs):
        out = self._inner(*args, **kwargs)
        now = time.perf_counter()
        self.ends.append(now)
        n = len(self.ends)
        if self.trace_every and (n == 1 or n % self.trace_every == 0):
            self.trace.append((n, now - self.t0, rss_bytes(),
                               sum(self._emb.stats()["rows"].values())))
        return out

    def step_times(self, warmup):
        """Seconds of each step after the first ``warmup`` (end to end of consecutive steps)."""
        ends = [self.t0, *self.ends]
        return np.diff(ends[warmup:])


def rss_bytes():
    """This process's resident set size now, in bytes (``/proc/self/statm``; else peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def run_one(dim, bag, steps, warmup, comm, threads, batch_per_rank=4096, device="cpu",
            trace_every=0, row_dtype="fp32", reserve=False):
    import gc

    from hpctrain.config import config_from_dict
    from hpctrain.train.loop import Trainer
    gc.collect()    # the previous case's trainer (reference cycles) and its tables go first
    name, _, derived = shipped_config(dim, bag)
    work = workload(dim, batch_per_rank, bag=bag, steps=steps + warmup, threads=threads,
                    device=device)
    vocab = work["data"]["synthetic"]["vocab"]
    for i, t in enumerate(work["tables"]):
        t["row_dtype"] = row_dtype
        if reserve:
            # every id of the table's features: what a preallocated table holds
            v = vocab[i] if isinstance(vocab, list) else vocab
            t["reserve_rows"] = int(v) * len(t["features"])
    cfg = config_from_dict(work, source=f"bench-train-d{dim}-bag{bag}")
    trainer = Trainer(cfg, comm, stream=io.StringIO())
    clock = _StepClock(trainer, trace_every)
    if trainer.device.phases is not None:
        trainer.device.phases.intervals = []  # for the copies' overlap with compute
    comm.barrier()
    clock.start()
    trainer.fit()
    wall = time.perf_counter() - clock.t0
    device_s = {f"gpu.{k}": v for k, v in trainer.device.take_phases(wait=True).items()}
    # the prefetch thread's CPU seconds during the fit: the reader's load on the cores
    busy = trainer.reader.busy_seconds
    step_times = clock.step_times(warmup)
    if len(step_times) != steps:
        raise RuntimeError(f"bench train: timed {len(step_times)} steps, expected {steps}")
    phases = dict(trainer.phase_totals)
    for k, v in device_s.items():
        phases[k] = phases.get(k, 0.0) + v
    mpi = comm.mpi_comm
    med = mpi.allreduce(float(np.median(step_times)), op=_max())
    timed_s = mpi.allreduce(float(np.sum(step_times)), op=_max())
    gb = trainer.global_batch
    losses = [float(x) for x in trainer.losses]
    trace = _gather_trace(clock.trace, mpi, gb)
    busy_max = mpi.allreduce(busy, op=_max())
    share_max = mpi.allreduce(busy / max(wall, 1e-12), op=_max())
    rss = mpi.gather(peak_rss_bytes(), root=0)
    rows = mpi.gather(sum(trainer.emb.stats()["rows"].values()), root=0)
    # Baselines: the dense model alone on one batch of the same shape, and its bare
    # matrix products + a raw allreduce of the gradient buffer, same run.
    dense_s = _dense_only(trainer, comm)
    gemm_s, raw_s = _bare_baseline(trainer, comm)
    hidden = None
    if trainer.device.phases is not None and trainer.device.phases.intervals is not None:
        from hpctrain.dense.streams import hidden_fraction
        hidden = hidden_fraction(trainer.device.phases.intervals)[2]
        hidden = mpi.allreduce(hidden, op=_min())
    cfg_name = name + (f" with {derived}" if derived else "")
    return {"dim": dim, "bag": bag, "row_dtype": row_dtype, "reserve": bool(reserve),
            "steps": len(step_times),
            "warmup": warmup,
            "threads": trainer.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "global_batch": gb, "config": cfg_name, "overlap": cfg.overlap,
            "bottom": trainer.model.bottom.sizes if hasattr(trainer.model, "bottom") else None,
            "samples_per_s_all_steps": gb * len(step_times) / timed_s, "timed_s": timed_s,
            "losses": losses, "first_loss": losses[0] if losses else None,
            "max_loss_vs_first": (max(losses) / losses[0]) if losses and losses[0] else None,
            "trace": trace,
            "device": trainer.device.name, "device_kind": device,
            "phase_ms_per_step": _phase_ms(phases, steps + warmup, device),
            "bare_gemm_s": gemm_s, "raw_allreduce_s": raw_s,
            "dense_vs_bare": dense_s / max(gemm_s + raw_s, 1e-12), "copies_hidden": hidden,
            "median_step_s": med, "samples_per_s": gb / med,
            "samples_per_s_per_rank": gb / med / comm.size,
            "dense_only_step_s": dense_s, "dense_share": dense_s / med,
            "wall_s": wall, "reader_busy_s": busy_max, "reader_busy_share": share_max,
            "reader_cpu_ms_per_step": 1e3 * busy_max / max(steps + warmup, 1),
            "phases_s": phases, "peak_rss_bytes": rss,
            "peak_rss_sum_gb": (sum(rss) / 1e9) if rss else None, "table_rows": rows}


def _max():
    from mpi4py import MPI
    return MPI.MAX


def _gather_trace(trace, mpi, global_batch):
    """Trace points of every rank merged (rank 0): step, seconds since the fit started
    (max over ranks), samples/s since the previous point, RSS summed over ranks, rows."""
    everyone = mpi.gather(trace, root=0)
    if mpi.rank != 0 or not trace:
        return []
    out, prev = [], (0, 0.0)
    for points in zip(*everyone):
        step = points[0][0]
        t = max(p[1] for p in points)
        out.append({"step": step, "elapsed_s": t,
                    "samples_per_s": global_batch * (step - prev[0]) / max(t - prev[1], 1e-12),
                    "rss_sum_bytes": sum(p[2] for p in points),
                    "rows": sum(p[3] for p in points)})
        prev = (step, t)
    return out


def _min():
    from mpi4py import MPI
    return MPI.MIN


def _phase_ms(phases, steps, device):
    """Milliseconds per step of the phases the GPU report names (rank 0's).

    On a GPU, H2D/dense/NCCL/D2H are device times from CUDA events; on CPU, dense and
    the allreduce are the host's and there are no copies.
    """
    g = (lambda k: phases.get(k, 0.0))
    if device == "gpu":
        out = {"h2d": g("gpu.h2d"), "dense": g("gpu.forward") + g("gpu.backward")
               + g("gpu.update"), "nccl": g("gpu.allreduce"), "d2h": g("gpu.d2h")}
    else:
        out = {"h2d": 0.0, "dense": g("dense"), "nccl": g("allreduce"), "d2h": 0.0}
    out["sparse"] = g("exchange") + g("sparse_update")
    return {k: 1e3 * v / max(steps, 1) for k, v in out.items()}


def _dense_only(trainer, comm):
    """Median time of forward+backward+allreduce+update of the dense model alone
    (inputs already where the model is; on a GPU, waited for at the end)."""
    from hpctrain.dense.loss import bce_with_logits
    from hpctrain.dense.parallel import allreduce_gradients
    xp = trainer.device.xp
    rng = np.random.default_rng(1)
    b = trainer.local_batch
    dense = xp.asarray(rng.random((b, trainer.model.num_dense), dtype=np.float32))
    embs = [xp.asarray(rng.standard_normal((b, d), dtype=np.float32) * 0.01)
            for d in [s.dim for s in trainer.specs]]
    labels = xp.asarray((rng.random(b) < 0.25).astype(np.float32))

    def step():
        z = trainer.model.forward(dense, embs)
        _, dz = bce_with_logits(z, labels, denom=b * comm.size)
        trainer.model.backward(dz)
        allreduce_gradients(trainer.model.params, trainer.dense_comm)
        trainer.opt.step()
        trainer.device.synchronize()
    return common.stats(common.time_fn(step, warmup=2, repeat=7, comm=comm.mpi_comm))["p50"]


def _bare_baseline(trainer, comm):
    """Median seconds of the dense step's bare matrix products (``bench.dense``'s
    baseline) and of one raw allreduce of a buffer of the gradients' size, through the
    trainer's dense communicator (NCCL on a GPU)."""
    from hpctrain.bench.dense import _gemm_baseline
    xp, sync = trainer.device.xp, trainer.device.synchronize
    gemm_linear, gemm_inter = _gemm_baseline(trainer.model, trainer.local_batch, xp)
    buf = xp.zeros(trainer.model.params.size, dtype=np.float32)

    def run_gemm():
        gemm_linear()
        gemm_inter()
        sync()

    def run_raw():
        trainer.dense_comm.allreduce(buf)
        sync()
    out = []
    for fn in (run_gemm, run_raw):
        out.append(common.stats(common.time_fn(fn, warmup=2, repeat=7, comm=comm.mpi_comm))["p50"])
    return tuple(out)


def main(argv=None):
    p = common.parser("train", __doc__.splitlines()[0])
    p.add_argument("--dim", type=int, action="append", help="embedding dim (repeatable)")
    p.add_argument("--bag", type=int, action="append",
                   help="ids per bag: 1 one-hot, 20 multi-hot (repeatable)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per case")
    p.add_argument("--batch", type=int, default=4096, help="samples per rank and step")
    p.add_argument("--global-batch", type=int, default=None,
                   help="fixed global batch (strong scaling); overrides --batch")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                   help="where the dense model trains (the config key device)")
    p.add_argument("--thread-counts", default=None,
                   help="comma-separated threads per rank: every case runs at each, in this "
                        "process, in turn (e.g. 1,2: the sparse phases' speed-up at 2 threads)")
    p.add_argument("--row-dtypes", default="fp32",
                   help="comma-separated row dtypes of the tables (fp32, fp16, bf16): every "
                        "case runs at each, in this process, back to back")
    p.add_argument("--reserve", action="store_true",
                   help="reserve every table's rows at start (reserve_rows = its vocabulary, "
                        "faulted in before the first step, as preallocated tables are)")
    p.add_argument("--trace-every", type=int, default=0,
                   help="every K steps record throughput, RSS and rows (0: no trace)")
    args = p.parse_args(argv)
    from hpctrain.comm import create_communicator
    from hpctrain.dense.device import select_device, tf32_enabled
    comm = create_communicator("mpi")
    # "gpu" without CuPy or a GPU: one ConfigError line before any case starts
    select_device(args.device, comm.local_rank, source="bench train --device", use=False)
    dims, bags = args.dim or [16, 64], args.bag or [1, 20]
    results = []
    counts = ([int(c) for c in args.thread_counts.split(",") if c] if args.thread_counts
              else [args.threads])
    for bag in bags:
        for dim in dims:
            per_rank = (args.global_batch // comm.size if args.global_batch else args.batch)
            for threads in counts:
                for dt in [d for d in args.row_dtypes.split(",") if d]:
                    results.append(run_one(dim, bag, args.steps, args.warmup, comm, threads,
                                           per_rank, device=args.device,
                                           trace_every=args.trace_every, row_dtype=dt,
                                           reserve=args.reserve))
    if comm.rank == 0:
        print(f"# hpctrain train benchmark: {comm.size} rank(s), batch "
              f"{results[0]['global_batch'] // comm.size}/rank, 26 features")
        common.print_table(
            ["dim", "bag", "rows", "threads", "samples/s", "per rank", "step ms",
             "dense-only ms", "dense share", "reader share", "reader ms/step", "RSS sum GB"],
            [[r["dim"], r["bag"], r["row_dtype"], r["threads"], r["samples_per_s"],
              r["samples_per_s_per_rank"],
              1e3 * r["median_step_s"], 1e3 * r["dense_only_step_s"], r["dense_share"],
              r["reader_busy_share"], r["reader_cpu_ms_per_step"], r["peak_rss_sum_gb"]]
             for r in results])
        print("# reader share: CPU seconds of the prefetch thread / wall seconds of the fit; "
              "reader ms/step: its CPU milliseconds per step (both max over ranks)")
        print(f"# per-phase ms per step (rank 0; device {results[0]['device']}, TF32 "
              f"{'on' if tf32_enabled() else 'off'}): h2d/dense/nccl/d2h on the device "
              "(CUDA events) with --device gpu; dense_vs_bare: dense-only step / (bare GEMMs "
              "+ raw allreduce)" + (f", goals <= {GPU_GOALS['dense_vs_bare']}, copies hidden "
                                    f">= {GPU_GOALS['copies_hidden']:.0%}"
                                    if args.device == "gpu" else ""))
        common.print_table(
            ["dim", "bag", "h2d", "dense", "nccl", "d2h", "sparse", "dense-only ms",
             "bare ms", "dense_vs_bare", "copies hidden"],
            [[r["dim"], r["bag"], *(r["phase_ms_per_step"][k]
                                    for k in ("h2d", "dense", "nccl", "d2h", "sparse")),
              1e3 * r["dense_only_step_s"], 1e3 * (r["bare_gemm_s"] + r["raw_allreduce_s"]),
              r["dense_vs_bare"], "-" if r["copies_hidden"] is None
              else f"{r['copies_hidden']:.0%}"] for r in results])
        print("# configs: " + "; ".join(f"d{r['dim']} bag {r['bag']}: {r['config']} (bottom "
                                        f"{'-'.join(map(str, r['bottom'] or []))}, overlap "
                                        f"{str(r['overlap']).lower()})" for r in results))
        print(f"# {results[0]['steps']} timed steps after {results[0]['warmup']} warm-up "
              "steps; loss: first step's, largest / first, last 10 steps' mean")
        common.print_table(
            ["dim", "bag", "samples/s all steps", "first loss", "max/first", "last loss"],
            [[r["dim"], r["bag"], r["samples_per_s_all_steps"], r["first_loss"],
              r["max_loss_vs_first"], float(np.mean(r["losses"][-10:]))] for r in results])
        for r in results:
            if r["trace"]:
                print(f"# trace d{r['dim']} bag {r['bag']}: samples/s over the last "
                      f"{args.trace_every} steps, RSS summed over ranks, rows stored")
                common.print_table(
                    ["step", "elapsed s", "samples/s", "RSS GB", "rows"],
                    [[t["step"], t["elapsed_s"], t["samples_per_s"], t["rss_sum_bytes"] / 1e9,
                      t["rows"]] for t in r["trace"]])
        if len(counts) > 1:
            print(f"# threads per rank (OMP_WAIT_POLICY "
                  f"{results[0]['omp_wait_policy'] or 'unset'}): sparse = exchange + sparse "
                  f"update, ms per step (rank 0); speed-up against {counts[0]} thread(s), same "
                  "case, same process")
            base = {(r["dim"], r["bag"]): r for r in results if r["threads"] == results[0][
                "threads"]}
            common.print_table(
                ["dim", "bag", "threads", "step ms", "sparse ms", "dense ms", "sparse speed-up",
                 "step speed-up"],
                [[r["dim"], r["bag"], r["threads"], 1e3 * r["median_step_s"],
                  r["phase_ms_per_step"]["sparse"], r["phase_ms_per_step"]["dense"],
                  base[r["dim"], r["bag"]]["phase_ms_per_step"]["sparse"]
                  / r["phase_ms_per_step"]["sparse"],
                  base[r["dim"], r["bag"]]["median_step_s"] / r["median_step_s"]]
                 for r in results])
        names = sorted({k for r in results for k in r["phases_s"]})
        print("# per-phase seconds over the run (rank 0)")
        common.print_table(["dim", "bag", *names],
                           [[r["dim"], r["bag"], *(r["phases_s"].get(k, 0.0) for k in names)]
                            for r in results])
    common.write_json("train", {"results": results, "device": args.device,
                                "tf32": tf32_enabled(), "goals_gpu": GPU_GOALS},
                      args.json, comm.mpi_comm)
    return 0
