"""The trainer's GPU path on several ranks, run by its NumPy twin (``HostOps``): the same
losses and parameters as the plain CPU step at any world size, bit for bit.

The device step reduces the sample count and flags before backward and the loss sum after
the gradients' copy back (two small host allreduces instead of one); every rank must take
the same path, and the dense allreduce goes through ``Trainer.dense_comm``.
"""
import io

import numpy as np
import pytest

from hpctrain.comm import create_communicator
from hpctrain.dense.device import Device
from hpctrain.dense.streams import HostOps
from hpctrain.train.loop import Trainer
from trainer_configs import small_config

pytestmark = pytest.mark.mpi


class TwinTrainer(Trainer):
    def _make_device(self):
        return Device("gpu", np, ops=HostOps(), source=self.cfg.source)


@pytest.mark.parametrize("overlap", [False, True])
def test_twin_equals_cpu_on_this_world(overlap):
    cfg = small_config(steps=4, overlap=overlap)
    runs = []
    for cls, device in ((Trainer, "cpu"), (TwinTrainer, "gpu")):
        t = cls(cfg.replace(device=device), create_communicator("mpi"), stream=io.StringIO())
        t.fit()
        runs.append(t)
    cpu, twin = runs
    assert twin.dense_comm is twin.comm  # host arrays: the trainer's own communicator
    assert twin.losses == cpu.losses and len(cpu.losses) == 4
    np.testing.assert_array_equal(twin.model.params.data, cpu.model.params.data)
