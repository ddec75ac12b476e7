"""Hybrid delta exports: the servers write the deltas a collective run on S ranks would write.

With an ``[online]`` section the rows live on the servers, so the servers write the
deltas (``hpctrain.checkpoint.delta.write_delta`` over the servers' communicator, the
servers in the place of the ranks)::

    delta-0000000K/
      sparse-0000i-of-0000S.h5   server i: the rows of its shard updated after ``since``
                                 and the keys it evicted since its previous delta
      dense.h5                   (every dense_every-th delta, and those of checkpoints and
                                 the end) server 0: the dense parameters, the S slices
                                 gathered over the servers, or worker 0's copy with
                                 ``ps.dense_on_servers = false``
      DONE                       server 0, once every server's file is written (the commit)

so ``hpctrain serve-sync`` and ``DeltaApplier`` apply them unchanged.

Which clocks get a delta is decided on the workers, as in collective mode
(``hpctrain.train.online``: every ``delta_every_steps``, every checkpoint, the end), and
it takes no extra coordination round: worker 0, after its PUSH of clock K and before its
PUSH of K + 1, sends DELTA(K) to every server, and a server writes when it has applied
clock K and before it applies K + 1 -- the BSP state of clock K whatever the staleness,
exactly as a checkpoint of K (``hpctrain.ps.checkpoint``). A server acts on the CKPT and
DELTA requests of one clock in the order they arrived, which is worker 0's sending order
on every server, so the servers' collectives always match.
"""
import time

import numpy as np

from hpctrain.errors import CheckpointError, CommError
from hpctrain.ps import protocol as P
from hpctrain.ps.checkpoint import named_params


# ---------------------------------------------------------------------- worker 0
def request_delta(p2p, servers, clock, worker, group, since, dense=None):
    """Worker 0: DELTA of ``clock`` (continuing from step ``since``) to every server.

    Args:
        dense: None for a delta without dense weights, else ``(layout, config text,
            params)``: the dense layout (``checkpoint.dense_layout``), the run's config
            (kept in ``DONE`` as the collective trainer keeps it) and worker 0's flat
            parameters when the dense model lives on the workers (None when the servers
            hold it). Only server 0 gets them.

    Returns:
        The send handles.
    """
    info = {"since": int(since), "dense": dense is not None}
    first, arrays = info, []
    if dense is not None:
        layout, config, params = dense
        first = dict(info, layout=layout, config=config)
        arrays = [] if params is None else [np.ascontiguousarray(params, dtype=np.float32)]
    h = P.header(clock, worker, group)
    return [p2p.send(rank, P.DELTA, h,
                     [P.json_array(first), *arrays] if k == 0 else [P.json_array(info)])
            for k, rank in enumerate(servers)]


# ---------------------------------------------------------------------- servers
def write_server_delta(server, msg):
    """Write the delta of clock ``server.applied`` (collective over the servers).

    Args:
        server: a ``hpctrain.ps.server.Server`` with ``online`` set (its tables track
            evictions).
        msg: worker 0's DELTA of that clock.

    Returns:
        ``(path, rows, tombstones, seconds)`` of this server's part.
    """
    t0 = time.perf_counter()
    clock = server.applied
    if server.online is None:
        raise CheckpointError(f"server {server.index}: DELTA of clock {clock} from rank "
                              f"{msg.source} but this server has no [online] section")
    from hpctrain.checkpoint.delta import write_delta
    comm = server.roles.role_comm
    info = P.from_json_array(msg.arrays[0])
    since = int(info["since"])
    dense = extra = None
    if info["dense"]:
        if server.dense is not None:
            params = comm.allgatherv(server.dense.params.data)   # every slice, server order
        elif server.index == 0:
            if len(msg.arrays) != 2:
                raise CommError(f"server 0: DELTA of clock {clock} with dense weights carries "
                                f"{len(msg.arrays) - 1} arrays, expected worker 0's parameters")
            params = msg.arrays[1]
        if server.index == 0:
            dense = {"params": named_params(params, info["layout"])}
            extra = {"config": info["config"]}
    tables = {name: t.export_delta(since) for name, t in server.tables.items()}
    path = write_delta(server.online.directory, clock, since, tables, comm, dense,
                       keep_last=server.online.keep_last, info=extra)
    rows = sum(int(x["keys"].shape[0]) for x in tables.values())
    gone = sum(int(x["tombstones"].shape[0]) for x in tables.values())
    return path, rows, gone, time.perf_counter() - t0
