"""End-to-end trainer tests: CLI under mpiexec, non-finite losses, real data (UCI Adult)."""
import dataclasses
import io
import json
import os
import re
import time

import h5py
import numpy as np
import pytest

from hpctrain.config import load_config
from hpctrain.errors import ConfigError, NonFiniteError
from hpctrain.train.loop import Trainer
from mpirun import ROOT, run_mpi
from trainer_configs import SMALL_DLRM, small_config

ADULT = os.path.join(ROOT, "..", "shared", "data", "adult", "adult.csv")


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    trainer = Trainer(small_config(str(tmp_path), steps=6, checkpoint_every=2),
                      stream=io.StringIO())
    forward = trainer.model.forward

    def poisoned(dense, embs, training=True):
        z = forward(dense, embs, training)
        if trainer.step + 1 == 5:
            z[3] = np.nan
        return z

    trainer.model.forward = poisoned
    with pytest.raises(NonFiniteError, match=r"step 5: .*non-finite.*step-00000004"):
        trainer.fit()
    assert trainer.step == 4 and len(trainer.losses) == 4


def test_loss_falls_and_same_seed_repeats():
    a = Trainer(small_config(steps=40), stream=io.StringIO())
    a.fit()
    b = Trainer(small_config(steps=40), stream=io.StringIO())
    b.fit()
    assert a.losses == b.losses
    assert np.mean(a.losses[-10:]) < np.mean(a.losses[:10])


def test_fit_eval_checkpoint_and_resume_on_the_null_communicator(tmp_path):
    """Every trainer path works without MPI: the null communicator is a world of one,
    and its run equals the same run on a 1-rank MPI communicator bit for bit."""
    from hpctrain.comm import create_communicator
    cfg = small_config(str(tmp_path / "null"), steps=6, eval_at_end=True, overlap=True)
    null = Trainer(cfg, create_communicator("null"), stream=io.StringIO())
    result = null.fit()
    assert result["stopped"] == "done" and result["step"] == 6
    assert 0.0 < result["eval"]["auc"] <= 1.0 and result["eval"]["count"] == 256
    assert os.path.isdir(result["checkpoint"])
    lines = [json.loads(x) for x in open(tmp_path / "null" / "metrics.jsonl")]
    assert [x["step"] for x in lines if "loss" in x] == [2, 4, 6]
    resumed = Trainer(cfg.replace(steps=8), create_communicator("null"), stream=io.StringIO())
    assert resumed.restore() == 6
    assert resumed.evaluate() == result["eval"]
    ref = Trainer(small_config(str(tmp_path / "mpi"), steps=6, eval_at_end=True, overlap=True),
                  create_communicator("mpi", _self_world()), stream=io.StringIO())
    assert ref.fit()["eval"] == result["eval"] and ref.losses == null.losses


def test_resume_of_a_finished_run_trains_nothing_and_repeats_its_metrics(tmp_path):
    """A requeue or resubmission after the last step: no step 7, no new checkpoint, the
    same final evaluation, exit as done."""
    cfg = small_config(str(tmp_path), steps=6, eval_at_end=True, checkpoint_every=3)
    first = Trainer(cfg, stream=io.StringIO()).fit()
    again_out = io.StringIO()
    again = Trainer(cfg, stream=again_out).fit(resume=True)
    assert again["step"] == 6 and again["stopped"] == "done"
    assert again["eval"] == first["eval"] and again["loss"] == first["loss"]
    assert "already reached" in again_out.getvalue()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step-00000003", "step-00000006"]


