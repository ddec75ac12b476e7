"""Hybrid-mode pieces in one process: message packing, roles, dense slices, server reads,
and the errors a bad hybrid setup gives. (Multi-rank behaviour: tests/mpi/test_hybrid.py,
failures: tests/test_hybrid_failure.py.)"""
import numpy as np
import pytest

from hpctrain.comm import create_communicator
from hpctrain.comm.p2p import pack, unpack
from hpctrain.errors import ConfigError
from hpctrain.ps import protocol as P
from hpctrain.ps.dense import DenseShard, FlatSlice, slice_bounds
from hpctrain.ps.roles import server_ranks
from hpctrain.ps.server import read_rows
from hpctrain.sparse.table import EmbeddingTable
from hpctrain.train.hybrid import setup_hybrid
from hybrid_configs import small


def test_pack_unpack_roundtrip():
    header = P.header(7, worker=3, group=1, aux=-2, counts=[4, 0, 2])
    arrays = [np.arange(6, dtype=np.int64) - 3, np.linspace(0, 1, 5, dtype=np.float32),
              np.zeros(0, dtype=np.float32), np.array([1.5], dtype=np.float64)]
    h, got = unpack(pack(header, arrays))
    assert h.tolist() == header.tolist()
    assert len(got) == len(arrays)
    for a, b in zip(arrays, got):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert P.counts_of(h, 3).tolist() == [4, 0, 2]
    assert P.describe(P.PUSH, h) == "PUSH of clock 7 from worker 3"


def test_pack_refuses_unknown_dtypes():
    with pytest.raises(TypeError, match="cannot send dtype"):
        pack(P.header(0), [np.zeros(2, dtype=np.complex64)])


def test_server_placement():
    assert server_ranks("first", 6, 2) == [0, 1]
    hosts = ["a", "a", "a", "b", "b", "b"]
    assert server_ranks("per_node", 6, 2, hosts) == [0, 3]
    assert server_ranks("per_node", 6, 3, hosts) == [0, 3, 1]
    with pytest.raises(ConfigError, match="ps.placement"):
        server_ranks("last", 6, 2)


def test_dense_slices_cover_the_buffer_and_sum_groups_in_order():
    bounds = slice_bounds(10, 3)
    assert bounds == [(0, 3), (3, 6), (6, 10)]
    from hpctrain.dense.optim import make_optimizer
    shard = DenseShard(lambda p: make_optimizer("sgd", p, lr=0.5))
    shard.init(np.ones(4, dtype=np.float32))
    assert isinstance(shard.params, FlatSlice)
    shard.apply([np.full(4, 1.0, np.float32), np.full(4, 3.0, np.float32)])
    assert shard.params.data.tolist() == [-1.0] * 4        # 1 - 0.5 * (1 + 3)


@pytest.mark.parametrize("init", ["uniform", "normal"])
def test_reads_of_missing_rows_give_the_initial_row_and_insert_nothing(init):
    table = EmbeddingTable("t", 5, "adagrad", table_id=3, seed=11, init=init)
    ref = EmbeddingTable("t", 5, "adagrad", table_id=3, seed=11, init=init)
    keys = np.array([7, -4, 1 << 40, 9], dtype=np.int64)
    table.apply_gradients(table.find_or_insert(keys[:1], 1), np.ones((1, 5), np.float32), 1)
    rows = read_rows(table, keys)
    assert len(table) == 1                                   # nothing inserted
    assert np.array_equal(rows[0], table.gather(table.find(keys[:1]))[0])
    assert np.array_equal(rows[1:], ref.gather(ref.find_or_insert(keys[1:], 1)))


def test_stop_clock_and_json_travel_in_messages():
    h, arrays = unpack(pack(P.header(5, aux=4, stop=6), [P.json_array({"path": "/x", "n": 2})]))
    assert h[P.H_CLOCK] == 5 and h[P.H_AUX] == 4 and h[P.H_STOP] == 6
    assert P.counts_of(P.header(1, counts=[3, 0]), 2).tolist() == [3, 0]
    assert P.from_json_array(arrays[0]) == {"path": "/x", "n": 2}
    assert P.from_json_array(P.json_array({"i": np.int64(3)})) == {"i": 3}


def test_dense_slice_restores_values_and_optimizer_state():
    from hpctrain.dense.optim import make_optimizer
    from hpctrain.errors import CheckpointError
    shard = DenseShard(lambda p: make_optimizer("adam", p, lr=0.1))
    m, v = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
    shard.restore(np.ones(3, np.float32), {"exp_avg": m, "exp_avg_sq": v}, 7)
    assert shard.opt.step_count == 7 and shard.params.data.tolist() == [1.0] * 3
    assert np.array_equal(shard.opt.state["exp_avg"], m)
    with pytest.raises(CheckpointError, match="slots"):
        shard.restore(np.ones(3, np.float32), {"sum": m}, 7)


def test_checkpoint_layout_names_the_flat_buffer():
    from hpctrain.dense.params import FlatParameters
    from hpctrain.ps.checkpoint import dense_layout, named_params
    params = FlatParameters()
    params.add("a", (2, 3), init="ones")
    params.add("b", (5,), init="zeros")
    params.build(seed=1)
    named = named_params(np.array(params.data), dense_layout(params))
    assert list(named) == ["a", "b"]
    assert all(np.array_equal(named[k], v) for k, v in params.state_dict().items())


def test_a_world_without_room_for_workers_names_the_key():
    cfg = small("hybrid", servers=1)
    with pytest.raises(ConfigError, match="ps.servers"):
        setup_hybrid(cfg, create_communicator("null"))


def test_collective_config_is_not_hybrid():
    with pytest.raises(ConfigError, match="mode"):
        setup_hybrid(small(), create_communicator("null"))


def test_example_config_fits_five_ranks():
    import os
    from hpctrain.config import load_config
    path = os.path.join(os.path.dirname(__file__), "..", "hpctrain", "configs",
                        "hybrid_synthetic.toml")
    cfg = load_config(path)
    assert cfg.mode == "hybrid" and cfg.ps.consistency == "ssp" and cfg.ps.staleness == 2
    assert cfg.ps_layout(5) == (1, 4, 2)
    assert cfg.batch_sizes(4) == (512, 128)


def test_resume_best_resolves_best_json_or_names_why_it_cannot(tmp_path):
    """``--resume best`` in hybrid mode: worker 0 resolves the name as the collective
    manager does (best.json), and without one every worker gets the reason."""
    import json
    import types
    from hpctrain.checkpoint import CheckpointManager
    from hpctrain.errors import CheckpointError
    from hpctrain.train.hybrid import HybridTrainer
    null = create_communicator("null")
    worker = types.SimpleNamespace(comm=null, ckpt=CheckpointManager(str(tmp_path), null))
    with pytest.raises(CheckpointError, match=r"resuming from .*best: .*no best checkpoint "
                                              r"\(best\.json is written by runs with \[eval\] "
                                              r"keep_best = true\)"):
        HybridTrainer._resolve_checkpoint(worker, "best")
    (tmp_path / "best.json").write_text(json.dumps({"checkpoint": "step-00000004", "step": 4}))
    for name in ("best", str(tmp_path / "best"), str(tmp_path / "best.json")):
        assert HybridTrainer._resolve_checkpoint(worker, name) == str(tmp_path / "step-00000004")
    assert HybridTrainer._resolve_checkpoint(worker, "step-00000002") == \
        str(tmp_path / "step-00000002")
