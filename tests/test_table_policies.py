"""Admission (exact counters, counting Bloom filter) and eviction (TTL, LFU cap)."""
import math

import numpy as np
import pytest

from hpctrain._kernels import table as kernel
from hpctrain.errors import ConfigError
from hpctrain.sparse.init import reference_init
from hpctrain.sparse.policies import Admission, Eviction
from hpctrain.sparse.table import EmbeddingTable


@pytest.mark.parametrize("counter", ["exact", "bloom"])
def test_key_admitted_on_its_min_count_th_occurrence(counter):
    adm = Admission(min_count=3, counter=counter, bloom_size=1 << 16)
    t = EmbeddingTable("t", 4, "sgd", admission=adm)
    keys = np.arange(100, 140, dtype=np.int64)
    for seen in (1, 2):
        rows = t.find_or_insert(keys, seen)
        assert (rows == -1).all() and len(t) == 0
        np.testing.assert_array_equal(t.gather(rows), 0)
        t.apply_gradients(rows, np.ones((40, 4), np.float32), seen)  # all skipped
        assert (t.find(keys) == -1).all()
    rows = t.find_or_insert(keys, 3)
    assert (rows >= 0).all() and len(t) == 40
    np.testing.assert_array_equal(t.gather(rows), reference_init(keys, 4))
    if counter == "exact":
        assert t.memory_stats()["pending_admission"] == 0  # admitted keys leave the counter map


@pytest.mark.parametrize("counter", ["exact", "bloom"])
def test_each_occurrence_in_a_batch_counts(counter):
    t = EmbeddingTable("t", 4, "sgd", admission=Admission(min_count=2, counter=counter))
    rows = t.find_or_insert(np.array([5, 6, 5, 5], dtype=np.int64), 0)
    assert rows[0] == -1 and rows[1] == -1 and rows[2] >= 0 and rows[3] == rows[2]
    assert t.export()["access_count"].tolist() == [2]


def test_exact_admission_matches_counting_model():
    rng = np.random.default_rng(1)
    t = EmbeddingTable("t", 2, "sgd", admission=Admission(min_count=4))
    counts, admitted = {}, set()
    for step in range(30):
        keys = rng.integers(0, 3000, size=2500)  # repeats inside a batch too
        rows = t.find_or_insert(keys, step)
        for k, r in zip(keys.tolist(), rows.tolist()):
            if k not in admitted:
                counts[k] = counts.get(k, 0) + 1
                if counts[k] >= 4:
                    admitted.add(k)
            assert (r >= 0) == (k in admitted)
    assert len(t) == len(admitted)
    assert t.memory_stats()["pending_admission"] == len(set(counts) - admitted)


def test_bloom_false_positive_rate_within_bound():
    m, k, n, probes = 1 << 15, 4, 4000, 3000
    t = EmbeddingTable("t", 2, "sgd", admission=Admission(min_count=2, counter="bloom",
                                                          bloom_size=m, bloom_hashes=k))
    rng = np.random.default_rng(2)
    keys = rng.permutation(np.arange(2 * (n + probes), dtype=np.int64) * 7919)
    seen, fresh = keys[:n], keys[n:n + probes]
    t.find_or_insert(seen, 0)              # each seen once: a true count of 1, never admitted
    early = len(t)                         # keys admitted on their first sighting (collisions)
    fp = int((t.find_or_insert(fresh, 1) >= 0).sum()) + early
    # every key inserted so far counts toward the filling of the filter
    bound = (1 - math.exp(-k * (n + probes) / m)) ** k
    rate = fp / (n + probes)
    sigma = math.sqrt(bound * (1 - bound) / (n + probes))
    assert rate <= bound + 4 * sigma, (rate, bound)
    assert fp > 0  # the filter is small enough that collisions do happen
    # no false negatives: a key really seen twice is always admitted
    assert (t.find_or_insert(seen, 2) >= 0).all()


def test_ttl_eviction_reuses_rows_and_reinitialises():
    t = EmbeddingTable("t", 4, "adagrad", eviction=Eviction(ttl=5), seed=4)
    keys = np.arange(10, dtype=np.int64)
    rows = t.find_or_insert(keys, 0)
    t.apply_gradients(rows[5:], np.ones((5, 4), np.float32), 8)
    assert t.evict(5) == 0              # 5 - 0 is not more than 5
    assert t.evict(6) == 5              # keys 0..4, last update at step 0
    assert (t.find(keys[:5]) == -1).all() and (t.find(keys[5:]) == rows[5:]).all()
    assert t.memory_stats()["free_rows"] == 5
    new = t.find_or_insert(np.array([100, 101], dtype=np.int64), 9)
    assert sorted(new.tolist()) == [0, 1]   # freed rows reused, lowest first
    back = t.find_or_insert(keys[:1], 9)    # an evicted key re-enters as new
    state = t.export()
    i = np.flatnonzero(state["keys"] == 0)[0]
    np.testing.assert_array_equal(state["values"][i], reference_init(keys[:1], 4, seed=4)[0])
    assert state["slots"]["accumulator"][i].sum() == 0 and state["access_count"][i] == 1
    assert back[0] == 2
    assert t.evict(13) == 0
    assert t.evict(14) == 5  # keys 5..9, updated at step 8
    assert t.evict(15) == 3  # the three rows inserted at step 9
    assert len(t) == 0
    kernel.check_invariants(t._core)


