"""``python -m hpctrain.bench table``: throughput of one embedding table shard.

Workload: batches of ``batch x features`` ids, each feature drawing Zipf(``zipf``) ranks over
its own ``vocab``-id vocabulary (keys ``feature * vocab + id``, all features in one table),
at every row width in ``--dims``. The table is first warmed with ``--warm-batches`` batches;
timed calls cycle through ``--batches`` further batches, so new keys keep arriving.

Measured, in ids per second (p50 of ``--repeat`` calls):
  find                  row indices of every id of a batch
  gather                rows of precomputed indices
  lookup+gather         find + gather (the forward read path)
  find_or_insert warm   the batch's unique keys, into the warm table
  find_or_insert cold   the batch's unique keys, into a new, empty table
  step <optimizer>      full embedding step: unique ids -> find_or_insert -> gather (one-hot
                        bags) -> pooled backward (segment sum per unique id) -> fused update;
                        one warm table per optimizer, its steps timed back to back
Baselines in the same run: ``np.take`` of the same rows with precomputed indices (the
memory-bandwidth ceiling) and a Python dict lookup. Goals: lookup+gather >= 0.7x np.take;
full step at dim 64 with Adagrad >= 3 M ids/s. Bytes per stored row are reported with
their bound 1.25 x (8 + 4 * dim * (1 + slots)).

``--cycle-rows N`` adds ``find`` of stored and of absent keys at ``--cycle-points`` table
sizes spread geometrically over [N, 1.25 N], one full growth cycle of the hash index, so that
the probe cost is averaged over the index loads a growing table goes through (a single size
sits at one arbitrary point of the cycle).
"""
import numpy as np

from hpctrain.bench import common
from hpctrain.memory import peak_rss_bytes

GOAL_LOOKUP_VS_TAKE = 0.7
GOAL_STEP_ADAGRAD_64 = 3.0e6


def zipf_batches(rng, n_batches, batch, features, vocab, a):
    """int64[n_batches, features * batch] ids, feature-major, Zipf(a) over each vocabulary."""
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    cdf = np.cumsum(ranks ** -a)
    cdf /= cdf[-1]
    # a fixed random rank -> id map per feature, so hot ids are scattered over the key space
    perms = np.stack([rng.permutation(vocab) for _ in range(features)])
    out = np.empty((n_batches, features * batch), dtype=np.int64)
    for b in range(n_batches):
        r = np.minimum(np.searchsorted(cdf, rng.random((features, batch))), vocab - 1)
        ids = np.take_along_axis(perms, r, axis=1)
        out[b] = (ids + np.arange(features)[:, None] * vocab).ravel()
    return out


class Cycle:
    """Calls ``fn(i)`` with i = 0, 1, 2, ... modulo ``n``: each timed call gets the next batch."""

    def __init__(self, fn, n):
        self.fn, self.n, self.i = fn, n, 0

    def __call__(self):
        self.fn(self.i % self.n)
        self.i += 1


