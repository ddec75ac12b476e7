"""What a checkpoint holds, checked on every path that reads one (load, export).

Checksums prove that the files are what the writer wrote, not that the writer was
right: a checkpoint can come from another hpctrain version, from a bug, or from a
person who edited it and recomputed the checksums. So before anything is used:

- every file's root attributes agree with the manifest (format version, kind, step,
  world size, rank, table list), and every table of the manifest is in every shard
  with the manifest's row counts and dim (``open_file``);
- a dataset's declared size is backed by storage in the file before it is read
  (``_h5tree.check_storage``);
- tables: keys are 1-D integers and unique; ``values`` is ``[n, dim]`` of the table's
  recorded ``row_dtype`` (float32 when none is recorded; float16 for fp16, uint16 bits for
  bf16: ``VALUES_DTYPES``); every floating row array (bf16 bits included) is finite; row
  counters are in the range the table stores (``COUNTER_RANGES``) (``check_dataset``,
  ``check_row_dtype``, ``check_chunk``);
- dense: every floating array outside ``optimizer`` is finite and, given the tree the
  caller expects, names, shapes and dtypes match it (``check_dense``);
- state: ``step`` and ``world_size`` agree with the manifest, ``reader`` is a data reader
  state (``check_state``).

Every problem is a ``CheckpointError`` of one line naming the file, the dataset and
what is wrong.
"""
import contextlib
import json
import os

import numpy as np

from hpctrain.checkpoint import _files, _h5tree
from hpctrain.errors import CheckpointError

# Row metadata of EmbeddingTable.export() and the range the table stores it in
# (hpctrain/sparse/table.py: _META_MAX, _MAX_COUNT; a test keeps them equal).
COUNTER_RANGES = {
    "access_count": (0, (1 << 32) - 1),     # uint32, saturating
    "last_step": (0, (1 << 31) - 1),        # int32
    "opt_step": (0, (1 << 63) - 1),         # int64
    "admission/counts": (1, (1 << 32) - 1),  # pending admission counts, uint32
}
# How a table's "values" are stored, by the "row_dtype" its export records (none: fp32);
# hpctrain.sparse.rowdtype.STORED (a test keeps them equal)
VALUES_DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16),
                 "bf16": np.dtype(np.uint16)}
ROW_DTYPE = "row_dtype"
OPTIMIZER = "optimizer"   # the top-level dense member that holds optimizer state
PARAMS = "params"         # the top-level dense member that holds parameters by name


def _attr(h5, key):
    value = h5.attrs.get(key)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray) and value.shape == ():
        return value.item()
    return value


@contextlib.contextmanager
def open_file(path, manifest, name, rank=None):
    """Open ``path/name`` read-only after checking it against ``manifest``.

    ``rank`` None opens ``dense.h5``; else the shard file of old ``rank``, whose table
    groups, row counts and dims are checked too.
    """
    try:
        h5 = _files.open_h5(os.path.join(path, name), "r")
    except OSError as exc:
        raise CheckpointError(f"{name}: not a readable HDF5 file ({exc})") from None
    try:
        _check_root(h5, manifest, name, rank)
        if rank is not None:
            _check_shard_tables(h5, manifest, name, rank)
        yield h5
    finally:
        h5.close()


def _check_root(h5, manifest, name, rank):
    version = _attr(h5, "format_version")
    if type(version) is not int or version != _files.FORMAT_VERSION:
        raise CheckpointError(f"{name}: format_version {version!r} is not supported (this "
                              f"hpctrain reads {_files.FORMAT_VERSION})")
    want = {"format": _files.FORMAT, "kind": "dense" if rank is None else "tables",
            "step": manifest["step"], "world_size": manifest["world_size"]}
    if rank is not None:
        want["rank"] = rank
    for key, expected in want.items():
        got = _attr(h5, key)
        if type(got) is not type(expected) or got != expected:
            raise CheckpointError(f"{name}: attribute {key} = {got!r}, the manifest means "
                                  f"{expected!r}")


