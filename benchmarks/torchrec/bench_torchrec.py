"""TorchRec baseline of hpctrain's DLRM training benchmark (``python -m hpctrain.bench train``).

Runs the workload of hpctrain's ``bench train`` with TorchRec, so that hpctrain's samples/s
can be divided by these. Every case is built from the shipped hpctrain config that ``bench
train`` runs (``hpctrain.bench.train.workload``): per rank a batch of 4096, 26 categorical
features each with its own table of 10^6 rows, ids Zipf(1.05), 13 dense features, bags of
1 or 20 ids (sum pooling), embedding dim 16 or 64; DLRM with bottom MLP 13-512-256-64(-16),
dot interaction, top MLP 512-256-1, BCE-with-logits (mean over the batch); Adagrad for
the embeddings (FBGEMM EXACT_ADAGRAD, element-wise like hpctrain's "adagrad"; or
EXACT_ROWWISE_ADAGRAD with ``--emb-optimizer rowwise_adagrad``) and for the dense layers
(torch.optim.Adagrad, initial accumulator 1e-4). The batches are hpctrain's synthetic
samples (``SyntheticDataset.fetch``) at the positions hpctrain's reader gives rank r at
step s, so both sides see the same ids, dense features and labels; with ``--init hpctrain``
(default) TorchRec starts from hpctrain's initial weights too (dense layers and every
embedding row), so the losses agree.

Layouts::

    --mode dmp   --procs 2      DistributedModelParallel, gloo on CPU, table-wise sharding
                                (13 tables per rank), fused FBGEMM embedding optimizer, DDP
                                for the dense layers; --threads (default 1) per process
    --mode fused --threads 2    one process, FusedEmbeddingBagCollection, no distribution

The script spawns its own processes (one set per case, so peak RSS is that case's).
``--warmup`` untimed steps, then exactly ``--steps`` timed steps; a step (forward, loss,
backward with the fused embedding update, dense optimizer step) runs from the end of the
previous step to the end of its own, one perf_counter per step end on every rank, no
barrier; the median of each rank's steps, max over ranks, gives samples/s (as hpctrain's
bench train does).

    python benchmarks/torchrec/bench_torchrec.py --mode dmp --procs 2 --dim 16 --bag 1
    python benchmarks/torchrec/bench_torchrec.py --mode fused --threads 2 --dim 64 --bag 20
"""
import argparse
import importlib.util
import json
import os
import platform
import resource
import socket
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if importlib.util.find_spec("hpctrain") is None:   # the checkout this script belongs to
    sys.path.insert(0, REPO)

_WAIT_VARS = ("OMP_WAIT_POLICY",)


# ----------------------------------------------------------------------------- environment

def _imports(wait_policy):
    """Import torch, torchrec and hpctrain in that order, keeping the OpenMP environment
    TorchRec runs with as the user set it.

    ``import hpctrain`` sets OMP_WAIT_POLICY=PASSIVE when it is unset (its own kernels'
    setting); torch's OpenMP runtime is loaded first, so this process keeps the runtime
    default, and the variable is removed again so spawned workers do not inherit it.
    ``--wait-policy passive`` sets it for TorchRec on purpose. OPENBLAS_THREAD_TIMEOUT=20
    (hpctrain's value) is set when unset: it only concerns NumPy's OpenBLAS, which the
    shared data generator uses, as hpctrain's reader does.
    """
    if wait_policy == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")
    saved = {k: os.environ.get(k) for k in _WAIT_VARS}
    for name in ("torch", "torchrec", "hpctrain"):   # torch first: its OpenMP reads it now
        importlib.import_module(name)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _versions():
    import fbgemm_gpu
    import numpy
    import torch
    import torchrec

    from hpctrain.versions import cpu_model
    return {"torch": torch.__version__, "torchrec": getattr(torchrec, "__version__", None),
            "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", None),
            "python": platform.python_version(), "numpy": numpy.__version__,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "machine": platform.machine()}


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- workload

def hpctrain_case(dim, bag, batch_per_rank, steps):
    """hpctrain's config of a bench train case (``Config``), as ``bench train`` builds it."""
    from hpctrain.bench.train import shipped_config, workload
    from hpctrain.config import config_from_dict
    name, _, derived = shipped_config(dim, bag)
    cfg = config_from_dict(workload(dim, batch_per_rank, bag=bag, steps=steps),
                           source=f"torchrec-bench-d{dim}-bag{bag}")
    return cfg, name + (f" with {derived}" if derived else "")


