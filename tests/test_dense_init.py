"""Dense layers start as the DLRM reference's (facebookresearch/dlrm, ``create_mlp``):
weights N(0, sqrt(2 / (in + out))), biases N(0, sqrt(1 / out)); and the benchmark
workload's loss never rises above twice its first step's."""
import io

import numpy as np
import pytest

from hpctrain.bench.train import workload
from hpctrain.config import config_from_dict
from hpctrain.dense.layers import Linear
from hpctrain.dense.params import FlatParameters, init_values
from hpctrain.train.loop import Trainer


def test_xavier_normal_has_the_two_sided_fan_std():
    w = init_values("xavier_normal", (600, 200), np.random.default_rng(0))
    assert abs(w.mean()) < 3e-3 and w.std() == pytest.approx(np.sqrt(2 / 800), rel=0.01)


@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"])
def test_linear_defaults_are_the_dlrm_reference(activation):
    p = FlatParameters()
    layer = Linear(p, "l", 512, 256, activation)
    p.build(3)
    w, b = layer.weight.data, layer.bias.data
    assert w.std() == pytest.approx(np.sqrt(2 / (512 + 256)), rel=0.02)
    assert b.std() == pytest.approx(np.sqrt(1 / 256), rel=0.15) and abs(b.mean()) < 0.02
    # a logit layer (out = 1) gets a bias of std 1, as in the reference
    p = FlatParameters()
    top = Linear(p, "t", 256, 1)
    assert top.bias.init == "normal:1.0"


def test_explicit_inits_still_win():
    p = FlatParameters()
    layer = Linear(p, "l", 400, 300, "relu", init="he", bias_init="zeros")
    p.build(0)
    assert layer.weight.data.std() == pytest.approx(np.sqrt(2 / 400), rel=0.02)
    assert not layer.bias.data.any()


@pytest.mark.parametrize("dim", [16, 64])
def test_benchmark_loss_never_exceeds_twice_the_first(dim):
    """The shipped benchmark configs (smaller batch): no loss spike after the first step
    (before: 10.7x at dim 16 and 17.3x at dim 64 at batch 4096)."""
    cfg = config_from_dict(workload(dim, 512, steps=8, threads=1), source="bench")
    trainer = Trainer(cfg, stream=io.StringIO())
    trainer.fit()
    losses = np.array(trainer.losses)
    assert len(losses) == 8 and np.isfinite(losses).all()
    assert losses.max() <= 2.0 * losses[0], losses
    assert losses[-1] < losses[0], losses
