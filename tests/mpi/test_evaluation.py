"""Exact AUC without gathering: the distributed sample sort gives the gathered result."""
import numpy as np
import pytest

from hpctrain.comm import create_communicator
from hpctrain.train.evaluation import evaluate_arrays, evaluate_distributed

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("skew", [False, True])
def test_distributed_metrics_equal_the_gathered_ones(ties, skew):
    comm = create_communicator("mpi")
    rng = np.random.default_rng(100 + comm.rank)
    n = 0 if (skew and comm.rank == 0 and comm.size > 1) else int(rng.integers(50, 400))
    z = rng.normal(size=n)
    if ties:
        z = np.round(z * 2) / 2            # a handful of distinct scores: long runs of ties
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.float64)
    for _ in range(2):                     # twice: no state left behind
        got = evaluate_distributed(comm, y, z)
        ref = evaluate_arrays(np.concatenate(comm.allgather_object(y)),
                              np.concatenate(comm.allgather_object(z)))
        assert got["count"] == ref["count"] and got["auc"] == ref["auc"]
        assert got["accuracy"] == ref["accuracy"]
        assert got["logloss"] == pytest.approx(ref["logloss"], rel=1e-12)
