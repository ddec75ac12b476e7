"""The Zipf sampler's tail guide draws the same ids as the Newton path, only cheaper, so the
synthetic data of every seed stays what it was."""
import hashlib

import numpy as np
import pytest

from hpctrain._kernels import data_synth
from hpctrain.data.synthetic import ZIPF_HEAD, zipf_tables, zipf_tail


@pytest.mark.parametrize("vocab,s", [(10**6, 1.05), (10**6, 1.0), (300000, 0.5),
                                     (10**7, 1.2), (ZIPF_HEAD + 1, 1.05), (80000, 2.5)])
def test_tail_guide_draws_the_same_ids(vocab, s):
    u = np.random.default_rng(vocab).random(200000)
    u[:4] = [0.0, np.nextafter(1.0, 0.0), 0.5, 1e-12]
    head, guide = zipf_tables(vocab, s)
    tail = zipf_tail(vocab, s)
    assert tail is not None and tail[0] == ZIPF_HEAD + 1 and (np.diff(tail) >= 0).all()
    a, b = np.empty(u.shape[0], np.int64), np.empty(u.shape[0], np.int64)
    data_synth.zipf_ids(u, vocab, s, head, guide, a)
    data_synth.zipf_ids(u, vocab, s, head, guide, b, tail)
    np.testing.assert_array_equal(a, b)
    assert a.max() < vocab


def test_benchmark_sampler_ids_are_pinned():
    """Ids of the benchmark's Zipf(1.05) over 10^6, fixed before the tail guide existed."""
    u = np.random.default_rng(7).random(400000)
    head, guide = zipf_tables(10**6, 1.05)
    out = np.empty(u.shape[0], np.int64)
    data_synth.zipf_ids(u, 10**6, 1.05, head, guide, out, zipf_tail(10**6, 1.05))
    assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == "f9bc68c0261b2432"


def test_no_tail_no_guide():
    assert zipf_tail(ZIPF_HEAD, 1.05) is None and zipf_tail(100, 1.0) is None


def test_bags_with_and_without_the_tail_guide_agree():
    vocab, s, n = 10**6, 1.05, 300
    head, guide = zipf_tables(vocab, s)
    keys = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    lengths = np.random.default_rng(1).integers(0, 30, n).astype(np.int64)
    out = []
    for tail in (None, zipf_tail(vocab, s)):
        ids, score = np.empty(int(lengths.sum()), np.int64), np.empty(n)
        data_synth.bags(keys, lengths, vocab, s, head, guide, 12345, ids, score, tail)
        out.append((ids, score))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])


def test_bad_tail_guides_are_refused():
    head, guide = zipf_tables(10**6, 1.05)
    out = np.empty(3, np.int64)
    with pytest.raises(ValueError, match="tail guide"):
        data_synth.zipf_ids(np.zeros(3), 10**6, 1.05, head, guide, out,
                            np.array([5, 6], np.int64))


def test_checked_tables_skip_the_checks_and_give_the_same_ids():
    # the dataset's cached tables are checked once and read-only; bags(checked=True) skips
    # the per-call order checks and draws the same ids and scores
    vocab, s, n = 10**6, 1.05, 200
    head, guide = zipf_tables(vocab, s)
    tail = zipf_tail(vocab, s)
    assert not (head.flags.writeable or guide.flags.writeable or tail.flags.writeable)
    keys = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    lengths = np.random.default_rng(2).integers(0, 25, n).astype(np.int64)
    out = []
    for checked in (False, True):
        ids, score = np.empty(int(lengths.sum()), np.int64), np.empty(n)
        data_synth.bags(keys, lengths, vocab, s, head, guide, 7, ids, score, tail,
                        checked=checked)
        out.append((ids, score))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])
    bad = guide.copy()
    bad[5], bad[6] = bad[6] + 1, bad[6]               # out of order
    with pytest.raises(ValueError, match="non-decreasing"):
        data_synth.check_tables(vocab, s, head, bad, tail)
    ids, score = np.empty(int(lengths.sum()), np.int64), np.empty(n)
    with pytest.raises(ValueError, match="non-decreasing"):
        data_synth.bags(keys, lengths, vocab, s, head, bad, 7, ids, score, tail)
