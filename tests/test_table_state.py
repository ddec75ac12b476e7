"""EmbeddingTable state: 8-byte row metadata (ranges, saturation) and pending admission counts
in export/import (exact resume with min_count > 1)."""
import numpy as np
import pytest

from hpctrain._kernels import _openmp
from hpctrain._kernels import table as kernel
from hpctrain.sparse.table import EmbeddingTable, as_step

MAX_STEP = 2**31 - 1
MAX_COUNT = 2**32 - 1


@pytest.fixture
def two_threads_small_batches():
    """Two threads, parallel kernels from 1 entry on: the atomic paths run in parallel."""
    nt, thr = _openmp.get_num_threads(), kernel.parallel_threshold()
    _openmp.set_num_threads(2)
    kernel.set_parallel_threshold(1)
    yield
    kernel.set_parallel_threshold(thr)
    _openmp.set_num_threads(nt)


def sorted_state(state):
    """Export with every keyed level sorted by key (row ids are internal)."""
    order = np.argsort(state["keys"], kind="stable")
    out = {k: v[order] for k, v in state.items() if isinstance(v, np.ndarray)}
    out["slots"] = {k: v[order] for k, v in state["slots"].items()}
    adm = state["admission"]
    o2 = np.argsort(adm["keys"], kind="stable")
    out["admission"] = {k: v[o2] for k, v in adm.items()}
    if "shard_state" in state:
        out["shard_state"] = state["shard_state"]
    return out


def assert_states_equal(a, b, where="state"):
    assert set(a) == set(b), (where, sorted(a), sorted(b))
    for k in a:
        if isinstance(a[k], dict):
            assert_states_equal(a[k], b[k], f"{where}[{k!r}]")
        elif isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype, f"{where}[{k!r}]"
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{where}[{k!r}]")
        else:
            assert a[k] == b[k], f"{where}[{k!r}]"


# ---------------------------------------------------------------------- metadata ranges

def test_steps_beyond_int32_are_refused_not_wrapped():
    t = EmbeddingTable("t", 4, "sgd")
    assert as_step(MAX_STEP) == MAX_STEP and as_step(np.int64(0)) == 0
    for bad in (MAX_STEP + 1, 2**40, -1):
        with pytest.raises(ValueError, match=r"step must be in \[0, 2\^31 - 1\].*got " + str(bad)):
            as_step(bad)
    rows = t.find_or_insert(np.arange(3, dtype=np.int64), MAX_STEP)
    with pytest.raises(ValueError, match="2\\^31 - 1"):
        t.find_or_insert(np.arange(5, dtype=np.int64), MAX_STEP + 1)
    with pytest.raises(ValueError, match="2\\^31 - 1"):
        t.apply_gradients(rows, np.ones((3, 4), np.float32), 2**32)
    with pytest.raises(ValueError, match="2\\^31 - 1"):
        t.evict(2**31)
    assert len(t) == 3  # the refused insert stored nothing
    np.testing.assert_array_equal(t.export()["last_step"], [MAX_STEP] * 3)
    # the core refuses too, whatever a caller passes
    with pytest.raises(ValueError, match="outside"):
        t._core.find_or_insert(np.arange(3, dtype=np.int64), np.empty(3, np.int64), -5, 1)


def test_import_refuses_metadata_out_of_range_naming_the_key():
    t = EmbeddingTable("t", 4, "adagrad")
    t.find_or_insert(np.array([7, 8, 9], dtype=np.int64), 0)
    s = t.export()
    u = EmbeddingTable("u", 4, "adagrad")
    for name, value, rng in (("access_count", MAX_COUNT + 1, r"\[0, 4294967295\]"),
                             ("last_step", MAX_STEP + 1, r"\[0, 2147483647\]"),
                             ("last_step", -1, r"\[0, 2147483647\]")):
        bad = dict(s)
        bad[name] = s[name].copy()
        bad[name][1] = value
        with pytest.raises(ValueError, match=rf"state\['{name}'\]\[1\] = {value} \(key 8\) is "
                                             rf"outside {rng}"):
            u.import_(bad)
    assert len(u) == 0  # a rejected state changes nothing
    ok = dict(s)
    ok["access_count"] = np.array([MAX_COUNT, 0, 1])
    ok["last_step"] = np.array([MAX_STEP, 0, 5])
    u.import_(ok)
    back = u.export()
    np.testing.assert_array_equal(back["access_count"], ok["access_count"])
    np.testing.assert_array_equal(back["last_step"], ok["last_step"])
    assert back["access_count"].dtype == back["last_step"].dtype == np.int64


