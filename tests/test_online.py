"""Online training in one process: deltas, their round trip to a serving model, the predictor."""
import dataclasses
import io
import json
import os

import numpy as np
import pytest

from hpctrain.checkpoint import export_model
from hpctrain.checkpoint.delta import list_deltas, read_delta, write_delta
from hpctrain.comm import create_communicator
from hpctrain.config import loads_config
from hpctrain.errors import CheckpointError
from hpctrain.sparse.rowdtype import to_float32
from hpctrain.sparse.table import EmbeddingTable
from hpctrain.train.loop import Trainer
from hpctrain.train.serving import DeltaApplier, Predictor, ServingModel, make_batch
from trainer_configs import SMALL_DLRM


def online_config(tmp, steps=20, every=3, dense_every=2, ckpt_every=6, ttl=3, eval_at_end=False,
                  overlap=False):
    """SMALL_DLRM with TTL eviction on t_big, deltas and checkpoints under ``tmp``."""
    text = SMALL_DLRM.replace('name = "t_big"\n',
                              f'name = "t_big"\neviction = {{{{ ttl = {ttl} }}}}\n')
    extra = f"""
[checkpoint]
directory = "{tmp}/ckpt"
every_steps = {ckpt_every}
keep_last = 10

[metrics]
path = "{tmp}/metrics.jsonl"
every_steps = 2

[online]
directory = "{tmp}/deltas"
delta_every_steps = {every}
dense_every = {dense_every}
"""
    return loads_config(text.format(steps=steps, overlap=str(overlap).lower(), sparse_opt="adam",
                                    eval_at_end=str(eval_at_end).lower(), extra=extra),
                        source="online.toml")


def test_table_delta_rows_and_tombstones():
    t = EmbeddingTable("t", 4, "sgd", eviction={"ttl": 2})
    t.track_evictions()
    t.find_or_insert(np.arange(10), 1)
    d = t.export_delta(0)
    assert sorted(d["keys"]) == list(range(10)) and d["tombstones"].size == 0
    t.apply_gradients(t.find(np.array([3, 4])), np.ones((2, 4), np.float32), 4)
    assert t.evict(4) == 8                              # rows 0..9 but 3, 4 (last step 1)
    t.find_or_insert(np.array([5, 11]), 4)             # 5 comes back, 11 is new
    d = t.export_delta(1)
    assert sorted(d["keys"]) == [3, 4, 5, 11]
    assert d["tombstones"].tolist() == [0, 1, 2, 6, 7, 8, 9]   # 5 is a row again
    np.testing.assert_array_equal(d["values"], t.gather(t.find(d["keys"])))
    assert t.export_delta(4)["tombstones"].size == 0    # handed out once
    assert t.remove(np.array([3, 99])) == 1 and len(t) == 3


def test_untracked_table_keeps_no_tombstones():
    t = EmbeddingTable("t", 2, "sgd", eviction={"ttl": 1})
    t.find_or_insert(np.arange(5), 1)
    t.evict(5)
    assert t._tombstones is None and t.export_delta(0)["tombstones"].size == 0


def test_delta_files_commit_marker_and_replacement(tmp_path):
    tables = {"a": {"keys": np.array([5, 7]), "values": np.ones((2, 3), np.float32),
                    "tombstones": np.array([9])}}
    p1 = write_delta(tmp_path, 10, 0, tables, dense={"params": {"w": np.arange(3.0)}})
    os.makedirs(tmp_path / ".delta-00000020.tmp-dead")          # an abandoned write
    os.makedirs(tmp_path / "delta-00000030")                     # no DONE: not committed
    assert list_deltas(tmp_path) == [(10, p1)]
    d = read_delta(p1)
    assert d["step"] == 10 and d["since"] == 0 and d["tables"]["a"]["keys"].tolist() == [5, 7]
    assert d["dense"]["params"]["w"].tolist() == [0.0, 1.0, 2.0]
    tables["a"]["values"] = np.full((2, 3), 2, np.float32)
    assert write_delta(tmp_path, 10, 0, tables) == p1           # rewritten after a resume
    assert read_delta(p1)["tables"]["a"]["values"][0, 0] == 2 and read_delta(p1)["dense"] is None
    with open(os.path.join(p1, "sparse-00000-of-00001.h5"), "r+b") as fh:
        fh.seek(-3, 2)
        fh.write(b"xyz")
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        read_delta(p1)


