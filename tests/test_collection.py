"""EmbeddingCollection (the twin) against a plain NumPy/dict model of embedding training."""
import numpy as np
import pytest

from hpctrain.sparse import EmbeddingCollection, JaggedBatch, TableSpec
from hpctrain.sparse.init import reference_init
from hpctrain.sparse.optimizers import SparseOptimizer
from hpctrain.sparse.policies import Admission

OPTIMIZERS = ["sgd", "momentum", "nesterov", "adagrad", "rowwise_adagrad", "adam", "ftrl"]
FEATURES = ["a", "b", "c"]
B = 6


class RefTable:
    """One table as a dict key -> float64 row and optimizer state (textbook equations)."""

    def __init__(self, spec, seed, opt):
        self.spec, self.seed, self.o = spec, seed, opt
        self.rows, self.state, self.seen = {}, {}, {}

    def lookup(self, key):
        """Count one sighting; return the row (admitted) or None."""
        self.seen[key] = self.seen.get(key, 0) + 1
        if key not in self.rows:
            need = self.spec.admission.min_count if self.spec.admission else 1
            if self.seen[key] < need:
                return None
            init = reference_init(np.array([key], np.int64), self.spec.dim, seed=self.seed,
                                  table_id=self.spec.table_id, init=self.spec.init,
                                  scale=self.spec.init_scale)
            self.rows[key] = np.asarray(init, np.float32).reshape(-1).copy()
            d = self.spec.dim
            acc = np.float32(self.o.initial_accumulator)
            self.state[key] = {"m": np.zeros(d, np.float32), "v": np.zeros(d, np.float32),
                               "a": np.full(1 if self.o.kind == "rowwise_adagrad" else d, acc,
                                            np.float32),
                               "z": np.zeros(d, np.float32), "n": np.full(d, acc, np.float32),
                               "t": 0}
        return self.rows[key]

    def update(self, key, grad):
        o, w, s = self.o, self.rows[key].astype(np.float64), self.state[key]
        g = grad.astype(np.float64) + o.weight_decay * w
        if o.kind == "sgd":
            w = w - o.lr * g
        elif o.kind in ("momentum", "nesterov"):
            m = o.momentum * s["m"].astype(np.float64) + g
            s["m"] = m.astype(np.float32)
            w = w - o.lr * (g + o.momentum * m if o.kind == "nesterov" else m)
        elif o.kind == "adagrad":
            a = s["a"].astype(np.float64) + g * g
            s["a"] = a.astype(np.float32)
            w = w - o.lr * g / (np.sqrt(a) + o.eps)
        elif o.kind == "rowwise_adagrad":
            a = s["a"].astype(np.float64) + (g * g).mean()
            s["a"] = a.astype(np.float32)
            w = w - o.lr / (np.sqrt(a) + o.eps) * g
        elif o.kind == "adam":
            s["t"] += 1
            m = o.beta1 * s["m"].astype(np.float64) + (1 - o.beta1) * g
            v = o.beta2 * s["v"].astype(np.float64) + (1 - o.beta2) * g * g
            s["m"], s["v"] = m.astype(np.float32), v.astype(np.float32)
            mh, vh = m / (1 - o.beta1 ** s["t"]), v / (1 - o.beta2 ** s["t"])
            w = w - o.lr * mh / (np.sqrt(vh) + o.eps)
        elif o.kind == "ftrl":
            p = -o.lr_power
            n = s["n"].astype(np.float64)
            nn = n + g * g
            z = s["z"].astype(np.float64) + g - (nn ** p - n ** p) / o.lr * w
            s["z"], s["n"] = z.astype(np.float32), nn.astype(np.float32)
            w = np.where(np.abs(z) <= o.l1, 0.0,
                         -(z - np.sign(z) * o.l1) / (nn ** p / o.lr + o.l2))
        self.rows[key] = w.astype(np.float32)


