# cython: language_level=3
"""Synthetic-data kernels: counter-based random numbers, Zipf ids, planted bag scores.

Every random number is ``mix_add(key, x) = mix64(key + x * 0x9E3779B97F4A7C15)``
(splitmix64's finaliser, wrapping arithmetic), turned into a uniform in [0, 1)
by its top 53 bits. hpctrain/data/synthetic.py documents which keys are used.

Zipf(s) over ranks 1..V samples the smallest k with ``H(k) >= u * H(V)``, where
``H(k) = sum_{i<=k} i^-s``: exactly (a table of partial sums) for k <= a, and by
the Euler-Maclaurin formula beyond, which is exact to float64 rounding once
``a >= 1024`` -- no table grows with V, so any vocabulary size works.

Beyond a, the answer is found by stepping from a first guess to the smallest k with
``H(k) >= t``. ``H`` grows by ``k^-s`` per rank, far above its rounding error, so that k
is unique and every first guess gives the same id. Without a tail guide the guess is the
integral's inverse and two Newton steps (about eight ``pow`` calls); with one
(``zipf_tail_guide``: the first rank past each of ``nt`` equal steps of ``H`` over the
tail) it is an interpolation between two guide entries, within a rank of the answer, so
the two checks of the final step are all that is left.
"""
from libc.math cimport ceil, exp, fabs, log, pow, sqrt
from libc.stdint cimport int64_t, uint64_t

import numpy as np

cdef extern from *:
    """
    #include "hp_mix64.h"
    static inline uint64_t hp_mix_add(uint64_t h, uint64_t x) {
        return hp_mix64(h + x * 0x9E3779B97F4A7C15ULL);
    }
    static inline double hp_unit(uint64_t h) {
        return (double)(h >> 11) * (1.0 / 9007199254740992.0);
    }
    """
    uint64_t hp_mix_add(uint64_t h, uint64_t x) noexcept nogil
    double hp_unit(uint64_t h) noexcept nogil


cdef struct Zipf:
    int64_t vocab
    double s
    int64_t a
    const double* head     # H(1..a)
    const int64_t* guide   # guide[j] = first i with head[i] >= j * total / ng
    int64_t ng
    double ha              # H(a)
    double pa              # a^-s
    double total           # H(vocab)
    const int64_t* tail    # tail[j]: first rank k > a with H(k) >= ha + j * (total - ha) / nt
    int64_t nt             # 0: no tail guide


cdef inline double _tail_h(const Zipf* z, double k) noexcept nogil:
    # H(k) for k > a: H(a) + integral + (f(k) - f(a))/2 + (f'(k) - f'(a))/12, f(x) = x^-s
    cdef double s = z.s, a = <double>z.a, p = pow(k, -s), integ
    if fabs(s - 1.0) < 1e-12:
        integ = log(k / a)
    else:
        integ = (k * p - a * z.pa) / (1.0 - s)
    return z.ha + integ + 0.5 * (p - z.pa) + (s * z.pa / a - s * p / k) / 12.0


