"""The trainer at any world size against itself on one rank (COMM_SELF)."""
import io
import json
import os
import tempfile

import numpy as np
import pytest
from mpi4py import MPI

from hpctrain.comm import create_communicator
from hpctrain.train.loop import Trainer
from trainer_configs import small_config

pytestmark = pytest.mark.mpi


def _shared_tmpdir():
    world = MPI.COMM_WORLD
    path = tempfile.mkdtemp(prefix="hpctrain-trainer-") if world.rank == 0 else None
    return world.bcast(path, root=0)


def _world():
    return create_communicator("mpi")


def _single():
    return create_communicator("mpi", mpi_comm=MPI.COMM_SELF)


@pytest.mark.parametrize("sparse_opt", ["adam", "rowwise_adagrad"])
def test_losses_match_single_rank_on_same_global_batches(sparse_opt):
    cfg = small_config(steps=6, sparse_opt=sparse_opt, eval_at_end=True)
    dist = Trainer(cfg, _world(), stream=io.StringIO())
    res = dist.fit()
    ref = Trainer(cfg, _single(), stream=io.StringIO())
    ref_res = ref.fit()
    assert len(dist.losses) == 6
    np.testing.assert_allclose(dist.losses, ref.losses, rtol=1e-5)
    np.testing.assert_allclose(dist.model.params.data, ref.model.params.data, rtol=1e-4,
                               atol=1e-6)
    assert res["eval"]["count"] == ref_res["eval"]["count"] == 256
    assert res["eval"]["auc"] == pytest.approx(ref_res["eval"]["auc"], abs=1e-4)


def test_overlap_gives_identical_losses():
    plain = Trainer(small_config(steps=5), _world(), stream=io.StringIO())
    plain.fit()
    over = Trainer(small_config(steps=5, overlap=True), _world(), stream=io.StringIO())
    over.fit()
    assert over.losses == plain.losses


def test_resume_continues_exactly_and_reshards():
    tmp = _shared_tmpdir()
    full = Trainer(small_config(steps=6), _world(), stream=io.StringIO())
    full.fit()

    first = Trainer(small_config(tmp, steps=6), _world(), stream=io.StringIO())
    out = first.fit(max_steps=3)
    assert out["stopped"] == "max_steps" and out["step"] == 3 and out["checkpoint"]
    resumed = Trainer(small_config(tmp, steps=6), _world(), stream=io.StringIO())
    out = resumed.fit(resume=True)
    assert out["step"] == 6 and out["stopped"] == "done"
    np.testing.assert_allclose(first.losses + resumed.losses, full.losses, rtol=1e-6)

    # The step-3 checkpoint written by this world, restored on a single rank, continues
    # like an uninterrupted single-rank run.
    world = MPI.COMM_WORLD
    if world.rank == 0:
        ref = Trainer(small_config(steps=6), _single(), stream=io.StringIO())
        ref.fit()
        one = Trainer(small_config(os.path.join(tmp, "one"), steps=6), _single(),
                      stream=io.StringIO())
        step = one.restore(os.path.join(tmp, "ckpt", "step-00000003"))
        assert step == 3
        one.fit()
        np.testing.assert_allclose(one.losses, ref.losses[3:], rtol=1e-5)
    world.Barrier()

    if world.rank == 0:
        lines = [json.loads(line) for line in open(os.path.join(tmp, "metrics.jsonl"))]
        steps = [r["step"] for r in lines if "loss" in r]
        assert steps and steps[-1] == 6
        rec = [r for r in lines if "phases_s" in r][-1]
        assert len(rec["table_rows"]) == world.size and rec["samples_per_s"] > 0
        assert {"data", "dense", "allreduce", "sparse_update"} <= set(rec["phases_s"])