def ref_forward(tables, feature_table, batch):
    """Pooled outputs and, per table, the occurrences (key, feature, bag or row, scale)."""
    out, occ = {}, {name: [] for name in tables}
    keys_per_table = {name: [] for name in tables}
    for f in batch.features:            # first sighting order: feature, sample, position
        keys_per_table[feature_table[f]] += batch[f].values.tolist()
    for name, keys in keys_per_table.items():
        for k in dict.fromkeys(keys):   # each distinct id counts once per step
            tables[name].lookup(k)
    for f in batch.features:
        t = tables[feature_table[f]]
        feat, dim, pooling = batch[f], t.spec.dim, t.spec.pooling
        rows = [t.rows.get(k, np.zeros(dim, np.float32)) for k in feat.values.tolist()]
        if pooling == "none":
            out[f] = np.array(rows, np.float32).reshape(-1, dim)
            occ[feature_table[f]] += [(k, f, j, 1.0) for j, k in enumerate(feat.values.tolist())]
            continue
        pooled = np.zeros((B, dim), np.float32)
        for b in range(B):
            lo, hi = feat.offsets[b], feat.offsets[b + 1]
            if hi > lo:
                s = np.sum(np.array(rows[lo:hi], np.float64), axis=0)
                pooled[b] = s / (hi - lo) if pooling == "mean" else s
                scale = 1.0 / (hi - lo) if pooling == "mean" else 1.0
                occ[feature_table[f]] += [(int(k), f, b, scale) for k in feat.values[lo:hi]]
        out[f] = pooled
    return out, occ


def ref_backward(tables, occ, grads):
    for name, items in occ.items():
        per_key = {}
        for key, f, row, scale in items:
            per_key[key] = per_key.get(key, 0.0) + scale * grads[f][row].astype(np.float64)
        for key, g in per_key.items():
            if key in tables[name].rows:
                tables[name].update(key, g.astype(np.float32))


def _specs(opt, pooling, admission=None):
    o = SparseOptimizer(kind=opt, lr=0.05, l1=0.001, l2=0.01, weight_decay=0.001,
                        initial_accumulator=0.1)
    return [TableSpec("ab", 4, ["a", "b"], optimizer=o, pooling=pooling, admission=admission),
            TableSpec("c", 3, ["c"], optimizer=o, pooling=pooling, admission=admission)], o


def _batch(rng, vocab=12):
    lengths = rng.integers(0, 4, size=len(FEATURES) * B)
    return JaggedBatch(FEATURES, rng.integers(0, vocab, size=lengths.sum()) * 31 - 5, lengths)


def _run(opt, pooling, steps=4, admission=None, vocab=12):
    specs, o = _specs(opt, pooling, admission)
    twin = EmbeddingCollection(specs, seed=5)
    ref = {s.name: RefTable(s, 5, o) for s in twin.specs}
    rng = np.random.default_rng(hash((opt, pooling)) % 2**32)
    for step in range(steps):
        batch = _batch(rng, vocab)
        out, ticket = twin.forward(batch, step)
        ref_out, occ = ref_forward(ref, twin.feature_to_table, batch)
        for f in FEATURES:
            np.testing.assert_allclose(out[f], ref_out[f], rtol=1e-5, atol=1e-6, err_msg=f)
        grads = {f: rng.standard_normal(v.shape).astype(np.float32) for f, v in out.items()}
        twin.backward(ticket, grads, step)
        ref_backward(ref, occ, grads)
    return twin, ref


