"""Cython sparse kernels against plain NumPy references, for any thread count."""
import numpy as np
import pytest

from hpctrain._kernels import _openmp
from hpctrain._kernels import sparse_ops as so
from hpctrain.sparse.routing import owner_of, owner_of_reference


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    """Kernels on 1-3 threads; every job split (no single-thread cut-off), so the small
    test inputs take the parallel paths."""
    old, old_min = _openmp.get_num_threads(), so.parallel_threshold()
    _openmp.set_num_threads(request.param)
    so.set_parallel_threshold(0)
    yield request.param
    _openmp.set_num_threads(old)
    so.set_parallel_threshold(old_min)


def _zipf_keys(rng, n, vocab=1000):
    return (rng.zipf(1.2, size=n) % vocab * 7919 - 3000).astype(np.int64)


def _unique_first_occurrence(keys):
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return uniq[order], rank[inverse.ravel()]


def _bags(rng, nbags, maxlen=5):
    lengths = rng.integers(0, maxlen, size=nbags)
    lengths[rng.random(nbags) < 0.2] = 0      # plenty of empty bags
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


@pytest.mark.parametrize("n", [0, 1, 17, 5000])
def test_unique_inverse_matches_numpy(n, threads):
    rng = np.random.default_rng(n)
    keys = _zipf_keys(rng, n)
    keys[: n // 3] = rng.integers(-2**63, 2**63 - 1, size=n // 3, dtype=np.int64)
    uniq, inv = so.unique_inverse(keys)
    ref_u, ref_inv = _unique_first_occurrence(keys)
    assert uniq.tolist() == ref_u.tolist()
    assert inv.tolist() == ref_inv.tolist()
    assert (uniq[inv] == keys).all()


def test_unique_table_grows_past_its_first_size_with_the_same_result(threads):
    # the dedup table starts at 16384 slots and doubles at half full: 60,000 distinct keys
    # (and colliding ones: multiples of a large power of two) take it through 3 doublings,
    # mid-array and mid-block, and change nothing about first-occurrence order
    rng = np.random.default_rng(7)
    distinct = np.concatenate([rng.integers(-2**62, 2**62, size=40000, dtype=np.int64),
                               np.arange(20000, dtype=np.int64) << 40])
    keys = np.concatenate([distinct, distinct[rng.integers(0, distinct.size, 30000)]])
    rng.shuffle(keys)
    ref_u, ref_inv = _unique_first_occurrence(keys)
    uniq, inv = so.unique_inverse(keys)
    assert ref_u.size == 60000
    assert np.array_equal(uniq, ref_u) and np.array_equal(inv, ref_inv)
    (u2, i2), (u3, i3) = so.unique_inverse_many([keys, keys[:9000]])
    assert np.array_equal(u2, ref_u) and np.array_equal(i2, ref_inv)
    ref_u3, ref_inv3 = _unique_first_occurrence(keys[:9000])
    assert np.array_equal(u3, ref_u3) and np.array_equal(i3, ref_inv3)
    starts = np.array([50000, 0, 20000], dtype=np.int64)
    counts = np.array([40000, 20000, 30000], dtype=np.int64)
    blocks = np.concatenate([keys[a:a + c] for a, c in zip(starts, counts)])
    ref_ub, ref_ib = _unique_first_occurrence(blocks)
    ub, ib = so.unique_blocks(keys, starts, counts)
    assert np.array_equal(ub, ref_ub) and np.array_equal(ib, ref_ib)


def test_unique_inverse_many_equals_one_call_per_array(threads):
    rng = np.random.default_rng(41)
    arrays = [_zipf_keys(rng, n) for n in (0, 1, 17, 5000, 3000, 0, 12000)]
    arrays.append(arrays[3][::2])                   # a strided view
    got = so.unique_inverse_many(arrays)
    assert len(got) == len(arrays)
    for keys, (uniq, inverse) in zip(arrays, got):
        ref_u, ref_inv = _unique_first_occurrence(keys)
        assert np.array_equal(uniq, ref_u) and np.array_equal(inverse, ref_inv)
    assert so.unique_inverse_many([]) == []
    with pytest.raises(ValueError, match="array 1 is not 1-D"):
        so.unique_inverse_many([arrays[1], np.zeros((2, 2), np.int64)])


def test_unique_blocks_equals_unique_of_the_concatenated_blocks():
    rng = np.random.default_rng(3)
    keys = _zipf_keys(rng, 4000)
    counts = np.array([700, 0, 1300, 1, 999], dtype=np.int64)
    starts = np.array([2500, 9, 0, 3999, 1400], dtype=np.int64)   # any order, may overlap
    blocks = np.concatenate([keys[s:s + c] for s, c in zip(starts, counts)])
    uniq, inv = so.unique_blocks(keys, starts, counts)
    ref_u, ref_inv = _unique_first_occurrence(blocks)
    assert uniq.tolist() == ref_u.tolist()
    assert inv.tolist() == ref_inv.tolist()
    u0, i0 = so.unique_blocks(keys, starts[:0], counts[:0])
    assert u0.shape == (0,) and i0.shape == (0,)
    with pytest.raises(ValueError, match="block 1 .* outside"):
        so.unique_blocks(keys, np.array([0, 3990]), np.array([5, 20]))
    with pytest.raises(ValueError, match="2 starts but 1 counts"):
        so.unique_blocks(keys, np.array([0, 1]), np.array([5]))


def test_block_offsets():
    starts = np.array([100, 7, 0], dtype=np.int64)
    counts = np.array([3, 0, 2], dtype=np.int64)
    got = so.block_offsets(starts, counts, 4)
    assert got.tolist() == [100, 104, 108, 0, 4]
    with pytest.raises(ValueError, match=r"counts\[1\] = -1"):
        so.block_offsets(starts, np.array([1, -1, 0]), 4)


def test_segment_sum_same_bits_serial_and_parallel():
    """One thread scatter-adds in input order, several group by segment first: same bits."""
    from hpctrain._kernels._openmp import get_num_threads, set_num_threads
    rng = np.random.default_rng(11)
    dim, n, nseg = 16, 20000, 3000
    src = rng.standard_normal((n, dim)).astype(np.float32)
    seg = rng.integers(0, nseg, size=n)
    scale = rng.random(n).astype(np.float32)
    off = rng.permutation(n).astype(np.int64) * dim
    before, before_min = get_num_threads(), so.parallel_threshold()
    so.set_parallel_threshold(0)
    got = {}
    try:
        for nt in (1, 3):
            set_num_threads(nt)
            got[nt] = (so.segment_sum(src.ravel(), off, dim, seg, nseg, scale),
                       so.segment_sum(src.ravel(), off, dim, seg, nseg))
            with pytest.raises(ValueError, match=r"segments\[5\] = 3000 is outside"):
                bad = seg.copy()
                bad[5] = nseg
                so.segment_sum(src.ravel(), off, dim, bad, nseg)
    finally:
        set_num_threads(before)
        so.set_parallel_threshold(before_min)
    for a, b in zip(got[1], got[3]):
        assert np.array_equal(a, b)


def test_route_matches_reference_and_spreads(threads):
    rng = np.random.default_rng(1)
    keys = rng.integers(-2**63, 2**63 - 1, size=20000, dtype=np.int64)
    for table_id in (0, 1, 26, 12345):
        for ws in (1, 2, 3, 4, 8):
            got = owner_of(table_id, keys, ws)
            assert got.dtype == np.int32
            assert (got == owner_of_reference(table_id, keys, ws)).all()
    counts = np.bincount(owner_of(0, np.arange(40000), 4), minlength=4)
    assert counts.min() > 9000, counts            # sequential ids spread evenly
    a, b = owner_of(0, np.arange(1000), 8), owner_of(1, np.arange(1000), 8)
    assert (a != b).mean() > 0.7                   # tables route independently


def test_route_reference_known_value():
    # splitmix64's first output from state 0 is 0xE220A8397B1DCDAF: mix64(gamma).
    assert so.mix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    assert so.route_salt(0) == 0xE220A8397B1DCDAF


def test_route_many_and_scatter_many_match_numpy(threads):
    """route_many's owners are route's; its counts, offsets and scatter_many's layout
    match a NumPy reference (stable sort by owner, tables in order within an owner)."""
    rng = np.random.default_rng(33)
    keys = [np.unique(rng.integers(-10**12, 10**12, size=n)) for n in (700, 0, 90, 2500, 1)]
    table_ids = np.array([3, 0, 11, 5, 2], dtype=np.int64)
    dims = np.array([4, 16, 1, 9, 7], dtype=np.int64)
    P, T = 6, 5
    owners, per_table, offs = so.route_many(keys, table_ids, dims, P)
    for t in range(T):
        assert np.array_equal(owners[t], so.route(keys[t], int(table_ids[t]), P))
        assert np.array_equal(per_table[:, t], np.bincount(owners[t], minlength=P))
    flat_owner = np.concatenate(owners)
    table = np.repeat(np.arange(T), [k.size for k in keys])
    order = np.lexsort((table, flat_owner))          # by owner, then table, stable
    width = dims[table][order]
    off = np.empty(flat_owner.size, np.int64)
    off[order] = np.concatenate([[0], np.cumsum(width)[:-1]])
    assert np.array_equal(np.concatenate(offs), off)
    id_start = np.concatenate([[0], np.cumsum(per_table.ravel())[:-1]]).reshape(P, T)
    out = np.full(int(per_table.sum()), -1, np.int64)
    so.scatter_many(keys, owners, np.ascontiguousarray(id_start.T), out)
    assert np.array_equal(out, np.concatenate(keys)[order])
    with pytest.raises(ValueError, match="5 key arrays, 4 table ids"):
        so.route_many(keys, table_ids[:4], dims, P)
    with pytest.raises(ValueError, match="world_size"):
        so.route_many(keys, table_ids, dims, 0)
    with pytest.raises(ValueError, match="outside out of"):
        so.scatter_many(keys, owners, np.ascontiguousarray(id_start.T), out[:-1])
    bad = [o.copy() for o in owners]
    bad[3][0] = P
    with pytest.raises(ValueError, match=r"owner outside \[0, 6\)"):
        so.scatter_many(keys, bad, np.ascontiguousarray(id_start.T), out)


def test_plan_route_layout_is_owner_then_table_then_first_occurrence(threads):
    """plan.route against a NumPy reference: the ids sorted stably by owner over the
    tables' unique ids concatenated; each id's row offset its place in that order times
    the widths before it."""
    from types import SimpleNamespace as NS
    from hpctrain.sparse.plan import route
    rng = np.random.default_rng(32)
    for P in (1, 2, 5):
        plans = [NS(uniq=np.unique(rng.integers(-10**12, 10**12, size=n)), spec=NS(table_id=t))
                 for t, n in enumerate((300, 0, 41, 170))]
        dims = np.array([4, 16, 1, 9], dtype=np.int64)
        r = route(plans, dims, P)
        owners = np.concatenate([so.route(p.uniq, p.spec.table_id, P) for p in plans])
        keys = np.concatenate([p.uniq for p in plans])
        table = np.repeat(np.arange(4), [p.uniq.size for p in plans])
        order = np.argsort(owners, kind="stable")
        out = np.empty(r.total, np.int64)
        assert np.array_equal(r.fill_ids(out), keys[order])
        width = dims[table][order]
        off = np.empty(keys.size, np.int64)
        off[order] = np.concatenate([[0], np.cumsum(width)[:-1]])
        assert np.array_equal(np.concatenate(r.unique_off), off)
        assert np.array_equal(r.to_peer, np.bincount(owners, minlength=P))
        assert np.array_equal(r.ask_elems, np.bincount(owners, weights=dims[table],
                                                       minlength=P).astype(np.int64))
        for t in range(4):
            assert np.array_equal(r.per_table[:, t], np.bincount(owners[table == t], minlength=P))


@pytest.mark.parametrize("mean", [False, True])
def test_pool_matches_numpy_with_empty_bags(mean, threads):
    rng = np.random.default_rng(4)
    dim, nrows = 6, 40
    table = rng.standard_normal((nrows, dim)).astype(np.float32)
    offsets = _bags(rng, 300)
    idx = rng.integers(0, nrows, size=offsets[-1])
    out = so.pool(table.ravel(), idx * dim, dim, offsets, mean)
    ref = np.zeros((300, dim), np.float32)
    for b in range(300):
        rows = table[idx[offsets[b]:offsets[b + 1]]]
        if rows.shape[0]:
            ref[b] = rows.mean(0) if mean else rows.sum(0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert (out[np.diff(offsets) == 0] == 0).all()


def test_segment_sum_matches_add_at_exactly(threads):
    rng = np.random.default_rng(5)
    dim, n, nseg = 5, 3000, 97
    src = rng.standard_normal((n, dim)).astype(np.float32)
    seg = rng.integers(0, nseg, size=n)
    scale = rng.random(n).astype(np.float32)
    ref = np.zeros((nseg, dim), np.float32)
    np.add.at(ref, seg, src * scale[:, None])
    got = so.segment_sum(src.ravel(), np.arange(n) * dim, dim, seg, nseg, scale)
    # the compiler may fuse scale * row + acc into one FMA (one rounding fewer)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    ref2 = np.zeros((nseg, dim), np.float32)
    np.add.at(ref2, seg, src)
    # unscaled: the same additions in the same order give the same bits
    assert np.array_equal(so.segment_sum(src.ravel(), np.arange(n) * dim, dim, seg, nseg), ref2)


def test_segment_sum_into_flat_buffer_at_offsets(threads):
    """out_off writes each segment's sum at its own offset of a flat buffer, leaving the
    rest untouched: the same bits as the 2-D result scattered there."""
    rng = np.random.default_rng(8)
    dim, n, nseg = 3, 500, 40
    src = rng.standard_normal((n, dim)).astype(np.float32)
    seg = rng.integers(0, nseg, size=n)
    ref = so.segment_sum(src.ravel(), np.arange(n) * dim, dim, seg, nseg)
    out = np.full(nseg * dim * 2 + 7, -9.0, np.float32)
    out_off = rng.permutation(nseg * 2)[:nseg].astype(np.int64) * dim + 7
    got = so.segment_sum(src.ravel(), np.arange(n) * dim, dim, seg, nseg, out=out,
                         out_off=out_off)
    assert got is out
    expect = np.full_like(out, -9.0)
    for s_, o in enumerate(out_off):
        expect[o:o + dim] = ref[s_]
    assert np.array_equal(out, expect)
    with pytest.raises(ValueError, match="outside"):
        so.segment_sum(src.ravel(), np.arange(n) * dim, dim, seg, nseg, out=out[:20],
                       out_off=out_off)
    with pytest.raises(ValueError, match="out_off has 3 entries"):
        so.segment_sum(src.ravel(), np.arange(n) * dim, dim, seg, nseg, out=out,
                       out_off=out_off[:3])
    with pytest.raises(ValueError, match="needs out"):
        so.segment_sum(src.ravel(), np.arange(n) * dim, dim, seg, nseg, out_off=out_off)


@pytest.mark.parametrize("mean", [False, True])
def test_pool_backward_via_bag_scatter_and_segment_sum(mean):
    rng = np.random.default_rng(6)
    dim, nb = 4, 50
    offsets = _bags(rng, nb)
    n = offsets[-1]
    inverse = rng.integers(0, 9, size=n)
    grad_out = rng.standard_normal((nb, dim)).astype(np.float32)
    bag = so.bag_of_rows(offsets)
    assert bag.tolist() == np.repeat(np.arange(nb), np.diff(offsets)).tolist()
    scale = so.bag_scales(offsets) if mean else None
    got = so.segment_sum(grad_out.ravel(), bag * dim, dim, inverse, 9, scale)
    per_row = grad_out[bag]
    if mean:
        per_row = per_row * (1 / np.diff(offsets)[bag]).astype(np.float32)[:, None]
    ref = np.zeros((9, dim), np.float32)
    np.add.at(ref, inverse, per_row)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim", [1, 16, 19, 64])
@pytest.mark.parametrize("mean", [False, True])
def test_pool_and_unpool_through_unique_ids(mean, dim, threads):
    """pool_unique / unpool_unique (rows reached as unique_off[inverse[j]]) against NumPy,
    and bit for bit the two-step forms they replace (pool of the expanded offsets;
    segment_sum over bag_of_rows with bag_scales), empty bags and unused ids included."""
    rng = np.random.default_rng(21)
    nb, nu = 257, 90
    offsets = _bags(rng, nb, maxlen=30)
    n = int(offsets[-1])
    inverse = rng.integers(0, nu - 3, size=n).astype(np.int64)    # the last 3 ids unused
    unique_off = (rng.permutation(nu * 2)[:nu] * dim + 5).astype(np.int64)
    src = rng.standard_normal(nu * 2 * dim + 5).astype(np.float32)
    pooled = so.pool_unique(src, unique_off, inverse, dim, offsets, mean)
    assert np.array_equal(pooled, so.pool(src, unique_off[inverse], dim, offsets, mean))
    rows = src[unique_off[inverse][:, None] + np.arange(dim)].astype(np.float64)
    lens = np.diff(offsets)
    ref = np.zeros((nb, dim))
    np.add.at(ref, np.repeat(np.arange(nb), lens), rows)
    if mean:
        ref[lens > 0] /= lens[lens > 0, None]
    np.testing.assert_allclose(pooled, ref, rtol=1e-5, atol=1e-5)
    assert (pooled[lens == 0] == 0).all()

    grads = rng.standard_normal((nb, dim)).astype(np.float32)
    got = so.unpool_unique(grads.ravel(), offsets, inverse, nu, dim, mean)
    two_step = so.segment_sum(grads.ravel(), so.bag_of_rows(offsets) * dim, dim, inverse, nu,
                              so.bag_scales(offsets) if mean else None)
    assert np.array_equal(got, two_step)
    per_item = grads[np.repeat(np.arange(nb), lens)].astype(np.float64)
    if mean:
        per_item /= np.repeat(lens, lens)[:, None]
    ref = np.zeros((nu, dim))
    np.add.at(ref, inverse, per_item)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert (got[nu - 3:] == 0).all()
    # into a flat buffer at offsets, the rest untouched
    out = np.full(nu * 2 * dim + 5, -9.0, np.float32)
    assert so.unpool_unique(grads.ravel(), offsets, inverse, nu, dim, mean, out=out,
                            out_off=unique_off) is out
    expect = np.full_like(out, -9.0)
    for u, o in enumerate(unique_off):
        expect[o:o + dim] = got[u]
    assert np.array_equal(out, expect)


def test_pool_and_unpool_through_unique_ids_name_bad_input():
    offsets = np.array([0, 2, 3], dtype=np.int64)
    inverse = np.array([0, 1, 2], dtype=np.int64)
    src = np.zeros(12, np.float32)
    with pytest.raises(ValueError, match=r"inverse\[2\] = 2 is outside \[0, 2\)"):
        so.pool_unique(src, np.array([0, 4], dtype=np.int64), inverse, 4, offsets, False)
    with pytest.raises(ValueError, match="row offset"):
        so.pool_unique(src, np.array([0, 4, 10], dtype=np.int64), inverse, 4, offsets, False)
    with pytest.raises(ValueError, match="bag_offsets must rise"):
        so.pool_unique(src, np.array([0, 4, 8], dtype=np.int64), inverse, 4,
                       np.array([0, 2], dtype=np.int64), False)
    with pytest.raises(ValueError, match="grads has 7 floats, expected 2 bags x 4"):
        so.unpool_unique(np.zeros(7, np.float32), offsets, inverse, 3, 4, False)
    with pytest.raises(ValueError, match=r"inverse\[2\] = 2 is outside \[0, 2\)"):
        so.unpool_unique(np.zeros(8, np.float32), offsets, inverse, 2, 4, False)
    with pytest.raises(ValueError, match="needs out"):
        so.unpool_unique(np.zeros(8, np.float32), offsets, inverse, 3, 4, False,
                         out_off=np.zeros(3, np.int64))


@pytest.mark.parametrize("bad_at", [0, 2047, 2048, 9998])
def test_bounds_checks_name_the_first_bad_entry_in_any_block(bad_at):
    # the checks scan blocks of 2048 entries without branches, then search the bad block:
    # the error names the first bad entry, negative or too large, wherever it falls
    n, dim, nu = 10000, 4, 50
    inverse = np.arange(n, dtype=np.int64) % nu
    unique_off = np.arange(nu, dtype=np.int64) * dim
    src = np.zeros(nu * dim, np.float32)
    offsets = np.arange(n + 1, dtype=np.int64)
    for value in (-1, nu, 2**62):
        bad = inverse.copy()
        bad[bad_at] = value
        bad[-1] = -5                                       # a later bad entry is not named
        with pytest.raises(ValueError, match=rf"inverse\[{bad_at}\] = {value} is outside"):
            so.pool_unique(src, unique_off, bad, dim, offsets, False)
        off = unique_off[inverse]
        off[bad_at] = value * dim if value != 2**62 else value
        off[-1] = -3
        with pytest.raises(ValueError, match=rf"row offset \[{bad_at}\] = {off[bad_at]} "):
            so.gather_rows(src, off, dim)
    assert np.array_equal(so.gather_rows(src, unique_off[inverse], dim), np.zeros((n, dim)))
    with pytest.raises(ValueError, match=r"row offset \[0\]"):
        so.gather_rows(np.zeros(3, np.float32), np.zeros(2, np.int64), 4)   # rows wider than src


def test_thread_count_invariance_bitwise():
    rng = np.random.default_rng(7)
    dim, n = 16, 20000
    src = rng.standard_normal((n, dim)).astype(np.float32)
    seg = (rng.zipf(1.1, size=n) % 500).astype(np.int64)
    offsets = _bags(rng, 5000, 8)
    idx = rng.integers(0, n, size=offsets[-1]) * dim
    results = []
    old = _openmp.get_num_threads()
    try:
        for nt in (1, 2, 4):
            _openmp.set_num_threads(nt)
            results.append((so.segment_sum(src.ravel(), np.arange(n) * dim, dim, seg, 500),
                            so.pool(src.ravel(), idx, dim, offsets, True),
                            so.route(seg, 3, 4), so.unique_inverse(seg)[1]))
    finally:
        _openmp.set_num_threads(old)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert np.array_equal(a, b)


def test_gather_and_scatter_rows_with_mixed_widths(threads):
    rng = np.random.default_rng(8)
    a = rng.standard_normal((5, 3)).astype(np.float32)
    b = rng.standard_normal((4, 2)).astype(np.float32)
    flat = np.zeros(5 * 3 + 4 * 2, np.float32)
    # interleave rows of both tables in a packed buffer
    off_a = np.array([0, 3, 8, 11, 14])
    off_b = np.array([6, 17, 19, 21])
    so.scatter_rows(a, None, flat, off_a)
    so.scatter_rows(b, np.array([0, 1, 2, 3]), flat, off_b)
    assert np.array_equal(so.gather_rows(flat, off_a, 3), a)
    assert np.array_equal(so.gather_rows(flat, off_b[::-1].copy(), 2), b[::-1])


def test_errors_name_the_culprit():
    f = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match=r"row offset \[1\] = 9"):
        so.gather_rows(f, np.array([0, 9]), 2)
    with pytest.raises(ValueError, match=r"segments\[1\] = 5"):
        so.segment_sum(f, np.array([0, 2]), 2, np.array([0, 5]), 3)
    with pytest.raises(ValueError, match="bag_offsets must rise"):
        so.pool(f, np.array([0, 2]), 2, np.array([0, 2, 1]), False)
    with pytest.raises(ValueError, match=r"src_row\[0\] = 9"):
        so.scatter_rows(np.zeros((2, 2), np.float32), np.array([9]), f, np.array([0]))


def test_parallel_threshold_keeps_small_jobs_on_one_thread_with_the_same_bits():
    rng = np.random.default_rng(3)
    dim, n = 8, 5000
    src = rng.standard_normal((n, dim)).astype(np.float32)
    off = rng.integers(0, n, n).astype(np.int64) * dim
    bags = np.sort(rng.integers(0, n, 700))
    bags[0], bags[-1] = 0, n
    old, old_min = _openmp.get_num_threads(), so.parallel_threshold()
    try:
        _openmp.set_num_threads(3)
        got = []
        for nbytes in (0, 1 << 40):          # every job split / none
            so.set_parallel_threshold(nbytes)
            got.append((so.pool(src.ravel(), off, dim, bags, False),
                        so.gather_rows(src.ravel(), off, dim), so.route(off, 4, 5)))
        with pytest.raises(ValueError, match=">= 0 bytes"):
            so.set_parallel_threshold(-1)
    finally:
        _openmp.set_num_threads(old)
        so.set_parallel_threshold(old_min)
    for a, b in zip(*got):
        np.testing.assert_array_equal(a, b)
    assert so.parallel_threshold() == old_min
