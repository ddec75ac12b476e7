"""Delta export at any world size: every rank writes its shard's rows, rank 0 commits."""
import io
import os
import tempfile

import numpy as np
import pytest
from mpi4py import MPI

from hpctrain.checkpoint import export_model
from hpctrain.checkpoint.delta import list_deltas, read_done
from hpctrain.comm import create_communicator
from hpctrain.train.loop import Trainer
from hpctrain.train.serving import DeltaApplier, Predictor
from test_online import online_config

pytestmark = pytest.mark.mpi


def _shared_tmpdir():
    world = MPI.COMM_WORLD
    path = tempfile.mkdtemp(prefix="hpctrain-online-") if world.rank == 0 else None
    return world.bcast(path, root=0)


def test_sharded_rows_equal_export_plus_deltas():
    comm = create_communicator("mpi")
    tmp = _shared_tmpdir()
    cfg = online_config(tmp, steps=14, ckpt_every=5, overlap=True, eval_at_end=True)
    tr = Trainer(cfg, comm, stream=io.StringIO())
    tr.fit()
    y, z = tr.predict("eval")
    rows = comm.allgather_object({n: (e["keys"], e["values"]) for n, e in tr.emb.export().items()})
    deltas = list_deltas(os.path.join(tmp, "deltas"))
    assert [s for s, _ in deltas] == [3, 5, 6, 9, 10, 12, 14]
    assert all(read_done(p)["world_size"] == comm.size for _, p in deltas)
    if comm.rank == 0:
        model = export_model(os.path.join(tmp, "ckpt", "step-00000005"),
                             os.path.join(tmp, "model.h5"))
        applier = DeltaApplier(model, os.path.join(tmp, "deltas"))
        applier.poll()
        assert applier.model_step == 14
        for name in ("t_small", "t_big"):
            keys = np.concatenate([r[name][0] for r in rows])
            values = np.concatenate([r[name][1] for r in rows])
            order = np.argsort(keys)
            k, v = applier.model.rows(name)
            np.testing.assert_array_equal(k, keys[order])
            np.testing.assert_array_equal(v, values[order])
        pred = Predictor(applier.model)
        y2, z2 = pred.score(pred.reader(split="eval", batch_size=64))
        np.testing.assert_array_equal(y2, y)
        np.testing.assert_allclose(z2, z, rtol=0, atol=1e-6)
    comm.barrier()