def _check_shard_tables(h5, manifest, name, rank):
    tables = manifest["tables"]
    try:
        listed = json.loads(_attr(h5, "tables"))
    except (TypeError, ValueError):
        listed = None
    if not isinstance(listed, list) or sorted(map(str, listed)) != sorted(tables):
        raise CheckpointError(f"{name}: attribute tables = {_attr(h5, 'tables')!r}, the "
                              f"manifest lists {sorted(tables)}")
    root = h5.get("tables")
    present = sorted(_h5tree.unescape(link) for link in root) if root is not None else []
    if present != sorted(tables):
        missing = sorted(set(tables) - set(present))
        extra = sorted(set(present) - set(tables))
        raise CheckpointError(f"{name}: /tables holds {present}; the manifest lists "
                              f"{sorted(tables)}"
                              + (f" (missing {missing})" if missing else "")
                              + (f" (not listed: {extra})" if extra else ""))
    for table, info in tables.items():
        where = f"{name}:/tables/{_h5tree.escape(table)}"
        group = root[_h5tree.escape(table)]
        levels = {"": info["rows"][rank]}
        levels.update({lv: n[rank] for lv, n in info.get("levels", {}).items()})
        for level, rows in levels.items():
            link = "/".join(_h5tree.escape(part) for part in level.split("/") if part)
            grp = group[link] if link and link in group else (group if not link else None)
            keys = grp.get("keys") if grp is not None else None
            what = f"{where}/{link + '/' if link else ''}keys"
            if keys is None or not hasattr(keys, "shape"):
                raise CheckpointError(f"{what}: missing")
            if keys.shape != (rows,):
                raise CheckpointError(f"{what}: shape {keys.shape}, the manifest says "
                                      f"{rows} rows")
        values = group.get("values")
        if values is None or not hasattr(values, "shape"):
            raise CheckpointError(f"{where}/values: missing")
        check_dataset(values, "values", info["dim"], where)


def check_dataset(ds, rel, dim, where):
    """Check a table's row dataset ``rel`` (path under the table) before reading it."""
    _h5tree.check_storage(ds, f"{where}/{rel}")
    kind, shape = ds.dtype.kind, tuple(ds.shape)
    if rel == "keys" or rel.endswith("/keys"):
        if len(shape) != 1 or kind not in "iu" or ds.dtype.itemsize > 8:
            raise CheckpointError(f"{where}/{rel}: keys must be a 1-D integer array, got "
                                  f"{ds.dtype}{list(shape)}")
    elif rel == "values":
        if ds.dtype not in VALUES_DTYPES.values() or len(shape) != 2 or shape[1] != dim:
            raise CheckpointError(f"{where}/{rel}: expected float32[n, {dim}] (the table's "
                                  f"dtype and dim), got {ds.dtype}{list(shape)} (float16 or "
                                  f"uint16 with row_dtype fp16 or bf16)")
    elif rel in COUNTER_RANGES:
        if kind not in "iu" or len(shape) != 1:
            raise CheckpointError(f"{where}/{rel}: expected a 1-D integer array, got "
                                  f"{ds.dtype}{list(shape)}")