def test_stale_index_of_an_evicted_row_is_caught():
    t = EmbeddingTable("stale", 2, "sgd", eviction=Eviction(ttl=0), debug=True)
    rows = t.find_or_insert(np.arange(3, dtype=np.int64), 0)
    assert t.evict(1) == 3
    with pytest.raises(IndexError, match="stale.*freed row"):
        t.gather(rows)
    with pytest.raises(IndexError, match="stale.*freed row"):
        t.apply_gradients(rows, np.zeros((3, 2), np.float32), 1)
    t2 = EmbeddingTable("lax", 2, "sgd", eviction=Eviction(ttl=0))
    rows = t2.find_or_insert(np.arange(3, dtype=np.int64), 0)
    t2.evict(1)
    t2.gather(rows)  # outside debug mode a stale row reads stale values, safely
    with pytest.raises(IndexError, match="lax.*freed row"):
        t2.apply_gradients(rows, np.zeros((3, 2), np.float32), 1)  # but is never written


def test_lfu_cap_evicts_least_frequently_used():
    t = EmbeddingTable("t", 2, "sgd", eviction=Eviction(max_rows=4))
    keys = np.arange(8, dtype=np.int64)
    t.find_or_insert(keys, 0)
    for k, times in ((0, 5), (3, 2), (5, 4), (6, 1), (7, 1)):
        for _ in range(times):
            t.find_or_insert(np.array([k]), 1)
    rows = t.find(np.array([6, 7], dtype=np.int64))
    t.apply_gradients(rows[:1], np.zeros((1, 2), np.float32), 3)  # key 6: newer last update
    # access counts: 0:6 1:1 2:1 3:3 4:1 5:5 6:2 7:2 -> keep 0, 5, 3 and, of 6/7, the newer 6
    assert t.evict(4) == 4
    assert sorted(t.export()["keys"].tolist()) == [0, 3, 5, 6]
    assert t.evict(5) == 0
    kernel.check_invariants(t._core)


def test_ttl_then_cap_and_growth_after_eviction():
    rng = np.random.default_rng(3)
    t = EmbeddingTable("t", 8, "adagrad", eviction=Eviction(ttl=2, max_rows=3000), capacity=16)
    model = {}
    for step in range(12):
        keys = np.unique(rng.integers(0, 20000, size=2000))
        rows = t.find_or_insert(keys, step)
        t.apply_gradients(rows, np.ones((rows.size, 8), np.float32), step)
        for k in keys.tolist():
            model[k] = step
        n = t.evict(step)
        stale = [k for k, s in model.items() if step - s > 2]
        for k in stale:
            del model[k]
        assert len(t) == min(len(model), 3000)
        assert n >= len(stale)
        kernel.check_invariants(t._core)
    mem = t.memory_stats()
    assert mem["rows_ever"] <= 3000 + 2000  # freed rows were reused instead of growing


@pytest.mark.parametrize("cls,kwargs,field", [
    (Admission, {"min_count": 0}, "min_count"),
    (Admission, {"min_count": 2.5}, "min_count"),
    (Admission, {"counter": "cuckoo"}, "counter"),
    (Admission, {"bloom_size": 4}, "bloom_size"),
    (Admission, {"bloom_hashes": 0}, "bloom_hashes"),
    (Eviction, {"ttl": -1}, "ttl"),
    (Eviction, {"max_rows": "10"}, "max_rows"),
])
def test_policy_validation_names_field(cls, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        cls(**kwargs)


def test_policy_from_any():
    assert Admission.from_any(None) == Admission()
    assert Eviction.from_any({"ttl": 3}).ttl == 3
    with pytest.raises(ConfigError, match="ttl_steps"):
        Eviction.from_any({"ttl_steps": 3})
    t = EmbeddingTable("t", 2, "sgd", admission={"min_count": 2}, eviction={"max_rows": 5})
    assert t.admission.min_count == 2 and t.eviction.max_rows == 5
