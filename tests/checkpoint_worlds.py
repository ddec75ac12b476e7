"""Helpers of the checkpoint tests: simulated worlds of any size and sharded test tables.

``run_world(size, fn)`` runs ``fn(comm)`` on ``size`` threads, each with a
communicator of that simulated world (``rank``, ``size``, ``bcast``, ``barrier``,
``allgather_object``), so one process can write or read a checkpoint as if it were
a world of any size.
"""
import threading

import numpy as np


class ThreadWorld:
    """Shared state of one simulated world."""

    def __init__(self, size, timeout=60):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots = [None] * size


class ThreadComm:
    """One rank of a ``ThreadWorld``."""

    def __init__(self, world, rank):
        self.world, self.rank, self.size = world, rank, world.size
        self.local_rank, self.local_size = rank, world.size

    def allgather_object(self, obj):
        self.world.slots[self.rank] = obj
        self.world.barrier.wait()
        out = list(self.world.slots)
        self.world.barrier.wait()
        return out

    def bcast(self, obj, root=0):
        return self.allgather_object(obj)[root]

    def barrier(self):
        self.world.barrier.wait()


def run_world(size, fn):
    """Run ``fn(comm)`` on every rank of a simulated world; return the per-rank results.

    Returns ``(results, errors)``: lists indexed by rank (an exception or None).
    """
    world = ThreadWorld(size)
    results, errors = [None] * size, [None] * size

    def body(rank):
        try:
            results[rank] = fn(ThreadComm(world, rank))
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            errors[rank] = exc

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def owner_fn(size):
    """A fixed routing: rank of each (table, key) in a world of ``size`` (a multiplicative hash)."""
    def owner(name, keys):
        salt = np.uint64(sum(map(ord, name)) * 0x9E3779B97F4A7C15 % 2**64)
        with np.errstate(over="ignore"):
            h = (keys.astype(np.uint64) ^ salt) * np.uint64(0xBF58476D1CE4E5B9)
        return ((h >> np.uint64(33)) % np.uint64(size)).astype(np.int64)
    return owner


def global_tables(seed=0, specs=(("user", 4, 500), ("item/id", 8, 300), ("empty", 2, 0))):
    """Whole tables (name -> export dict), as one rank holding every row would export them."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, dim, n in specs:
        keys = rng.choice(2**40, size=n, replace=False).astype(np.int64)
        pending = rng.choice(2**40, size=n // 5, replace=False).astype(np.int64)
        out[name] = {
            "keys": keys,
            "values": rng.standard_normal((n, dim)).astype(np.float32),
            "slots": {"accumulator": rng.random((n, dim), dtype=np.float32),
                      "step": rng.integers(0, 100, size=(n, 1)).astype(np.float32)},
            "access_count": rng.integers(1, 1000, size=n).astype(np.int64),
            "last_step": rng.integers(0, 50, size=n).astype(np.int64),
            "admission": {"keys": pending, "count": rng.integers(1, 3, size=len(pending))},
            "optimizer": "adagrad",
            "dim": dim,
        }
    return out


def take(export, mask_of):
    """Rows of ``export`` selected per keyed level: ``mask_of(keys) -> bool mask``."""
    if not isinstance(export, dict):
        return export
    mask = mask_of(export["keys"]) if "keys" in export else None
    return {k: _take(v, mask, mask_of) for k, v in export.items()}


def _take(value, mask, mask_of):
    if isinstance(value, dict):
        if "keys" in value:
            return take(value, mask_of)
        return {k: _take(v, mask, mask_of) for k, v in value.items()}
    if isinstance(value, np.ndarray) and value.ndim >= 1 and mask is not None:
        return value[mask]
    return value


def shard(tables, owner, size, rank):
    """This rank's shard of ``global_tables`` under ``owner`` in a world of ``size``."""
    return {name: take(t, lambda keys, n=name: owner(n, keys) == rank)
            for name, t in tables.items()}


def take_sorted(export):
    """Export dict with every keyed level's rows sorted by key (order-free comparison)."""
    order = np.argsort(export["keys"], kind="stable")
    out = {}
    for k, v in export.items():
        if isinstance(v, dict) and "keys" in v:
            out[k] = take_sorted(v)
        elif isinstance(v, dict):
            out[k] = {kk: vv[order] if isinstance(vv, np.ndarray) and vv.ndim else vv
                      for kk, vv in v.items()}
        elif isinstance(v, np.ndarray) and v.ndim:
            out[k] = v[order]
        else:
            out[k] = v
    return out


def concat(parts):
    """Row-wise concatenation of export dicts of the same structure."""
    first = parts[0]
    out = {}
    for k, v in first.items():
        if isinstance(v, dict):
            out[k] = concat([p[k] for p in parts])
        elif isinstance(v, np.ndarray) and v.ndim:
            out[k] = np.concatenate([p[k] for p in parts])
        else:
            out[k] = v
    return out


def assert_tree_equal(got, want, where="tree"):
    """Exact equality of value trees: types, key order, dtypes, shapes and values."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_tree_equal(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_tree_equal(g, w, f"{where}/{i}")
    elif isinstance(want, (np.ndarray, np.generic)):
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
        assert np.shape(got) == np.shape(want), f"{where}: shape {np.shape(got)} != {np.shape(want)}"
        assert np.array_equal(got, want, equal_nan=want.dtype.kind in "fc"), f"{where}: values differ"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def admission_stream(seed, steps=6, batch=400, vocab=1500):
    """Key batches of a training run whose keys repeat across steps (int64 arrays)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(-vocab, vocab, size=batch).astype(np.int64) for _ in range(steps)]


def admission_table(name, counter, table_id=3):
    """A table with min_count=3 (exact counts or a small Bloom filter) and a fixed seed."""
    from hpctrain.sparse.table import EmbeddingTable
    return EmbeddingTable(name, 4, "adagrad", table_id=table_id, seed=5,
                          admission={"min_count": 3, "counter": counter, "bloom_size": 4096})


def train_owned(table, batches, rank, size, start=0, table_id=3):
    """Feed this rank's keys of each batch (routing ``owner_of``) and update admitted rows with a
    gradient that depends only on (key, step), so any sharding gives the same rows per key."""
    from hpctrain.sparse.routing import owner_of
    for i, keys in enumerate(batches):
        step = start + i
        mine = keys[owner_of(table_id, keys, size) == rank]
        rows = table.find_or_insert(mine, step)
        uniq, first = np.unique(mine, return_index=True)
        r = rows[first]
        g = np.cos(np.outer(uniq.astype(np.float64) + step, np.arange(1, table.dim + 1)))
        table.apply_gradients(r, g.astype(np.float32), step)


def pending_of(export):
    """{key: pending admission count} of an export dict."""
    adm = export["admission"]
    return dict(zip(adm["keys"].tolist(), adm["counts"].tolist()))


def rows_by_key(export):
    """{key: (values row bytes, access count, last step)} of an export dict."""
    return {k: (v.tobytes(), a, s) for k, v, a, s in zip(
        export["keys"].tolist(), export["values"], export["access_count"].tolist(),
        export["last_step"].tolist())}
