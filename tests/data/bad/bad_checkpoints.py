"""Bad checkpoints: a good one written by the trainer, edited, its checksums recomputed.

Checksums only prove that files are what the writer wrote; every case here is
resealed after its edit (``reseal``), so only content checks can catch it. Each
case is ``Case(name, edit, match)``: ``edit(ckpt)`` damages a copy of the good
checkpoint (a 2-rank checkpoint of ``CONFIG``, directory ``step-00000002``) and
``match`` is a regex that the one-line ``CheckpointError`` must match on each of
``paths`` (resume onto another world size and onto the writer's, eval of an
explicit checkpoint, ``export_model`` and ``hpctrain export``). Add a case by
appending to ``CASES``; tests/test_checkpoint_corpus.py runs them all.
"""
import hashlib
import json
import os
from dataclasses import dataclass

import h5py
import numpy as np

CONFIG = """
seed = 3
global_batch = 16
steps = 2

[model]
kind = "dlrm"
bottom = [8]
top = [8, 1]

[[tables]]
name = "user"
features = ["C1", "C2"]
dim = 4
optimizer = { kind = "adagrad", lr = 0.1 }
admission = { min_count = 2 }

[[tables]]
name = "item"
features = ["C3"]
dim = 4
optimizer = { kind = "adam", lr = 0.05 }

[dense_optimizer]
kind = "adagrad"
lr = 0.01

[data]
format = "synthetic"
[data.train]
num_samples = 1000
[data.eval]
num_samples = 64
[data.synthetic]
features = ["C1", "C2", "C3"]
num_dense = 3
vocab = [40, 300, 300]
bag_size = [1, 2, 1]
"""
STEP = 2
WORLD = 2
SHARDS = [f"tables-{r:05d}-of-{WORLD:05d}.h5" for r in range(WORLD)]


def make_trainer():
    """A fresh trainer of ``CONFIG`` on the null communicator (world of one)."""
    import io

    from hpctrain.comm import create_communicator
    from hpctrain.config import loads_config
    from hpctrain.train.loop import Trainer
    return Trainer(loads_config(CONFIG, source="bad_checkpoints.toml"),
                   create_communicator("null"), stream=io.StringIO())


def write_good(directory):
    """Train ``STEP`` steps and save the result as a ``WORLD``-rank checkpoint in
    ``directory`` (rows sharded by their owner under ``WORLD`` ranks); returns its path."""
    from checkpoint_worlds import run_world, shard
    from hpctrain.checkpoint import CheckpointManager
    from hpctrain.sparse.routing import owner_of

    trainer = make_trainer()
    trainer.fit()
    assert trainer.step == STEP
    dense = {"params": trainer.model.state_dict(), "optimizer": trainer.opt.state_dict()}
    tables = {name: tb.export() for name, tb in trainer.emb.tables.items()}
    ids = dict(trainer.table_ids)
    state = {"step": STEP, "reader": trainer.reader.state(), "config": CONFIG,
             "world_size": WORLD, "seed": 3}

    def owner(name, keys):
        return owner_of(ids[name], keys, WORLD)

    def body(comm):
        mine = shard(tables, owner, WORLD, comm.rank)
        return CheckpointManager(directory, comm).save(STEP, dense, mine, state, table_ids=ids)

    results, errors = run_world(WORLD, body)
    assert errors == [None] * WORLD, errors
    return results[0]


def reseal(ckpt):
    """Recompute every listed file's size and sha256 and the manifest's own checksum."""
    from hpctrain.checkpoint import _files
    path = os.path.join(ckpt, _files.MANIFEST)
    doc = json.load(open(path))
    for name in doc["files"]:
        full = os.path.join(ckpt, name)
        if os.path.exists(full):
            data = open(full, "rb").read()
            doc["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    doc["checksum"] = "sha256:" + hashlib.sha256(_files._canonical(doc)).hexdigest()
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)


# ----------------------------------------------------------------------------- edit helpers
def manifest(fn):
    """An edit of the manifest dict."""
    def edit(ckpt):
        path = os.path.join(ckpt, "MANIFEST.json")
        doc = json.load(open(path))
        fn(doc)
        json.dump(doc, open(path, "w"))
    return edit


