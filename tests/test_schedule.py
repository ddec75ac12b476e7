"""Dense learning-rate schedules and gradient clipping: the functions, the config keys, and
the trainer (a resumed run takes the uninterrupted run's steps bit for bit). Multi-rank:
tests/mpi/test_schedule.py."""
import io
import json
import math

import numpy as np
import pytest

from hpctrain.comm import create_communicator
from hpctrain.config import config_from_dict, loads_config
from hpctrain.dense.optim import make_optimizer
from hpctrain.dense.params import FlatParameters
from hpctrain.dense.schedule import LrSchedule, clip_gradient, grad_norm
from hpctrain.errors import ConfigError
from hpctrain.train.loop import Trainer
from test_config import BASE, DELETE, HYBRID, mutate
from trainer_configs import small_config

SCHEDULED = """
[dense_optimizer]
kind = "adam"
lr = 0.01
clip_norm = 0.3
schedule = { warmup_steps = 3, decay = "cosine", min_lr = 0.001 }
"""


def scheduled_config(tmpdir=None, steps=10, dense=SCHEDULED, **kw):
    """``small_config`` with ``dense`` in place of its [dense_optimizer] section."""
    text = small_config(tmpdir, steps=steps, **kw).text
    text = text.replace('[dense_optimizer]\nkind = "adam"\nlr = 0.01\n', dense)
    return loads_config(text, source="scheduled.toml")


