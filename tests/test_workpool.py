"""Per-table loops spread over a rank's threads: same results, same order, same bits."""
import io
import threading
import time

import numpy as np
import pytest

from hpctrain._kernels import _openmp
from hpctrain.bench.train import workload
from hpctrain.config import config_from_dict
from hpctrain.workpool import parallel_map
from hpctrain.train.loop import Trainer


@pytest.fixture
def threads():
    old = _openmp.get_num_threads()
    yield _openmp.set_num_threads
    _openmp.set_num_threads(old)


def test_results_in_order_on_several_threads_kernels_on_one(threads):
    threads(3)
    seen = []

    def fn(x):
        seen.append((threading.current_thread().name, _openmp.get_num_threads()))
        time.sleep(0.001)       # releases the GIL, as the kernels do
        return x * x
    for _ in range(5):
        assert parallel_map(fn, range(40)) == [x * x for x in range(40)]
    assert {n for _, n in seen} == {1}
    assert any(name.startswith("hpctrain-pool-") for name, _ in seen)
    assert _openmp.get_num_threads() == 3


def test_one_thread_or_one_table_runs_in_the_caller(threads):
    threads(1)
    assert parallel_map(lambda x: threading.current_thread().name, range(3)) == \
        [threading.current_thread().name] * 3
    threads(2)
    assert parallel_map(lambda x: _openmp.get_num_threads(), [0]) == [2]


def test_first_error_propagates_and_the_pool_stays_usable(threads):
    threads(2)

    def fn(x):
        if x == 7:
            raise ValueError("table 7")
        return x
    with pytest.raises(ValueError, match="table 7"):
        parallel_map(fn, range(20))
    assert _openmp.get_num_threads() == 2
    assert parallel_map(lambda x: x + 1, range(20)) == list(range(1, 21))


def test_nested_loops_run_inline(threads):
    threads(2)
    assert parallel_map(lambda x: sum(parallel_map(lambda y: x * y, range(4))), range(6)) == \
        [6 * x for x in range(6)]


@pytest.mark.parametrize("bag", [1, 3])
def test_training_gives_the_same_bits_on_one_and_two_threads(bag):
    out = []
    for t in (1, 2):
        cfg = config_from_dict(workload(16, 128, bag=bag, steps=4, threads=t), source="bench")
        trainer = Trainer(cfg, stream=io.StringIO())
        trainer.fit()
        rows = trainer.emb.export()
        out.append((trainer.losses, trainer.model.params.data.copy(), rows))
    assert out[0][0] == out[1][0]
    np.testing.assert_array_equal(out[0][1], out[1][1])
    for name in out[0][2]:
        a, b = out[0][2][name], out[1][2][name]
        order_a, order_b = np.argsort(a["keys"]), np.argsort(b["keys"])
        np.testing.assert_array_equal(a["keys"][order_a], b["keys"][order_b])
        np.testing.assert_array_equal(a["values"][order_a], b["values"][order_b])