def test_resume_drops_metric_records_of_rolled_back_steps(tmp_path):
    cfg = small_config(str(tmp_path), steps=6, checkpoint_every=4)
    Trainer(cfg, stream=io.StringIO()).fit()
    resumed = Trainer(cfg, stream=io.StringIO())
    resumed.fit(resume=str(tmp_path / "ckpt" / "step-00000004"))
    steps = [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")]
    assert steps == [2, 4, 6], steps


def test_fresh_run_refuses_another_runs_directory(tmp_path):
    cfg = small_config(str(tmp_path), steps=2, checkpoint_every=2)
    Trainer(cfg, stream=io.StringIO()).fit()
    with pytest.raises(ConfigError, match=r"another run's files \(checkpoints in .*ckpt; "
                                          r"metrics in .*metrics.jsonl\).*--resume"):
        Trainer(cfg, stream=io.StringIO()).fit()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step-00000002"]


def test_max_steps_zero_writes_the_initial_model(tmp_path):
    out = io.StringIO()
    trainer = Trainer(small_config(str(tmp_path), steps=4), stream=out)
    init = trainer.model.state_dict()
    result = trainer.fit(max_steps=0)
    assert result["step"] == 0 and result["stopped"] == "max_steps"
    assert result["checkpoint"].endswith("step-00000000")
    assert "fresh start; 4 steps of global batch 64; 1 rank(s)" in out.getvalue()
    again = Trainer(small_config(str(tmp_path), steps=4), stream=io.StringIO())
    assert again.restore() == 0
    for k, v in again.model.state_dict().items():
        np.testing.assert_array_equal(v, init[k])


def _self_world():
    from hpctrain.comm.world import mpi_world
    return mpi_world().Split(mpi_world().rank, 0)


def _write_config(tmp_path, steps=6):
    text = SMALL_DLRM.format(steps=steps, overlap="true", sparse_opt="adagrad",
                             eval_at_end="true", extra=f"""
[checkpoint]
directory = "{tmp_path / 'ckpt'}"
every_steps = 3
[metrics]
path = "{tmp_path / 'metrics.jsonl'}"
every_steps = 2
""")
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_train_eval_export_commands_under_mpiexec(tmp_path):
    cfg = _write_config(tmp_path)
    out = run_mpi(2, ["-m", "hpctrain", "train", str(cfg)], timeout=300).stdout
    assert "done at step 6" in out and "eval_auc" in out
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    ckpt = tmp_path / "ckpt" / "step-00000006"
    assert (ckpt / "MANIFEST.json").exists()

    out = run_mpi(2, ["-m", "hpctrain", "eval", str(cfg)], timeout=300).stdout
    assert "step 6 eval: auc" in out
    model = tmp_path / "model.h5"
    run_mpi(1, ["-m", "hpctrain", "export", str(ckpt), str(model)], timeout=120)
    with h5py.File(model, "r") as f:
        names = []
        f.visit(names.append)
    assert any("t_small" in n for n in names) and any("top" in n for n in names)


def test_config_error_ends_the_whole_job_naming_the_key(tmp_path):
    cfg = _write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("[dense_optimizer]", "[dense_optimizer]\nlr_typo = 1"))
    res = run_mpi(2, ["-m", "hpctrain", "train", str(cfg)], timeout=60, check=False)
    assert res.returncode != 0
    assert "dense_optimizer.lr_typo" in res.stdout and "run.toml" in res.stdout


@pytest.mark.slow
def test_wide_and_deep_on_uci_adult_reaches_published_quality(tmp_path, monkeypatch):
    if not os.path.exists(ADULT):
        pytest.skip(f"UCI Adult data not found at {ADULT} (../shared/data is not in a user's "
                    f"clone)")
    monkeypatch.chdir(ROOT)
    cfg = load_config(os.path.join(ROOT, "hpctrain", "configs", "wide_deep_adult.toml"))
    cfg = cfg.replace(epochs=3, checkpoint=None, metrics=type(cfg.metrics)(None, 1000))
    cfg.eval.interval = 0
    result = Trainer(cfg, stream=io.StringIO()).fit()
    ev = result["eval"]
    assert ev["count"] == 16281
    assert ev["auc"] >= 0.90 and ev["accuracy"] >= 0.85, ev


def test_evaluating_the_train_split_reads_it_exactly_once(tmp_path):
    """Whatever the training stream's epochs, evaluation sees every sample once, the last
    partial batch included; an endless synthetic split is a named error."""
    cfg = small_config(steps=2)
    finite = cfg.replace(epochs=13, data=dataclasses.replace(
        cfg.data, train=dataclasses.replace(cfg.data.train, num_samples=1000)))
    trainer = Trainer(finite, stream=io.StringIO())
    assert trainer.evaluate("train")["count"] == 1000
    with pytest.raises(ConfigError, match=r"data.train.num_samples: the synthetic train split "
                                          r"is endless"):
        Trainer(cfg.replace(data=dataclasses.replace(
            cfg.data, train=dataclasses.replace(cfg.data.train, num_samples=None))),
            stream=io.StringIO()).evaluate("train")