def check_workload(cfg, specs):
    """The parts of the workload this script maps onto TorchRec; ValueError otherwise."""
    syn = cfg.data.synthetic
    if cfg.model.kind != "dlrm" or cfg.data.format != "synthetic":
        raise ValueError("expected the DLRM model on synthetic data")
    for s in specs:
        o = s.optimizer
        if s.pooling != "sum" or len(s.features) != 1:
            raise ValueError(f"table {s.name}: expected one feature, sum pooling")
        if o.kind != "adagrad" or o.weight_decay != 0.0:
            raise ValueError(f"table {s.name}: expected adagrad without weight decay "
                             f"(FBGEMM's); got {o}")
        if o.initial_accumulator != specs[0].optimizer.initial_accumulator:
            raise ValueError(f"table {s.name}: initial_accumulator {o.initial_accumulator}, "
                             f"table {specs[0].name}: {specs[0].optimizer.initial_accumulator}; "
                             f"expected one value for all tables")
        if s.init != "uniform":
            raise ValueError(f"table {s.name}: expected uniform initial rows")
    d = dict(cfg.dense_optimizer)
    if d.get("kind") != "adagrad" or set(d) - {"kind", "lr", "eps", "initial_accumulator"}:
        raise ValueError(f"expected a plain Adagrad dense optimizer, got {d}")
    return syn