@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_twin_matches_reference_model(opt, pooling):
    twin, ref = _run(opt, pooling)
    for name, t in twin.tables.items():
        exp = t.export()
        assert sorted(exp["keys"].tolist()) == sorted(ref[name].rows)
        for k, v in zip(exp["keys"].tolist(), exp["values"]):
            np.testing.assert_allclose(v, ref[name].rows[k], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{opt}/{pooling} table {name} key {k}")


def test_admission_defaults_and_no_update():
    twin, ref = _run("adagrad", "sum", steps=5, admission=Admission(min_count=2), vocab=40)
    for name, t in twin.tables.items():
        assert sorted(t.export()["keys"].tolist()) == sorted(ref[name].rows)
        rare = [k for k, c in ref[name].seen.items() if c < 2]
        assert rare and (t.find(np.array(rare, np.int64)) == -1).all()


def test_mean_of_empty_bag_is_zero_and_none_pooling_shapes():
    specs, _ = _specs("sgd", "mean")
    twin = EmbeddingCollection(specs)
    lengths = np.zeros(len(FEATURES) * B, np.int64)
    lengths[0] = 2
    out, _ = twin.forward(JaggedBatch(FEATURES, [3, 4], lengths), 0)
    assert (out["a"][1:] == 0).all() and (out["b"] == 0).all() and np.abs(out["a"][0]).sum() > 0
    specs, _ = _specs("sgd", "none")
    twin = EmbeddingCollection(specs)
    lengths[:] = 1
    out, _ = twin.forward(JaggedBatch(FEATURES, np.arange(lengths.sum()), lengths), 0)
    assert out["a"].shape == (B, 4) and out["c"].shape == (B, 3)


def test_start_wait_equals_forward_and_one_update_per_id():
    specs, _ = _specs("sgd", "sum")
    t1, t2 = EmbeddingCollection(specs), EmbeddingCollection(specs)
    batch = JaggedBatch(FEATURES, [7] * (len(FEATURES) * B), np.ones(len(FEATURES) * B, np.int64))
    o1, ticket = t1.forward(batch, 0)
    o2 = t2.wait_lookup(t2.start_lookup(batch, 0))
    for f in FEATURES:
        assert np.array_equal(o1[f], o2[f])
    before = t1.tables["ab"].gather(t1.tables["ab"].find(np.array([7])))
    t1.backward(ticket, {f: np.ones_like(o) for f, o in o1.items()}, 0)
    after = t1.tables["ab"].gather(t1.tables["ab"].find(np.array([7])))
    # id 7 appears 2 * B times in table "ab": one sgd step with the summed gradient
    # (plus the specs' weight decay 0.001 * w)
    np.testing.assert_allclose(after, before - 0.05 * (2 * B + 0.001 * before), rtol=1e-6)
    assert set(t1.timers) >= {"dedup", "lookup", "pool", "update"}


def test_spec_validation():
    with pytest.raises(ValueError, match="feature 'a' is in tables"):
        EmbeddingCollection([TableSpec("x", 2, ["a"]), TableSpec("y", 2, ["a"])])
    with pytest.raises(ValueError, match="duplicate table name"):
        EmbeddingCollection([TableSpec("x", 2, ["a"]), TableSpec("x", 2, ["b"])])
    with pytest.raises(ValueError, match="pooling"):
        TableSpec("x", 2, ["a"], pooling="max")
    with pytest.raises(ValueError, match="dim"):
        TableSpec("x", 0, ["a"])
    specs = EmbeddingCollection([TableSpec("x", 2, ["a"]), TableSpec("y", 2, ["b"],
                                                                      table_id=9)]).specs
    assert [s.table_id for s in specs] == [0, 9]


def test_unknown_and_missing_features():
    specs, _ = _specs("sgd", "sum")
    twin = EmbeddingCollection(specs)
    with pytest.raises(ValueError, match=r"\['c'\]"):
        twin.forward(JaggedBatch(["a", "b"], [], np.zeros(2 * B, np.int64)), 0)
    with pytest.raises(ValueError, match=r"\['zz'\] belong to no table"):
        twin.forward(JaggedBatch(FEATURES + ["zz"], [], np.zeros(4 * B, np.int64)), 0)
    batch = JaggedBatch(FEATURES, [7] * (len(FEATURES) * B), np.ones(len(FEATURES) * B, np.int64))
    ticket = twin.start_lookup(batch, 0)
    with pytest.raises(RuntimeError, match="needs a ticket returned by wait_lookup"):
        twin.backward(ticket, {f: None for f in FEATURES}, 0)
    out = twin.wait_lookup(ticket)
    with pytest.raises(RuntimeError, match="already waited"):
        twin.wait_lookup(ticket)
    twin.backward(ticket, {f: np.ones_like(o) for f, o in out.items()}, 0)
    with pytest.raises(RuntimeError, match="ticket of step 0 is applied"):
        twin.backward(ticket, {f: np.ones_like(o) for f, o in out.items()}, 0)
    _, evaluation = twin.forward(batch, 1, train=False)
    with pytest.raises(RuntimeError, match="evaluation lookup"):
        twin.backward(evaluation, {f: np.ones_like(o) for f, o in out.items()}, 1)