def _trainer_rows(trainer):
    out = {}
    for name, e in trainer.emb.export().items():
        order = np.argsort(e["keys"])
        out[name] = (e["keys"][order], to_float32(e["values"][order], e.get("row_dtype", "fp32")))
    return out


@pytest.mark.parametrize("row_dtype", ["fp32", "bf16"])
def test_checkpoint_export_plus_deltas_equal_the_trainer(tmp_path, row_dtype):
    """Full export of the first checkpoint + every later delta in order = the trainer's
    final rows and dense weights, bit for bit, evictions included; also with bf16 rows
    (stored as bits in the checkpoint and the model file, float32 in deltas)."""
    cfg = online_config(str(tmp_path), steps=20)
    cfg = cfg.replace(tables=[dataclasses.replace(t, row_dtype=row_dtype) for t in cfg.tables])
    tr = Trainer(cfg, create_communicator("null"), stream=io.StringIO())
    tr.fit()
    steps = [s for s, _ in list_deltas(tmp_path / "deltas")]
    assert steps == [3, 6, 9, 12, 15, 18, 20]                   # 20: the end (and checkpoint)
    gone = sum(read_delta(p)["tables"]["t_big"]["tombstones"].size
               for _, p in list_deltas(tmp_path / "deltas"))
    assert gone > 0                                             # evictions were exported
    done = [json.load(open(os.path.join(p, "DONE"))) for _, p in list_deltas(tmp_path / "deltas")]
    assert [d["dense"] for d in done] == [False, True, False, True, False, True, True]
    records = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    prog = [r for r in records if "progressive" in r]
    assert [r["step"] for r in prog] == list(range(2, 21, 2))
    assert all(r["progressive"]["count"] == 128 and 0 < r["progressive"]["auc"] < 1 for r in prog)
    assert prog[-1]["progressive"]["cumulative_count"] == 20 * 64
    assert sum(len(r.get("deltas", [])) for r in records) == 7
    export_model(str(tmp_path / "ckpt" / "step-00000006"), str(tmp_path / "model.h5"))
    applier = DeltaApplier(str(tmp_path / "model.h5"), str(tmp_path / "deltas"))
    assert applier.model_step == 6 and [s for s, _ in applier.pending()] == [9, 12, 15, 18, 20]
    applied = applier.poll()
    assert [a["step"] for a in applied] == [9, 12, 15, 18, 20] and applier.model_step == 20
    assert applier.export_lag_s >= 0
    want = _trainer_rows(tr)
    for name, (keys, values) in want.items():
        k, v = applier.model.rows(name)
        np.testing.assert_array_equal(k, keys)
        np.testing.assert_array_equal(v, values)
    for name, a in tr.model.state_dict().items():
        np.testing.assert_array_equal(applier.model.model.state_dict()[name], a)
    # the synced model written and read back is the same model
    applier.model.save(tmp_path / "synced.h5")
    again = ServingModel.load(tmp_path / "synced.h5")
    assert again.step == 20
    np.testing.assert_array_equal(again.rows("t_big")[1], want["t_big"][1])


def test_applier_refuses_a_gap(tmp_path):
    cfg = online_config(str(tmp_path), steps=12)
    Trainer(cfg, create_communicator("null"), stream=io.StringIO()).fit()
    export_model(str(tmp_path / "ckpt" / "step-00000006"), str(tmp_path / "model.h5"))
    import shutil
    shutil.rmtree(tmp_path / "deltas" / "delta-00000009")
    with pytest.raises(CheckpointError, match="continues from step 9 but the model is at step 6"):
        DeltaApplier(str(tmp_path / "model.h5"), str(tmp_path / "deltas")).poll()


