"""Dense step: DLRM's dense part against the bare matrix products and a raw allreduce.

    mpiexec -n 2 python -m mpi4py -m hpctrain.bench dense --dims 16,64

One step is forward + BCE loss + backward + allreduce of the flat gradient buffer +
optimizer update of DLRM's dense part (bottom 13-512-256-64-d, dot interaction of
26 embeddings, top 512-256-1, ``--batch`` samples per rank). In the same run, in
alternating rounds, it times the baseline: the bare matrix products of the same
shapes on preallocated buffers (per Linear: forward, weight gradient and, except
for the first layer, input gradient; the interaction's two batched products) and a
raw ``MPI.Allreduce`` (``--device gpu``: a raw NCCL allreduce) of a buffer of the
same size (with several threads the batched products run one slice of the batch per
thread, their fastest form on NumPy), the Linear GEMMs, the interaction's products and the allreduce timed back to
back in each round (``linear_ratio`` leaves the interaction's products out of the
baseline). Goal: step <= 1.15 x
(GEMM + raw allreduce) on CPU, <= 1.2 x (cuBLAS GEMMs + NCCL) on a GPU, judged on the
median over rounds of the per-round ratio. GFLOP/s count the FLOPs of those products
(per rank, and summed over ranks).

``--device gpu`` runs the CuPy model on this rank's GPU (``local_rank % devices``) with
the NCCL communicator; without CuPy or a GPU it stops with one ``ConfigError`` line.
TF32 stays off unless ``CUPY_TF32=1`` (reported in the output and the JSON).
"""
import time

import numpy as np

from hpctrain._kernels import _openmp
from hpctrain.bench import common
from hpctrain.memory import peak_rss_bytes
from hpctrain.workpool import parallel_map

GOAL = 1.15
GOALS = {"cpu": GOAL, "gpu": 1.2}
NUM_DENSE = 13


def _flops(model, batch):
    """Multiply-add FLOPs of one step's matrix products (2 per multiply-add)."""
    from hpctrain.dense.layers import Linear
    lin = 0
    for layer in model.bottom.layers + model.top.layers:
        if isinstance(layer, Linear):
            products = 3 if layer.input_grad else 2
            lin += 2 * batch * layer.in_features * layer.out_features * products
    it = model.interaction
    inter = 2 * (2 * batch * it.n * it.n * it.dim)
    return lin, inter


def _gemm_baseline(model, batch, xp):
    """Two functions running the step's matrix products bare, on preallocated buffers:
    the Linear layers' GEMMs, and the interaction's two batched products."""
    from hpctrain.dense.layers import Linear
    rng = np.random.default_rng(0)

    def arr(*shape):
        return xp.asarray(rng.standard_normal(shape).astype(np.float32))

    work = []
    for layer in model.bottom.layers + model.top.layers:
        if isinstance(layer, Linear):
            i, o = layer.in_features, layer.out_features
            work.append((arr(batch, i), arr(i, o), arr(batch, o), arr(i, o), arr(batch, i),
                         layer.input_grad))
    it = model.interaction
    t, z, dt = arr(batch, it.n, it.dim), arr(batch, it.n, it.n), arr(batch, it.n, it.dim)
    # T @ T^T as the model runs it: on NumPy against a copy of T (one buffer twice would
    # be BLAS's syrk, 2-3 times slower for these shapes); cuBLAS takes the view.
    t2 = t.copy() if xp is np else t

    def linear():
        for x, w, y, dw, dx, input_grad in work:
            xp.matmul(x, w, out=y)
            xp.matmul(x.T, y, out=dw)
            if input_grad and w.shape[1] == 1:  # as the model does it: an outer product
                xp.multiply(y, w.T, out=dx)
            elif input_grad:
                xp.matmul(y, w.T, out=dx)

    def products(lo, hi):
        xp.matmul(t[lo:hi], t2[lo:hi].transpose(0, 2, 1), out=z[lo:hi])
        xp.matmul(z[lo:hi], t[lo:hi], out=dt[lo:hi])

    # BLAS runs a batch of such small products on one core whatever its thread count;
    # with several kernel threads the fastest form is the batch cut into one slice per
    # thread, run side by side (as the model's row blocks are).
    nt = _openmp.get_num_threads() if xp is np else 1
    cuts = np.linspace(0, batch, min(nt, batch) + 1).astype(int)
    slices = list(zip(cuts[:-1], cuts[1:]))

    def interaction():
        if len(slices) > 1:
            parallel_map(lambda s: products(*s), slices)
        else:
            products(0, batch)
    return linear, interaction


