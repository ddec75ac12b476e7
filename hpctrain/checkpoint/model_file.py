"""Read and write a model file (the layout ``hpctrain export`` writes) from memory.

``export_model`` builds a model file from a checkpoint; the serving side
(``hpctrain.train.serving``) loads one, brings it up to date with deltas and
writes it back with ``write_model``: the same layout (docs/checkpoint.md)::

    /                      attrs: format="hpctrain-model", format_version, step, source, versions
    /dense/...             dense tree without optimizer state
    /state/<key>           JSON strings (config text, versions, ...)
    /tables/<name>/keys    int64[n]            attrs: dim, table_id, num_rows, row_dtype
    /tables/<name>/values  E[n, dim]           E: float32, float16 (fp16) or uint16 (bf16 bits)

Tables are read back as float32 whatever their row dtype (a file without ``row_dtype``
holds float32 rows).
"""
import json
import os
import secrets

import numpy as np

from hpctrain.checkpoint import _files, _h5tree, _validate
from hpctrain.checkpoint.export import MODEL_FORMAT, MODEL_FORMAT_VERSION
from hpctrain.errors import CheckpointError
from hpctrain.sparse.rowdtype import overflowed, round_nearest, to_float32


def read_model(path):
    """The content of the model file at ``path``.

    Returns:
        ``{"step": int, "source": str, "dense": tree, "state": dict, "tables": {name:
        {"keys": int64[n], "values": float32[n, dim], "dim": int, "table_id": int,
        "row_dtype": str}}}``; values widened to float32 from the stored ``row_dtype``.

    Raises:
        CheckpointError: not a readable model file, naming it.
    """
    path = os.fspath(path)
    try:
        with _files.open_h5(path, "r") as h5:
            if h5.attrs.get("format") != MODEL_FORMAT:
                raise CheckpointError(f"{path}: not an {MODEL_FORMAT} file (format "
                                      f"{h5.attrs.get('format')!r})")
            state = {_h5tree.unescape(k): json.loads(h5["state"][k].asstr()[()])
                     for k in h5.get("state", {})}
            tables = {}
            for link, g in h5["tables"].items():
                dim = int(g.attrs["dim"])
                rd = g.attrs.get("row_dtype", "fp32")
                rd = rd.decode() if isinstance(rd, bytes) else str(rd)
                keys = g["keys"][...] if "keys" in g else np.empty(0, np.int64)
                values = (g["values"][...] if "values" in g
                          else np.empty((0, dim), _validate.VALUES_DTYPES.get(rd, np.float32)))
                _validate.check_row_dtype(rd, values.dtype, f"{path}:/tables/{link}")
                tables[_h5tree.unescape(link)] = {
                    "keys": keys.astype(np.int64, copy=False),
                    "values": to_float32(values, rd),
                    "dim": dim, "table_id": int(g.attrs["table_id"]), "row_dtype": rd}
            return {"step": int(h5.attrs["step"]), "source": str(h5.attrs.get("source", "")),
                    "dense": _h5tree.read(h5["dense"]), "state": state, "tables": tables}
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable model file: {exc}") from None


def write_model(path, step, dense, state, tables, source=""):
    """Write a model file atomically (temporary name, fsync, rename).

    Args:
        path: the file to write (replaced if it exists).
        step: the training step the model holds.
        dense: dense tree (``{"params": {...}}``), no optimizer state.
        state: JSON-able entries (``config`` text at least, for ``Predictor``).
        tables: dict name -> ``{"keys", "values", "dim", "table_id"}`` and optionally
            ``"row_dtype"`` (default "fp32"): values are written as that dtype stores them
            (float32 values are narrowed with round to nearest even; values already in the
            stored form are written as they are).
        source: what the model came from (a checkpoint, a delta directory).

    Returns:
        ``path``.
    """
    path = os.path.abspath(os.fspath(path))
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    try:
        with _files.open_h5(tmp, "w") as out:
            out.attrs.update({"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION,
                              "step": int(step), "source": source,
                              "versions": json.dumps(_files.versions())})
            _h5tree.write(out, "dense", dense, "dense")
            group = out.create_group("state", track_order=True)
            for key, value in state.items():
                group.create_dataset(_h5tree.escape(key), data=json.dumps(value),
                                     dtype=_h5tree.STRING_DTYPE)
            root = out.create_group("tables", track_order=True)
            for name, t in tables.items():
                g = root.create_group(_h5tree.escape(name))
                keys = np.ascontiguousarray(t["keys"], dtype=np.int64)
                g.attrs.update({"dim": int(t["dim"]), "table_id": int(t["table_id"]),
                                "num_rows": keys.shape[0]})
                g.create_dataset("keys", data=keys)
                rd = t.get("row_dtype", "fp32")
                g.attrs["row_dtype"] = rd
                g.create_dataset("values", data=_stored(t["values"], rd, name))
        _files.fsync_and_digest(tmp)
        os.replace(tmp, path)
        _files.fsync_dir(os.path.dirname(path))
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def _stored(values, row_dtype, name):
    """``values`` as ``row_dtype`` stores them (see ``write_model``)."""
    want = _validate.VALUES_DTYPES.get(row_dtype)
    if want is None:
        raise ValueError(f"table {name!r}: row_dtype {row_dtype!r} is not one of "
                         f"{', '.join(_validate.VALUES_DTYPES)}")
    v = np.asarray(values)
    if v.dtype == want:
        return np.ascontiguousarray(v)
    if v.dtype == np.uint16:
        raise ValueError(f"table {name!r}: uint16 values (bf16 bits?) for row_dtype "
                         f"{row_dtype!r}")
    f32 = np.ascontiguousarray(v, dtype=np.float32)
    out = round_nearest(f32, row_dtype)
    if overflowed(f32, out, row_dtype).any():
        raise ValueError(f"table {name!r}: values past the range of row_dtype {row_dtype!r}")
    return out
