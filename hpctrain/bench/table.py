"""``python -m hpctrain.bench table``: throughput of one embedding table shard.

Workload: batches of ``batch x features`` ids, each feature drawing Zipf(``zipf``) ranks over
its own ``vocab``-id vocabulary (keys ``feature * vocab + id``, all features in one table),
at every row width in ``--dims``. The table is first warmed with ``--warm-batches`` batches.
Two kinds of timed calls:

* *warm*: cycling through ``--batches`` further batches, inserted once before timing, so
  after the first pass every id is stored (the read path, and a step that creates no rows);
* *fresh*: a newly drawn batch for every call (``warmup + repeat`` batches drawn before
  timing, each used once), so each step also inserts the ids it has never seen (cold
  inserts), as in training. Drawing the ids is outside the timed region.

Measured, in ids per second (p50 of ``--repeat`` calls):
  find                  row indices of every id of a batch (warm)
  gather                rows of precomputed indices (warm)
  lookup+gather         find + gather (the forward read path, warm)
  find_or_insert warm   the batch's unique keys, all stored
  find_or_insert fresh  a fresh batch's unique keys, new ones inserted into the growing table
  find_or_insert cold   the batch's unique keys, into a new, empty table
  step <opt> warm|fresh full embedding step: unique ids -> find_or_insert -> gather (one-hot
                        bags) -> pooled backward (segment sum per unique id) -> fused update;
                        one table per optimizer and kind, its steps timed back to back
Baselines in the same run: ``np.take`` of the same rows with precomputed indices and a
preallocated output (the memory-bandwidth ceiling), in its fastest form (``mode="clip"``,
no index checks or buffering) both on one thread and split over the table's thread count
(``np.take`` releases the GIL); the faster of the two is the ceiling the ratios use. And a
Python dict lookup. Goals: lookup+gather >= 0.7x the np.take ceiling; fresh full step at
dim 64 with Adagrad >= 3 M ids/s. Bytes per stored row are reported with their bound
1.25 x (8 + 4 * dim * (1 + slots)) (the float32 bound, also for reduced rows).

``--row-dtypes fp32,fp16,bf16`` compares row dtypes instead: at each dim, one table per
dtype and optimizer, warmed alike, timed interleaved call by call (gather, lookup+gather,
warm steps over the same stored batches; fresh steps with each new batch through every
dtype's table in turn), with ratios against the first dtype. A single dtype
(``--row-dtypes fp16``) runs the usual benchmark on tables of that dtype.

``--cycle-rows N`` adds ``find`` of stored and of absent keys at ``--cycle-points`` table
sizes spread geometrically over [N, 1.25 N], one full growth cycle of the hash index, so that
the probe cost is averaged over the index loads a growing table goes through (a single size
sits at one arbitrary point of the cycle).
"""
import numpy as np

from hpctrain.bench import common
from hpctrain.sparse import rowdtype
from hpctrain.memory import peak_rss_bytes

GOAL_LOOKUP_VS_TAKE = 0.7
GOAL_STEP_ADAGRAD_64 = 3.0e6


class ZipfIds:
    """Batches of ids, feature-major, each feature Zipf(a) over its own ``vocab`` ids.

    A fixed random rank -> id map per feature scatters the hot ids over the key space;
    keys are ``feature * vocab + id``.
    """

    def __init__(self, rng, batch, features, vocab, a):
        ranks = np.arange(1, vocab + 1, dtype=np.float64)
        self.cdf = np.cumsum(ranks ** -a)
        self.cdf /= self.cdf[-1]
        self.perms = np.stack([rng.permutation(vocab) for _ in range(features)])
        self.rng, self.batch, self.features, self.vocab = rng, batch, features, vocab

    def draw(self, n_batches):
        """int64[n_batches, features * batch]."""
        out = np.empty((n_batches, self.features * self.batch), dtype=np.int64)
        offsets = np.arange(self.features)[:, None] * self.vocab
        for b in range(n_batches):
            r = np.minimum(np.searchsorted(self.cdf, self.rng.random((self.features,
                                                                      self.batch))),
                           self.vocab - 1)
            out[b] = (np.take_along_axis(self.perms, r, axis=1) + offsets).ravel()
        return out


def zipf_batches(rng, n_batches, batch, features, vocab, a):
    """int64[n_batches, features * batch] ids, feature-major, Zipf(a) over each vocabulary."""
    return ZipfIds(rng, batch, features, vocab, a).draw(n_batches)