def check_chunk(chunk, rel, start, keys, where):
    """Check the rows ``[start, start + len(chunk))`` of dataset ``rel``; ``keys`` are theirs."""
    if chunk.size == 0:
        return
    if rel == "values" and chunk.dtype == np.uint16:   # bf16 bits: exponent all ones
        bad = ((chunk & 0x7F80) == 0x7F80).any(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CheckpointError(f"{where}/{rel}[{start + i}]: non-finite bf16 value (key "
                                  f"{keys[i]}); {int(bad.sum())} such row(s) in this chunk")
    elif chunk.dtype.kind in "fc":
        bad = ~np.isfinite(chunk)
        if bad.ndim > 1:
            bad = bad.reshape(bad.shape[0], -1).any(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            row = chunk[i]
            value = row if np.ndim(row) == 0 else row.reshape(-1)[~np.isfinite(row.reshape(-1))][0]
            raise CheckpointError(f"{where}/{rel}[{start + i}]: non-finite value {value} "
                                  f"(key {keys[i]}); {int(bad.sum())} such row(s) in this chunk")
    elif rel in COUNTER_RANGES and chunk.dtype.kind in "iu":
        lo, hi = COUNTER_RANGES[rel]
        bad = (chunk < lo) | (chunk > hi)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CheckpointError(f"{where}/{rel}[{start + i}] = {chunk[i]} (key {keys[i]}) is "
                                  f"outside [{lo}, {hi}]")


def check_row_dtype(row_dtype, values_dtype, where):
    """Raise CheckpointError unless a table's recorded ``row_dtype`` (None: not recorded,
    i.e. fp32) is known and its ``values`` are stored as it says."""
    if row_dtype is None:
        row_dtype = "fp32"
    if not isinstance(row_dtype, str) or row_dtype not in VALUES_DTYPES:
        raise CheckpointError(f"{where}/{ROW_DTYPE} = {row_dtype!r}: not one of "
                              f"{', '.join(VALUES_DTYPES)}")
    want = VALUES_DTYPES[row_dtype]
    if np.dtype(values_dtype) != want:
        raise CheckpointError(f"{where}/values: {np.dtype(values_dtype)}, but {ROW_DTYPE} "
                              f"{row_dtype!r} is stored as {want}")


def first_duplicate(keys):
    """A key that occurs more than once in ``keys``, or None."""
    if keys.shape[0] < 2:
        return None
    s = np.sort(keys, kind="stable")
    dup = s[1:][s[1:] == s[:-1]]
    return dup[0] if dup.size else None


def _schema(name, export, skip_shard_state):
    from hpctrain.checkpoint import _tables
    schema = _tables.describe({name: export})[name]["schema"]
    return {path: (kind, dtype, shape) for path, kind, dtype, shape in schema
            if not (skip_shard_state and path.startswith(_tables.SHARD_STATE + "/"))}


def _say(entry):
    kind, dtype, shape = entry
    if kind in ("rows", "shard"):
        dtype = np.dtype(dtype).name
    if kind == "rows":
        return f"rows of {dtype}{list(shape)}"
    if kind == "shard":
        return f"{dtype}{list(shape)}"
    return "a keyed group" if kind == "keyed" else f"a {dtype}"


def check_table_schema(name, got, like, where, skip_shard_state=False):
    """Raise CheckpointError unless the table export ``got`` (read from a checkpoint) has the
    structure of ``like`` (the live table's export): the same entries, row dtypes and widths
    (optimizer slots, counters, the shard's Bloom filter); ``skip_shard_state`` when the
    shard-local state was left out of ``got`` (rows resharded)."""
    have = _schema(name, got, skip_shard_state)
    want = _schema(name, like, skip_shard_state)
    # the row dtype is the writer's: rows of another precision are converted on import
    for schema in (have, want):
        schema.pop(ROW_DTYPE, None)
    for path in sorted(set(have) | set(want), key=lambda p: (p not in want, p)):
        shown = f"{where}/{path}" if path else where
        if path not in have:
            raise CheckpointError(f"{shown}: missing; the table has {_say(want[path])}")
        if path not in want:
            raise CheckpointError(f"{shown}: {_say(have[path])}, which the table does not have")
        if path == "values" and have[path][0] == want[path][0] == "rows":
            if have[path][2] != want[path][2]:
                raise CheckpointError(f"{shown}: {_say(have[path])}, the table has "
                                      f"{_say(want[path])}")
            continue
        if have[path] != want[path]:
            raise CheckpointError(f"{shown}: {_say(have[path])}, the table has "
                                  f"{_say(want[path])}")


# ---------------------------------------------------------------------------- dense
def _leaves(tree, path=""):
    if isinstance(tree, dict):
        for key, item in tree.items():
            yield from _leaves(item, f"{path}{key}/")
    elif isinstance(tree, (list, tuple)):
        for i, item in enumerate(tree):
            yield from _leaves(item, f"{path}{i}/")
    else:
        yield path[:-1], tree


def _check_finite(value, where):
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "fc":
        bad = ~np.isfinite(value)
        if bad.any():
            idx = (np.unravel_index(int(np.flatnonzero(bad)[0]), np.shape(value))
                   if np.ndim(value) else ())
            at = f" at index {list(map(int, idx))}" if idx else ""
            raise CheckpointError(f"{where}: non-finite value {np.asarray(value)[idx]}{at}; "
                                  f"{int(bad.sum())} such value(s)")
    elif isinstance(value, float) and not np.isfinite(value):
        raise CheckpointError(f"{where}: non-finite value {value}")


def _compatible(got, want):
    if got == want:
        return True
    kinds = "iu" if want.kind in "iu" else want.kind
    return got.kind in kinds and np.can_cast(got, want, "safe")


def _describe(value):
    if isinstance(value, (np.ndarray, np.generic)):
        return f"{value.dtype}{list(np.shape(value))}"
    return type(value).__name__


def _compare(got, want, where):
    if isinstance(want, dict):
        if not isinstance(got, dict):
            raise CheckpointError(f"{where}: expected a group, got {_describe(got)}")
        missing = [k for k in want if k not in got]
        extra = [k for k in got if k not in want]
        if missing or extra:
            raise CheckpointError(f"{where}: names differ from the model's: "
                                  + "; ".join(x for x in (
                                      f"missing {missing[:5]}" if missing else "",
                                      f"unexpected {extra[:5]}" if extra else "") if x))
        for key in want:
            _compare(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            raise CheckpointError(f"{where}: expected a list of {len(want)}, got {_describe(got)}")
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, f"{where}/{i}")
    elif isinstance(want, (np.ndarray, np.generic)):
        if not isinstance(got, (np.ndarray, np.generic)):
            raise CheckpointError(f"{where}: expected {_describe(want)}, got {_describe(got)}")
        if np.shape(got) != np.shape(want):
            raise CheckpointError(f"{where}: shape {list(np.shape(got))}, the model expects "
                                  f"{list(np.shape(want))}")
        if not _compatible(got.dtype, want.dtype):
            raise CheckpointError(f"{where}: dtype {got.dtype}, the model expects {want.dtype}")
        _check_finite(got, where)
    elif isinstance(want, (bool, int, float, str, bytes)) or want is None:
        ok = (isinstance(got, (int, np.integer)) and not isinstance(got, bool)
              if isinstance(want, int) and not isinstance(want, bool)
              else isinstance(got, type(want)) if want is not None else got is None)
        if not ok:
            raise CheckpointError(f"{where}: expected {type(want).__name__}, got "
                                  f"{_describe(got)}")
        _check_finite(got, where)


def check_dense(dense, expected, where):
    """Check the dense tree read from ``where`` (e.g. ``dense.h5:/dense``).

    Every floating value outside the top-level ``optimizer`` member must be finite, and
    every member of ``params`` a numeric array. With
    ``expected`` (a value tree shaped like what the caller saved, e.g. ``{"params":
    model.state_dict(), "optimizer": opt.state_dict()}``), each of its top-level members
    must be present with the same names, shapes and compatible dtypes (the same kind,
    castable without loss), and finite. Other top-level members of ``dense`` are allowed.
    """
    if not isinstance(dense, dict):
        raise CheckpointError(f"{where}: expected a group, got {_describe(dense)}")
    for path, value in _leaves({k: v for k, v in dense.items() if k != OPTIMIZER}):
        _check_finite(value, f"{where}/{path}")
        if path.startswith(PARAMS + "/") and not (
                isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "biuf"):
            raise CheckpointError(f"{where}/{path}: a parameter must be a numeric array, got "
                                  f"{_describe(value)}")
    if expected is None:
        return
    for key, want in expected.items():
        if key not in dense:
            raise CheckpointError(f"{where}/{key}: missing (the model has it)")
        _compare(dense[key], want, f"{where}/{key}")


def check_state(state, manifest, where):
    """Check the state entries the trainer relies on against the manifest."""
    for key in ("step", "world_size"):
        if key in state and (type(state[key]) is not int or state[key] != manifest[key]):
            raise CheckpointError(f"{where}/{key} = {state[key]!r}, the manifest says "
                                  f"{manifest[key]}")
    if state.get("reader") is not None:
        from hpctrain.data.reader import state_problem
        problem = state_problem(state["reader"])
        if problem:
            raise CheckpointError(f"{where}/reader: {problem}")