def h5(name, fn):
    """An edit of one file, opened read-write with h5py."""
    def edit(ckpt):
        with h5py.File(os.path.join(ckpt, name), "r+") as f:
            fn(f)
    return edit


def replace(f, path, data=None, **kw):
    """Replace dataset ``path`` by ``data`` (or by ``create_dataset(**kw)``), keeping attrs."""
    attrs = dict(f[path].attrs)
    del f[path]
    ds = f.create_dataset(path, data=data, **kw)
    ds.attrs.update(attrs)


def poke(path, index, value):
    def fn(f):
        a = f[path][...]
        a[index] = value
        f[path][...] = a
    return fn


def first_param(f):
    return "dense/params/" + sorted(f["dense/params"])[0]


def matrix_param(f):
    """The first non-square 2-D parameter (its transpose has another shape)."""
    params = f["dense/params"]
    return "dense/params/" + next(n for n in sorted(params) if params[n].ndim == 2
                                  and params[n].shape[0] != params[n].shape[1])


def one_more_row(table, rank):
    def fn(doc):
        doc["tables"][table]["rows"][rank] += 1
    return fn


def duplicate_key_within(f):
    keys = f["tables/user/keys"][...]
    keys[1] = keys[0]
    f["tables/user/keys"][...] = keys


def copy_key_from(src_name):
    def edit(ckpt):
        with h5py.File(os.path.join(ckpt, src_name), "r") as f:
            key = f["tables/user/keys"][0]
        with h5py.File(os.path.join(ckpt, SHARDS[1]), "r+") as f:
            keys = f["tables/user/keys"][...]
            keys[0] = key
            f["tables/user/keys"][...] = keys
    return edit


def garbage(name):
    def edit(ckpt):
        with open(os.path.join(ckpt, name), "wb") as fh:
            fh.write(b"\x00garbage, not HDF5" * 100)
    return edit


def swap_shards(ckpt):
    a, b = (os.path.join(ckpt, s) for s in SHARDS)
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)


def state(key, text):
    def fn(f):
        del f[f"state/{key}"]
        f.create_dataset(f"state/{key}", data=text, dtype=h5py.string_dtype())
    return fn


# ----------------------------------------------------------------------------- the cases
PATHS = ("resume", "resume_same_world", "eval", "export", "export_cli")


@dataclass
class Case:
    name: str
    edit: object
    match: str
    paths: tuple = PATHS