class TakeCeiling:
    """``np.take(values, rows, axis=0, mode="clip", out=buf)``, the fastest NumPy gather,
    split into ``threads`` contiguous parts run by a thread pool (np.take releases the GIL)."""

    def __init__(self, threads):
        from concurrent.futures import ThreadPoolExecutor
        self.threads = max(1, int(threads))
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def __call__(self, values, rows, buf):
        if self.pool is None:
            return np.take(values, rows, axis=0, mode="clip", out=buf)
        n, k = len(rows), self.threads
        cuts = [n * i // k for i in range(k + 1)]
        parts = [self.pool.submit(np.take, values, rows[a:b], 0, buf[a:b], "clip")
                 for a, b in zip(cuts[:-1], cuts[1:])]
        for f in parts:
            f.result()
        return buf

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


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


def fresh_times(batches, fn, warmup, repeat):
    """Seconds per call of ``fn(ids)``, each call on the next unused batch of ``batches``
    (``warmup + repeat`` of them, drawn beforehand: drawing is not timed)."""
    if len(batches) < warmup + repeat:
        raise ValueError(f"{warmup + repeat} fresh batches needed, {len(batches)} drawn")
    for i in range(warmup):
        fn(batches[i])
    out = []
    for i in range(warmup, warmup + repeat):
        ids = batches[i]
        out += common.time_fn(lambda: fn(ids), 0, 1)
    return out


def bench_dim(dim, args, warm, timed, fresh, kinds, threads, row_dtype="fp32"):
    """Rows of the result table (and JSON records) for one row width and row dtype."""
    from hpctrain.sparse.rowdtype import to_float32
    from hpctrain.sparse.table import EmbeddingTable
    unique_inverse, segment_sum = _kernels()
    n_ids = timed.shape[1]
    records = []

    def rec(op, n, times, baseline=None, goal=None, goal_on="ratio"):
        st = common.stats(times)
        r = {"dim": dim, "row_dtype": row_dtype, "op": op, "ids": n, "p50_s": st["p50"],
             "ids_per_s": n / st["p50"], "stats": st}
        if baseline is not None:
            r["ratio"] = r["ids_per_s"] / baseline
        if goal is not None:
            value = r["ratio"] if goal_on == "ratio" else r["ids_per_s"]
            r["goal"], r["met"] = goal, bool(value >= goal)
        records.append(r)
        return r

    t = EmbeddingTable("bench", dim, "adagrad", seed=1, row_dtype=row_dtype)
    for s, ids in enumerate(warm):
        t.find_or_insert(unique_inverse(ids)[0], s)
    step0 = len(warm)
    uniq = [unique_inverse(ids) for ids in timed]
    for i, ids in enumerate(timed):  # so every timed id is stored (find/gather read rows)
        t.find_or_insert(uniq[i][0], step0 + i)
    rows = [t.find(ids) for ids in timed]
    # row r at position r (nothing was evicted); the np.take ceiling reads float32 rows
    values = to_float32(t.export()["values"], row_dtype)
    assert len(values) == t.memory_stats()["rows_ever"]
    buf = np.empty((n_ids, dim), dtype=np.float32)
    nb, w, rp = len(timed), args.warmup, args.repeat
    take1, taken = TakeCeiling(1), TakeCeiling(threads)

    # the read path and its baselines are timed interleaved, call by call, so that they see
    # the same machine load
    lookup = dict(zip(t.export()["keys"].tolist(), range(len(t))))
    lists = [ids.tolist() for ids in timed]
    n_u = int(np.mean([len(u[0]) for u in uniq]))
    take_names = ("np.take clip, 1 thread", f"np.take clip, {threads} threads")
    fns = {take_names[0]: Cycle(lambda i: take1(values, rows[i], buf), nb)}
    if threads > 1:
        fns[take_names[1]] = Cycle(lambda i: taken(values, rows[i], buf), nb)
    times = interleaved({
        **fns,
        "find": Cycle(lambda i: t.find(timed[i]), nb),
        "gather": Cycle(lambda i: t.gather(rows[i], out=buf), nb),
        "lookup+gather": Cycle(lambda i: t.gather(t.find(timed[i]), out=buf), nb),
        "find_or_insert warm": Cycle(lambda i: t.find_or_insert(uniq[i][0], step0 + nb), nb),
    }, w, rp)
    take1.close()
    taken.close()
    takes = [rec(name, n_ids, times[name]) for name in take_names if name in times]
    ceiling = max(r["ids_per_s"] for r in takes)   # the faster form is the ceiling
    for r in takes:
        r["ratio"] = r["ids_per_s"] / ceiling
        r["ceiling"] = r["ids_per_s"] == ceiling
    rec("python dict (baseline)", n_ids, common.time_fn(
        Cycle(lambda i: np.fromiter((lookup.get(k, -1) for k in lists[i]), np.int64, n_ids), nb),
        1, max(2, rp // 5)), ceiling)
    for op in ("find", "gather"):
        rec(op, n_ids, times[op], ceiling)
    rec("lookup+gather", n_ids, times["lookup+gather"], ceiling, GOAL_LOOKUP_VS_TAKE)
    rec("find_or_insert warm", n_u, times["find_or_insert warm"])
    fresh_u = [unique_inverse(ids)[0] for ids in fresh]
    rec("find_or_insert fresh", int(np.mean([len(u) for u in fresh_u[w:]])), fresh_times(
        fresh_u, lambda u: t.find_or_insert(u, step0 + nb), w, rp))
    rec("find_or_insert cold", n_u, common.time_fn(
        Cycle(lambda i: EmbeddingTable("cold", dim, "adagrad", row_dtype=row_dtype)
              .find_or_insert(uniq[i][0], 0), nb),
        w, rp))
    mem = {"adagrad": t.memory_stats()}
    del t, values, lookup, lists

    src_off = np.arange(n_ids, dtype=np.int64) * dim
    d_out = np.random.default_rng(dim).standard_normal((n_ids, dim)).astype(np.float32) * 1e-3
    d_flat = d_out.ravel()
    # per optimizer, one warm table whose steps cycle over stored batches and one whose
    # steps each take a fresh batch (new ids inserted), timed back to back as in training
    for kind in kinds:
        for mode in ("warm", "fresh"):
            table = EmbeddingTable("bench", dim, kind, seed=1, row_dtype=row_dtype)
            for s, ids in enumerate(warm):
                table.find_or_insert(unique_inverse(ids)[0], s)
            state = {"step": step0}

            def step(ids):
                s = state["step"] = state["step"] + 1
                u, inv = unique_inverse(ids)
                r = table.find_or_insert(u, s)
                table.gather(r[inv], out=buf)                            # forward (one-hot bags)
                g = segment_sum(d_flat, src_off, dim, inv, len(u))       # pooled backward
                table.apply_gradients(r, g, s, keys=u)                   # fused update

            goal = (GOAL_STEP_ADAGRAD_64 if (kind == "adagrad" and dim == 64 and mode == "fresh"
                                             and row_dtype == "fp32") else None)
            times = (common.time_fn(Cycle(lambda i: step(timed[i]), nb), w, rp)
                     if mode == "warm" else fresh_times(fresh, step, w, rp))
            rec(f"step {kind} {mode}", n_ids, times, ceiling, goal, goal_on="rate")
            mem[kind] = table.memory_stats()
            del table
    return records, mem


def bench_row_dtypes(dim, args, warm, timed, fresh, kinds, dtypes):
    """The row dtypes against each other, call by call, one optimizer at a time: a table
    per dtype, warmed alike; gather and lookup+gather (first optimizer's tables) and warm
    steps cycle over the same stored batches, fresh steps give every dtype's table the same
    new batch in turn. Ratios are against the first dtype (fp32), timed interleaved with it,
    so machine load affects all alike."""
    from hpctrain.sparse.table import EmbeddingTable
    unique_inverse, segment_sum = _kernels()
    n_ids, nb, w, rp = timed.shape[1], len(timed), args.warmup, args.repeat
    uniq = [unique_inverse(ids) for ids in timed]
    src_off = np.arange(n_ids, dtype=np.int64) * dim
    d_flat = (np.random.default_rng(dim).standard_normal((n_ids, dim)).astype(np.float32)
              * 1e-3).ravel()
    buf = np.empty((n_ids, dim), dtype=np.float32)
    times, mem = {}, {}
    for kind in kinds:
        tables, steps, fns = {}, {}, {}
        for dt in dtypes:
            t = tables[dt] = EmbeddingTable("bench", dim, kind, seed=1, row_dtype=dt)
            for s, ids in enumerate(warm):
                t.find_or_insert(unique_inverse(ids)[0], s)
            for i, (u, _) in enumerate(uniq):
                t.find_or_insert(u, len(warm) + i)
            clock = {"step": len(warm) + nb}

            def step(ids, t=t, clock=clock):
                s = clock["step"] = clock["step"] + 1
                u, inv = unique_inverse(ids)
                r = t.find_or_insert(u, s)
                t.gather(r[inv], out=buf)
                t.apply_gradients(r, segment_sum(d_flat, src_off, dim, inv, len(u)), s, keys=u)
            steps[dt] = step
            if kind == kinds[0]:
                rows = [t.find(ids) for ids in timed]
                fns[dt, "gather"] = Cycle(lambda i, t=t, rows=rows: t.gather(rows[i], out=buf),
                                          nb)
                fns[dt, "lookup+gather"] = Cycle(
                    lambda i, t=t: t.gather(t.find(timed[i]), out=buf), nb)
            fns[dt, f"step {kind} warm"] = Cycle(lambda i, f=step: f(timed[i]), nb)
        times.update(interleaved(fns, w, rp))
        for dt in dtypes:   # fresh: each new batch through every dtype's table in turn
            times[dt, f"step {kind} fresh"] = []
        for i in range(w + rp):
            for dt in dtypes:
                t_ = common.time_fn(lambda: steps[dt](fresh[i]), 0, 1)
                if i >= w:
                    times[dt, f"step {kind} fresh"] += t_
        mem.update({f"{dt} {kind}": tables[dt].memory_stats() for dt in dtypes})
        del tables, steps, fns
    out = []
    ops = ["gather", "lookup+gather"] + [f"step {k} {m}" for k in kinds for m in ("warm", "fresh")]
    for op in ops:
        base = common.stats(times[dtypes[0], op])["p50"]
        for dt in dtypes:
            st = common.stats(times[dt, op])
            out.append({"dim": dim, "row_dtype": dt, "op": op, "ids": n_ids, "p50_s": st["p50"],
                        "ids_per_s": n_ids / st["p50"], "vs_first": base / st["p50"],
                        "stats": st})
    return out, mem


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
    p.add_argument("--row-dtypes", default="fp32",
                   help="comma-separated row dtypes (fp32, fp16, bf16), each timed per dim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cycle-rows", type=int, default=0,
                   help="also time find over one index growth cycle from this many rows (0: no)")
    p.add_argument("--cycle-points", type=int, default=10, help="table sizes in that cycle")
    args = p.parse_args(argv)
    _openmp.set_num_threads(args.threads or 2)
    threads = _openmp.get_num_threads()
    comm = common.world()
    rng = np.random.default_rng(args.seed)
    zipf = ZipfIds(rng, args.batch, args.features, args.vocab, args.zipf)
    ids = zipf.draw(args.warm_batches + args.batches)
    warm, timed = ids[:args.warm_batches], ids[args.warm_batches:]
    kinds = [k for k in args.optimizers.split(",") if k]
    records, memory, versus = [], {}, []
    dtypes = [rowdtype.check(d, "--row-dtypes") for d in args.row_dtypes.split(",") if d]
    for dim in (int(d) for d in args.dims.split(",")):
        if len(dtypes) > 1:   # the dtypes against each other, interleaved
            fresh = zipf.draw(args.warmup + args.repeat)
            r, m = bench_row_dtypes(dim, args, warm, timed, fresh, kinds, dtypes)
            versus += r
            memory[f"{dim} by row dtype"] = m
            continue
        fresh = zipf.draw(args.warmup + args.repeat)   # never stored before the timed calls
        r, m = bench_dim(dim, args, warm, timed, fresh, kinds, threads, dtypes[0])
        records += r
        memory[dim if dtypes[0] == "fp32" else f"{dim} {dtypes[0]}"] = m
    cycle = bench_cycle(args, rng) if args.cycle_rows > 0 else []
    if comm.rank == 0:
        print(f"# table: {args.batch}x{args.features} ids/batch, Zipf({args.zipf}) over "
              f"{args.vocab} ids/feature, {threads} threads; x np.take: against the faster "
              f"np.take row (the ceiling)")
        if versus:
            print(f"# row dtypes, timed interleaved call by call; x {dtypes[0]}: speed against "
                  f"the {dtypes[0]} table's (> 1: faster)")
            common.print_table(
                ["dim", "rows", "operation", "ids", "p50 ms", "M ids/s", f"x {dtypes[0]}"],
                [[r["dim"], r["row_dtype"], r["op"], r["ids"], r["p50_s"] * 1e3,
                  r["ids_per_s"] / 1e6, r["vs_first"]] for r in versus])
        if records:
            common.print_table(
                ["dim", "rows", "operation", "ids", "p50 ms", "M ids/s", "x np.take", "goal",
                 "met"],
                [[r["dim"], r["row_dtype"], r["op"], r["ids"], r["p50_s"] * 1e3,
                  r["ids_per_s"] / 1e6, r.get("ratio", ""), _goal(r),
                  {True: "yes", False: "NO"}.get(r.get("met"), "")] for r in records])
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
                                                 "row_dtypes",
                                                 "warmup", "repeat", "seed", "cycle_rows",
                                                 "cycle_points")},
        "threads": threads,
        "goals": {"lookup_gather_vs_take": GOAL_LOOKUP_VS_TAKE,
                  "step_adagrad_fresh_dim64_ids_per_s": GOAL_STEP_ADAGRAD_64},
        "results": records, "row_dtypes": versus, "memory": memory, "cycle": cycle,
        "peak_rss_bytes": peak_rss_bytes(),
    }, path=args.json, comm=comm)
    return 0


def _goal(r):
    if "goal" not in r:
        return ""
    g = r["goal"]
    return f">= {g:g}x" if g < 100 else f">= {g / 1e6:g} M/s"
