"""JaggedBatch: layout, derived offsets, per-feature slicing and validation."""
import numpy as np
import pytest

from hpctrain.sparse.jagged import JaggedBatch


def _docstring_batch():
    return JaggedBatch(["user", "items"], [11, 12, 11, 7, 8, 9, 7], [1, 1, 1, 3, 0, 1])


def test_docstring_example_offsets_and_features():
    jb = _docstring_batch()
    assert jb.batch_size == 3 and len(jb) == 3 and jb.num_features == 2
    assert jb.offsets.tolist() == [0, 1, 2, 3, 6, 6, 7]
    assert jb.feature_offsets.tolist() == [0, 3, 7]
    items = jb["items"]
    assert items.values.tolist() == [7, 8, 9, 7]
    assert items.offsets.tolist() == [0, 3, 3, 4]
    assert items.lengths.tolist() == [3, 0, 1]
    assert jb.to_dict() == {"user": [[11], [12], [11]], "items": [[7, 8, 9], [], [7]]}


def test_offsets_cached_and_values_are_views():
    jb = _docstring_batch()
    assert jb.offsets is jb.offsets
    assert np.shares_memory(jb.feature("user").values, jb.values)


def test_random_round_trip_against_python_lists():
    rng = np.random.default_rng(3)
    feats = [f"f{i}" for i in range(5)]
    bags = {f: [rng.integers(0, 50, size=rng.integers(0, 4)).tolist() for _ in range(7)]
            for f in feats}
    jb = JaggedBatch.from_dict(bags)
    assert jb.to_dict() == bags
    sub = jb.select(["f3", "f1"])
    assert sub.features == ["f3", "f1"] and sub.to_dict() == {"f3": bags["f3"], "f1": bags["f1"]}
    part = jb.slice_samples(2, 5)
    assert part.to_dict() == {f: bags[f][2:5] for f in feats}
    for f in feats:
        feat = jb[f]
        for b in range(7):
            assert feat.values[feat.offsets[b]:feat.offsets[b + 1]].tolist() == bags[f][b]


def test_one_hot():
    ids = np.arange(12).reshape(4, 3)
    jb = JaggedBatch.one_hot(["a", "b", "c"], ids)
    assert (jb.lengths == 1).all()
    assert jb["b"].values.tolist() == [1, 4, 7, 10]


def test_negative_length_is_named():
    with pytest.raises(ValueError, match=r"negative length -1 for feature 'b', sample 0"):
        JaggedBatch(["a", "b"], [1, 2], [1, 1, -1, 1])


def test_lengths_not_summing_to_values():
    with pytest.raises(ValueError, match="sum to 3 but there are 2 values"):
        JaggedBatch(["a"], [1, 2], [1, 2])


def test_lengths_not_multiple_of_features():
    with pytest.raises(ValueError, match="not a multiple"):
        JaggedBatch(["a", "b"], [1, 2, 3], [1, 1, 1])


def test_unknown_features_are_named():
    jb = _docstring_batch()
    with pytest.raises(ValueError, match=r"unknown feature names \['nope', 'zz'\]"):
        jb.select(["user", "nope", "zz"])
    with pytest.raises(ValueError, match="nope"):
        jb["nope"]


def test_duplicate_features_and_non_integer_values():
    with pytest.raises(ValueError, match="duplicate"):
        JaggedBatch(["a", "a"], [1, 2], [1, 1])
    with pytest.raises(ValueError, match="integers"):
        JaggedBatch(["a"], [1.5], [1])


def test_empty_bags_everywhere():
    jb = JaggedBatch(["a", "b"], [], [0, 0, 0, 0])
    assert jb.batch_size == 2 and jb["a"].offsets.tolist() == [0, 0, 0]
