"""EmbeddingTable.reserve and the per-table ``reserve_rows`` key: preallocated, faulted-in
storage that changes no result."""
import resource

import numpy as np
import pytest

from hpctrain.config import config_from_dict
from hpctrain.errors import ConfigError
from hpctrain.sparse import table as table_mod
from hpctrain.sparse.plan import make_table, shard_reserve
from hpctrain.sparse.spec import TableSpec
from hpctrain.sparse.table import EmbeddingTable


def _train(table, batches, dim, seed=3):
    rng = np.random.default_rng(seed)
    caps = []
    for step, keys in enumerate(batches, 1):
        idx = table.find_or_insert(keys, step)
        grads = rng.standard_normal((keys.shape[0], dim)).astype(np.float32)
        table.apply_gradients(idx, grads, step, keys=keys)
        m = table.memory_stats()
        caps.append((m["row_capacity"], m["index_slots"]))
    return caps


@pytest.mark.parametrize("optimizer,row_dtype", [("adagrad", "fp32"), ("adam", "fp32"),
                                                 ("rowwise_adagrad", "fp16")])
def test_reserved_table_trains_bit_for_bit_like_a_growing_one_and_never_grows(optimizer,
                                                                            row_dtype):
    rng = np.random.default_rng(0)
    dim = 8
    batches = [np.unique(rng.integers(0, 40_000, 6_000)) for _ in range(6)]
    total = len(np.unique(np.concatenate(batches)))
    plain = EmbeddingTable("t", dim, optimizer, seed=5, row_dtype=row_dtype)
    reserved = EmbeddingTable("t", dim, optimizer, seed=5, row_dtype=row_dtype)
    reserved.reserve(total)
    before = reserved.memory_stats()
    assert len(reserved) == 0 and before["row_capacity"] >= total
    _train(plain, batches, dim)
    caps = _train(reserved, batches, dim)
    assert set(caps) == {(before["row_capacity"], before["index_slots"])}    # never grew
    a, b = plain.export(), reserved.export()
    order_a, order_b = np.argsort(a["keys"]), np.argsort(b["keys"])
    np.testing.assert_array_equal(a["keys"][order_a], b["keys"][order_b])
    np.testing.assert_array_equal(a["values"][order_a], b["values"][order_b])
    for k in a["slots"]:
        np.testing.assert_array_equal(a["slots"][k][order_a], b["slots"][k][order_b])


def test_reserved_inserts_do_not_fault_pages_in():
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 2**62, 50_000) for _ in range(4)]

    def faults(reserve):
        t = EmbeddingTable("t", 64, "adagrad")
        if reserve:
            t.reserve(200_000)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for step, b in enumerate(batches, 1):
            t.find_or_insert(b, step)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    plain, reserved = faults(False), faults(True)
    assert reserved * 3 < plain, (plain, reserved)


def test_reserve_checks_its_argument_and_the_memory_there_is(monkeypatch):
    t = EmbeddingTable("users", 16, "sgd")
    for bad in (-1, 1.5, True, 1 << 31):
        with pytest.raises(ValueError, match="users.*reserve rows"):
            t.reserve(bad)
    monkeypatch.setattr(table_mod, "available_memory", lambda: 1 << 20)
    with pytest.raises(MemoryError, match=r"table 'users': reserving 1,000,000 rows .* GiB"):
        t.reserve(1_000_000)
    assert t.memory_stats()["row_capacity"] < 1_000_000    # nothing reserved
    t.reserve(1_000_000, populate=False)                   # mapped, not faulted in: allowed
    assert t.memory_stats()["row_capacity"] >= 1_000_000
    t.reserve(10)                                          # already room: nothing to do


def test_shards_reserve_their_share_with_room_for_the_hash_imbalance():
    assert shard_reserve(0, 4) == 0 and shard_reserve(1000, 1) == 1000
    rows = 1_000_000
    per = shard_reserve(rows, 8)
    assert rows / 8 < per < 1.02 * rows / 8
    # a uniform hash: the largest of 8 shards over 200 draws of the keys stays within it
    rng = np.random.default_rng(2)
    worst = max(np.bincount(rng.integers(0, 8, rows), minlength=8).max() for _ in range(200))
    assert worst <= per
    spec = TableSpec("t", 4, ["f"], optimizer="sgd", table_id=0, reserve_rows=40_000)
    one, four = make_table(spec, 0).memory_stats(), make_table(spec, 0, shards=4).memory_stats()
    assert one["row_capacity"] >= 40_000 > four["row_capacity"] >= shard_reserve(40_000, 4)


def _cfg(**table):
    return {"global_batch": 8, "steps": 1,
            "model": {"kind": "dlrm", "bottom": [8, 4], "top": [8, 1]},
            "tables": [{"name": "users", "features": ["C1"], "dim": 4, **table}],
            "data": {"format": "synthetic", "synthetic": {"num_features": 1, "num_dense": 2},
                     "train": {"num_samples": 64}}}


def test_config_key_reaches_the_spec_and_bad_values_name_the_key():
    from hpctrain.train.build import table_specs
    cfg = config_from_dict(_cfg(reserve_rows=5000), source="job.toml")
    assert cfg.tables[0].reserve_rows == 5000 and table_specs(cfg)[0].reserve_rows == 5000
    assert config_from_dict(_cfg(), source="job.toml").tables[0].reserve_rows == 0
    for bad in (-5, "many", 1.5):
        with pytest.raises(ConfigError, match="reserve_rows"):
            config_from_dict(_cfg(reserve_rows=bad), source="job.toml")
