"""Delta exports: the rows changed since a step, written atomically, read back in order.

A delta carries what a serving copy of the model needs to catch up from step ``since``
to step ``step``: per table the rows updated after ``since`` (keys and values, no
optimizer state) and the keys evicted since then (tombstones), plus the dense
parameters every few deltas. Layout (docs/online.md)::

    DIR/
      delta-00000100/
        sparse-00000-of-00002.h5   rank 0's rows: /tables/<name>/keys      int64[n]
                                                  /tables/<name>/values    float32[n, dim]
                                                  /tables/<name>/tombstones int64[m]
        sparse-00001-of-00002.h5   rank 1's rows
        dense.h5                   (every k-th delta) /dense/params/<name>, from rank 0
        DONE                       JSON, written last: step, since, world size, tables,
                                   size + sha256 of every file
      .delta-00000200.tmp-1a2b3c4d/  a delta being written (or abandoned): never read

Every rank writes its file into a temporary directory; after all have written (an
allgather, which is also the barrier), rank 0 writes ``DONE`` and renames the
directory into place, so a reader sees a delta whole or not at all. A delta that
already exists under that step (a run resumed from an earlier checkpoint writes it
again) is replaced the same way.

``write_delta`` takes this rank's tables as plain dicts, so anything that holds rows
(the collective trainer's ``ShardedEmbedding``, a parameter server's shards) writes
deltas with it. ``list_deltas`` and ``read_delta`` are the reading side.
"""
import json
import os
import re
import secrets
import shutil
import time

import numpy as np

from hpctrain.checkpoint import _files, _h5tree
from hpctrain.errors import CheckpointError

DELTA_FORMAT = "hpctrain-delta"
DELTA_FORMAT_VERSION = 1
DONE = "DONE"
DENSE_FILE = "dense.h5"
_NAME = re.compile(r"^delta-(\d{8,})$")


def delta_name(step):
    """Directory name of the delta of ``step``."""
    return f"delta-{int(step):08d}"


def sparse_file(rank, world_size):
    """File name of the rows written by ``rank`` of ``world_size``."""
    return f"sparse-{rank:05d}-of-{world_size:05d}.h5"


def _null_comm(comm):
    if comm is not None:
        return comm
    from hpctrain.comm.null import NullCommunicator
    return NullCommunicator()


def write_delta(directory, step, since, tables, comm=None, dense=None, *, keep_last=None,
                info=None):
    """Write the delta of ``step`` under ``directory`` (collective over ``comm``).

    Args:
        directory: where deltas live (created if missing).
        step: the step the delta brings a model to.
        since: the step of the previous delta (or checkpoint) it continues from.
        tables: this rank's rows: dict table -> ``{"keys": int64[n], "values":
            float32[n, dim], "tombstones": int64[m]}`` (``EmbeddingTable.export_delta``;
            other entries are ignored).
        comm: a ``hpctrain.comm`` communicator (None: one process).
        dense: the dense value tree to include (rank 0's is written), or None.
        keep_last: keep only this many newest deltas (None: keep all).
        info: extra JSON-able entries for ``DONE`` (rank 0's are written).

    Returns:
        The delta's directory (every rank).

    Raises:
        CheckpointError: a rank could not write (every rank raises, naming it); nothing is
            committed then.
    """
    comm = _null_comm(comm)
    directory = os.path.abspath(os.fspath(directory))
    step, since = int(step), int(since)
    if not 0 <= since < step:
        raise ValueError(f"delta: need 0 <= since < step, got since {since}, step {step}")
    tmp, error = None, None
    if comm.rank == 0:
        try:
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{delta_name(step)}.tmp-{secrets.token_hex(4)}")
            os.mkdir(tmp)
        except OSError as exc:
            error = f"cannot create {tmp or directory}: {exc.strerror}"
    tmp, error = comm.bcast((tmp, error), root=0)
    if error:
        raise CheckpointError(f"delta {step}: rank 0: {error}")
    mine = {"error": None}
    try:
        mine.update(_write_sparse(tmp, step, since, tables, comm.rank, comm.size))
        if comm.rank == 0 and dense is not None:
            path = os.path.join(tmp, DENSE_FILE)
            with _files.open_h5(path, "w") as h5:
                _stamp(h5, step, since, comm.size, "dense")
                _h5tree.write(h5, "dense", dense, "dense")
            mine["dense"] = _files.fsync_and_digest(path)
    except Exception as exc:  # noqa: BLE001 - reported by every rank below
        mine["error"] = f"{type(exc).__name__}: {exc}"
    everyone = comm.allgather_object(mine)
    bad = [(r, m["error"]) for r, m in enumerate(everyone) if m["error"]]
    final = os.path.join(directory, delta_name(step))
    if comm.rank == 0:
        try:
            if bad:
                raise CheckpointError("; ".join(f"rank {r}: {e}" for r, e in bad))
            _commit(tmp, final, step, since, everyone, dense is not None, info)
            if keep_last is not None:
                _prune(directory, keep_last)
            error = None
        except Exception as exc:  # noqa: BLE001
            error = str(exc)
            shutil.rmtree(tmp, ignore_errors=True)
    error = comm.bcast(error, root=0)
    if error:
        raise CheckpointError(f"delta {step} in {directory}: {error}")
    return final


