"""CSV/TSV reader with a schema: roles, hashing, transforms, labels, errors; UCI Adult."""
import math
import os

import numpy as np
import pytest

from data_helpers import data_config, same_samples, samples
from hpctrain.config import load_config
from hpctrain.data import hash_string, make_reader
from hpctrain.data.hashing import fnv1a64
from hpctrain.errors import DataError

HERE = os.path.dirname(os.path.abspath(__file__))
ADULT = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "adult", "adult.csv"))
CONFIGS = os.path.join(HERE, "..", "hpctrain", "configs")

SCHEMA = {
    "label": "click",
    "dense": ["price", {"name": "count", "transform": "log1p"},
              {"name": "temp", "transform": "standardize", "mean": 20.0, "std": 5.0},
              {"name": "score", "transform": "standardize"}],
    "categorical": ["city", "country"],
    "multi_valued": [{"name": "tags", "separator": "|"}],
    "ignore": ["id"],
}
COLUMNS = ["id", "click", "price", "count", "temp", "score", "city", "tags", "country"]
FEATURES = ["city", "country", "tags"]


def csv_cfg(path, schema=None, eval_path=None, bad_lines=None, **split):
    data = {"format": "csv", "schema": dict(SCHEMA, **(schema or {})),
            "train": {"paths": [str(path)], **split}}
    if eval_path:
        data["eval"] = {"paths": [str(eval_path)]}
    if bad_lines:
        data["bad_lines"] = bad_lines
    feats = [f for f in FEATURES if f in data["schema"]["categorical"] or
             f in [m["name"] for m in data["schema"].get("multi_valued", [])]]
    return data_config(data, feats)


def random_rows(n, seed):
    rng = np.random.default_rng(seed)
    words = ["paris", "oslo", "lima", "", "sào paulo", "x y"]
    rows = []
    for i in range(n):
        tags = "|".join(rng.choice(["a", "b", "ü", "", " c "], size=rng.integers(0, 4)))
        rows.append([str(i), str(int(rng.integers(0, 2))), f"{rng.normal():.4f}",
                     "" if rng.random() < 0.2 else str(int(rng.integers(-2, 100))),
                     f"{rng.normal(20, 5):.3f}", f"{rng.normal(3, 2):.3f}",
                     str(rng.choice(words)), tags, str(rng.choice(words))])
    return rows


def ref_rows(rows, score_mean, score_std):
    """Plain-Python reference of SCHEMA: (label, dense, bags) per row."""
    out = []
    for r in rows:
        d = dict(zip(COLUMNS, [x.strip() for x in r]))
        cnt = float(d["count"]) if d["count"] else 0.0
        dense = (float(d["price"]), math.log1p(max(cnt, 0.0)), (float(d["temp"]) - 20.0) / 5.0,
                 (float(d["score"]) - score_mean) / score_std)
        tags = tuple(hash_string("tags", t.strip()) for t in r[7].split("|") if t.strip())
        bags = ((hash_string("city", d["city"]),), (hash_string("country", d["country"]),), tags)
        out.append((float(d["click"]), dense, bags))
    return out


