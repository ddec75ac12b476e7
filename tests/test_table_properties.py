"""Property tests: EmbeddingTable against a Python dict model, round trips, thread invariance."""
import contextlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpctrain._kernels import _openmp
from hpctrain._kernels import table as kernel
from hpctrain.sparse.policies import Eviction
from hpctrain.sparse.table import EmbeddingTable

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# a small pool (so keys repeat and re-enter) that includes the int64 extremes
POOL = [0, -1, 1, 2**63 - 1, -2**63, 7, 1 << 40, -(1 << 40)] + list(range(100, 160))
keys_st = st.lists(st.sampled_from(POOL), min_size=0, max_size=40)
op_st = st.one_of(
    st.tuples(st.just("insert"), keys_st),
    st.tuples(st.just("update"), keys_st),
    st.tuples(st.just("evict"), st.just([])),
)


@contextlib.contextmanager
def parallel_small_batches():
    """Run the parallel code paths even for tiny batches, on 2 threads."""
    saved_min, saved_nt = kernel.parallel_threshold(), _openmp.get_num_threads()
    kernel.set_parallel_threshold(1)
    try:
        yield
    finally:
        kernel.set_parallel_threshold(saved_min)
        _openmp.set_num_threads(saved_nt)


class DictModel:
    """What the table should hold: key -> [row, access count, last step], plus the free list."""

    def __init__(self, ttl, max_rows):
        self.ttl, self.max_rows = ttl, max_rows
        self.rows, self.free, self.next_row = {}, [], 0

    def insert(self, keys, step):
        out = []
        for k in keys:
            if k in self.rows:
                self.rows[k][1] += 1
            else:
                r = self.free.pop() if self.free else self.next_row
                self.next_row += r == self.next_row
                self.rows[k] = [r, 1, step]
            out.append(self.rows[k][0])
        return out

    def _remove(self, keys):
        rows = sorted(self.rows[k][0] for k in keys)
        for k in keys:
            del self.rows[k]
        self.free.extend(reversed(rows))  # lowest row id reused first
        return len(rows)

    def evict(self, step):
        n = 0
        if self.ttl is not None:
            n += self._remove([k for k, (_, _, s) in self.rows.items() if step - s > self.ttl])
        if self.max_rows is not None and len(self.rows) > self.max_rows:
            order = sorted(self.rows, key=lambda k: (self.rows[k][1], self.rows[k][2], k))
            n += self._remove(order[:len(self.rows) - self.max_rows])
        return n


@settings(SETTINGS, max_examples=100)
@given(ops=st.lists(op_st, max_size=25), ttl=st.one_of(st.none(), st.integers(0, 4)),
       max_rows=st.one_of(st.none(), st.integers(0, 30)), capacity=st.integers(1, 8))
def test_random_operations_match_dict_model(ops, ttl, max_rows, capacity):
    t = EmbeddingTable("t", 3, "sgd", capacity=capacity,
                       eviction=Eviction(ttl=ttl, max_rows=max_rows))
    model = DictModel(ttl, max_rows)
    for step, (op, keys) in enumerate(ops):
        k = np.array(keys, dtype=np.int64)
        if op == "insert":
            assert t.find_or_insert(k, step).tolist() == model.insert(keys, step)
        elif op == "update":
            uniq = list(dict.fromkeys(x for x in keys if x in model.rows))
            t.apply_gradients(t.find(np.array(uniq, dtype=np.int64)),
                              np.ones((len(uniq), 3), np.float32), step)
            for x in uniq:
                model.rows[x][2] = step
        else:
            assert t.evict(step) == model.evict(step)
        probe = np.array(POOL, dtype=np.int64)
        assert t.find(probe).tolist() == [model.rows.get(x, [-1])[0] for x in POOL]
        assert len(t) == len(model.rows)
        kernel.check_invariants(t._core)
    state = t.export()
    want = {k: v[1:] for k, v in model.rows.items()}
    got = {k: [a, s] for k, a, s in zip(state["keys"].tolist(), state["access_count"].tolist(),
                                        state["last_step"].tolist())}
    assert got == want


@SETTINGS
@given(batches=st.lists(st.lists(st.integers(-2**63, 2**63 - 1), max_size=60), max_size=6),
       kind=st.sampled_from(["sgd", "adagrad", "adam", "ftrl", "rowwise_adagrad"]),
       seed=st.integers(0, 2**64 - 1))
def test_export_import_round_trip_is_exact(batches, kind, seed):
    t = EmbeddingTable("t", 5, kind, seed=seed, table_id=3)
    rng = np.random.default_rng(seed % 1000)
    for step, keys in enumerate(batches):
        rows = t.find_or_insert(np.array(keys, dtype=np.int64), step)
        rows = np.unique(rows)
        t.apply_gradients(rows, rng.standard_normal((rows.size, 5)).astype(np.float32), step)
    a = t.export()
    u = EmbeddingTable("u", 5, kind, seed=seed, table_id=3)
    u.import_(a)
    b = u.export()
    for name in ("keys", "values", "access_count", "last_step", "opt_step"):
        np.testing.assert_array_equal(a[name], b[name])
    for name in a["slots"]:
        np.testing.assert_array_equal(a["slots"][name], b["slots"][name])
    np.testing.assert_array_equal(u.find(a["keys"]), np.arange(len(a["keys"])))


@SETTINGS
@given(batches=st.lists(st.lists(st.sampled_from(POOL), max_size=50), min_size=1, max_size=6),
       min_count=st.integers(1, 3), max_rows=st.one_of(st.none(), st.integers(0, 40)))
def test_results_identical_for_1_and_2_threads(batches, min_count, max_rows):
    exports = []
    for nt in (1, 2):
        with parallel_small_batches():
            _openmp.set_num_threads(nt)
            exports.append(_run_batches(batches, min_count, max_rows))
    (trace1, s1), (trace2, s2) = exports
    assert trace1 == trace2
    for name in ("keys", "values", "access_count", "last_step", "opt_step"):
        np.testing.assert_array_equal(s1[name], s2[name])


def _run_batches(batches, min_count, max_rows):
    t = EmbeddingTable("t", 4, "adam", admission={"min_count": min_count},
                       eviction={"max_rows": max_rows}, capacity=2)
    trace = []
    for step, keys in enumerate(batches):
        rows = t.find_or_insert(np.array(keys, dtype=np.int64), step)
        trace.append(rows.tolist())
        u = np.unique(rows)
        g = np.linspace(-1, 1, u.size * 4, dtype=np.float32).reshape(u.size, 4)
        t.apply_gradients(u, g, step)
        trace.append(t.gather(rows).tolist())
        trace.append(t.evict(step))
    return trace, t.export()