def _stamp(h5, step, since, world_size, kind):
    h5.attrs.update({"format": DELTA_FORMAT, "format_version": DELTA_FORMAT_VERSION,
                     "kind": kind, "step": step, "since": since, "world_size": world_size})


def _write_sparse(tmp, step, since, tables, rank, world):
    name = sparse_file(rank, world)
    path = os.path.join(tmp, name)
    rows, gone, dims = {}, {}, {}
    with _files.open_h5(path, "w") as h5:
        _stamp(h5, step, since, world, "sparse")
        h5.attrs["rank"] = rank
        root = h5.create_group("tables", track_order=True)
        for table, part in tables.items():
            keys = np.ascontiguousarray(part["keys"], dtype=np.int64)
            values = np.ascontiguousarray(part["values"], dtype=np.float32)
            tomb = np.ascontiguousarray(part.get("tombstones", np.empty(0, np.int64)),
                                        dtype=np.int64)
            if values.ndim != 2 or values.shape[0] != keys.shape[0]:
                raise ValueError(f"table {table!r}: values {values.shape} do not match "
                                 f"{keys.shape[0]} keys")
            g = root.create_group(_h5tree.escape(table))
            g.create_dataset("keys", data=keys)
            g.create_dataset("values", data=values)
            g.create_dataset("tombstones", data=tomb)
            g.attrs.update({"dim": values.shape[1], "num_rows": keys.shape[0]})
            rows[table], gone[table], dims[table] = keys.shape[0], tomb.shape[0], values.shape[1]
    return {"file": name, "digest": _files.fsync_and_digest(path), "rows": rows,
            "tombstones": gone, "dims": dims}