def interleaved(fns, warmup, repeat):
    """Seconds per call of each function, timed in ``repeat`` rounds of one call each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name] += common.time_fn(fn, 0, 1)
    return times


def _kernels():
    from hpctrain._kernels import sparse_ops
    return sparse_ops.unique_inverse, sparse_ops.segment_sum


def bench_dim(dim, args, warm, timed, kinds):
    """Rows of the result table (and JSON records) for one row width."""
    from hpctrain.sparse.table import EmbeddingTable
    unique_inverse, segment_sum = _kernels()
    n_ids = timed.shape[1]
    records = []

    def rec(op, n, times, baseline=None, goal=None, goal_on="ratio"):
        st = common.stats(times)
        r = {"dim": dim, "op": op, "ids": n, "p50_s": st["p50"], "ids_per_s": n / st["p50"],
             "stats": st}
        if baseline is not None:
            r["ratio"] = r["ids_per_s"] / baseline
        if goal is not None:
            value = r["ratio"] if goal_on == "ratio" else r["ids_per_s"]
            r["goal"], r["met"] = goal, bool(value >= goal)
        records.append(r)
        return r

    t = EmbeddingTable("bench", dim, "adagrad", seed=1)
    for s, ids in enumerate(warm):
        t.find_or_insert(unique_inverse(ids)[0], s)
    step0 = len(warm)
    uniq = [unique_inverse(ids) for ids in timed]
    for i, ids in enumerate(timed):  # so every timed id is stored (find/gather read rows)
        t.find_or_insert(uniq[i][0], step0 + i)
    rows = [t.find(ids) for ids in timed]
    values = t.export()["values"]       # row r at position r: nothing was evicted
    assert len(values) == t.memory_stats()["rows_ever"]
    buf = np.empty((n_ids, dim), dtype=np.float32)
    nb, w, rp = len(timed), args.warmup, args.repeat

    # the read path and its baseline are timed interleaved, call by call, so that they see
    # the same machine load
    lookup = dict(zip(t.export()["keys"].tolist(), range(len(t))))
    lists = [ids.tolist() for ids in timed]
    n_u = int(np.mean([len(u[0]) for u in uniq]))
    times = interleaved({
        "np.take (baseline)": Cycle(lambda i: np.take(values, rows[i], axis=0, out=buf), nb),
        "find": Cycle(lambda i: t.find(timed[i]), nb),
        "gather": Cycle(lambda i: t.gather(rows[i], out=buf), nb),
        "lookup+gather": Cycle(lambda i: t.gather(t.find(timed[i]), out=buf), nb),
        "find_or_insert warm": Cycle(lambda i: t.find_or_insert(uniq[i][0], step0 + nb), nb),
    }, w, rp)
    take = rec("np.take (baseline)", n_ids, times["np.take (baseline)"])
    rec("python dict (baseline)", n_ids, common.time_fn(
        Cycle(lambda i: np.fromiter((lookup.get(k, -1) for k in lists[i]), np.int64, n_ids), nb),
        1, max(2, rp // 5)), take["ids_per_s"])
    for op in ("find", "gather"):
        rec(op, n_ids, times[op], take["ids_per_s"])
    rec("lookup+gather", n_ids, times["lookup+gather"], take["ids_per_s"], GOAL_LOOKUP_VS_TAKE)
    rec("find_or_insert warm", n_u, times["find_or_insert warm"])
    rec("find_or_insert cold", n_u, common.time_fn(
        Cycle(lambda i: EmbeddingTable("cold", dim, "adagrad").find_or_insert(uniq[i][0], 0), nb),
        w, rp))
    mem = {"adagrad": t.memory_stats()}
    del t, values, lookup, lists

    src_off = np.arange(n_ids, dtype=np.int64) * dim
    d_out = np.random.default_rng(dim).standard_normal((n_ids, dim)).astype(np.float32) * 1e-3
    d_flat = d_out.ravel()
    # one warm table per optimizer, its steps timed back to back as in a training loop
    for kind in kinds:
        table = EmbeddingTable("bench", dim, kind, seed=1)
        for s, ids in enumerate(warm):
            table.find_or_insert(unique_inverse(ids)[0], s)
        state = {"step": step0}

        def step(i):
            s = state["step"] = state["step"] + 1
            u, inv = unique_inverse(timed[i])
            r = table.find_or_insert(u, s)
            table.gather(r[inv], out=buf)                                # forward (one-hot bags)
            g = segment_sum(d_flat, src_off, dim, inv, len(u))           # pooled backward
            table.apply_gradients(r, g, s)                               # fused update

        goal = GOAL_STEP_ADAGRAD_64 if (kind == "adagrad" and dim == 64) else None
        rec(f"step {kind}", n_ids, common.time_fn(Cycle(step, nb), w, rp), take["ids_per_s"],
            goal, goal_on="rate")
        mem[kind] = table.memory_stats()
        del table
    return records, mem


def bench_cycle(args, rng):
    """find of stored / absent keys at table sizes over one index growth cycle (dim 16)."""
    from hpctrain.sparse.table import EmbeddingTable
    n0, points = args.cycle_rows, args.cycle_points
    sizes = np.unique(np.geomspace(n0, 1.25 * n0, points).astype(np.int64))
    keys = np.unique(rng.integers(0, 2**62, size=int(1.3 * n0)))
    keys = rng.permutation(keys)[:sizes[-1]]
    n_q = args.batch * args.features
    t = EmbeddingTable("cycle", 16, "sgd", capacity=int(sizes[0]))
    out, done = [], 0
    for n in sizes:
        t.find_or_insert(keys[done:n], 0)
        done = n
        hits = [keys[rng.integers(0, n, size=n_q)] for _ in range(4)]
        misses = [rng.integers(2**62, 2**63 - 1, size=n_q) for _ in range(4)]  # never stored
        times = interleaved({"hit": Cycle(lambda i: t.find(hits[i]), 4),
                             "miss": Cycle(lambda i: t.find(misses[i]), 4)},
                            args.warmup, max(4, args.repeat // 3))
        out.append({"rows": int(n), "index_load": t.memory_stats()["index_load"],
                    "find_hit_p50_s": common.stats(times["hit"])["p50"],
                    "find_miss_p50_s": common.stats(times["miss"])["p50"], "ids": n_q})
    return out


def main(argv=None):
    from hpctrain._kernels import _openmp
    from hpctrain.sparse.optimizers import KINDS
    p = common.parser("table", "Embedding table shard: lookups, gather, fused optimizer steps")
    p.add_argument("--batch", type=int, default=4096, help="samples per batch")
    p.add_argument("--features", type=int, default=26, help="one-hot features per sample")
    p.add_argument("--vocab", type=int, default=10**6, help="ids per feature")
    p.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of id popularity")
    p.add_argument("--dims", default="16,64", help="comma-separated row widths")
    p.add_argument("--warm-batches", type=int, default=20, help="batches inserted before timing")
    p.add_argument("--batches", type=int, default=8, help="distinct timed batches (cycled)")
    p.add_argument("--optimizers", default=",".join(KINDS), help="comma-separated kinds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cycle-rows", type=int, default=0,
                   help="also time find over one index growth cycle from this many rows (0: no)")
    p.add_argument("--cycle-points", type=int, default=10, help="table sizes in that cycle")
    args = p.parse_args(argv)
    _openmp.set_num_threads(args.threads or 2)
    comm = common.world()
    rng = np.random.default_rng(args.seed)
    ids = zipf_batches(rng, args.warm_batches + args.batches, args.batch, args.features,
                       args.vocab, args.zipf)
    warm, timed = ids[:args.warm_batches], ids[args.warm_batches:]
    kinds = [k for k in args.optimizers.split(",") if k]
    records, memory = [], {}
    for dim in (int(d) for d in args.dims.split(",")):
        r, m = bench_dim(dim, args, warm, timed, kinds)
        records += r
        memory[dim] = m
    cycle = bench_cycle(args, rng) if args.cycle_rows > 0 else []
    if comm.rank == 0:
        print(f"# table: {args.batch}x{args.features} ids/batch, Zipf({args.zipf}) over "
              f"{args.vocab} ids/feature, {_openmp.get_num_threads()} threads")
        common.print_table(
            ["dim", "operation", "ids", "p50 ms", "M ids/s", "x np.take", "goal", "met"],
            [[r["dim"], r["op"], r["ids"], r["p50_s"] * 1e3, r["ids_per_s"] / 1e6,
              r.get("ratio", ""), _goal(r), {True: "yes", False: "NO"}.get(r.get("met"), "")]
             for r in records])
        print("# memory per stored row (bytes) after the run")
        common.print_table(
            ["dim", "optimizer", "rows", "index load", "bytes/row", "bound", "within"],
            [[d, k, m["rows"], m["index_load"], m["bytes_per_row"], m["bound_bytes_per_row"],
              "yes" if m["bytes_per_row"] <= m["bound_bytes_per_row"] else "NO"]
             for d, mk in memory.items() for k, m in mk.items()])
        if cycle:
            print("# find over one index growth cycle (dim 16): p50 ms per call")
            rows = [[c["rows"], c["index_load"], c["find_hit_p50_s"] * 1e3,
                     c["find_miss_p50_s"] * 1e3] for c in cycle]
            rows.append(["mean", np.mean([c["index_load"] for c in cycle]),
                         np.mean([c["find_hit_p50_s"] for c in cycle]) * 1e3,
                         np.mean([c["find_miss_p50_s"] for c in cycle]) * 1e3])
            common.print_table(["rows", "index load", "find stored", "find absent"], rows)
    common.write_json("table", {
        "config": {k: getattr(args, k) for k in ("batch", "features", "vocab", "zipf", "dims",
                                                 "warm_batches", "batches", "optimizers",
                                                 "warmup", "repeat", "seed", "cycle_rows",
                                                 "cycle_points")},
        "goals": {"lookup_gather_vs_take": GOAL_LOOKUP_VS_TAKE,
                  "step_adagrad_dim64_ids_per_s": GOAL_STEP_ADAGRAD_64},
        "results": records, "memory": memory, "cycle": cycle,
        "peak_rss_bytes": peak_rss_bytes(),
    }, path=args.json, comm=comm)
    return 0


def _goal(r):
    if "goal" not in r:
        return ""
    g = r["goal"]
    return f">= {g:g}x" if g < 100 else f">= {g / 1e6:g} M/s"
