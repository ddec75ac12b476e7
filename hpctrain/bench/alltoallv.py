"""Alltoallv: hpctrain's communicator against raw mpi4py on the same buffers.

    mpiexec -n 2 python -m mpi4py -m hpctrain.bench alltoallv --max-bytes 16M

The size is the message each rank sends to *each* peer (OSU alltoall
convention), made of float32 rows of ``--dim`` columns like embedding rows.
Raw mpi4py gets precomputed element counts and displacements
(``Alltoallv([buf, (counts, displs), MPI.FLOAT], ...)``); hpctrain gets counts in
rows, as its callers pass them, and a preallocated receive buffer. Bus bandwidth
follows nccl-tests/OSU: ``busbw = (n * size) / t * (n - 1) / n``. ``--fresh-args``: both sides'
calls alternate between two send buffers of the same rows, so no hpctrain call repeats the
previous one's arguments, as in a training step, whose counts follow the data (raw mpi4py
keeps precomputed arguments for each buffer).
"""
import itertools

import numpy as np

from hpctrain.bench import common
from hpctrain.bench.allreduce import add_size_args, compare, print_rows, sizes, summarize
from hpctrain.memory import peak_rss_bytes

GOAL = 0.9


def main(argv=None):
    p = common.parser("alltoallv", __doc__.splitlines()[0])
    add_size_args(p, "16M")
    p.add_argument("--dim", type=int, default=16, help="float32 columns per row")
    p.add_argument("--uneven", action="store_true",
                   help="peer p gets (p + 1) / mean share of the rows, rank-rotated")
    p.add_argument("--nonblocking", action="store_true", help="time ialltoallv().wait()")
    p.add_argument("--fresh-args", action="store_true",
                   help="alternate two send buffers: no hpctrain call repeats the last one")
    args = p.parse_args(argv)
    from mpi4py import MPI

    from hpctrain.comm import create_communicator
    from hpctrain.comm.mpi import element_counts
    comm = common.world()
    hc = create_communicator("mpi", debug=False)
    n, row_bytes = comm.size, 4 * args.dim
    rows = []
    for nbytes in sizes(max(args.min_bytes, row_bytes), args.max_bytes):
        per_peer = nbytes // row_bytes
        if args.uneven:
            weights = (np.arange(n) + comm.rank) % n + 1.0
            counts = np.floor(per_peer * weights / weights.mean()).astype(np.int64)
        else:
            counts = np.full(n, per_peer, dtype=np.int64)
        recv_counts = hc.alltoall(counts)
        send = np.zeros((int(counts.sum()), args.dim), dtype=np.float32)
        sends = [send, send.copy()] if args.fresh_args else [send]
        recv = np.empty((int(recv_counts.sum()), args.dim), dtype=np.float32)
        sc, sd = element_counts(counts, args.dim)
        rc, rd = element_counts(recv_counts, args.dim)
        # both sides take the send buffers in turn (one buffer unless --fresh-args)
        raw_args = itertools.cycle([([b, (sc, sd), MPI.FLOAT], [recv, (rc, rd), MPI.FLOAT])
                                    for b in sends])
        our_send = itertools.cycle(sends)
        if args.nonblocking:
            def raw():
                comm.Ialltoallv(*next(raw_args)).Wait()

            def ours():
                hc.ialltoallv(next(our_send), counts, recv_counts, recv).wait()
        else:
            def raw():
                comm.Alltoallv(*next(raw_args))

            def ours():
                hc.alltoallv(next(our_send), counts, recv_counts, recv)
        s_raw, s_ours = compare(raw, ours, args, comm)
        sent = per_peer * row_bytes * n  # the nominal bytes of one rank's send
        rows.append({"bytes": per_peer * row_bytes, "raw": s_raw, "hpctrain": s_ours,
                     "raw_busbw_GBps": sent / s_raw["p50"] * (n - 1) / n / 1e9,
                     "busbw_GBps": sent / s_ours["p50"] * (n - 1) / n / 1e9,
                     "ratio": s_raw["p50"] / s_ours["p50"],
                     "ratio_min": s_raw["min"] / s_ours["min"]})
    summary = summarize(rows, GOAL, n)
    direct = getattr(hc, "_direct_a2av", None) is not None
    if comm.rank == 0:
        print(f"# hpctrain alltoallv (float32 rows of {args.dim}, "
              f"{'uneven' if args.uneven else 'even'}, "
              f"{'non-blocking' if args.nonblocking else 'blocking'}"
              f"{', fresh arguments every call' if args.fresh_args else ''}) vs raw mpi4py, "
              f"{n} ranks; size per peer, busbw = n*size/t * (n-1)/n")
        print(f"# direct MPI_Alltoallv calls (hpctrain.comm.direct): "
              f"{'on' if direct else 'off'}")
        print_rows(rows, summary, GOAL)
    common.write_json("alltoallv", {"dim": args.dim, "uneven": args.uneven,
                                    "nonblocking": args.nonblocking,
                                    "fresh_args": args.fresh_args, "direct_mpi": direct,
                                    "rows": rows,
                                    "summary": summary, "peak_rss_bytes": peak_rss_bytes()},
                      path=args.json, comm=comm)
    return 0