def test_warmup_then_each_decay():
    s = LrSchedule(1.0, warmup_steps=4, decay="linear", decay_steps=10, min_lr=0.1)
    assert [s(i) for i in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(5) == 1.0 and s(10) == pytest.approx(1.0 - 0.9 * 0.5)
    assert s(14) == pytest.approx(0.19) and s(15) == pytest.approx(0.1)
    assert s(1000) == pytest.approx(0.1)
    c = LrSchedule(2.0, decay="cosine", decay_steps=8)
    assert c(1) == 2.0 and c(5) == pytest.approx(1.0) and c(9) == pytest.approx(0.0)
    assert c(100) == pytest.approx(0.0)
    st = LrSchedule(1.0, warmup_steps=2, decay="step", step_size=3, gamma=0.5)
    assert [st(i) for i in range(1, 10)] == [0.5, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    assert LrSchedule(0.3)(12345) == 0.3
    # a pure function of the step: the same value whenever it is asked
    assert [s(i) for i in range(1, 20)] == [s(i) for i in range(1, 20)]


def test_schedule_refuses_what_the_config_would():
    with pytest.raises(ValueError, match="decay_steps"):
        LrSchedule(1.0, decay="cosine")
    with pytest.raises(ValueError, match="step_size"):
        LrSchedule(1.0, decay="step")
    with pytest.raises(ValueError, match="min_lr"):
        LrSchedule(1.0, decay="linear", decay_steps=3, min_lr=2.0)


def test_clip_gradient_scales_to_the_norm_and_leaves_small_ones():
    g = np.array([3.0, 4.0, 0.0], dtype=np.float32)
    assert grad_norm(g) == 5.0
    norm = clip_gradient(g, 1.0)
    assert norm == 5.0 and g.dtype == np.float32
    assert math.isclose(float(np.linalg.norm(g.astype(np.float64))), 1.0, rel_tol=1e-6)
    h = np.array([0.3, 0.4], dtype=np.float32)
    before = h.copy()
    assert clip_gradient(h, 1.0) == pytest.approx(0.5)
    assert np.array_equal(h, before)
    bad = np.array([np.inf, 1.0], dtype=np.float32)
    assert not math.isfinite(clip_gradient(bad, 1.0)) and bad[1] == 1.0


def test_optimizer_takes_the_lr_of_the_step_it_is_given():
    p = FlatParameters()
    p.add("w", (4,))
    p.build()
    opt = make_optimizer("sgd", p, lr=1.0)
    opt.schedule = LrSchedule(1.0, warmup_steps=10)
    p.grad[...] = 1.0
    opt.step(5)
    assert opt.lr == 0.5 and np.allclose(p.data[:4], -0.5)
    opt.step()                      # no step given: the optimizer's own count + 1 (2)
    assert opt.lr == 0.2


SCHEDULE_ERRORS = [
    ({"decay": "exp"}, "dense_optimizer.schedule.decay: expected one of 'none'"),
    ({"decay": "cosine", "gamma": 0.5},
     "dense_optimizer.schedule.gamma: not a key of decay 'cosine' (it takes decay_steps, "
     "min_lr)"),
    ({"decay": "step"}, "dense_optimizer.schedule.step_size: required key is missing"),
    ({"decay": "step", "step_size": 5, "gamma": 1.5},
     "dense_optimizer.schedule.gamma: expected a finite number > 0 and <= 1"),
    ({"warmup_steps": -1}, "dense_optimizer.schedule.warmup_steps: expected an integer >= 0"),
    ({"decay": "linear", "min_lr": 0.01},
     "dense_optimizer.schedule.min_lr: expected a finite number >= 0 and <= 0.001"),
    ({"decay": "linear", "warmup_steps": 10},
     "dense_optimizer.schedule.warmup_steps: 10 warm-up steps leave none of the 10 steps"),
    ({"warmup": 3}, "dense_optimizer.schedule.warmup: unknown key; did you mean "
                    "'warmup_steps'?"),
]


@pytest.mark.parametrize("schedule,message", SCHEDULE_ERRORS)
def test_schedule_errors_name_the_key(schedule, message):
    d = mutate(BASE, "dense_optimizer.schedule", schedule)
    with pytest.raises(ConfigError, match="^run.toml: ") as e:
        config_from_dict(d, source="run.toml")
    assert message in str(e.value)


def test_schedule_and_clip_config():
    d = mutate(BASE, "dense_optimizer", {"kind": "adam", "clip_norm": 1.0,
                                         "schedule": {"warmup_steps": 2, "decay": "cosine"}})
    cfg = config_from_dict(d)
    assert cfg.dense_optimizer == {"kind": "adam", "lr": 1e-3, "clip_norm": 1.0, "schedule": {
        "warmup_steps": 2, "decay": "cosine", "decay_steps": 8, "min_lr": 0.0}}
    no_steps = mutate(mutate(d, "steps", DELETE), "epochs", 2)
    with pytest.raises(ConfigError, match="decay_steps: required: the run sets no steps"):
        config_from_dict(no_steps)
    with pytest.raises(ConfigError, match="dense_optimizer.clip_norm: expected a finite "
                                          "number > 0"):
        config_from_dict(mutate(d, "dense_optimizer.clip_norm", 0))
    # tables' optimizers take neither key
    for key, value in (("clip_norm", 1.0), ("schedule", {"warmup_steps": 2})):
        with pytest.raises(ConfigError, match=f"tables\\[0\\].optimizer.{key}: unknown key"):
            config_from_dict(mutate(BASE, f"tables.0.optimizer.{key}", value))


def test_clip_norm_in_hybrid_mode_needs_one_group_or_dense_on_the_workers():
    d = mutate(HYBRID, "dense_optimizer.clip_norm", 1.0)
    config_from_dict(mutate(d, "ps", {"groups": 1}))
    config_from_dict(mutate(d, "ps", {"groups": 2, "dense_on_servers": False}))
    with pytest.raises(ConfigError, match="dense_optimizer.clip_norm: the servers sum the "
                                          "gradients of 2 worker groups"):
        config_from_dict(mutate(d, "ps", {"groups": 2}))


def test_resumed_run_equals_the_uninterrupted_run_bitwise(tmp_path):
    null = create_communicator("null")
    full = Trainer(scheduled_config(str(tmp_path / "full"), steps=10), null,
                   stream=io.StringIO())
    full.fit()
    first = Trainer(scheduled_config(str(tmp_path / "cut"), steps=10), null,
                    stream=io.StringIO())
    assert first.fit(max_steps=4)["stopped"] == "max_steps"
    second = Trainer(scheduled_config(str(tmp_path / "cut"), steps=10), null,
                     stream=io.StringIO())
    assert second.fit(resume=True)["step"] == 10
    assert first.losses + second.losses == full.losses
    assert np.array_equal(second.model.params.data, full.model.params.data)
    # the metrics carry the lr of each reported step and the norm before clipping; the
    # clip bit (norms above clip_norm = 0.3), and the lr followed warm-up and decay
    recs = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    lrs = {r["step"]: r["lr"] for r in recs if "lr" in r}
    sched = LrSchedule(0.01, warmup_steps=3, decay="cosine", decay_steps=7, min_lr=0.001)
    assert lrs == {s: sched(s) for s in (2, 4, 6, 8, 10)}
    assert max(r["grad_norm"] for r in recs if "grad_norm" in r) > 0.3
    assert full.opt.lr == sched(10)


def test_clipping_changes_the_run_and_a_huge_clip_norm_does_not():
    null = create_communicator("null")
    plain = Trainer(small_config(steps=5), null, stream=io.StringIO())
    plain.fit()
    loose = Trainer(scheduled_config(steps=5, dense='[dense_optimizer]\nkind = "adam"\n'
                                                   'lr = 0.01\nclip_norm = 1e9\n'),
                    null, stream=io.StringIO())
    loose.fit()
    assert loose.losses == plain.losses
    tight = Trainer(scheduled_config(steps=5, dense='[dense_optimizer]\nkind = "sgd"\n'
                                                   'lr = 0.01\nclip_norm = 1e-3\n'),
                    null, stream=io.StringIO())
    tight.fit()
    sgd = Trainer(scheduled_config(steps=5, dense='[dense_optimizer]\nkind = "sgd"\n'
                                                 'lr = 0.01\n'), null, stream=io.StringIO())
    sgd.fit()
    assert tight.losses[0] == sgd.losses[0] and tight.losses[1:] != sgd.losses[1:]


def test_clip_gradient_on_each_array_backend(xp):
    from hpctrain.dense.backend import to_numpy
    ref = np.arange(1, 9, dtype=np.float32)
    g = xp.asarray(ref.copy())
    assert clip_gradient(g, 2.0) == pytest.approx(clip_gradient(ref, 2.0), rel=1e-12)
    np.testing.assert_allclose(to_numpy(g), ref, rtol=1e-6)


def test_the_gpu_path_schedules_and_clips_as_the_cpu_path():
    """The device step (its NumPy twin here) reaches the same ``_apply_dense``: same bits."""
    from test_device_path import TwinTrainer
    cfg = scheduled_config(steps=6)
    cpu = Trainer(cfg, create_communicator("null"), stream=io.StringIO())
    cpu.fit()
    twin = TwinTrainer(cfg.replace(device="gpu"), create_communicator("null"),
                       stream=io.StringIO())
    twin.fit()
    assert twin._device_step is not None and twin.losses == cpu.losses
    assert twin._grad_norm == cpu._grad_norm and twin.opt.lr == cpu.opt.lr
    np.testing.assert_array_equal(twin.model.params.data, cpu.model.params.data)