cdef inline int64_t _zipf_id(const Zipf* z, double u) noexcept nogil:
    cdef double t = u * z.total, x, base
    cdef int64_t lo, hi, mid, k, n, half
    cdef int it
    if t <= z.ha:
        # the guide table narrows the search to the ranks between two guide points
        mid = <int64_t>(u * <double>z.ng)
        lo = z.guide[mid]
        hi = z.guide[mid + 1] if z.guide[mid + 1] < z.a - 1 else z.a - 1
        # first i in [lo, hi] with head[i] >= t (hi if none before it): a search whose
        # steps depend on the data only through conditional moves, not branches, since
        # which half holds the answer is a coin flip the branch predictor cannot learn
        n = hi - lo + 1
        while n > 1:
            half = n >> 1
            lo = lo + half if z.head[lo + half - 1] < t else lo
            n -= half
        return lo
    if z.nt > 0:
        x = (t - z.ha) / (z.total - z.ha) * <double>z.nt
        mid = <int64_t>x
        if mid >= z.nt:
            mid = z.nt - 1
        lo, hi = z.tail[mid], z.tail[mid + 1]
        k = lo + <int64_t>((x - <double>mid) * <double>(hi - lo))
        if k < z.a + 1:
            k = z.a + 1
        if k > z.vocab:
            k = z.vocab
        return _tail_step(z, k, t)
    if fabs(z.s - 1.0) < 1e-12:
        x = <double>z.a * exp(t - z.ha)
    else:
        base = pow(<double>z.a, 1.0 - z.s) + (1.0 - z.s) * (t - z.ha)
        x = pow(base, 1.0 / (1.0 - z.s)) if base > 0 else <double>z.vocab
    if not (x == x) or x > <double>z.vocab:
        x = <double>z.vocab
    if x < <double>z.a:
        x = <double>z.a
    # The integral alone is off by the (f(x) - f(a))/2 term, many ranks deep in the tail:
    # two Newton steps on H(x) = t (H'(x) ~ x^-s) land within a rank.
    for it in range(2):
        x -= (_tail_h(z, x) - t) / pow(x, -z.s)
        if not (x == x) or x > <double>z.vocab:
            x = <double>z.vocab
        if x < <double>z.a:
            x = <double>z.a
    k = <int64_t>ceil(x)
    if k < z.a + 1:
        k = z.a + 1
    return _tail_step(z, k, t)


cdef inline int64_t _tail_step(const Zipf* z, int64_t k, double t) noexcept nogil:
    # from a guess k in (a, vocab] to the smallest k with H(k) >= t; the id is k - 1
    while k < z.vocab and _tail_h(z, <double>k) < t:
        k += 1
    while k > z.a + 1 and _tail_h(z, <double>(k - 1)) >= t:
        k -= 1
    return k - 1


cdef Zipf _make(int64_t vocab, double s, const double[::1] head,
                const int64_t[::1] guide, const int64_t[::1] tail=None,
                bint check=True) except *:
    # check=False skips the O(len) order checks of the guides (tables checked when built)
    cdef Zipf z
    cdef int64_t j
    if vocab < 1 or head.shape[0] < 1 or head.shape[0] > vocab or guide.shape[0] < 2:
        raise ValueError(f"zipf: vocab {vocab}, a head table of {head.shape[0]} entries and "
                         f"a guide of {guide.shape[0]}")
    z.vocab, z.s, z.a, z.head = vocab, s, head.shape[0], &head[0]
    z.guide, z.ng = &guide[0], guide.shape[0] - 1
    z.ha = head[head.shape[0] - 1]
    z.pa = pow(<double>z.a, -s)
    z.total = z.ha if vocab == z.a else _tail_h(&z, <double>vocab)
    z.tail, z.nt = NULL, 0
    for j in range(guide.shape[0] if check else 0):
        if guide[j] < 0 or guide[j] > z.a or (j and guide[j] < guide[j - 1]):
            raise ValueError("zipf: the guide table must be non-decreasing within [0, a]")
    if tail is not None and vocab > z.a and z.total > z.ha:
        if tail.shape[0] < 2:
            raise ValueError(f"zipf: a tail guide needs at least 2 entries, got {tail.shape[0]}")
        for j in range(tail.shape[0] if check else 0):
            if tail[j] <= z.a or tail[j] > vocab or (j and tail[j] < tail[j - 1]):
                raise ValueError(f"zipf: the tail guide must be non-decreasing within "
                                 f"(a, vocab] = ({z.a}, {vocab}]")
        z.tail, z.nt = &tail[0], tail.shape[0] - 1
    return z


def zipf_tail_guide(int64_t vocab, double s, const double[::1] head, int64_t nt):
    """The tail guide of ``bags``/``zipf_ids``: int64[nt + 1], entry j the first rank
    k > a with ``H(k) >= H(a) + j * (H(vocab) - H(a)) / nt`` (a = len(head)); empty when
    the vocabulary has no tail."""
    cdef int64_t[::1] g0 = np.zeros(2, dtype=np.int64)
    cdef Zipf z = _make(vocab, s, head, g0)
    if vocab <= z.a or z.total <= z.ha or nt < 1:
        return np.zeros(0, dtype=np.int64)
    out_arr = np.empty(nt + 1, dtype=np.int64)
    cdef int64_t[::1] out = out_arr
    cdef int64_t j, lo, hi, mid
    cdef double t
    with nogil:
        lo = z.a + 1
        for j in range(nt + 1):
            t = z.ha + (z.total - z.ha) * (<double>j / <double>nt)
            hi = vocab          # H(vocab) = total >= t: the first rank is in [lo, vocab]
            while lo < hi:
                mid = (lo + hi) >> 1
                if _tail_h(&z, <double>mid) >= t:
                    hi = mid
                else:
                    lo = mid + 1
            out[j] = lo
    return out_arr


