"""Validation with early stopping and the keep-the-best checkpoint ([eval] metric, keep_best,
early_stopping): the tracker, the config keys, the trainer, resume, eval/export of "best".
Multi-rank and hybrid mode: tests/mpi/test_schedule.py."""
import io
import json
import os

import numpy as np
import pytest

from hpctrain.checkpoint import CheckpointManager, export_model
from hpctrain.checkpoint.manager import BEST_FILE, read_best
from hpctrain.comm import create_communicator
from hpctrain.config import EvalConfig, config_from_dict, loads_config
from hpctrain.config.run import EarlyStoppingConfig
from hpctrain.errors import CheckpointError, ConfigError
from hpctrain.train.best import BestTracker
from hpctrain.train.loop import Trainer
from test_config import BASE, mutate
from trainer_configs import small_config


def eval_config(tmpdir, steps=12, eval_extra="", keep_last=10, every_steps=None):
    """``small_config`` evaluating every 2 steps with ``eval_extra`` in its [eval]."""
    text = small_config(tmpdir, steps=steps, eval_at_end=True).text
    text = text.replace("[eval]\nat_end = true\n", f"[eval]\nat_end = true\ninterval = 2\n"
                                                   f"{eval_extra}\n")
    text = text.replace("keep_last = 10\n", f"keep_last = {keep_last}\n")
    if every_steps:
        text = text.replace("[checkpoint]\n", f"[checkpoint]\nevery_steps = {every_steps}\n")
    return loads_config(text, source="best.toml")


def _tracker(metric="auc", patience=None, min_delta=0.0, keep_best=True):
    es = EarlyStoppingConfig(patience, min_delta) if patience else None
    return BestTracker(EvalConfig(interval=1, metric=metric, keep_best=keep_best,
                                  early_stopping=es))


def test_tracker_counts_improvements_patience_and_direction():
    t = _tracker("auc", patience=2, min_delta=0.01)
    assert t.update(1, {"auc": 0.6}) and t.best_step == 1
    assert not t.update(2, {"auc": 0.605})          # not by more than min_delta
    assert t.update(3, {"auc": 0.62}) and t.bad == 0
    assert not t.update(3, {"auc": 0.9})            # a step already counted: ignored
    assert not t.update(4, {"auc": float("nan")}) and not t.stopped
    assert not t.update(5, {"auc": 0.5}) and t.stopped
    assert t.summary() == {"metric": "auc", "value": 0.62, "step": 3}
    low = _tracker("logloss")
    assert low.update(1, {"logloss": 0.7}) and low.update(2, {"logloss": 0.6})
    assert not low.update(3, {"logloss": 0.65}) and not low.stopped   # no early stopping
    again = _tracker("auc", patience=2, min_delta=0.01)
    again.restore(t.state())
    assert again.state() == t.state() and again.stopped
    looser = _tracker("auc", patience=3)
    looser.restore(t.state())
    assert looser.bad == 2 and not looser.stopped   # this run's patience decides
    other = _tracker("logloss")
    other.restore(t.state())                        # another metric: start afresh
    assert other.best is None and other.bad == 0