def write(path, rows, header=True, sep=","):
    lines = ([sep.join(COLUMNS)] if header else []) + [sep.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_all(cfg, split="train", G=16, **kw):
    with make_reader(cfg, split, 0, 1, G, 0, epochs=1, drop_last=False, **kw) as r:
        return [s for b in r for s in samples(b)], r.stats()


def test_fnv1a_reference_vectors():
    # the published FNV-1a 64-bit test vectors
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8
    assert hash_string("c", "v") == fnv1a64(b"c\xffv") & ((1 << 63) - 1)


def test_matches_reference(tmp_path):
    rows = random_rows(150, seed=1)
    write(tmp_path / "d.csv", rows)
    score = np.array([float(r[5]) for r in rows])
    got, stats = read_all(csv_cfg(tmp_path / "d.csv"))
    same_samples(got, ref_rows(rows, score.mean(), score.std()), rtol=1e-5)
    assert stats["bad_lines"] == 0


def test_equal_strings_in_different_columns_get_different_ids(tmp_path):
    rows = random_rows(20, seed=2)
    for r in rows:
        r[6] = r[8] = "lima"
    write(tmp_path / "d.csv", rows)
    got, _ = read_all(csv_cfg(tmp_path / "d.csv"))
    city, country = got[0][2][0][0], got[0][2][1][0]
    assert city != country and city == hash_string("city", "lima") and city >= 0


def test_standardisation_uses_train_statistics_for_eval(tmp_path):
    train, ev = random_rows(80, seed=3), random_rows(30, seed=4)
    write(tmp_path / "train.csv", train)
    write(tmp_path / "eval.csv", ev)
    score = np.array([float(r[5]) for r in train])
    got, _ = read_all(csv_cfg(tmp_path / "train.csv", eval_path=tmp_path / "eval.csv"), "eval")
    same_samples(got, ref_rows(ev, score.mean(), score.std()), rtol=1e-5)


def test_tsv_without_header_and_row_range(tmp_path):
    rows = random_rows(60, seed=5)
    write(tmp_path / "d.tsv", rows, header=False, sep="\t")
    schema = {"delimiter": "\t", "header": False, "columns": COLUMNS,
              "dense": ["price", {"name": "count", "transform": "log1p"},
                        {"name": "temp", "transform": "standardize", "mean": 20.0, "std": 5.0},
                        {"name": "score", "transform": "standardize", "mean": 1.0, "std": 2.0}]}
    got, _ = read_all(csv_cfg(tmp_path / "d.tsv", schema, rows=[10, 50]))
    same_samples(got, ref_rows(rows[10:50], 1.0, 2.0), rtol=1e-5)


def test_label_mapping_and_unknown_label(tmp_path):
    rows = random_rows(30, seed=6)
    for i, r in enumerate(rows):
        r[1] = ["yes", "no"][i % 2]
    rows[17][1] = "maybe"
    write(tmp_path / "d.csv", rows)
    schema = {"label_positive": ["yes"], "label_negative": ["no"]}
    with pytest.raises(DataError, match=r"d.csv:19: bad label 'maybe' in column 'click'"):
        read_all(csv_cfg(tmp_path / "d.csv", schema))
    got, stats = read_all(csv_cfg(tmp_path / "d.csv", schema, bad_lines={"max_count": 1}))
    assert [g[0] for g in got] == [float(i % 2 == 0) for i in range(30) if i != 17]
    assert stats["bad_lines"] == 1
    # without label_negative every other value is a negative
    got, _ = read_all(csv_cfg(tmp_path / "d.csv", {"label_positive": ["yes"]}))
    assert sum(g[0] for g in got) == 15


def test_bad_numbers_and_field_counts(tmp_path):
    rows = random_rows(10, seed=7)
    rows[3][2] = "1.5.2"
    rows[6] = rows[6][:-1]
    write(tmp_path / "d.csv", rows)
    with pytest.raises(DataError, match=r"d.csv:5: non-numeric value '1.5.2' in column 'price'"):
        read_all(csv_cfg(tmp_path / "d.csv"))
    with pytest.raises(DataError, match=r"d.csv:8: wrong field count: 8 fields, expected 9"):
        read_all(csv_cfg(tmp_path / "d.csv", bad_lines={"max_count": 1}))


def test_header_problems(tmp_path):
    rows = random_rows(5, seed=8)
    write(tmp_path / "d.csv", rows)
    with pytest.raises(DataError, match=r"d.csv:1: the header has no column 'nope'"):
        read_all(csv_cfg(tmp_path / "d.csv", {"categorical": ["city", "nope"]}))
    with pytest.raises(DataError, match=r"d.csv:1: columns \['country'\] have no role"):
        read_all(csv_cfg(tmp_path / "d.csv", {"categorical": ["city"]}))
    with pytest.raises(DataError, match=r"d.csv:1: header .* does not match"):
        read_all(csv_cfg(tmp_path / "d.csv", {"columns": COLUMNS[::-1]}))
    (tmp_path / "h.csv").write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(DataError, match=r"h.csv: no data lines after the header"):
        read_all(csv_cfg(tmp_path / "h.csv"))


def test_multi_valued_bags(tmp_path):
    rows = random_rows(4, seed=9)
    for r, tags in zip(rows, ["", "a||b", " a | b |", "x"]):
        r[7] = tags
    write(tmp_path / "d.csv", rows)
    got, _ = read_all(csv_cfg(tmp_path / "d.csv"))
    a, b, x = (hash_string("tags", t) for t in "abx")
    assert [g[2][2] for g in got] == [(), (a, b), (a, b), (x,)]


# ------------------------------------------------------------------------- UCI Adult

needs_adult = pytest.mark.skipif(not os.path.exists(ADULT),
                                 reason=f"UCI Adult data not found at {ADULT}")


@needs_adult
def test_adult_standard_split():
    cfg = load_config(os.path.join(CONFIGS, "wide_deep_adult.toml")).data
    cfg.train.paths = cfg.eval.paths = [ADULT]        # independent of the working directory
    for split, n, pos in (("train", 32561, 7841), ("eval", 16281, 3846)):
        with make_reader(cfg, split, 0, 1, 1024, 0, epochs=1, drop_last=False,
                         shuffle=False) as r:
            batches = list(r)
        labels = np.concatenate([b.labels for b in batches])
        dense = np.concatenate([b.dense for b in batches])
        assert labels.shape[0] == n and labels.sum() == pos
        assert batches[0].features == ("workclass", "education", "marital-status", "occupation",
                                       "relationship", "race", "gender", "native-country")
        assert all((b.lengths == 1).all() for b in batches)
        if split == "train":    # standardised with the train split's own statistics
            np.testing.assert_allclose(dense[:, :4].mean(axis=0), 0, atol=1e-4)
            np.testing.assert_allclose(dense[:, :4].std(axis=0), 1, atol=1e-4)
    # the first UCI test record: 25, Private, 226802, 11th, ..., <=50K
    with make_reader(cfg, "eval", 0, 1, 1, 0, epochs=1) as r:
        label, _, bags = samples(next(r))[0]
    assert label == 0.0 and bags[:2] == ((hash_string("workclass", "Private"),),
                                         (hash_string("education", "11th"),))


def test_to_feature_major_matches_numpy():
    from hpctrain._kernels.data_parse import to_feature_major
    rng = np.random.default_rng(10)
    for n, nf in [(0, 3), (1, 1), (37, 5)]:
        lengths = rng.integers(0, 4, size=(n, nf))
        order = rng.permutation(nf).astype(np.int32)
        # sample-major ids, a sample's bags in feature order `order`
        bags = [[list(rng.integers(0, 1 << 40, size=lengths[s, f])) for f in range(nf)]
                for s in range(n)]
        ids = np.array([v for s in range(n) for f in order for v in bags[s][f]], dtype=np.int64)
        values = np.empty(ids.shape[0], dtype=np.int64)
        fm = np.empty(n * nf, dtype=np.int64)
        to_feature_major(ids, lengths, order, values, fm)
        ref = [v for f in range(nf) for s in range(n) for v in bags[s][f]]
        assert values.tolist() == ref
        assert fm.tolist() == lengths.T.reshape(-1).tolist()


def test_rows_take_and_concat_match_per_sample_lists():
    from hpctrain.data.batch import Rows
    rng = np.random.default_rng(11)

    def make(n):
        lengths = rng.integers(0, 3, size=(2, n))
        return Rows(rng.random(n), rng.random((n, 2)),
                    rng.integers(0, 99, size=int(lengths.sum())), lengths)

    def as_list(r):
        return samples(r.to_batch(("f", "g")))
    a, b = make(7), make(5)
    cat = Rows.concat([a, Rows.empty(2, 2), b], 2, 2)
    assert as_list(cat) == as_list(a) + as_list(b)
    order = rng.permutation(12)
    assert as_list(cat.take(order)) == [as_list(cat)[i] for i in order]


def test_crossed_features(tmp_path):
    from hpctrain.data.hashing import hash_cross
    rows = random_rows(25, seed=12)
    write(tmp_path / "d.csv", rows)
    cross = {"crossed": [{"name": "city_x_country", "columns": ["city", "country"]}]}
    data = {"format": "csv", "schema": dict(SCHEMA, **cross), "train": {"paths": [
        str(tmp_path / "d.csv")]}}
    cfg = data_config(data, ["city", "country", "tags", "city_x_country"])
    with make_reader(cfg, "train", 0, 1, 10, 0, epochs=1, drop_last=False) as r:
        batches = list(r)
    assert batches[0].features == ("city", "country", "tags", "city_x_country")
    got = [s for b in batches for s in samples(b)]
    for s, row in zip(got, rows):
        city, country = hash_string("city", row[6]), hash_string("country", row[8])
        assert s[2][3] == (hash_cross("city_x_country", [city, country]),)
    assert got[0][2][3][0] != hash_cross("city_x_country", [got[0][2][1][0], got[0][2][0][0]])
