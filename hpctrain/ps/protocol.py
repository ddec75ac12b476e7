"""Messages between workers and parameter servers: kinds (MPI tags) and the int64 header.

Every message is an int64 header plus arrays (``hpctrain.comm.p2p``); its kind is
the tag. Clocks travel in headers, never in tags (a tag only has to reach 32767)::

    header  [clock, worker, group, aux, stop, n_0, ..., n_{T-1}]
            clock   the training step the message belongs to (1, 2, ...)
            worker  sender's worker index (-1 from servers)
            group   sender's group (-1 from servers)
            aux     replies: ``applied`` (clocks the server has applied);
                    DPULL: FRESH asks for every clock up to ``clock`` (evaluation);
                    CKPT, RESTORE: the dense optimizer's step count; STOP: the signal
            stop    replies of server 0: the clock every worker stops at after a stop
                    signal (0: none decided); see "Stopping" below
            n_t     ids of table t in the message (table-major id / row arrays)

    kind    from -> to        arrays                        answered
    PULL    worker -> server  ids int64                     ROWS when applied >= clock - 1 - s
    ROWS    server -> worker  rows float32 (flat)
    PUSH    worker -> server  ids int64, grads float32      -- (every clock, even with no ids)
    EVAL    worker -> server  ids int64                     EROWS when applied >= clock
    EROWS   server -> worker  rows float32
    DINIT   worker 0 -> srv   dense slice float32           -- (initial dense values)
    DPUSH   leader -> server  dense gradient slice float32  -- (every clock)
    DPULL   leader -> server  (none)                        DROWS when applied >= clock - 1 - s
                                                            (aux FRESH: when applied >= clock)
    DROWS   server -> leader  dense slice float32
    DONE    worker -> server  (none)                        -- (the worker has finished)
    CKPT    worker 0 -> srv   to server 0: run state (JSON) -- (write the checkpoint of
                              [+ dense params, slots]          ``clock`` once it is applied)
    RESTORE worker 0 -> srv   path (JSON) [+ this server's  -- (the first message of a
                              slice of params, slots]          resumed run; clock -1: none)
    STOP    any -> server 0   (none)                        -- (a stop signal arrived there)
    DELTA   worker 0 -> srv   since, dense? (JSON) [+ to    -- (write the delta of ``clock``
                              server 0 with dense on the       once it is applied;
                              workers: worker 0's params]      ``hpctrain.ps.delta``)

Rows and gradients of a message are the ids' rows back to back, table-major,
each ``dim_t`` floats wide, in the order of the ids.

Stopping (SIGTERM/SIGUSR1): a signalled rank sends STOP to server 0 (server 0 itself
decides at once). Server 0 picks ``K = 1 +`` the highest clock whose PULL it has
answered (no worker can have started clock K: every worker needs server 0's ROWS of
K first) and writes K into ``stop`` of every reply from then on, so every worker
learns K with its rows of clock K, trains clock K and stops after it (worker 0 asks
for the checkpoint of K with CKPT when checkpoints are configured).
"""
import numpy as np

PULL, ROWS, PUSH, EVAL, EROWS, DINIT, DPUSH, DPULL, DROWS, DONE, CKPT, RESTORE, STOP, DELTA = \
    range(1, 15)

NAMES = {PULL: "PULL", ROWS: "ROWS", PUSH: "PUSH", EVAL: "EVAL", EROWS: "EROWS",
         DINIT: "DINIT", DPUSH: "DPUSH", DPULL: "DPULL", DROWS: "DROWS", DONE: "DONE",
         CKPT: "CKPT", RESTORE: "RESTORE", STOP: "STOP", DELTA: "DELTA"}

H_CLOCK, H_WORKER, H_GROUP, H_AUX, H_STOP, H_COUNTS = range(6)

#: ``aux`` of a DPULL that must see every clock up to its own (evaluation reads).
FRESH = 1

#: Workers wait this much longer than ``ps.timeout_s`` for a server's answer: when a
#: worker hangs, the server (which knows whose push it waits for) reports it first.
WORKER_WAIT = 1.1


def header(clock, worker=-1, group=-1, aux=0, counts=(), stop=0):
    """The int64 header of a message (see the module docstring)."""
    h = np.empty(H_COUNTS + len(counts), dtype=np.int64)
    h[H_CLOCK], h[H_WORKER], h[H_GROUP], h[H_AUX] = clock, worker, group, aux
    h[H_STOP] = stop
    h[H_COUNTS:] = counts
    return h


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-able")


def json_array(obj):
    """uint8 array of ``obj`` as UTF-8 JSON (run state and paths travel this way)."""
    import json
    return np.frombuffer(json.dumps(obj, default=_json_default).encode("utf-8"),
                         dtype=np.uint8)


def from_json_array(a):
    """The object ``json_array`` encoded."""
    import json
    return json.loads(np.asarray(a, dtype=np.uint8).tobytes().decode("utf-8"))


def counts_of(h, num_tables):
    """int64[T]: ids per table of a message's header."""
    c = h[H_COUNTS:H_COUNTS + num_tables]
    if c.shape[0] != num_tables:
        raise ValueError(f"header {h.tolist()} has {c.shape[0]} table counts, expected "
                         f"{num_tables}")
    return c


def table_splits(counts, dims):
    """``(id_bounds, elem_bounds)``: where table t's ids and floats start and end."""
    counts = np.asarray(counts, dtype=np.int64)
    ids = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=ids[1:])
    elems = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts * np.asarray(dims, dtype=np.int64), out=elems[1:])
    return ids, elems


def describe(tag, h):
    """A short human description of a message, for errors and logs."""
    name = NAMES.get(tag, f"tag {tag}")
    return f"{name} of clock {int(h[H_CLOCK])}" + (
        f" from worker {int(h[H_WORKER])}" if h[H_WORKER] >= 0 else "")