def top_permutation(dim, n):
    """Column of hpctrain's top-MLP input for every column of TorchRec's.

    Both inputs are ``[x | pairwise dots of T = (x, e_1, ..., e_F)]`` (n = F + 1 vectors):
    TorchRec lists the pairs (r, c), r < c, row by row of the upper triangle
    (``torch.triu_indices(n, n, 1)``); hpctrain lists (i, j), i > j, row by row of the
    lower triangle, pair (i, j) at column ``dim + i (i - 1) / 2 + j``.
    """
    cols = list(range(dim))
    for r in range(n):
        for c in range(r + 1, n):
            cols.append(dim + c * (c - 1) // 2 + r)
    return cols


def _linears(module):
    import torch.nn as nn
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def copy_dense_init(model, hp_model, dim, num_features):
    """Set the TorchRec DLRM's dense layers to hpctrain's initial values (same seed)."""
    import torch
    hp = {p.name: p.data for p in hp_model.params.params}
    perm = top_permutation(dim, num_features + 1)
    with torch.no_grad():
        for arch, prefix in ((model.dense_arch, "bottom"), (model.over_arch, "top")):
            lins = _linears(arch)
            n_hp = sum(1 for k in hp if k.startswith(prefix + ".") and k.endswith(".weight"))
            if len(lins) != n_hp:
                raise RuntimeError(f"{prefix}: {len(lins)} torch layers, {n_hp} hpctrain layers")
            for i, lin in enumerate(lins):
                w = hp[f"{prefix}.{i}.weight"]                 # (in, out)
                if prefix == "top" and i == 0:
                    w = w[perm]
                lin.weight.copy_(torch.from_numpy(w.T.copy()))
                lin.bias.copy_(torch.from_numpy(hp[f"{prefix}.{i}.bias"].copy()))


def copy_embedding_init(state, specs, seed, chunk=1 << 18):
    """Write hpctrain's initial rows (``table.init_rows_reference``: the numbers its tables
    give a new id) into every table this process holds; returns the tables written."""
    import numpy as np
    import torch
    from hpctrain._kernels.table import init_rows_reference
    from hpctrain.sparse.init import default_scale
    done = []
    for s in specs:
        key = [k for k in state if k.endswith(f"embedding_bags.{s.name}.weight")]
        if len(key) != 1:
            raise RuntimeError(f"table {s.name}: state_dict keys {key}")
        t = state[key[0]]
        shards = ([(sh.tensor, sh.metadata.shard_offsets) for sh in t.local_shards()]
                  if hasattr(t, "local_shards") else [(t, [0, 0])])
        scale = default_scale(s.dim) if s.init_scale is None else float(s.init_scale)
        for w, (row0, col0) in shards:
            if col0 != 0 or w.shape[1] != s.dim:
                raise RuntimeError(f"table {s.name}: column shards are not supported here")
            with torch.no_grad():
                for a in range(0, w.shape[0], chunk):
                    b = min(a + chunk, w.shape[0])
                    keys = np.arange(row0 + a, row0 + b, dtype=np.int64)
                    rows = init_rows_reference(keys, s.dim, seed, s.table_id, False, scale)
                    w[a:b].copy_(torch.from_numpy(rows))
            done.append(s.name)
    return done


def fill_accumulators(opt, value):
    """Start every Adagrad accumulator (FBGEMM's ``momentum1`` state) of the fused
    embedding optimizer ``opt`` at ``value``, hpctrain's ``initial_accumulator``; returns
    the number of state tensors filled."""
    import torch
    n = 0
    with torch.no_grad():
        for state in opt.state.values():
            for key, v in state.items():
                if "momentum" not in key:
                    continue
                parts = ([sh.tensor for sh in v.local_shards()] if hasattr(v, "local_shards")
                         else [v])
                for t in parts:
                    t.fill_(value)
                n += 1
    return n


# ----------------------------------------------------------------------------- batches

class Batches:
    """This rank's batches, step after step, as torch tensors ``(dense, kjt, labels)``.

    Global batch s is the sample positions ``[s G, (s + 1) G)``, rank r of n reads
    ``[s G + r b, s G + (r + 1) b)`` (b = G / n): hpctrain's reader on an endless synthetic
    split (hpctrain/data/reader.py). ``thread``: hpctrain's own prefetch thread
    (``reader._Prefetcher``) generates them without end, ``depth`` ahead through a bounded
    queue, counting its CPU seconds (``time.thread_time``), and runs on past the last step
    until it is closed, as in hpctrain's reader; ``pregenerated``: the first ``count`` of
    them, all now.
    """

    def __init__(self, ds, rank, world, batch, count, mode, depth):
        self.ds, self.rank, self.world, self.b = ds, rank, world, batch
        self.mode = mode
        self.pregen_s = None
        if mode == "pregenerated":
            t0 = time.perf_counter()
            self._items = [self.make(i) for i in range(count)]
            self.pregen_s = time.perf_counter() - t0
            self._it = iter(self._items)
        else:
            from hpctrain.data.reader import _Prefetcher
            self._pf = _Prefetcher(self._generate(), depth)

    def make(self, step):
        import numpy as np
        import torch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        G = self.b * self.world
        lo = step * G + self.rank * self.b
        rows = self.ds.fetch(np.arange(lo, lo + self.b, dtype=np.int64))
        kjt = KeyedJaggedTensor(keys=list(self.ds.features),
                                values=torch.from_numpy(rows.values),
                                lengths=torch.from_numpy(rows.lengths.reshape(-1)))
        return torch.from_numpy(rows.dense), kjt, torch.from_numpy(rows.labels)

    def _generate(self):
        import torch
        # One intra-op thread here, as PyTorch's DataLoader workers have: the KJT's few
        # torch ops would otherwise open a second OpenMP team of --threads threads beside
        # the training thread's, and with the runtime's default spin-waits the two teams
        # on the same cores slowed every step 40x (2.4 s instead of 55 ms, fused, batch 512).
        torch.set_num_threads(1)
        step = 0
        while True:
            yield self.make(step), None
            step += 1

    @property
    def busy(self):
        """CPU seconds the thread spent making batches (0 when pregenerated)."""
        return self._pf.busy_seconds if self.mode == "thread" else 0.0

    def next(self):
        if self.mode == "pregenerated":
            return next(self._it)
        from hpctrain.data.reader import _ERROR
        item, err = self._pf.get()
        if item is _ERROR:
            raise err
        return item

    def close(self):
        """Stop the thread (after the fit, as hpctrain's trainer closes its reader)."""
        if self.mode == "thread":
            self._pf.close()


# ----------------------------------------------------------------------------- model

def build(args, cfg, specs, rank, world):
    """``(model, dense optimizer, what the embedding side is, bottom MLP widths)`` of the
    chosen layout."""
    import torch
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from hpctrain.train.build import build_model
    syn = cfg.data.synthetic
    dim = specs[0].dim
    hp_model = build_model(cfg, syn.num_dense)
    bottom = list(hp_model.bottom.sizes)          # [13, 512, 256, 64(, 16)]
    top = list(cfg.model.top)
    o = specs[0].optimizer
    lr, eps = o.lr, o.eps
    emb_opt = args.emb_optimizer
    init_kw = {}
    if args.init == "hpctrain":       # the range of hpctrain's rows (then overwritten)
        a = 1.0 / dim ** 0.5
        init_kw = {"weight_init_min": -a, "weight_init_max": a}
    tables = [EmbeddingBagConfig(name=s.name, embedding_dim=s.dim,
                                 num_embeddings=int(syn.vocab[syn.features.index(s.features[0])]),
                                 feature_names=list(s.features), pooling=PoolingType.SUM,
                                 **init_kw) for s in specs]
    cpu = torch.device("cpu")
    if args.mode == "fused":
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
        from torchrec.optim import RowWiseAdagrad
        opt_cls = torch.optim.Adagrad if emb_opt == "adagrad" else RowWiseAdagrad
        ebc = FusedEmbeddingBagCollection(tables=tables, optimizer_type=opt_cls,
                                          optimizer_kwargs={"lr": lr, "eps": eps}, device=cpu)
        what = (f"FusedEmbeddingBagCollection ({opt_cls.__module__}.{opt_cls.__name__} -> "
                f"FBGEMM {'EXACT_ADAGRAD' if emb_opt == 'adagrad' else 'EXACT_ROWWISE_ADAGRAD'},"
                f" lr {lr:g}, eps {eps:g})")
    else:
        ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=syn.num_dense,
                 dense_arch_layer_sizes=bottom[1:], over_arch_layer_sizes=top, dense_device=cpu)
    if args.init == "hpctrain":
        copy_dense_init(model, hp_model, dim, len(specs))
    if args.mode == "dmp":
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.sharding_plan import (construct_module_sharding_plan,
                                                         table_wise)
        from torchrec.distributed.types import ShardingPlan
        fbgemm_opt = (EmbOptimType.EXACT_ADAGRAD if emb_opt == "adagrad"
                      else EmbOptimType.EXACT_ROWWISE_ADAGRAD)
        sharder = EmbeddingBagCollectionSharder(
            fused_params={"optimizer": fbgemm_opt, "learning_rate": lr, "eps": eps})
        placement = {s.name: i % world for i, s in enumerate(specs)}
        module_plan = construct_module_sharding_plan(
            model.sparse_arch.embedding_bag_collection,
            {name: table_wise(rank=r, compute_kernel="fused") for name, r in placement.items()},
            sharder=sharder, local_size=world, world_size=world, device_type="cpu")
        plan = ShardingPlan({"sparse_arch.embedding_bag_collection": module_plan})
        model = DistributedModelParallel(module=model, device=cpu, plan=plan,
                                         sharders=[sharder])
        what = (f"DistributedModelParallel, table-wise (table i on rank i mod {world}), "
                f"compute kernel fused, FBGEMM {fbgemm_opt.name} (lr {lr:g}, eps {eps:g}); "
                f"dense layers DDP (gloo)")
    if args.init == "hpctrain":
        copy_embedding_init(model.state_dict(), specs, cfg.seed)
    acc0 = o.initial_accumulator
    if acc0:
        fused = (model.fused_optimizer if args.mode == "dmp"
                 else model.sparse_arch.embedding_bag_collection.fused_optimizer())
        # the same start in dmp too: TorchRec's all-to-all divides the embedding gradients
        # by the world size in backward (torchrec.distributed.comm_ops, gradient division
        # on by default), so they are the global mean's, as hpctrain's
        if fill_accumulators(fused, acc0) == 0:
            raise RuntimeError("initial_accumulator: no Adagrad state found in TorchRec's "
                               "fused embedding optimizer")
        what += f", accumulators start at {acc0:g}"
    dense = [(n, p) for n, p in model.named_parameters() if "sparse_arch" not in n]
    want = sum(p.size for p in hp_model.params.params)
    got = sum(p.numel() for _, p in dense)
    if got != want:
        raise RuntimeError(f"dense parameters: {got} in TorchRec, {want} in hpctrain: "
                           f"{[n for n, _ in dense]}")
    d = dict(cfg.dense_optimizer)
    opt = torch.optim.Adagrad([p for _, p in dense], lr=d["lr"], eps=d.get("eps", 1e-10),
                              initial_accumulator_value=d.get("initial_accumulator", 0.0))
    return model, opt, what, bottom