def check_tables(int64_t vocab, double s, const double[::1] head, const int64_t[::1] guide,
                 const int64_t[::1] tail=None):
    """``ValueError`` unless ``head``, ``guide`` and ``tail`` are tables the sampler can use
    (the checks ``bags`` skips with ``checked=True``)."""
    _make(vocab, s, head, guide, tail)


def zipf_total(int64_t vocab, double s, const double[::1] head):
    """``H(vocab)`` as the sampler computes it (head table ``head = H(1..a)``)."""
    cdef int64_t[::1] g = np.zeros(2, dtype=np.int64)
    cdef Zipf z = _make(vocab, s, head, g)
    return z.total


def zipf_ids(const double[::1] u, int64_t vocab, double s, const double[::1] head,
             const int64_t[::1] guide, int64_t[::1] out, const int64_t[::1] tail=None):
    """Zipf(s) ids in [0, vocab) (id = rank - 1) of uniforms ``u``.

    ``head`` holds H(1..a); ``guide[j]`` (j = 0..ng) the first i with
    ``head[i] >= j * total / ng``, capped at a (hpctrain.data.synthetic.zipf_tables);
    ``tail``, optional, the tail guide (``zipf_tail_guide``): the same ids, cheaper.
    """
    cdef Zipf z = _make(vocab, s, head, guide, tail)
    cdef int64_t i, n = u.shape[0]
    if out.shape[0] != n:
        raise ValueError("zipf_ids: out must have one entry per uniform")
    with nogil:
        for i in range(n):
            out[i] = _zipf_id(&z, u[i])


def bags(const uint64_t[::1] bag_keys, const int64_t[::1] lengths, int64_t vocab, double s,
         const double[::1] head, const int64_t[::1] guide, uint64_t weight_key,
         int64_t[::1] ids, double[::1] score, const int64_t[::1] tail=None,
         bint checked=False):
    """Ids of one feature's bags and each bag's planted score.

    Bag ``i`` has ``lengths[i]`` ids; id ``j`` of bag ``i`` is
    ``zipf(unit(mix_add(bag_keys[i], j)))``. Its planted weight is
    ``(2 * unit(mix_add(weight_key, id)) - 1) * sqrt(3)`` and ``score[i]`` is the sum of
    its bag's weights divided by ``sqrt(max(lengths[i], 1))``. ``tail``: as in ``zipf_ids``.
    ``checked``: the tables passed ``check_tables`` and have not changed since (the
    dataset's cached, read-only ones), so their order checks, which read every entry of
    both guides, are skipped.
    """
    cdef Zipf z = _make(vocab, s, head, guide, tail, not checked)
    cdef int64_t n = lengths.shape[0], i, j, w = 0, idv
    cdef double acc, r3 = sqrt(3.0)
    if bag_keys.shape[0] != n or score.shape[0] != n:
        raise ValueError("bags: bag_keys, lengths and score must have one entry per bag")
    for i in range(n):
        if lengths[i] < 0:
            raise ValueError(f"bags: negative length at bag {i}")
        w += lengths[i]
    if ids.shape[0] != w:
        raise ValueError(f"bags: ids has {ids.shape[0]} entries, lengths sum to {w}")
    w = 0
    with nogil:
        for i in range(n):
            acc = 0.0
            for j in range(lengths[i]):
                idv = _zipf_id(&z, hp_unit(hp_mix_add(bag_keys[i], <uint64_t>j)))
                ids[w] = idv
                w += 1
                acc += (2.0 * hp_unit(hp_mix_add(weight_key, <uint64_t>idv)) - 1.0) * r3
            score[i] = acc / sqrt(<double>(lengths[i] if lengths[i] > 1 else 1))
    return w
