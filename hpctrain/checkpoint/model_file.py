"""Read and write a model file (the layout ``hpctrain export`` writes) from memory.

``export_model`` builds a model file from a checkpoint; the serving side
(``hpctrain.train.serving``) loads one, brings it up to date with deltas and
writes it back with ``write_model``: the same layout (docs/checkpoint.md)::

    /                      attrs: format="hpctrain-model", format_version, step, source, versions
    /dense/...             dense tree without optimizer state
    /state/<key>           JSON strings (config text, versions, ...)
    /tables/<name>/keys    int64[n]            attrs: dim, table_id, num_rows
    /tables/<name>/values  float32[n, dim]
"""
import json
import os
import secrets

import numpy as np

from hpctrain.checkpoint import _files, _h5tree
from hpctrain.checkpoint.export import MODEL_FORMAT, MODEL_FORMAT_VERSION
from hpctrain.errors import CheckpointError


def read_model(path):
    """The content of the model file at ``path``.

    Returns:
        ``{"step": int, "source": str, "dense": tree, "state": dict, "tables": {name:
        {"keys": int64[n], "values": float32[n, dim], "dim": int, "table_id": int}}}``.

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
                keys = g["keys"][...] if "keys" in g else np.empty(0, np.int64)
                values = g["values"][...] if "values" in g else np.empty((0, dim), np.float32)
                tables[_h5tree.unescape(link)] = {
                    "keys": keys.astype(np.int64, copy=False),
                    "values": values.astype(np.float32, copy=False),
                    "dim": dim, "table_id": int(g.attrs["table_id"])}
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
        tables: dict name -> ``{"keys", "values", "dim", "table_id"}``.
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
                g.create_dataset("values", data=np.ascontiguousarray(t["values"],
                                                                     dtype=np.float32))
        _files.fsync_and_digest(tmp)
        os.replace(tmp, path)
        _files.fsync_dir(os.path.dirname(path))
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path
