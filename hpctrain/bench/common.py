"""Shared benchmark plumbing: timing between barriers, percentiles, tables, JSON.

Every benchmark measures its baseline in the same run and reports ratios, so the
figures hold on a noisy, oversubscribed machine.
"""
import argparse
import json
import os
import socket
import sys
import time

import numpy as np

from hpctrain.versions import versions


def world():
    """The MPI world communicator (mpi4py), imported lazily."""
    from mpi4py import MPI
    return MPI.COMM_WORLD


def parser(name, description):
    """An ArgumentParser with the options every benchmark takes."""
    p = argparse.ArgumentParser(prog=f"python -m hpctrain.bench {name}", description=description)
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    p.add_argument("--repeat", type=int, default=10, help="timed repetitions")
    p.add_argument("--json", default=None,
                   help="output JSON path (default bench-results/NAME-<nranks>.json)")
    p.add_argument("--threads", type=int, default=None, help="OpenMP threads per rank")
    return p


def time_fn(fn, warmup=3, repeat=10, comm=None):
    """Seconds per call of ``fn()`` for each timed repetition (max over ranks, between barriers)."""
    from mpi4py import MPI
    comm = comm if comm is not None else world()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        comm.Barrier()
        t0 = MPI.Wtime()
        fn()
        dt = MPI.Wtime() - t0
        times.append(comm.allreduce(dt, op=MPI.MAX))
    return times


def stats(times):
    """p50/p90/min/mean of a list of seconds."""
    a = np.asarray(times, dtype=np.float64)
    return {"p50": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "mean": float(a.mean()), "n": int(a.size)}


def layout(comm=None):
    """World size, node count and ranks per node; machines and ranks per machine.

    A node is a host name; a machine is a running kernel (its boot id). They differ only
    when nodes are emulated on one machine (benchmarks/multihost/): the nodes then share
    the machine's cores and memory, which ``ranks_per_machine`` lets a reader account for.
    """
    comm = comm if comm is not None else world()
    hosts = comm.allgather(socket.gethostname())
    boots = comm.allgather(_boot_id())
    return {"world_size": comm.size, "nodes": len(set(hosts)),
            "ranks_per_node": max(hosts.count(h) for h in set(hosts)),
            "machines": len(set(boots)),
            "ranks_per_machine": max(boots.count(b) for b in set(boots))}


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:           # not Linux: every node its own machine
        return socket.gethostname()


def print_table(headers, rows, file=None):
    """Print an OSU-style fixed-width table."""
    file = file or sys.stdout
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)), file=file)
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)), file=file)
    file.flush()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return "-" if v is None else str(v)


def write_json(name, payload, path=None, comm=None):
    """Write ``payload`` (plus versions, layout, date) as JSON on rank 0; return the path."""
    comm = comm if comm is not None else world()
    info = layout(comm)
    if comm.rank != 0:
        return None
    path = path or os.path.join("bench-results", f"{name}-{info['world_size']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "versions": versions(), **info, **payload}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=_jsonable)
    print(f"wrote {path}")
    return path


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
