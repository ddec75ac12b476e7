"""Hybrid checkpoints: the servers write what a collective run on S ranks would write.

A hybrid checkpoint of clock K has the collective layout (docs/checkpoint.md), with
the servers in the place of the ranks, so whatever reads checkpoints reads it:
resuming in either mode on any number of ranks, ``hpctrain eval``, ``hpctrain export``::

    step-0000000K/
      tables-0000i-of-0000S.h5  server i: its shard of every table
      dense.h5                  server 0: the dense parameters and optimizer state (the S
                                slices gathered over the servers; with the dense model on
                                the workers, worker 0's copy); /state from worker 0 (reader
                                position after global batch K, config, last losses)
      MANIFEST.json             server 0, once every server's file is written (the commit)

Saving takes no extra coordination round. Every worker knows which clocks are
checkpointed (multiples of ``checkpoint.every_steps``, the last clock, the clock a
stop signal settled on); worker 0, after its PUSH of clock K and before its PUSH of
K + 1, sends CKPT(K) to every server. A server writes when it has applied clock K and
before it applies K + 1 (it cannot have: worker 0's push of K + 1 comes after the
CKPT), i.e. every push of clocks <= K and none later, the BSP state of clock K
whatever the staleness; the servers write together (``CheckpointManager`` over the
servers' communicator) while the workers go on.

Resuming: the workers choose the checkpoint (``latest(strict=True)`` or the path
given), each reads dense.h5 (dense parameters and optimizer, run state, the reader
position: global, since clock c is global batch c, so W and G may differ from the
writer's), and worker 0 sends every server RESTORE(K, path, that server's slice of the
dense parameters and optimizer slots). The servers load the tables from the path with
every row routed by key to its server among the S' of this run.
"""
import numpy as np

from hpctrain.errors import CheckpointError, CommError
from hpctrain.ps import protocol as P
from hpctrain.ps.dense import slice_bounds
from hpctrain.sparse.routing import owner_of


def dense_layout(params):
    """``[[name, offset, shape], ...]`` of a ``FlatParameters``, in layout order."""
    return [[p.name, int(p.offset), list(p.shape)] for p in params.params]


def named_params(flat, layout):
    """Parameter name -> array, cut out of the flat buffer ``flat`` by ``layout``."""
    out = {}
    for name, offset, shape in layout:
        size = int(np.prod(shape, dtype=np.int64))
        if offset + size > flat.shape[0]:
            raise CheckpointError(f"dense parameter {name!r} ends at {offset + size}, the "
                                  f"flat buffer has {flat.shape[0]} values")
        out[name] = np.array(flat[offset:offset + size]).reshape(shape)
    return out


# ---------------------------------------------------------------------- worker 0
def request_checkpoint(p2p, servers, clock, worker, group, state, layout, dense=None):
    """Worker 0: CKPT of ``clock`` to every server; returns the send handles.

    Server 0 gets the run ``state`` (JSON-able), the dense ``layout`` and, when the
    dense model lives on the workers, ``dense = (params, {slot: values}, step)`` (flat
    buffers); the other servers only the clock.
    """
    info = {"state": state, "layout": layout, "slots": []}
    arrays, aux = [], 0
    if dense is not None:
        params, slots, aux = dense
        info["slots"] = list(slots)
        arrays = [params, *slots.values()]
    h = P.header(clock, worker, group, aux=aux)
    return [p2p.send(rank, P.CKPT, h, [P.json_array(info), *arrays] if k == 0 else [])
            for k, rank in enumerate(servers)]


def request_restore(p2p, servers, clock, worker, group, path=None, dense=None):
    """Worker 0: RESTORE to every server; returns the send handles.

    ``clock`` -1 says there is nothing to resume. With ``dense = (params, {slot:
    values}, step)`` (the checkpoint's flat buffers) each server gets its slice.
    """
    slots, aux, bounds = {}, 0, None
    if dense is not None:
        params, slots, aux = dense
        bounds = slice_bounds(params.shape[0], len(servers))
    info = P.json_array({"path": path, "slots": list(slots)})
    h = P.header(clock, worker, group, aux=aux)
    sends = []
    for k, rank in enumerate(servers):
        arrays = [info]
        if bounds is not None:
            lo, hi = bounds[k]
            arrays += [params[lo:hi]] + [s[lo:hi] for s in slots.values()]
        sends.append(p2p.send(rank, P.RESTORE, h, arrays))
    return sends


# ---------------------------------------------------------------------- servers
def _table_ids(server):
    return {s.name: int(s.table_id) for s in server.specs}


def save_server(server, msg):
    """Write the checkpoint of clock ``server.applied`` (collective over the servers).

    Args:
        server: a ``hpctrain.ps.server.Server`` with ``checkpoints`` set.
        msg: worker 0's CKPT of that clock.

    Returns:
        The checkpoint's directory.
    """
    comm = server.roles.role_comm
    info = P.from_json_array(msg.arrays[0]) if server.index == 0 else None
    if server.dense is not None:
        # every server's slice, in server order (the servers' communicator is ordered so)
        params = comm.allgatherv(server.dense.params.data)
        slots = {name: comm.allgatherv(buf) for name, buf in server.dense.opt.state.items()}
        step = server.dense.opt.step_count
    elif info is not None:
        params, step = msg.arrays[1], int(msg.header[P.H_AUX])
        slots = dict(zip(info["slots"], msg.arrays[2:]))
    dense = state = None
    if info is not None:
        dense = {"params": named_params(params, info["layout"]),
                 "optimizer": {"step": np.asarray(step, dtype=np.int64),
                               **{k: np.array(v) for k, v in slots.items()}}}
        state = info["state"]
    tables = {name: t.export() for name, t in server.tables.items()}
    return server.checkpoints.save(server.applied, dense, tables, state,
                                   table_ids=_table_ids(server))


def restore_server(server, msg):
    """Load worker 0's RESTORE on a server (collective over the servers).

    The rows this server owns among the S' of this run are read from every shard
    file (resharded by key); the dense slice and its optimizer slots come with the
    message.

    Returns:
        The checkpoint's path, or None when there is nothing to resume.
    """
    clock = int(msg.header[P.H_CLOCK])
    if clock < 0:
        return None
    info = P.from_json_array(msg.arrays[0])
    path = info["path"]
    if server.checkpoints is None:
        raise CheckpointError(f"server {server.index}: asked to resume from {path} but the "
                              f"config has no [checkpoint] section")
    ids, size = _table_ids(server), server.roles.num_servers

    def owner(name, keys):
        return owner_of(ids[name], keys, size)

    step, _, tables, _ = server.checkpoints.load(
        path, owner=owner, table_dims={s.name: s.dim for s in server.specs},
        verify_files=False)       # worker side just verified it
    if int(step) != clock:
        raise CheckpointError(f"checkpoint {path} holds step {step}, worker 0 resumes at "
                              f"clock {clock}")
    for name, export in tables.items():
        try:
            server.tables[name].import_(export)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: table {name!r}: {exc}") from None
    server._set_clock(clock)
    if server.dense is not None:
        names = info["slots"]
        if len(msg.arrays) != 2 + len(names):
            raise CommError(f"server {server.index}: RESTORE of clock {clock} carries "
                            f"{len(msg.arrays) - 1} dense arrays, expected {1 + len(names)} "
                            f"(parameters and slots {names})")
        server.dense.restore(msg.arrays[1], dict(zip(names, msg.arrays[2:])),
                             int(msg.header[P.H_AUX]))
    return path
