"""Allreduce: hpctrain's communicator against raw mpi4py on the same buffers.

    mpiexec -n 2 python -m mpi4py -m hpctrain.bench allreduce --max-bytes 16M

For every message size (bytes of the buffer) it times ``comm.allreduce(buf)``
and ``MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf)`` in alternating rounds, and
prints an OSU-style table: p50 latency and bus bandwidth, where (nccl-tests /
OSU convention) ``busbw = size / t * 2 (n - 1) / n`` for a ring allreduce of n
ranks, and the ratio hpctrain/raw of bus bandwidth (= raw time / hpctrain time).
"""
import numpy as np

from hpctrain.bench import common
from hpctrain.memory import peak_rss_bytes

GOAL = 0.95          # hpctrain busbw / raw mpi4py busbw, for sizes >= GOAL_FROM bytes
GOAL_FROM = 1 << 20


def parse_size(text):
    """'4096', '64K', '16M', '1G' -> bytes."""
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def sizes(lo, hi):
    """Powers of two from ``lo`` to ``hi`` bytes."""
    out, s = [], max(1, lo)
    while s <= hi:
        out.append(s)
        s *= 2
    return out


def compare(raw, ours, args, comm):
    """Time raw and hpctrain calls interleaved one by one (alternating which goes first),
    so both see the same machine noise; returns (raw stats, hpctrain stats)."""
    common.time_fn(raw, warmup=args.warmup, repeat=0, comm=comm)
    common.time_fn(ours, warmup=args.warmup, repeat=0, comm=comm)
    t_raw, t_ours = [], []
    for i in range(args.rounds * args.repeat):
        first, second = ((raw, t_raw), (ours, t_ours))[::1 if i % 2 == 0 else -1]
        for fn, out in (first, second):
            out += common.time_fn(fn, warmup=0, repeat=1, comm=comm)
    return common.stats(t_raw), common.stats(t_ours)


def summarize(rows, goal, nranks):
    """Ratios over sizes >= GOAL_FROM and whether the goal is met: the median over those
    sizes of the p50 ratio must reach ``goal`` (None when there is nothing to judge, e.g.
    one rank). ``ratio_min`` (fastest call of each) is reported beside it: on a shared,
    oversubscribed machine it shows the library's own overhead best."""
    big = [r for r in rows if r["bytes"] >= GOAL_FROM]
    if not big or nranks < 2:
        return {"goal": goal, "goal_from_bytes": GOAL_FROM, "met": None}
    p50 = [r["ratio"] for r in big]
    best = [r["ratio_min"] for r in big]
    return {"goal": goal, "goal_from_bytes": GOAL_FROM, "min_ratio": min(p50),
            "median_ratio": float(np.median(p50)), "median_ratio_min": float(np.median(best)),
            "met": bool(np.median(p50) >= goal)}


def print_rows(rows, summary, goal):
    """The OSU-style table of one sweep and its verdict against ``goal`` (rank 0)."""
    common.print_table(
        ["size(B)", "lat_us", "raw_lat_us", "busbw_GB/s", "raw_busbw_GB/s", "ratio",
         "ratio_min"],
        [[r["bytes"], r["hpctrain"]["p50"] * 1e6, r["raw"]["p50"] * 1e6, r["busbw_GBps"],
          r["raw_busbw_GBps"], r["ratio"], r["ratio_min"]] for r in rows])
    if summary["met"] is not None:
        print(f"# goal: median p50 ratio >= {goal} over sizes >= 1 MiB: "
              f"{summary['median_ratio']:.3f} (worst size {summary['min_ratio']:.3f}; "
              f"median ratio_min {summary['median_ratio_min']:.3f}) -> "
              f"{'met' if summary['met'] else 'NOT met'}")


def add_size_args(p, default_max):
    p.add_argument("--min-bytes", type=parse_size, default=8)
    p.add_argument("--max-bytes", type=parse_size, default=parse_size(default_max))
    p.add_argument("--rounds", type=int, default=3,
                   help="timings per implementation = rounds x repeat, raw and hpctrain interleaved")


def main(argv=None):
    p = common.parser("allreduce", __doc__.splitlines()[0])
    add_size_args(p, "16M")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "int64"])
    p.add_argument("--op", default="sum", choices=["sum", "mean"])
    p.add_argument("--nonblocking", action="store_true", help="time iallreduce().wait()")
    args = p.parse_args(argv)
    from mpi4py import MPI

    from hpctrain.comm import create_communicator
    comm = common.world()
    hc = create_communicator("mpi", debug=False)
    n, dtype = comm.size, np.dtype(args.dtype)
    factor = 2 * (n - 1) / n
    rows = []
    for nbytes in sizes(args.min_bytes, args.max_bytes):
        if nbytes < dtype.itemsize:
            continue
        buf = np.zeros(nbytes // dtype.itemsize, dtype=dtype)  # zeros: sums stay finite
        if args.nonblocking:
            def raw():
                comm.Iallreduce(MPI.IN_PLACE, buf, MPI.SUM).Wait()

            def ours():
                hc.iallreduce(buf, args.op).wait()
        else:
            def raw():
                comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)

            def ours():
                hc.allreduce(buf, args.op)
        s_raw, s_ours = compare(raw, ours, args, comm)
        rows.append({"bytes": buf.nbytes, "raw": s_raw, "hpctrain": s_ours,
                     "raw_busbw_GBps": buf.nbytes / s_raw["p50"] * factor / 1e9,
                     "busbw_GBps": buf.nbytes / s_ours["p50"] * factor / 1e9,
                     "ratio": s_raw["p50"] / s_ours["p50"],
                     "ratio_min": s_raw["min"] / s_ours["min"]})
    summary = summarize(rows, GOAL, n)
    direct = getattr(hc, "_direct", None) is not None
    if comm.rank == 0:
        mode = "non-blocking" if args.nonblocking else "blocking"
        print(f"# hpctrain allreduce ({args.op}, {dtype}, {mode}) vs raw mpi4py, {n} ranks; "
              "busbw = size/t * 2(n-1)/n")
        print(f"# direct MPI_Allreduce calls (hpctrain.comm.direct): "
              f"{'on' if direct else 'off'}")
        print_rows(rows, summary, GOAL)
    common.write_json("allreduce", {"dtype": str(dtype), "op": args.op,
                                    "nonblocking": args.nonblocking, "busbw_factor": factor,
                                    "direct_mpi": direct,
                                    "rows": rows, "summary": summary,
                                    "peak_rss_bytes": peak_rss_bytes()},
                      path=args.json, comm=comm)
    return 0