CASES = [
    # format version
    Case("manifest_format_version_2", manifest(lambda d: d.update(format_version=2)),
         r"MANIFEST.json: format_version 2 is not supported"),
    Case("manifest_format_version_true", manifest(lambda d: d.update(format_version=True)),
         r"MANIFEST.json: format_version True is not supported"),
    Case("file_format_version_2", h5("dense.h5", lambda f: f.attrs.modify("format_version", 2)),
         r"dense\.h5: format_version 2 is not supported"),
    # manifest vs files
    Case("manifest_step_999", manifest(lambda d: d.update(step=999)),
         r"MANIFEST.json: step 999 but the directory is step-00000002"),
    Case("manifest_world_size_3", manifest(lambda d: d.update(world_size=3)),
         r"MANIFEST.json: lists 3 files; world_size 3 means 4"),
    Case("manifest_world_size_1e8", manifest(lambda d: d.update(world_size=10**8)),
         r"MANIFEST.json: world_size 100000000 is not an integer in \[1, 1048576\]"),
    Case("manifest_rows_1e12", manifest(lambda d: d["tables"]["user"].update(rows=[10**12, 1])),
         r"MANIFEST.json: the tables' row counts need at least \d+ bytes in "
         r"tables-00000-of-00002.h5"),
    Case("manifest_rows_off_by_one",
         manifest(one_more_row("item", 1)),
         r"tables-00001-of-00002.h5:/tables/item/keys: shape \(\d+,\), the manifest says \d+ rows"),
    Case("manifest_extra_table",
         manifest(lambda d: d["tables"].update(ghost={"table_id": 9, "dim": 4, "rows": [0, 0]})),
         r"tables-00000-of-00002.h5: attribute tables = .*the manifest lists "
         r"\['ghost', 'item', 'user'\]|holds table 'ghost', which the caller does not have"),
    Case("manifest_dim_8", manifest(lambda d: d["tables"]["user"].update(dim=8)),
         r"table 'user' has dim 8, expected 4|/tables/user/values: expected float32\[n, 8\]"),
    Case("shard_missing_table", h5(SHARDS[1], lambda f: f.__delitem__("tables/item")),
         r"tables-00001-of-00002.h5: /tables holds \['user'\].*\(missing \['item'\]\)"),
    Case("shard_attr_step", h5(SHARDS[0], lambda f: f.attrs.modify("step", 999)),
         r"tables-00000-of-00002.h5: attribute step = 999, the manifest means 2"),
    Case("shards_swapped", swap_shards,
         r"tables-00000-of-00002.h5: attribute rank = 1, the manifest means 0"),
    Case("dense_not_hdf5", garbage("dense.h5"), r"dense\.h5: not a readable HDF5 file"),
    Case("dense_group_missing", h5("dense.h5", lambda f: f.__delitem__("dense")),
         r"dense\.h5: no /dense group"),
    # dense parameters
    Case("dense_transposed", h5("dense.h5", lambda f: (lambda p: replace(f, p, f[p][...].T))(
        matrix_param(f))), r"dense\.h5:/dense/params/\S+: shape \[\d+, \d+\], the model expects"),
    Case("dense_missing_param", h5("dense.h5", lambda f: f.__delitem__(first_param(f))),
         r"dense\.h5:/dense/params: names differ from the model's: missing"),
    Case("dense_string_param", h5("dense.h5", lambda f: replace(
        f, first_param(f), "weights", dtype=h5py.string_dtype())),
         r"dense\.h5:/dense/params/\S+: a parameter must be a numeric array|"
         r"arrays of dtype object are not part of a checkpoint"),
    Case("dense_int_param", h5("dense.h5", lambda f: (lambda p: replace(
        f, p, f[p][...].astype(np.int64)))(first_param(f))),
         r"dense\.h5:/dense/params/\S+: dtype int64, the model expects float32"),
    Case("dense_nan", h5("dense.h5", lambda f: poke(first_param(f), 0, np.nan)(f)),
         r"dense\.h5:/dense/params/\S+: non-finite value nan"),
    Case("dense_inf_optimizer", h5("dense.h5", lambda f: poke(
        "dense/optimizer/" + next(n for n in f["dense/optimizer"] if n != "step"), 0, np.inf)(f)),
         r"dense\.h5:/dense/optimizer/\S+: non-finite value inf",
         paths=("resume", "resume_same_world", "eval")),  # export leaves the optimizer out
    Case("dense_declares_64GiB", h5("dense.h5", lambda f: replace(
        f, first_param(f), shape=(1 << 33,), dtype=np.float64)),
         r"dense\.h5:/dense/params/\S+: declares float64\[8589934592\] \(68719476736 bytes\) "
         r"but the file stores 0 bytes"),
    Case("dense_compressed", h5("dense.h5", lambda f: (lambda p: replace(
        f, p, f[p][...], compression="gzip"))(first_param(f))),
         r"dense\.h5:/dense/params/\S+: stored with HDF5 filters"),
    # state
    Case("state_reader_not_json", h5("dense.h5", state("reader", "{not json")),
         r"dense\.h5:/state/reader: not valid JSON"),
    Case("state_reader_keys", h5("dense.h5", state("reader", '{"epoch": 1}')),
         r"dense\.h5:/state/reader: not a data reader state"),
    Case("state_reader_float", h5("dense.h5", state(
        "reader", '{"version": 1, "epoch": 0.5, "row": 0, "file": 0, "offset": -1, "line": 0}')),
         r"dense\.h5:/state/reader: data reader state: epoch = 0.5 is not an integer"),
    Case("state_step", h5("dense.h5", state("step", "7")),
         r"dense\.h5:/state/step = 7, the manifest says 2"),
    # tables
    Case("keys_repeat_within_shard", h5(SHARDS[0], duplicate_key_within),
         r"table 'user': /tables/user/keys repeats key -?\d+ "
         r"\(tables-00000-of-00002.h5 row 0, tables-00000-of-00002.h5 row 1\)"),
    Case("keys_repeat_across_shards", copy_key_from(SHARDS[0]),
         r"table 'user': /tables/user/keys repeats key -?\d+ \(tables-00000-of-00002.h5 row 0, "
         r"tables-00001-of-00002.h5 row 0\)"),
    Case("keys_float", h5(SHARDS[0], lambda f: replace(
        f, "tables/user/keys", f["tables/user/keys"][...].astype(np.float64))),
         r"tables-00000-of-00002.h5:/tables/user/keys: keys must be a 1-D integer array, got "
         r"float64"),
    Case("keys_declared_not_stored", h5(SHARDS[1], lambda f: replace(
        f, "tables/item/keys", shape=f["tables/item/keys"].shape, dtype=np.int64)),
         r"tables-00001-of-00002.h5:/tables/item/keys: declares int64\[\d+\] \(\d+ bytes\) but "
         r"the file stores 0 bytes"),
    Case("values_int", h5(SHARDS[0], lambda f: replace(
        f, "tables/item/values", f["tables/item/values"][...].astype(np.int32))),
         r"tables-00000-of-00002.h5:/tables/item/values: expected float32\[n, 4\] \(the table's "
         r"dtype and dim\), got int32"),
    Case("values_dim_3", h5(SHARDS[1], lambda f: replace(
        f, "tables/item/values", f["tables/item/values"][:, :3])),
         r"tables-00001-of-00002.h5:/tables/item/values: expected float32\[n, 4\] .*got "
         r"float32\[\d+, 3\]"),
    Case("values_nan", h5(SHARDS[1], poke("tables/user/values", (2, 1), np.nan)),
         r"tables-00001-of-00002.h5:/tables/user/values\[2\]: non-finite value nan \(key -?\d+\)"),
    Case("slot_inf", h5(SHARDS[0], lambda f: poke(
        "tables/item/slots/" + sorted(f["tables/item/slots"])[0], (1, 0), -np.inf)(f)),
         r"tables-00000-of-00002.h5:/tables/item/slots/\w+\[1\]: non-finite value -inf"),
    Case("access_count_negative", h5(SHARDS[1], poke("tables/user/access_count", 3, -5)),
         r"tables-00001-of-00002.h5:/tables/user/access_count\[3\] = -5 \(key -?\d+\) is outside "
         r"\[0, 4294967295\]"),
    Case("last_step_2_40", h5(SHARDS[1], poke("tables/item/last_step", 0, 1 << 40)),
         r"tables-00001-of-00002.h5:/tables/item/last_step\[0\] = 1099511627776 .* is outside "
         r"\[0, 2147483647\]"),
    Case("access_count_float", h5(SHARDS[0], lambda f: replace(
        f, "tables/user/access_count", f["tables/user/access_count"][...].astype(np.float32))),
         r"tables-00000-of-00002.h5:/tables/user/access_count: expected a 1-D integer array, got "
         r"float32"),
    Case("slot_width_3", h5(SHARDS[0], lambda f: replace(
        f, "tables/user/slots/accumulator", f["tables/user/slots/accumulator"][:, :3])),
         r"tables-00000-of-00002.h5:/tables/user/slots/accumulator: rows of float32\[3\], the "
         r"table has rows of float32\[4\]"),
    Case("slot_extra", h5(SHARDS[1], lambda f: f.create_dataset(
        "tables/item/slots/momentum", data=np.zeros((f["tables/item/keys"].shape[0], 4),
                                                     np.float32))),
         r"tables-00001-of-00002.h5:/tables/item/slots/momentum: (rows of float32\[4\], which "
         r"the table does not have|not in old rank 0's shard of table 'item')"),
    Case("opt_step_missing", h5(SHARDS[0], lambda f: f.__delitem__("tables/user/opt_step")),
         r"tables-00000-of-00002.h5:/tables/user/opt_step: missing; the table has rows of "
         r"int64\[\]"),
    Case("admission_count_0", h5(SHARDS[0], poke("tables/user/admission/counts", 0, 0)),
         r"tables-00000-of-00002.h5:/tables/user/admission/counts\[0\] = 0 \(key -?\d+\) is "
         r"outside \[1, 4294967295\]"),
]
