"""Run curves: ``hpctrain plot RUN`` (PNG files, matplotlib) and TensorBoard event files
(``[metrics] tensorboard``, the tensorboard extra)."""
import glob
import io
import json
import os
import struct
import sys

import pytest

from hpctrain.cli import COMMANDS
from hpctrain.cli import main as cli_main
from hpctrain.comm import create_communicator
from hpctrain.config import loads_config
from hpctrain.errors import ConfigError
from hpctrain.train import plot, tensorboard
from hpctrain.train.loop import Trainer
from trainer_configs import small_config

PNG = b"\x89PNG\r\n\x1a\n"


def _run(tmpdir, steps=6, metrics_extra="", dense_extra=""):
    text = small_config(tmpdir, steps=steps, eval_at_end=True).text
    text = text.replace("[eval]\nat_end = true\n", "[eval]\nat_end = true\ninterval = 2\n")
    text = text.replace("every_steps = 2\n", f"every_steps = 2\n{metrics_extra}\n")
    text = text.replace('kind = "adam"\nlr = 0.01\n', f'kind = "adam"\nlr = 0.01\n{dense_extra}\n')
    return loads_config(text, source="plot.toml")


def test_plot_writes_loss_auc_throughput_and_lr_curves(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plotting needs matplotlib (the bench extra)")
    cfg = _run(str(tmp_path), dense_extra='schedule = { warmup_steps = 2 }')
    Trainer(cfg, create_communicator("null"), stream=io.StringIO()).fit()
    assert "plot" in COMMANDS
    assert cli_main(["plot", str(tmp_path), "--out", str(tmp_path / "png")]) == 0
    names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "png" / "*.png")))
    assert names == ["auc.png", "loss.png", "lr.png", "throughput.png"]
    for name in names:
        with open(tmp_path / "png" / name, "rb") as f:
            assert f.read(8) == PNG
    assert "hpctrain plot: wrote" in capsys.readouterr().out
    s = plot.read_series(str(tmp_path / "metrics.jsonl"))
    assert s["loss"][0] == [2, 4, 6] and s["eval_auc"][0] == [2, 4, 6]
    # the metrics file itself, and beside it by default
    assert cli_main(["plot", str(tmp_path / "metrics.jsonl")]) == 0
    assert os.path.isfile(tmp_path / "loss.png")


def test_plot_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert plot.main([str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hpctrain plot: error: ") and err.count("\n") == 1
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # not installed
    assert plot.main([str(tmp_path)]) == 1
    assert capsys.readouterr().err == ("hpctrain plot: error: plotting needs matplotlib: "
                                       "pip install 'hpctrain[bench]'\n")


def test_scalars_of_the_metrics_records():
    rec = {"step": 4, "loss": 0.5, "samples_per_s": 100.0, "time": 1.0, "world_size": 2,
           "lr": 0.01, "phases_s": {"dense": 0.2}, "table_rows": [[1, 2]], "flag": True}
    assert sorted(tensorboard.scalars(rec)) == [
        ("phases_s/dense", 0.2), ("train/loss", 0.5), ("train/lr", 0.01),
        ("train/samples_per_s", 100.0)]
    assert tensorboard.scalars({"step": 4, "eval": {"auc": 0.7, "logloss": 0.4, "count": 9}}) \
        == [("eval/auc", 0.7), ("eval/logloss", 0.4)]


def test_tensorboard_without_the_extra_is_a_one_line_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard, "available", lambda: False)
    cfg = _run(str(tmp_path), metrics_extra=f'tensorboard = "{tmp_path / "tb"}"')
    with pytest.raises(ConfigError, match=r"^metrics.tensorboard: TensorBoard event files need "
                                          r"the tensorboard extra: pip install "
                                          r"'hpctrain\[tensorboard\]'$"):
        Trainer(cfg, create_communicator("null"), stream=io.StringIO()).fit()


def _read_events(logdir):
    """``{tag: {step: value}}`` of every event file in ``logdir`` (TFRecord framing read
    here, the Event protobuf decoded by tensorboardX's own classes)."""
    from tensorboardX.proto import event_pb2
    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


def test_tensorboard_event_files_hold_the_metrics(tmp_path):
    if not tensorboard.available():
        pytest.skip("TensorBoard event files need the tensorboard extra: "
                    "pip install 'hpctrain[tensorboard]'")
    tb = tmp_path / "tb"
    cfg = _run(str(tmp_path), metrics_extra=f'tensorboard = "{tb}"',
               dense_extra="clip_norm = 0.5")
    Trainer(cfg, create_communicator("null"), stream=io.StringIO()).fit()
    events = _read_events(str(tb))
    recs = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    loss = {r["step"]: r["loss"] for r in recs if "loss" in r}
    assert events["train/loss"] == pytest.approx(loss) and set(loss) == {2, 4, 6}
    auc = {r["step"]: r["eval"]["auc"] for r in recs if "eval" in r}
    assert events["eval/auc"] == pytest.approx(auc)
    assert set(events["train/grad_norm"]) == {2, 4, 6} and "phases_s/dense" in events