def _device_sync(xp):
    if xp is np:
        return lambda: None
    return lambda: xp.cuda.get_current_stream().synchronize()


def bench_dim(d, args, comm, hc, xp, goal=GOAL):
    """Time the step, its phases and the baseline for embedding width ``d``."""
    from mpi4py import MPI

    from hpctrain.dense import DLRM, allreduce_gradients, bce_with_logits, make_optimizer
    n, b = comm.size, args.batch
    model = DLRM(NUM_DENSE, [d] * args.features, bottom=[512, 256, 64, d], top=[512, 256, 1],
                 xp=xp, seed=0)
    opt = make_optimizer(args.optimizer, model.params, lr=args.lr)
    rng = np.random.default_rng([comm.rank, d])
    dense = xp.asarray(rng.standard_normal((b, NUM_DENSE)).astype(np.float32))
    embs = [xp.asarray((rng.standard_normal((b, d)) * 0.1).astype(np.float32))
            for _ in range(args.features)]
    labels = xp.asarray((rng.random(b) > 0.5).astype(np.float32))
    sync = _device_sync(xp)
    phases = dict.fromkeys(("forward", "backward", "allreduce", "update"), 0.0)
    clock = time.perf_counter

    def step(record=False):
        t0 = clock()
        logits = model.forward(dense, embs)
        _, d_logits = bce_with_logits(logits, labels, denom=b * n)
        if record:
            sync()
        t1 = clock()
        model.backward(d_logits)
        if record:
            sync()
        t2 = clock()
        allreduce_gradients(model.params, hc, debug=False)
        if record:
            sync()
        t3 = clock()
        opt.step()
        sync()
        if record:
            t4 = clock()
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k] += v

    gemm_linear, gemm_inter = _gemm_baseline(model, b, xp)
    raw_buf = xp.zeros(model.params.size, dtype=np.float32)
    if xp is np:
        def raw():
            comm.Allreduce(MPI.IN_PLACE, [raw_buf, MPI.FLOAT], MPI.SUM)
    else:
        def raw():
            hc.allreduce(raw_buf)
            sync()

    def synced(fn):
        def run():
            fn()
            sync()
        return run

    fns = {"step": step, "linear": synced(gemm_linear), "inter": synced(gemm_inter),
           "allreduce": raw}
    for fn in fns.values():
        common.time_fn(fn, warmup=args.warmup, repeat=0, comm=comm)
    times = {k: [] for k in fns}
    order = list(fns)
    for i in range(args.repeat):
        k0 = i % len(order)
        for k in order[k0:] + order[:k0]:  # rotate who goes first: same noise for all
            times[k] += common.time_fn(fns[k], warmup=0, repeat=1, comm=comm)
    times["gemm"] = [a + c for a, c in zip(times["linear"], times["inter"])]
    reps = max(1, args.repeat // 2)
    for _ in range(reps):
        step(record=True)
    st = {k: common.stats(v) for k, v in times.items()}
    lin_flops, inter_flops = _flops(model, b)
    flops = lin_flops + inter_flops
    # Each round timed the four back to back, so a round's ratio sees one noise level;
    # the median over rounds resists load bursts better than a ratio of medians.
    paired = [s / (g + a) for s, g, a in zip(times["step"], times["gemm"], times["allreduce"])]
    ratio = float(np.median(paired))
    linear = [s / (g + a) for s, g, a in zip(times["step"], times["linear"], times["allreduce"])]
    best = min(times["step"]) / (min(times["gemm"]) + min(times["allreduce"]))
    return {"d": d, "batch_per_rank": b, "features": args.features,
            "params": model.params.num_parameters, "grad_bytes": model.params.grad.nbytes,
            "step": st["step"], "gemm": st["gemm"], "gemm_linear": st["linear"],
            "gemm_interaction": st["inter"], "raw_allreduce": st["allreduce"],
            "phases_mean": {k: v / reps for k, v in phases.items()},
            "flops": flops, "linear_flops": lin_flops, "interaction_flops": inter_flops,
            "step_gflops": flops / st["step"]["p50"] / 1e9,
            "step_gflops_all_ranks": n * flops / st["step"]["p50"] / 1e9,
            "gemm_gflops": flops / st["gemm"]["p50"] / 1e9,
            "ratio": ratio, "ratio_of_minima": best, "paired_ratios": paired,
            "ratio_linear": float(np.median(linear)), "goal": goal,
            "met": bool(ratio <= goal)}


def main(argv=None):
    p = common.parser("dense", __doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4096, help="samples per rank")
    p.add_argument("--dims", default="16,64", help="embedding widths d, comma-separated")
    p.add_argument("--features", type=int, default=26, help="number of embedding features")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default=None, choices=["cpu", "gpu"],
                   help="where the model runs (gpu: CuPy on this rank's GPU, NCCL allreduce)")
    p.add_argument("--backend", default=None, choices=["numpy", "cupy"],
                   help="the same as --device cpu|gpu")
    p.add_argument("--no-fused", action="store_true",
                   help="NumPy without the fused kernels of hpctrain._kernels.dense_ops (the "
                        "generic array code, as the CuPy path runs it): the before of a "
                        "comparison")
    args = p.parse_args(argv)
    if args.no_fused:
        from hpctrain.dense import backend
        backend.FUSED_KERNELS = False
    device = args.device or {"numpy": "cpu", "cupy": "gpu"}.get(args.backend, "cpu")
    args.backend = "cupy" if device == "gpu" else "numpy"
    from hpctrain.comm import create_communicator
    from hpctrain.dense.backend import get_blas_threads, set_blas_threads
    from hpctrain.dense.device import select_device, tf32_enabled
    comm = common.world()
    # "gpu" without CuPy or a GPU: one ConfigError line, before any collective
    select_device(device, 0, source="bench dense --device", use=False)
    host = create_communicator("mpi", debug=False)
    dev = select_device(device, host.local_rank, source="bench dense --device")
    xp = dev.xp
    if args.threads:
        set_blas_threads(args.threads)
        from hpctrain._kernels import _openmp
        _openmp.set_num_threads(args.threads)
    hc = dev.collective(host)
    rows = [bench_dim(int(d), args, comm, hc, xp, GOALS[device]) for d in args.dims.split(",")]
    threads = get_blas_threads()
    goal = GOALS[device]
    if comm.rank == 0:
        print(f"# device {dev.name}" + (f", TF32 {'on' if tf32_enabled() else 'off'}"
                                       if device == "gpu" else ""))
        fused = "" if device == "gpu" else (", generic array code" if args.no_fused
                                            else ", fused kernels")
        print(f"# DLRM dense step ({args.backend}{fused}, {args.optimizer}) vs bare matrix "
              f"products + raw allreduce; {comm.size} ranks x {threads} BLAS threads, "
              f"batch {args.batch}/rank; p50 ms (phases: means; allred includes waiting for "
              "the slowest rank)\n# ratio: median over rounds of step/(gemm+allreduce) timed "
              "back to back; min_ratio: from the fastest of each; linear_ratio: against the "
              "Linear layers' GEMMs only (no interaction products)")
        common.print_table(
            ["d", "step_ms", "fwd", "bwd", "allred", "update", "gemm_ms", "linear_ms",
             "raw_ar_ms", "ratio", "min_ratio", "linear_ratio", "goal", "step_GF/s",
             "gemm_GF/s", "all_ranks_GF/s"],
            [[r["d"], r["step"]["p50"] * 1e3, r["phases_mean"]["forward"] * 1e3,
              r["phases_mean"]["backward"] * 1e3, r["phases_mean"]["allreduce"] * 1e3,
              r["phases_mean"]["update"] * 1e3, r["gemm"]["p50"] * 1e3,
              r["gemm_linear"]["p50"] * 1e3, r["raw_allreduce"]["p50"] * 1e3, r["ratio"],
              r["ratio_of_minima"], r["ratio_linear"],
              f"<={goal} {'met' if r['met'] else 'NOT met'}", r["step_gflops"],
              r["gemm_gflops"], r["step_gflops_all_ranks"]] for r in rows])
    common.write_json("dense", {"backend": args.backend, "device": dev.name,
                                "fused_kernels": not args.no_fused and device == "cpu",
                                "tf32": tf32_enabled(), "optimizer": args.optimizer,
                                "blas_threads": threads, "rows": rows,
                                "peak_rss_bytes": peak_rss_bytes()},
                      path=args.json, comm=comm)
    return 0