@pytest.mark.parametrize("path,value,message", [
    ("eval.metric", "f1", "eval.metric: expected one of 'auc', 'logloss', 'accuracy'"),
    ("eval.early_stopping", {"min_delta": 0.1},
     "eval.early_stopping.patience: required key is missing"),
    ("eval.early_stopping", {"patience": 0}, "eval.early_stopping.patience: expected an "
                                             "integer >= 1"),
    ("eval.early_stopping", {"patience": 2, "metric": "auc"},
     "eval.early_stopping.metric: unknown key"),
    ("eval", {"keep_best": True}, "eval.interval: keep_best compare(s) evaluations"),
    ("eval", {"early_stopping": {"patience": 2}}, "eval.interval: early_stopping compare(s)"),
])
def test_eval_key_errors(path, value, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(mutate(BASE, path, value), source="run.toml")
    assert message in str(e.value)


def test_keep_best_needs_a_checkpoint_directory():
    d = mutate(BASE, "eval.keep_best", True)
    assert config_from_dict(d).eval.keep_best
    d.pop("checkpoint")
    with pytest.raises(ConfigError, match="eval.keep_best: keeping the best checkpoint needs"):
        config_from_dict(d)


def test_early_stopping_stops_keeps_the_best_and_reports_it(tmp_path):
    # min_delta 1: nothing after the first evaluation improves, patience 2 -> stop at 6
    cfg = eval_config(str(tmp_path), eval_extra="keep_best = true\nearly_stopping = "
                                               "{ patience = 2, min_delta = 1.0 }",
                      keep_last=1, every_steps=1)
    out = io.StringIO()
    tr = Trainer(cfg, create_communicator("null"), stream=out)
    res = tr.fit()
    assert res["stopped"] == "early_stopped" and res["step"] == 6 and tr.step == 6
    ck = str(tmp_path / "ckpt")
    assert res["best"] == {"metric": "auc", "value": tr.best.best, "step": 2,
                           "checkpoint": os.path.join(ck, "step-00000002")}
    assert "early stopping at step 6: no auc improvement in 2 evaluations" in out.getvalue()
    # keep_last = 1 rotated every other checkpoint away, but not the best one
    assert sorted(os.listdir(ck)) == [BEST_FILE, "step-00000002", "step-00000006"]
    assert read_best(ck) == {"checkpoint": "step-00000002", "step": 2, "metric": "auc",
                             "value": tr.best.best}
    assert CheckpointManager(ck).best() == os.path.join(ck, "step-00000002")
    # "best" names it for restore (hpctrain eval --checkpoint best) and export
    other = Trainer(cfg, create_communicator("null"), stream=io.StringIO())
    assert other.restore("best") == 2
    assert other.evaluate()["auc"] == tr.best.best
    export_model(os.path.join(ck, "best"), str(tmp_path / "model.h5"))
    # resuming an early-stopped run trains nothing more
    again = Trainer(cfg, create_communicator("null"), stream=io.StringIO())
    res2 = again.fit(resume=True)
    assert res2["stopped"] == "early_stopped" and again.step == 6 and again.losses == []


def test_no_best_file_is_a_clear_error(tmp_path):
    cfg = small_config(str(tmp_path), steps=2)
    Trainer(cfg, create_communicator("null"), stream=io.StringIO()).fit()
    with pytest.raises(CheckpointError, match="no best checkpoint"):
        Trainer(cfg, create_communicator("null"), stream=io.StringIO()).restore("best")


@pytest.mark.parametrize("cut", [3, 4])
def test_resume_keeps_the_early_stopping_state(tmp_path, cut):
    """Interrupted at step ``cut`` (4: right after an evaluation step's training, before its
    evaluation was counted), the resumed run stops where the uninterrupted one does, with
    the same best and the same losses."""
    extra = "keep_best = true\nmetric = \"logloss\"\nearly_stopping = { patience = 2, " \
            "min_delta = 0.002 }"
    full = Trainer(eval_config(str(tmp_path / "full"), steps=40, eval_extra=extra),
                   create_communicator("null"), stream=io.StringIO())
    ref = full.fit()
    assert ref["stopped"] == "early_stopped" and 4 < ref["step"] < 40
    cfg = eval_config(str(tmp_path / "cut"), steps=40, eval_extra=extra)
    first = Trainer(cfg, create_communicator("null"), stream=io.StringIO())
    assert first.fit(max_steps=cut)["stopped"] == "max_steps"
    second = Trainer(cfg, create_communicator("null"), stream=io.StringIO())
    res = second.fit(resume=True)
    assert res["stopped"] == "early_stopped" and res["step"] == ref["step"]
    assert first.losses + second.losses == full.losses
    assert {k: v for k, v in res["best"].items() if k != "checkpoint"} == \
        {k: v for k, v in ref["best"].items() if k != "checkpoint"}
    assert read_best(str(tmp_path / "cut" / "ckpt"))["step"] == ref["best"]["step"]
    recs = [json.loads(x) for x in open(tmp_path / "cut" / "metrics.jsonl")]
    evals = [r["step"] for r in recs if "eval" in r]
    assert evals == list(range(2, ref["step"] + 1, 2))


def test_final_evaluation_counts_for_the_best_checkpoint(tmp_path):
    """The last step's checkpoint is written after the final evaluation, once."""
    cfg = eval_config(str(tmp_path), steps=8, eval_extra="keep_best = true", keep_last=1,
                      every_steps=4)
    tr = Trainer(cfg, create_communicator("null"), stream=io.StringIO())
    res = tr.fit()
    assert res["stopped"] == "done" and res["eval"] is not None
    ck = str(tmp_path / "ckpt")
    best = read_best(ck)
    assert best["step"] == res["best"]["step"] and best["value"] == res["best"]["value"]
    assert os.path.isdir(os.path.join(ck, best["checkpoint"]))
    if best["step"] == 8:
        assert best["value"] == res["eval"]["auc"]
    state = CheckpointManager(ck).load()[3]
    assert state["early_stopping"]["last_step"] == 8
    assert np.isfinite(state["early_stopping"]["best"])