def _commit(tmp, final, step, since, everyone, has_dense, info):
    names = list(everyone[0]["rows"])
    doc = {"format": DELTA_FORMAT, "format_version": DELTA_FORMAT_VERSION, "step": step,
           "since": since, "world_size": len(everyone), "created": time.time(),
           "dense": has_dense,
           "tables": {t: {"dim": everyone[0]["dims"][t],
                          "rows": [m["rows"].get(t, 0) for m in everyone],
                          "tombstones": [m["tombstones"].get(t, 0) for m in everyone]}
                      for t in names},
           "files": {m["file"]: m["digest"] for m in everyone},
           "versions": _files.versions()}
    if has_dense:
        doc["files"][DENSE_FILE] = everyone[0]["dense"]
    doc.update(info or {})
    path = os.path.join(tmp, DONE)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    _files.fsync_dir(tmp)
    old = None
    if os.path.lexists(final):        # written before by a run that was resumed
        old = f"{os.path.dirname(final)}/.{os.path.basename(final)}.old-{secrets.token_hex(4)}"
        os.rename(final, old)
    os.rename(tmp, final)
    _files.fsync_dir(os.path.dirname(final))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune(directory, keep_last):
    for _, path in list_deltas(directory)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def list_deltas(directory, after=None):
    """Committed deltas under ``directory`` as ``[(step, path)]`` in step order.

    Args:
        after: only deltas of a step greater than this.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = _NAME.match(name)
        if m and os.path.exists(os.path.join(directory, name, DONE)):
            step = int(m.group(1))
            if after is None or step > after:
                out.append((step, os.path.join(directory, name)))
    return sorted(out)


def read_done(path):
    """The ``DONE`` record of the delta at ``path`` (a dict).

    Raises:
        CheckpointError: missing, not JSON, or not a delta of this format.
    """
    try:
        with open(os.path.join(path, DONE), encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"delta {path}: {DONE} unreadable: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != DELTA_FORMAT:
        raise CheckpointError(f"delta {path}: {DONE} is not an {DELTA_FORMAT} record")
    if doc.get("format_version") != DELTA_FORMAT_VERSION:
        raise CheckpointError(f"delta {path}: format_version {doc.get('format_version')}, "
                              f"this hpctrain reads {DELTA_FORMAT_VERSION}")
    return doc


def read_delta(path, verify=True):
    """Every rank's rows of the delta at ``path``, merged.

    Args:
        verify: check every file's size and sha256 against ``DONE`` first.

    Returns:
        ``{"step", "since", "created", "dense": tree or None, "tables": {name: {"keys",
        "values", "tombstones"}}}`` with every rank's rows concatenated in rank order.

    Raises:
        CheckpointError: missing, altered or malformed files, naming the file.
    """
    done = read_done(path)
    if verify:
        for name, expected in done["files"].items():
            problem = _files.check_file(os.path.join(path, name), expected)
            if problem:
                raise CheckpointError(f"delta {path}: {problem}")
    world = int(done["world_size"])
    parts = {t: {"keys": [], "values": [], "tombstones": []} for t in done["tables"]}
    for rank in range(world):
        name = sparse_file(rank, world)
        try:
            with _files.open_h5(os.path.join(path, name), "r") as h5:
                for table, info in done["tables"].items():
                    g = h5["tables"][_h5tree.escape(table)]
                    keys, values, tomb = g["keys"][...], g["values"][...], g["tombstones"][...]
                    if keys.shape != (info["rows"][rank],) or values.shape != \
                            (info["rows"][rank], info["dim"]):
                        raise CheckpointError(f"table {table!r}: keys {keys.shape} / values "
                                              f"{values.shape}, {DONE} says "
                                              f"{info['rows'][rank]} rows of dim {info['dim']}")
                    for k, v in (("keys", keys), ("values", values), ("tombstones", tomb)):
                        parts[table][k].append(v)
        except CheckpointError as exc:
            raise CheckpointError(f"delta {path}: {name}: {exc}") from None
        except (OSError, KeyError) as exc:
            raise CheckpointError(f"delta {path}: {name}: {exc}") from None
    tables = {}
    for table, p in parts.items():
        dim = done["tables"][table]["dim"]
        tables[table] = {
            "keys": np.concatenate(p["keys"]) if p["keys"] else np.empty(0, np.int64),
            "values": np.concatenate(p["values"]) if p["values"] else
            np.empty((0, dim), np.float32),
            "tombstones": np.concatenate(p["tombstones"]) if p["tombstones"] else
            np.empty(0, np.int64)}
    dense = None
    if done.get("dense"):
        try:
            with _files.open_h5(os.path.join(path, DENSE_FILE), "r") as h5:
                dense = _h5tree.read(h5["dense"])
        except (OSError, KeyError) as exc:
            raise CheckpointError(f"delta {path}: {DENSE_FILE}: {exc}") from None
    return {"step": int(done["step"]), "since": int(done["since"]),
            "created": float(done["created"]), "dense": dense, "tables": tables}
