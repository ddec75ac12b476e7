"""A single HDF5 model file for inference, written from a checkpoint.

Layout of the model file (see docs/checkpoint.md)::

    /                      attrs: format="hpctrain-model", format_version, step, source, versions
    /dense/...             the checkpoint's dense tree without its "optimizer" member
    /state/<key>           the checkpoint's state entries (JSON strings; config text, versions)
    /tables/<name>/keys    int64[n]   every row of every shard, unique keys, shard order
    /tables/<name>/values  E[n, dim]           attrs: dim, table_id, num_rows, row_dtype
                           as the checkpoint stores them: E = float32 (row_dtype "fp32"),
                           float16 ("fp16") or uint16, the bits of bf16 ("bf16")
"""
import json
import os
import secrets
import warnings

import numpy as np

from hpctrain.checkpoint import _files, _h5tree, _model, _restore, _tables, _validate
from hpctrain.checkpoint._collective import describe
from hpctrain.checkpoint._restore import verify
from hpctrain.checkpoint.manager import CheckpointManager, CheckpointWarning, resolve_best
from hpctrain.errors import CheckpointError, HpctrainError

MODEL_FORMAT = "hpctrain-model"
MODEL_FORMAT_VERSION = 1


def export_model(checkpoint_path, out_path, *, exclude=("optimizer",), chunk_bytes=64 << 20,
                 check_model=True):
    """Write ``out_path``: dense parameters and all table rows of a checkpoint, no optimizer state.

    Single process; memory stays bounded (tables are checked and copied in row chunks). The
    checkpoint is checked like ``CheckpointManager.load`` checks it (files against the
    manifest, every row of every table, dense values) before anything is written; the file
    is written under a temporary name, fsynced and renamed, so a reader never sees half of it.

    Args:
        checkpoint_path: a checkpoint (``.../step-XXXXXXXX``), or a directory of checkpoints
            (its newest one that verifies is exported), or ``DIR/best`` (the checkpoint
            ``DIR/best.json`` names, ``[eval] keep_best``).
        out_path: the model file to write (replaced if it exists).
        exclude: top-level members of the dense tree left out (the dense optimizer state).
        chunk_bytes: bound on the bytes of table rows read at once.
        check_model: compare dense parameters and table dims with the model that the config
            stored in the checkpoint (``state["config"]``) describes, when there is one
            (a ``CheckpointWarning`` says so when that config no longer validates).

    Returns:
        ``out_path``.

    Raises:
        CheckpointError: the checkpoint is missing, partial, corrupt or inconsistent (naming
            file, dataset and problem); nothing is written then.
    """
    checkpoint_path = os.path.abspath(resolve_best(checkpoint_path))
    try:
        return _export(checkpoint_path, os.path.abspath(os.fspath(out_path)), exclude,
                       chunk_bytes, check_model)
    except CheckpointError:
        raise
    except HpctrainError as exc:
        raise CheckpointError(f"checkpoint {checkpoint_path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever a crafted file provokes, named
        raise CheckpointError(f"checkpoint {checkpoint_path}: {describe(exc)}") from exc


def _export(checkpoint_path, out_path, exclude, chunk_bytes, check_model):
    manager = CheckpointManager(checkpoint_path)
    if not os.path.exists(os.path.join(checkpoint_path, _files.MANIFEST)) and manager.checkpoints():
        checkpoint_path = manager.latest(strict=True)  # a directory of checkpoints
    manifest, problem = verify(checkpoint_path)
    if problem:
        raise CheckpointError(f"checkpoint {checkpoint_path}: {problem}")
    try:
        dense, state = _restore.read_dense(checkpoint_path, manifest)
        if check_model:
            try:
                params, dims, like = _model.expected_from_config(state.get("config"), dense)
            except HpctrainError as exc:  # e.g. a config of an older hpctrain
                params = like = None
                warnings.warn(f"checkpoint {checkpoint_path}: dense parameters and table dims "
                              f"not checked against the model: {exc}", CheckpointWarning,
                              stacklevel=3)
            if params is not None:
                _validate.check_dense(dense, {_validate.PARAMS: params},
                                      f"{_files.DENSE_FILE}:/dense")
                _restore.check_tables(checkpoint_path, manifest, dims)
        _check_shards(checkpoint_path, manifest, chunk_bytes, like if check_model else None)
    except CheckpointError as exc:
        if str(exc).startswith("checkpoint "):
            raise
        raise CheckpointError(f"checkpoint {checkpoint_path}: {exc}") from None
    tmp = f"{out_path}.tmp-{secrets.token_hex(4)}"
    try:
        # a new file of our own: never through a symlink planted under that name
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_NOFOLLOW", 0), 0o644))
        with _files.open_h5(tmp, "w") as out:
            out.attrs["format"] = MODEL_FORMAT
            out.attrs["format_version"] = MODEL_FORMAT_VERSION
            out.attrs["step"] = manifest["step"]
            out.attrs["source"] = checkpoint_path
            out.attrs["versions"] = json.dumps(_files.versions())
            group = out.create_group("dense", track_order=True)
            for key, value in dense.items():
                if key not in exclude:
                    _h5tree.write(group, _h5tree.escape(key), value, f"dense/{key}")
            group = out.create_group("state", track_order=True)
            for key, value in state.items():
                group.create_dataset(_h5tree.escape(key), data=json.dumps(value),
                                     dtype=_h5tree.STRING_DTYPE)
            _copy_tables(checkpoint_path, manifest, out, chunk_bytes)
        _files.fsync_and_digest(tmp)
        os.replace(tmp, out_path)
        _files.fsync_dir(os.path.dirname(out_path))
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return out_path


def _check_shards(path, manifest, chunk_bytes, tables_like):
    """Every row of every table in every shard, checked as ``load`` checks them, and each
    shard's table structure against ``tables_like`` (name -> empty table export) if given."""
    world = manifest["world_size"]
    for rank in range(world):
        shard = _files.shard_file(rank, world)
        with _validate.open_file(path, manifest, shard, rank) as h5:
            for name, info in manifest["tables"].items():
                reader = _tables.TableReader(h5, name, dim=info["dim"])
                reader.add(h5, None, chunk_bytes, keep=False)
                if tables_like and name in tables_like:
                    _validate.check_table_schema(name, reader.result(), tables_like[name],
                                                 f"{shard}:/tables/{_h5tree.escape(name)}")


def _copy_tables(path, manifest, out, chunk_bytes):
    world = manifest["world_size"]
    root = out.create_group("tables", track_order=True)
    for name, info in manifest["tables"].items():
        link = _h5tree.escape(name)
        total = sum(info["rows"])
        grp = root.create_group(link)
        grp.attrs.update({"dim": info["dim"], "table_id": info["table_id"], "num_rows": total})
        keys = values = None
        starts = []
        at = 0
        for rank in range(world):
            shard = _files.shard_file(rank, world)
            with _validate.open_file(path, manifest, shard, rank) as src:
                s_keys, s_values = src["tables"][link]["keys"], src["tables"][link]["values"]
                rd = src["tables"][link].get(_validate.ROW_DTYPE)
                rd = _h5tree.read(rd) if rd is not None else "fp32"
                _validate.check_row_dtype(rd, s_values.dtype, f"{shard}:/tables/{link}")
                if keys is None:
                    grp.attrs["row_dtype"] = rd
                    keys = grp.create_dataset("keys", (total,), dtype=s_keys.dtype)
                    values = grp.create_dataset("values", (total, info["dim"]),
                                                dtype=s_values.dtype)
                n = s_keys.shape[0]
                step = max(1, chunk_bytes // max(1, s_values.dtype.itemsize * info["dim"] + 8))
                for start in range(0, n, step):
                    stop = min(n, start + step)
                    keys[at + start:at + stop] = s_keys[start:stop]
                    values[at + start:at + stop] = s_values[start:stop]
                starts.append(at)
                at += n
        if at != total:
            raise CheckpointError(f"checkpoint {path}: table {name!r} has {at} rows in its "
                                  f"shards, the manifest says {total}")
        if keys is not None:
            _check_unique(path, name, keys, starts, world, chunk_bytes)


def _check_unique(path, name, keys, starts, world, chunk_bytes):
    """No key of the exported table repeats, checked in memory of about ``chunk_bytes``:
    in passes over the keys, each pass sorting one hash bucket of them."""
    total = keys.shape[0]
    if total < 2:
        return
    step = max(1, chunk_bytes // 8)
    buckets = min(256, max(1, -(-total * 16 // max(1, chunk_bytes))))
    for bucket in range(buckets):
        mine = []
        for a in range(0, total, step):
            k = keys[a:a + step]
            mine.append(k if buckets == 1 else k[_bucket_of(k, buckets) == bucket])
        dup = _validate.first_duplicate(np.concatenate(mine))
        if dup is None:
            continue
        where = []
        for a in range(0, total, step):
            for i in np.flatnonzero(keys[a:a + step] == dup):
                pos = a + int(i)
                rank = int(np.searchsorted(starts, pos, side="right")) - 1
                where.append(f"{_files.shard_file(rank, world)} row {pos - starts[rank]}")
        raise CheckpointError(f"checkpoint {path}: table {name!r}: /tables/"
                              f"{_h5tree.escape(name)}/keys repeats key {dup} "
                              f"({', '.join(where[:4])})")


def _bucket_of(keys, buckets):
    with np.errstate(over="ignore"):
        h = keys.astype(np.int64, copy=False).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return (h >> np.uint64(32)) % np.uint64(buckets)
