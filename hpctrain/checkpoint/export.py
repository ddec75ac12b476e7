"""A single HDF5 model file for inference, written from a checkpoint.

Layout of the model file (see docs/checkpoint.md)::

    /                      attrs: format="hpctrain-model", format_version, step, source, versions
    /dense/...             the checkpoint's dense tree without its "optimizer" member
    /state/<key>           the checkpoint's state entries (JSON strings; config text, versions)
    /tables/<name>/keys    int64[n]   every row of every shard, unique keys, shard order
    /tables/<name>/values  float32[n, dim]     attrs: dim, table_id, num_rows
"""
import json
import os
import secrets

from hpctrain.checkpoint import _files, _h5tree
from hpctrain.checkpoint._restore import verify
from hpctrain.checkpoint.manager import CheckpointManager
from hpctrain.errors import CheckpointError

MODEL_FORMAT = "hpctrain-model"
MODEL_FORMAT_VERSION = 1


def export_model(checkpoint_path, out_path, *, exclude=("optimizer",), chunk_bytes=64 << 20):
    """Write ``out_path``: dense parameters and all table rows of a checkpoint, no optimizer state.

    Single process; memory stays bounded (tables are copied in row chunks). The file is
    written under a temporary name, fsynced and renamed, so a reader never sees half of it.

    Args:
        checkpoint_path: a checkpoint (``.../step-XXXXXXXX``), or a directory of checkpoints
            (its newest one that verifies is exported).
        out_path: the model file to write (replaced if it exists).
        exclude: top-level members of the dense tree left out (the dense optimizer state).
        chunk_bytes: bound on the bytes of table rows copied at once.

    Returns:
        ``out_path``.

    Raises:
        CheckpointError: the checkpoint is missing, partial or corrupt (naming file and problem).
    """
    checkpoint_path = os.path.abspath(os.fspath(checkpoint_path))
    manager = CheckpointManager(checkpoint_path)
    if not os.path.exists(os.path.join(checkpoint_path, _files.MANIFEST)) and manager.checkpoints():
        checkpoint_path = manager.latest()  # a checkpoint directory root: its newest valid one
        if checkpoint_path is None:
            raise CheckpointError(f"no complete checkpoint in {manager.directory}")
    manifest, problem = verify(checkpoint_path)
    if problem:
        raise CheckpointError(f"checkpoint {checkpoint_path}: {problem}")
    out_path = os.path.abspath(os.fspath(out_path))
    tmp = f"{out_path}.tmp-{secrets.token_hex(4)}"
    try:
        with _files.open_h5(tmp, "w") as out:
            out.attrs["format"] = MODEL_FORMAT
            out.attrs["format_version"] = MODEL_FORMAT_VERSION
            out.attrs["step"] = manifest["step"]
            out.attrs["source"] = checkpoint_path
            out.attrs["versions"] = json.dumps(_files.versions())
            _copy_dense(checkpoint_path, out, exclude)
            _copy_tables(checkpoint_path, manifest, out, chunk_bytes)
        _files.fsync_and_digest(tmp)
        os.replace(tmp, out_path)
        _files.fsync_dir(os.path.dirname(out_path))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_path


def _copy_dense(path, out, exclude):
    with _files.open_h5(os.path.join(path, _files.DENSE_FILE), "r") as src:
        dense = out.create_group("dense", track_order=True)
        for link in src["dense"]:
            if _h5tree.unescape(link) not in exclude:
                _h5tree.write(dense, link, _h5tree.read(src["dense"][link]), f"dense/{link}")
        state = out.create_group("state", track_order=True)
        for link, ds in src["state"].items():
            state.create_dataset(link, data=ds.asstr()[()], dtype=_h5tree.STRING_DTYPE)


def _copy_tables(path, manifest, out, chunk_bytes):
    world = manifest["world_size"]
    root = out.create_group("tables", track_order=True)
    for name, info in manifest["tables"].items():
        link = _h5tree.escape(name)
        total = sum(info["rows"])
        grp = root.create_group(link)
        grp.attrs.update({"dim": info["dim"], "table_id": info["table_id"], "num_rows": total})
        keys = values = None
        at = 0
        for rank in range(world):
            with _files.open_h5(os.path.join(path, _files.shard_file(rank, world)), "r") as src:
                s_keys, s_values = src["tables"][link]["keys"], src["tables"][link]["values"]
                if keys is None:
                    keys = grp.create_dataset("keys", (total,), dtype=s_keys.dtype)
                    values = grp.create_dataset("values", (total, info["dim"]),
                                                dtype=s_values.dtype)
                n = s_keys.shape[0]
                step = max(1, chunk_bytes // max(1, s_values.dtype.itemsize * info["dim"] + 8))
                for start in range(0, n, step):
                    stop = min(n, start + step)
                    keys[at + start:at + stop] = s_keys[start:stop]
                    values[at + start:at + stop] = s_values[start:stop]
                at += n
        if at != total:
            raise CheckpointError(f"checkpoint {path}: table {name!r} has {at} rows in its "
                                  f"shards, the manifest says {total}")
