"""Alltoallv: hpctrain's communicator against raw mpi4py on the same buffers.

    mpiexec -n 2 python -m mpi4py -m hpctrain.bench alltoallv --max-bytes 16M

The size is the message each rank sends to *each* peer (OSU alltoall
convention), made of float32 rows of ``--dim`` columns like embedding rows.
Raw mpi4py gets precomputed element counts and displacements
(``Alltoallv([buf, (counts, displs), MPI.FLOAT], ...)``); hpctrain gets counts in
rows, as its callers pass them, and a preallocated receive buffer. Bus bandwidth
follows nccl-tests/OSU: ``busbw = (n * size) / t * (n - 1) / n``.
"""
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
        recv = np.empty((int(recv_counts.sum()), args.dim), dtype=np.float32)
        sc, sd = element_counts(counts, args.dim)
        rc, rd = element_counts(recv_counts, args.dim)
        raw_args = ([send, (sc, sd), MPI.FLOAT], [recv, (rc, rd), MPI.FLOAT])
        if args.nonblocking:
            def raw():
                comm.Ialltoallv(*raw_args).Wait()

            def ours():
                hc.ialltoallv(send, counts, recv_counts, recv).wait()
        else:
            def raw():
                comm.Alltoallv(*raw_args)

            def ours():
                hc.alltoallv(send, counts, recv_counts, recv)
        s_raw, s_ours = compare(raw, ours, args, comm)
        sent = per_peer * row_bytes * n  # the nominal bytes of one rank's send
        rows.append({"bytes": per_peer * row_bytes, "raw": s_raw, "hpctrain": s_ours,
                     "raw_busbw_GBps": sent / s_raw["p50"] * (n - 1) / n / 1e9,
                     "busbw_GBps": sent / s_ours["p50"] * (n - 1) / n / 1e9,
                     "ratio": s_raw["p50"] / s_ours["p50"],
                     "ratio_min": s_raw["min"] / s_ours["min"]})
    summary = summarize(rows, GOAL, n)
    if comm.rank == 0:
        print(f"# hpctrain alltoallv (float32 rows of {args.dim}, "
              f"{'uneven' if args.uneven else 'even'}, "
              f"{'non-blocking' if args.nonblocking else 'blocking'}) vs raw mpi4py, {n} ranks; "
              f"size per peer, busbw = n*size/t * (n-1)/n")
        print_rows(rows, summary, GOAL)
    common.write_json("alltoallv", {"dim": args.dim, "uneven": args.uneven,
                                    "nonblocking": args.nonblocking, "rows": rows,
                                    "summary": summary, "peak_rss_bytes": peak_rss_bytes()},
                      path=args.json, comm=comm)
    return 0