def test_access_count_saturates_instead_of_wrapping(two_threads_small_batches):
    t = EmbeddingTable("t", 4, "sgd", eviction={"max_rows": 2})
    keys = np.array([10, 11, 12], dtype=np.int64)
    t.find_or_insert(keys, 0)
    s = t.export()
    s["access_count"] = np.array([MAX_COUNT - 2, 5, 6])
    u = EmbeddingTable("u", 4, "sgd", eviction={"max_rows": 2})
    u.import_(s)
    # parallel path (keys already stored; each occurrence counts, atomically)
    u.find_or_insert(np.repeat(keys, 4), 1)
    np.testing.assert_array_equal(u.export()["access_count"], [MAX_COUNT, 9, 10])
    u.find_or_insert(np.repeat(keys[:1], 3000), 2)
    np.testing.assert_array_equal(u.export()["access_count"], [MAX_COUNT, 9, 10])
    # serial path: repeats of a key inserted earlier in the same batch
    v = EmbeddingTable("v", 4, "sgd")
    v.import_({k: x[:1] for k, x in s.items() if isinstance(x, np.ndarray)}
              | {"slots": {}, "keys": np.array([99]), "access_count": np.array([MAX_COUNT])})
    v.find_or_insert(np.array([5, 5, 99, 5, 99], dtype=np.int64), 3)
    got = dict(zip(v.export()["keys"].tolist(), v.export()["access_count"].tolist()))
    assert got == {99: MAX_COUNT, 5: 3}
    # LFU eviction keeps the saturated (hottest) row: a wrapped count would evict it first
    assert u.evict(3) == 1
    np.testing.assert_array_equal(np.sort(u.export()["keys"]), [10, 12])


def test_ttl_with_int32_steps():
    t = EmbeddingTable("t", 4, "sgd", eviction={"ttl": 10})
    rows = t.find_or_insert(np.array([1, 2], dtype=np.int64), MAX_STEP - 20)
    t.apply_gradients(rows[1:], np.ones((1, 4), np.float32), MAX_STEP - 5)
    assert t.evict(MAX_STEP) == 1  # key 1: 20 steps old; key 2: 5
    np.testing.assert_array_equal(t.export()["keys"], [2])


# ---------------------------------------------------------------------- pending admission

def _train(t, batches, grads, start):
    """find_or_insert + fused update of each batch (gradients for admitted keys)."""
    for i, (keys, g) in enumerate(zip(batches, grads)):
        rows = t.find_or_insert(keys, start + i)
        t.apply_gradients(rows, g, start + i)


def _batches(rng, n, size=600, vocab=3000, dim=4):
    keys = [np.unique(rng.integers(-vocab, vocab, size=size)) for _ in range(n)]
    return keys, [rng.standard_normal((len(k), dim)).astype(np.float32) for k in keys]


def test_export_keeps_exact_pending_counts():
    rng = np.random.default_rng(1)
    t = EmbeddingTable("t", 4, "sgd", admission={"min_count": 3})
    seen = {}
    for step in range(6):
        keys = rng.integers(0, 400, size=150)
        t.find_or_insert(keys, step)
        for k in keys.tolist():
            seen[k] = seen.get(k, 0) + 1
    state = t.export()
    want = {k: c for k, c in seen.items() if c < 3}
    adm = state["admission"]
    assert adm["keys"].dtype == adm["counts"].dtype == np.int64
    assert (np.diff(adm["keys"]) > 0).all()
    assert dict(zip(adm["keys"].tolist(), adm["counts"].tolist())) == want
    assert sorted(state["keys"].tolist()) == sorted(k for k, c in seen.items() if c >= 3)
    u = EmbeddingTable("u", 4, "sgd", admission={"min_count": 3})
    u.import_(state)
    assert u.memory_stats()["pending_admission"] == len(want)
    assert_states_equal(sorted_state(u.export()), sorted_state(state))
    kernel.check_invariants(u._core)


@pytest.mark.parametrize("counter", ["exact", "bloom"])
def test_resume_with_min_count_is_exact(counter):
    """Trained k steps, exported, imported into a fresh table and trained on: equal to the
    uninterrupted table. Without the admission state the resumed table differs."""
    rng = np.random.default_rng(2)
    k, n = 5, 10
    batches, grads = _batches(rng, n)
    adm = {"min_count": 3, "counter": counter, "bloom_size": 1 << 12}

    def fresh():
        return EmbeddingTable("t", 4, "adagrad", seed=4, admission=adm)

    whole = fresh()
    _train(whole, batches, grads, 0)
    first = fresh()
    _train(first, batches[:k], grads[:k], 0)
    state = first.export()
    assert len(state["admission"]["keys"]) > 100 if counter == "exact" else "shard_state" in state
    resumed = fresh()
    resumed.import_(state)
    _train(resumed, batches[k:], grads[k:], k)
    assert_states_equal(sorted_state(resumed.export()), sorted_state(whole.export()))
    lossy = fresh()
    lossy.import_({key: v for key, v in state.items() if key not in ("admission", "shard_state")})
    _train(lossy, batches[k:], grads[k:], k)
    assert len(lossy) < len(whole)  # keys lost their counts: fewer admitted