# ----------------------------------------------------------------------------- one case

def worker(rank, args, case, port, out_path):
    """One process of one case: train ``warmup + steps`` steps, write rank 0's result."""
    import faulthandler
    faulthandler.enable()           # a native abort names the Python line it came from
    _imports(args.wait_policy)
    import warnings
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from hpctrain.data.sources import open_dataset
    from hpctrain.train.build import table_specs
    torch.set_num_threads(args.threads)
    world = args.procs
    dim, bag = case
    if args.mode == "dmp":
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    total = args.warmup + args.steps
    cfg, cfg_name = hpctrain_case(dim, bag, args.batch, total)
    specs = table_specs(cfg)
    check_workload(cfg, specs)
    t_setup = time.perf_counter()
    model, opt, what, bottom = build(args, cfg, specs, rank, world)
    ds = open_dataset(cfg.data, "train", cfg.seed)
    extra = PROFILE_STEPS if args.profile else 0
    batches = Batches(ds, rank, world, args.batch, total + extra, args.batches,
                      cfg.data.prefetch)
    setup_s = time.perf_counter() - t_setup
    model.train()
    losses, ends = [], []

    def step():
        dense, kjt, labels = batches.next()
        logits = model(dense, kjt)
        loss = F.binary_cross_entropy_with_logits(logits.reshape(-1), labels)
        loss.backward()                  # the fused embedding update runs in here
        opt.step()
        opt.zero_grad()
        return loss.detach()

    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(total):
        losses.append(step())
        ends.append(time.perf_counter())
    wall = time.perf_counter() - t0
    if args.profile:
        profile_steps(step, args, case, rank)
    batches.close()
    main_threads = torch.get_num_threads()
    step_times = np.diff([t0, *ends][args.warmup:])
    if len(step_times) != args.steps:
        raise RuntimeError(f"timed {len(step_times)} steps, expected {args.steps}")
    local = torch.stack(losses).double()
    busy = batches.busy
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = torch.tensor([np.median(step_times), np.sum(step_times), busy,
                          busy / max(wall, 1e-12)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
        local /= world                   # equal local batches: the global mean loss
        everyone = [None] * world
        dist.all_gather_object(everyone, {"rss": rss, "step_times": step_times.tolist()})
    else:
        everyone = [{"rss": rss, "step_times": step_times.tolist()}]
    med, timed_s, busy_max, share_max = (float(x) for x in stats)
    gb = args.batch * world
    loss_list = [float(x) for x in local]
    result = {
        "dim": dim, "bag": bag, "mode": args.mode, "procs": world, "threads": args.threads,
        "torch_threads_training": main_threads,
        "emb_optimizer": args.emb_optimizer, "batches": args.batches, "init": args.init,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "steps": len(step_times), "warmup": args.warmup, "global_batch": gb,
        "config": cfg_name, "embedding": what,
        "bottom": bottom,
        "median_step_s": med, "samples_per_s": gb / med,
        "samples_per_s_per_rank": gb / med / world,
        "samples_per_s_all_steps": gb * len(step_times) / timed_s, "timed_s": timed_s,
        "wall_s": wall, "setup_s": setup_s,
        "losses": loss_list, "first_loss": loss_list[0] if loss_list else None,
        "max_loss_vs_first": (max(loss_list) / loss_list[0]) if loss_list and loss_list[0]
        else None,
        "last10_loss": float(np.mean(loss_list[-10:])) if loss_list else None,
        "reader_busy_s": busy_max if args.batches == "thread" else None,
        "reader_busy_share": share_max if args.batches == "thread" else None,
        "reader_cpu_ms_per_step": (1e3 * busy_max / max(total, 1)
                                   if args.batches == "thread" else None),
        "pregenerate_s": batches.pregen_s,
        "peak_rss_bytes": [e["rss"] for e in everyone],
        "peak_rss_sum_gb": sum(e["rss"] for e in everyone) / 1e9,
        "step_times_per_rank": [e["step_times"] for e in everyone],
    }
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


PROFILE_STEPS = 3


def profile_steps(step, args, case, rank):
    """``--profile``: torch.profiler over PROFILE_STEPS more steps after the timed ones (not
    in the figures); the operators' table goes to DIR/torchrec-MODE-dD-bagB-rankR.txt."""
    import torch
    with torch.profiler.profile() as prof:
        for _ in range(PROFILE_STEPS):
            step()
    os.makedirs(args.profile, exist_ok=True)
    path = os.path.join(args.profile, f"torchrec-{args.mode}-d{case[0]}-bag{case[1]}-"
                                      f"rank{rank}.txt")
    with open(path, "w") as f:
        f.write(f"# {PROFILE_STEPS} steps after the timed ones, {args.mode}, dim {case[0]}, "
                f"bag {case[1]}, rank {rank}\n")
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    print(f"wrote {path}")


def run_case(args, case):
    import torch.multiprocessing as mp
    fd, out_path = tempfile.mkstemp(prefix="torchrec-bench-", suffix=".json")
    os.close(fd)
    try:
        mp.start_processes(worker, args=(args, case, _free_port(), out_path),
                           nprocs=args.procs, join=True, start_method="spawn")
        with open(out_path) as f:
            return json.load(f)
    finally:
        os.unlink(out_path)


# ----------------------------------------------------------------------------- report

def report(args, results, vers):
    from hpctrain.bench.common import print_table
    print(f"# TorchRec train benchmark ({args.mode}): {args.procs} process(es) x "
          f"{args.threads} thread(s), batch {args.batch}/rank, 26 features; torch "
          f"{vers['torch']}, torchrec {vers['torchrec']}, fbgemm_gpu {vers['fbgemm_gpu']}; "
          f"{vers['cpu']}")
    print(f"# embeddings: {results[0]['embedding']}")
    print(f"# {args.steps} timed steps after {args.warmup} warm-up steps; batches "
          f"{args.batches}; init {args.init}; OMP_WAIT_POLICY "
          f"{results[0]['omp_wait_policy'] or 'unset'}")
    print_table(["dim", "bag", "threads", "samples/s", "per rank", "step ms", "all steps",
                 "reader ms/step", "RSS GB/proc", "first loss", "max/first", "last10 loss"],
                [[r["dim"], r["bag"], r["threads"], r["samples_per_s"],
                  r["samples_per_s_per_rank"], 1e3 * r["median_step_s"],
                  r["samples_per_s_all_steps"], r["reader_cpu_ms_per_step"],
                  max(r["peak_rss_bytes"]) / 1e9, r["first_loss"], r["max_loss_vs_first"],
                  r["last10_loss"]] for r in results])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["dmp", "fused"], default="dmp")
    p.add_argument("--procs", type=int, default=None,
                   help="processes (dmp; default 2); fused runs one")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: 1 dmp, 2 fused)")
    p.add_argument("--dim", type=int, action="append", help="embedding dim (repeatable)")
    p.add_argument("--bag", type=int, action="append",
                   help="ids per bag: 1 one-hot, 20 multi-hot (repeatable)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch", type=int, default=4096, help="samples per rank and step")
    p.add_argument("--batches", choices=["thread", "pregenerated"], default="thread",
                   help="thread: generated by a background thread 2 ahead (as hpctrain's "
                        "prefetch reader); pregenerated: all before timing starts")
    p.add_argument("--emb-optimizer", choices=["adagrad", "rowwise_adagrad"],
                   default="adagrad",
                   help="adagrad: FBGEMM EXACT_ADAGRAD, element-wise as hpctrain's; "
                        "rowwise_adagrad: EXACT_ROWWISE_ADAGRAD (not what hpctrain runs)")
    p.add_argument("--init", choices=["hpctrain", "torchrec"], default="hpctrain",
                   help="hpctrain: start from hpctrain's initial weights (dense layers and "
                        "every embedding row, copied before timing); torchrec: TorchRec's "
                        "and PyTorch's default initialisation")
    p.add_argument("--wait-policy", choices=["env", "passive"], default="env",
                   help="OMP_WAIT_POLICY of torch's OpenMP: as the environment says "
                        "(default), or PASSIVE (what import hpctrain sets for its kernels)")
    p.add_argument("--json", default=None,
                   help="output JSON (default bench-results/torchrec-<mode>-<procs>.json)")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help=f"after the timed steps, profile {PROFILE_STEPS} more (torch.profiler) "
                        "and write each rank's operator table to DIR")
    args = p.parse_args(argv)
    if args.mode == "fused":
        if args.procs not in (None, 1):
            p.error("--mode fused runs one process")
        args.procs = 1
    args.procs = args.procs or 2
    args.threads = args.threads or (1 if args.mode == "dmp" else 2)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.procs < 1:
        p.error("--steps, --batch and --procs must be >= 1, --warmup >= 0")
    _imports(args.wait_policy)
    vers = _versions()
    dims, bags = args.dim or [16, 64], args.bag or [1, 20]
    results = []
    for bag in bags:
        for dim in dims:
            results.append(run_case(args, (dim, bag)))
    report(args, results, vers)
    path = args.json or os.path.join("bench-results", f"torchrec-{args.mode}-{args.procs}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"benchmark": "torchrec-train", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "argv": sys.argv[1:] if argv is None else list(argv), "mode": args.mode,
           "procs": args.procs, "world_size": args.procs, "threads": args.threads,
           "versions": vers, "cpu_model": vers["cpu"], "hostname": socket.gethostname(),
           "results": results}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