def test_train_without_config_and_set_overrides_recorded(tmp_path):
    """`hpctrain train` alone is the packaged quick start (into ./runs); --set overrides
    keys, and the checkpoint's saved config records them."""
    out = run_mpi(1, ["-m", "hpctrain", "train", "--max-steps", "0",
                      "--set", "dense_optimizer.lr=0.002", "--set", "tables[0].dim=16",
                      "--set", "model.bottom=[32, 16]"], cwd=str(tmp_path)).stdout
    ckpt = tmp_path / "runs" / "dlrm_synthetic" / "checkpoints" / "step-00000000"
    assert "fresh start" in out and f"checkpoint {ckpt}" in out, out
    from hpctrain.config import loads_config
    with h5py.File(ckpt / "dense.h5") as f:
        text = json.loads(f["state/config"][()])
    cfg = loads_config(text)
    assert cfg.dense_optimizer["lr"] == 0.002 and cfg.tables[0].dim == 16
    assert "--set dense_optimizer.lr=0.002" in text
    bad = run_mpi(1, ["-m", "hpctrain", "train", "--set", "dense_optimizer.lrr=1"],
                  cwd=str(tmp_path), check=False)
    assert bad.returncode != 0 and "dense_optimizer.lrr: unknown key" in bad.stdout


def test_missing_eval_file_and_unwritable_checkpoint_dir_fail_before_step_one(tmp_path):
    """Named before training starts, and the failing job leaves its error line in the
    run directory (the launcher may drop what a rank prints just before MPI_Abort)."""
    cfg = _write_config(tmp_path)
    text = cfg.read_text()
    from hpctrain.errors import CheckpointError, DataError
    eval_cfg = small_config(str(tmp_path / "a"), steps=4)
    bad_eval = eval_cfg.replace(data=dataclasses.replace(
        eval_cfg.data, eval=dataclasses.replace(eval_cfg.data.eval,
                                                paths=[str(tmp_path / "gone.csv")])))
    trainer = Trainer(bad_eval, stream=io.StringIO())
    with pytest.raises(DataError, match=r"data.eval.paths: .*gone.csv does not exist"):
        trainer.fit()
    assert trainer.step == 0
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "ckpt").write_text("a file where the checkpoint directory should be")
    with pytest.raises(CheckpointError, match="checkpoint.directory: .*ckpt"):
        Trainer(small_config(str(locked), steps=4), stream=io.StringIO()).fit()
    # the CLI: one error line, and the same line in <run dir>/hpctrain-error.txt
    cfg.write_text(text.replace(f'directory = "{tmp_path / "ckpt"}"',
                                f'directory = "{locked / "ckpt"}"'))
    res = run_mpi(2, ["-m", "hpctrain", "train", str(cfg)], timeout=60, check=False)
    assert res.returncode != 0 and "CheckpointError" in res.stdout, res.stdout
    assert "Traceback" not in res.stdout
    written = (tmp_path / "hpctrain-error.txt").read_text()
    assert "CheckpointError" in written and "checkpoint.directory" in written


def test_metrics_file_is_never_written_through_a_symlink(tmp_path):
    target = tmp_path / "someone_elses_file"
    target.write_text("")
    cfg = small_config(str(tmp_path), steps=2)
    os.symlink(target, tmp_path / "metrics.jsonl")
    with pytest.raises(ConfigError, match=r"metrics.path: .*metrics.jsonl is a symbolic link"):
        Trainer(cfg, stream=io.StringIO()).fit()
    assert target.read_text() == ""