def test_import_merges_pending_counts_with_rows():
    t = EmbeddingTable("t", 4, "sgd", admission={"min_count": 4})
    t.find_or_insert(np.array([1, 1, 1, 1, 2, 3, 3], dtype=np.int64), 0)  # 1 stored; 2, 3 wait
    assert t.memory_stats()["pending_admission"] == 2
    state = t.export()
    state["admission"] = {"keys": np.array([1, 3, 5]), "counts": np.array([2, 1, 3])}
    u = EmbeddingTable("u", 4, "sgd", admission={"min_count": 4})
    u.find_or_insert(np.array([3, 3, 7], dtype=np.int64), 0)  # pending 3: 2, 7: 1
    u.import_(state)
    adm = u.export()["admission"]
    # key 1 is stored as a row, so not pending; 3 is replaced by the state's count
    assert dict(zip(adm["keys"].tolist(), adm["counts"].tolist())) == {3: 1, 5: 3, 7: 1}
    # rows imported for keys the table had pending stop waiting
    u.import_({"keys": np.array([7]), "values": np.zeros((1, 4), np.float32)})
    adm = u.export()["admission"]
    assert adm["keys"].tolist() == [3, 5]
    rows = u.find_or_insert(np.array([5, 3], dtype=np.int64), 1)
    assert rows[0] >= 0 and rows[1] == -1  # 5 reaches 4 occurrences, 3 has 2
    kernel.check_invariants(u._core)


def test_import_refuses_bad_pending_counts():
    u = EmbeddingTable("u", 4, "sgd", admission={"min_count": 3})
    base = {"keys": np.empty(0, np.int64), "values": np.empty((0, 4), np.float32)}
    for counts, what in (([1, 0], r"\[1\] = 0 \(key 9\)"), ([MAX_COUNT + 1, 1], r"\[0\] = 4294967296 \(key 8\)")):
        with pytest.raises(ValueError, match=r"state\['admission'\]\['counts'\]" + what):
            u.import_(base | {"admission": {"keys": np.array([8, 9]), "counts": np.array(counts)}})
    with pytest.raises(ValueError, match="repeats key 8"):
        u.import_(base | {"admission": {"keys": np.array([8, 8]), "counts": np.array([1, 1])}})
    with pytest.raises(ValueError, match="shape"):
        u.import_(base | {"admission": {"keys": np.array([8, 9]), "counts": np.array([1])}})
    with pytest.raises(ValueError, match="'keys' and 'counts'"):
        u.import_(base | {"admission": {"keys": np.array([8])}})
    assert u.memory_stats()["pending_admission"] == 0


def test_pending_counts_across_counter_kinds():
    pending = {"keys": np.array([4, 5]), "counts": np.array([2, 1])}
    base = {"keys": np.empty(0, np.int64), "values": np.empty((0, 4), np.float32),
            "admission": pending}
    # into a Bloom filter: each key counted that many times
    b = EmbeddingTable("b", 4, "sgd", admission={"min_count": 3, "counter": "bloom"})
    b.import_(base)
    np.testing.assert_array_equal(b.find_or_insert(np.array([4, 5], dtype=np.int64), 0) >= 0,
                                  [True, False])
    # without admission every key is admitted at first sight: nothing to restore
    n = EmbeddingTable("n", 4, "sgd")
    n.import_(base)
    assert len(n) == 0 and n.export()["admission"]["keys"].size == 0


def test_bloom_counters_in_shard_state():
    adm = {"min_count": 2, "counter": "bloom", "bloom_size": 4096, "bloom_hashes": 3}
    t = EmbeddingTable("t", 4, "sgd", admission=adm)
    t.find_or_insert(np.arange(50, dtype=np.int64), 0)
    s = t.export()
    counters = s["shard_state"]["bloom_counters"]
    assert counters.dtype == np.uint8 and counters.shape == (4096,)
    assert s["shard_state"]["bloom_hashes"] == 3 and counters.sum() == 150
    u = EmbeddingTable("u", 4, "sgd", admission=adm)
    u.import_(s)
    np.testing.assert_array_equal(u.export()["shard_state"]["bloom_counters"], counters)
    assert (u.find_or_insert(np.arange(50, dtype=np.int64), 1) >= 0).all()
    with pytest.raises(ValueError, match=r"uint8\[4096\] with 3 hashes.*uint8\[8192\] with 3"):
        EmbeddingTable("w", 4, "sgd", admission=adm | {"bloom_size": 8192}).import_(s)
    with pytest.raises(ValueError, match="with 3 hashes.*with 4"):
        EmbeddingTable("w", 4, "sgd", admission=adm | {"bloom_hashes": 4}).import_(s)
    with pytest.raises(ValueError, match="'t'.*Bloom filter counters.*exactly"):
        EmbeddingTable("t", 4, "sgd", admission={"min_count": 2}).import_(s)
    plain = EmbeddingTable("p", 4, "sgd")
    plain.import_(s)  # no admission: the filter has nothing to do
    assert "shard_state" not in plain.export()