def test_resumed_run_continues_the_delta_chain(tmp_path):
    """A run stopped at a checkpoint and resumed writes the same deltas as an
    uninterrupted one (the checkpoint is a delta boundary: no tombstone is lost)."""
    a, b = tmp_path / "a", tmp_path / "b"
    Trainer(online_config(str(a), steps=16, ckpt_every=5), create_communicator("null"),
            stream=io.StringIO()).fit()
    first = Trainer(online_config(str(b), steps=16, ckpt_every=5), create_communicator("null"),
                    stream=io.StringIO())
    assert first.fit(max_steps=7)["stopped"] == "max_steps"     # checkpoint 7, deltas 3 5 6 7
    second = Trainer(online_config(str(b), steps=16, ckpt_every=5), create_communicator("null"),
                     stream=io.StringIO())
    second.fit(resume=True)
    da, db = list_deltas(a / "deltas"), list_deltas(b / "deltas")
    assert [s for s, _ in db] == [3, 5, 6, 7, 9, 10, 12, 15, 16]
    model = ServingModel.load(export_model(str(a / "ckpt" / "step-00000005"),
                                           str(tmp_path / "m.h5")))
    for _, p in db:
        model.apply(read_delta(p))
    ref = ServingModel.load(export_model(str(a / "ckpt" / "step-00000005"),
                                         str(tmp_path / "m2.h5")))
    for _, p in da:
        ref.apply(read_delta(p))
    for name in ("t_small", "t_big"):
        np.testing.assert_array_equal(model.rows(name)[0], ref.rows(name)[0])
        np.testing.assert_array_equal(model.rows(name)[1], ref.rows(name)[1])


def test_checkpoint_and_last_deltas_hold_the_dense_weights(tmp_path):
    """A checkpoint's or the last step's delta on the delta grid but off the dense grid (9
    and 15 with dense every 2nd of every 3) holds the dense weights too, so the first
    checkpoint's export plus the deltas gives the final dense model."""
    cfg = online_config(str(tmp_path), steps=15, every=3, dense_every=2, ckpt_every=9)
    tr = Trainer(cfg, create_communicator("null"), stream=io.StringIO())
    tr.fit()
    deltas = list_deltas(tmp_path / "deltas")
    assert [(s, read_delta(p)["dense"] is not None) for s, p in deltas] == [
        (3, False), (6, True), (9, True), (12, True), (15, True)]
    model = ServingModel.load(export_model(str(tmp_path / "ckpt" / "step-00000009"),
                                           str(tmp_path / "m.h5")))
    for _, p in deltas:
        model.apply(read_delta(p))
    for k, v in tr.model.state_dict().items():
        np.testing.assert_array_equal(model.model.state_dict()[k], v)


def test_predictor_scores_equal_the_trainer_eval(tmp_path):
    cfg = online_config(str(tmp_path), steps=10, ckpt_every=10, eval_at_end=True)
    tr = Trainer(cfg, create_communicator("null"), stream=io.StringIO())
    tr.fit()
    y, z = tr.predict("eval")
    path = export_model(str(tmp_path / "ckpt" / "step-00000010"), str(tmp_path / "model.h5"))
    pred = Predictor(path)
    y2, z2 = pred.score(pred.reader(split="eval", batch_size=100))
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_allclose(z2, z, rtol=0, atol=1e-6)
    # an in-memory batch: the same samples scored one by one; unknown ids read zeros
    batch = next(iter(pred.reader(split="eval", batch_size=5)))
    feats = pred.data_features
    bags = {f: [list(batch.bags(f)[0][o:o + n]) for o, n in
                zip(np.cumsum(np.r_[0, batch.bags(f)[1]])[:-1], batch.bags(f)[1])] for f in feats}
    mem = make_batch(feats, batch.dense, bags)
    np.testing.assert_allclose(pred.logits(mem), z[:5], rtol=0, atol=1e-6)
    unknown = make_batch(feats, batch.dense[:1], {f: [[10 ** 12]] for f in feats})
    zero = make_batch(feats, batch.dense[:1], {f: [[]] for f in feats})
    # an unknown id reads a row of zeros: it scores like an empty bag (sum and mean pool
    # both to zeros)
    np.testing.assert_allclose(pred.logits(unknown), pred.logits(zero), atol=1e-7)
    p = pred.predict(mem)
    assert np.all((p > 0) & (p < 1))