STALL = """
import io, sys, time
from hpctrain.comm import create_communicator
from hpctrain.config import load_config
from hpctrain.train.loop import Trainer
cfg = load_config(sys.argv[1])
comm = create_communicator("mpi")
trainer = Trainer(cfg, comm, stream=io.StringIO())
if comm.rank == comm.size - 1:
    step = trainer._dense_step
    def stuck(batch, pooled, s, flags):
        if s == 3:
            time.sleep(600)          # an endless loop on one rank; the others wait for it
        return step(batch, pooled, s, flags)
    trainer._dense_step = stuck
trainer.fit()
"""


def test_a_stuck_rank_ends_the_job_naming_rank_phase_and_step(tmp_path):
    cfg = _write_config(tmp_path, steps=20)
    cfg.write_text("stall_timeout_s = 3\n" + cfg.read_text())
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    t0 = time.monotonic()
    res = run_mpi(2, [str(script), str(cfg)], timeout=120, check=False)
    assert res.returncode != 0
    assert time.monotonic() - t0 < 60, res.stdout
    assert re.search(r"rank \d/2: StallError: no progress for \d+ s in phase '\w+' of step 3",
                     res.stdout), res.stdout
    assert "StallError" in (tmp_path / "hpctrain-error.txt").read_text()


CRITEO_RUN = """
seed = 1
global_batch = 64
steps = 6
[model]
kind = "dlrm"
bottom = [16, 8]
top = [8, 1]
[[tables]]
name = "all"
features = [{features}]
dim = 8
[dense_optimizer]
kind = "adam"
[data]
format = "criteo"
prefetch = 0
[data.train]
paths = ["{path}"]
"""


def test_bad_line_on_one_rank_is_named_on_rank_zero(tmp_path):
    """Strict bad-line policy: the rank that parsed the bad line is not the only one to say
    so; rank 0's output names the file and line too."""
    from data_helpers import write_criteo

    from hpctrain.data.parse import CRITEO_FEATURES
    path = tmp_path / "day.tsv"
    lines = write_criteo(path, 400, seed=3)
    lines[100] = "1\tnot-a-number" + lines[100][lines[100].index("\t", 2):]
    path.write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "run.toml"
    cfg.write_text(CRITEO_RUN.format(features=", ".join(f'"{f}"' for f in CRITEO_FEATURES),
                                     path=path))
    res = run_mpi(2, ["-m", "hpctrain", "train", str(cfg)], timeout=120, check=False)
    assert res.returncode != 0
    assert re.search(r"rank 0/2: DataError: rank 1: .*day.tsv:101", res.stdout), res.stdout
    assert "Traceback" not in res.stdout


def test_quiet_log_level_and_epoch_runs_on_the_live_line(tmp_path):
    path = _write_config(tmp_path, steps=6)
    quiet = run_mpi(1, ["-m", "hpctrain", "train", str(path), "--quiet"], cwd=str(tmp_path))
    assert "step 2/6" not in quiet.stdout and "fresh start" not in quiet.stdout
    assert "hpctrain: done at step 6" in quiet.stdout      # the summary stays
    # an epoch-bound run knows its length: total, epoch and ETA on the live line
    out = io.StringIO()
    cfg = small_config(steps=2)
    finite = cfg.replace(steps=None, epochs=2, data=dataclasses.replace(
        cfg.data, train=dataclasses.replace(cfg.data.train, num_samples=64 * 5)),
        metrics=dataclasses.replace(cfg.metrics, every_steps=3))
    Trainer(finite, stream=out).fit()
    text = out.getvalue()
    assert "step 3/10  epoch 1/2" in text and "step 9/10  epoch 2/2" in text, text
    assert "ETA" in text
    assert re.search(r"^\d\d:\d\d:\d\d hpctrain: fresh start", text, re.M), text


def test_a_checkpoint_directory_others_can_write_is_refused_before_step_one(tmp_path):
    from hpctrain.errors import CheckpointError
    (tmp_path / "ckpt").mkdir()
    os.chmod(tmp_path / "ckpt", 0o777)
    trainer = Trainer(small_config(str(tmp_path), steps=4, checkpoint_every=2),
                      stream=io.StringIO())
    with pytest.raises(CheckpointError, match=r"checkpoint.directory: .*writable by every user"):
        trainer.fit()
    assert trainer.step == 0 and os.listdir(tmp_path / "ckpt") == []
