# cython: language_level=3
"""Batched kernels of the sparse lookup path: dedup, routing, pooling, segment sums.

Every kernel takes whole batches as typed memoryviews and runs without the GIL.
Row data travels as a *flat* float32 buffer plus one int64 element offset per
row (``src_off[i]`` is where row ``i``'s ``dim`` floats start), so the same
kernel reads a 2-D ``[n, dim]`` array (``off = row * dim``) and a packed
exchange buffer that mixes tables of different widths.

Determinism: every kernel gives bit-identical results for any thread count.
Reductions are partitioned by *output* (one thread owns a bag or a segment) and
add their inputs in increasing input index, the order ``np.add.at`` uses; the
order-dependent passes (unique, bucketing) run serially in O(n).
"""
from cython.parallel cimport prange
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import numpy as np

from hpctrain._kernels._openmp import get_num_threads

include "parallel_threshold.pxi"

cdef extern from *:
    """
    #include "hp_mix64.h"
    /* Per-table salt of the routing hash: mix64((table_id + 1) * golden gamma). */
    static inline uint64_t hp_route_salt(int64_t table_id) {
        return hp_mix64(((uint64_t)table_id + 1ULL) * 0x9E3779B97F4A7C15ULL);
    }
    /* Salt of the dedup hash, so its probe order is unrelated to routing. */
    static inline uint64_t hp_dedup_hash(int64_t key) {
        return hp_mix64((uint64_t)key ^ 0xD6E8FEB86659FD93ULL);
    }
    """
    uint64_t hp_mix64(uint64_t z) noexcept nogil
    uint64_t hp_route_salt(int64_t table_id) noexcept nogil
    uint64_t hp_dedup_hash(int64_t key) noexcept nogil


cdef extern from "sparse_rows.h" nogil:
    void hp_pool_bags(float* out, const float* src, const int64_t* uoff, const int64_t* inv,
                      const int64_t* bags, int64_t b0, int64_t b1, int64_t dim, int mean,
                      int64_t n_items)
    void hp_zero_rows(float* base, const int64_t* doff, int64_t nu, int64_t dim)
    void hp_unpool_serial(float* base, const int64_t* doff, const float* g, const int64_t* inv,
                          const int64_t* bags, int64_t nb, int64_t dim, int mean)
    void hp_unpool_one(float* d, const float* g, const int64_t* order, const int64_t* bag_of,
                       const float* scale, int64_t start, int64_t end, int64_t dim)
    int64_t hp_first_above(const int64_t* a, int64_t n, uint64_t limit)


def mix64(uint64_t z):
    """splitmix64's finaliser of one unsigned 64-bit integer (for tests and docs)."""
    return hp_mix64(z)


def route_salt(int64_t table_id):
    """The routing salt of ``table_id``: ``mix64((table_id + 1) * 0x9E3779B97F4A7C15)``."""
    return hp_route_salt(table_id)


# ----------------------------------------------------------------------------- dedup

# The dedup table starts at this many slots (or 2n, if smaller) and doubles whenever it
# would pass half full: a batch with few distinct ids (multi-hot bags of popular ids)
# allocates and clears a table of its own size, not one sized for every id being new,
# whose pages the OS may take back when it is freed and fault in again on the next call.
cdef enum:
    DEDUP_FIRST_SLOTS = 16384

cdef struct DedupTable:
    int64_t* keys       # key of each slot
    int64_t* idx        # unique index of each slot, -1 when empty
    uint64_t mask       # slots - 1 (a power of two)
    int64_t nu          # unique keys so far


cdef int _dedup_alloc(DedupTable* d, uint64_t cap) noexcept nogil:
    """Point ``d`` at a fresh, empty table of ``cap`` slots; -1 (``d`` unchanged) when it
    cannot be allocated."""
    cdef int64_t* keys = <int64_t*>malloc(cap * sizeof(int64_t))
    cdef int64_t* idx = <int64_t*>malloc(cap * sizeof(int64_t))
    if keys == NULL or idx == NULL:
        free(keys)
        free(idx)
        return -1
    memset(idx, 0xFF, cap * sizeof(int64_t))  # every slot -1 (empty)
    d.keys, d.idx, d.mask = keys, idx, cap - 1
    return 0


cdef int _dedup_grow(DedupTable* d, const int64_t* uniq) noexcept nogil:
    """Double the table and re-insert the ``d.nu`` unique keys so far (``uniq``; key
    ``uniq[s]`` keeps index ``s``); -1 when the larger table cannot be allocated."""
    cdef int64_t* old_keys = d.keys
    cdef int64_t* old_idx = d.idx
    cdef uint64_t h
    cdef int64_t s
    if _dedup_alloc(d, 2 * (d.mask + 1)) < 0:
        return -1
    free(old_keys)
    free(old_idx)
    for s in range(d.nu):
        h = hp_dedup_hash(uniq[s]) & d.mask
        while d.idx[h] >= 0:
            h = (h + 1) & d.mask
        d.idx[h] = s
        d.keys[h] = uniq[s]
    return 0


cdef int _unique_block(const int64_t* keys, Py_ssize_t lo, Py_ssize_t hi, DedupTable* d,
                       int64_t* uniq, int64_t* inverse, int64_t* j) noexcept nogil:
    """Dedup ``keys[lo:hi]`` into ``d``, continuing at ``d.nu`` uniques and inverse
    position ``j`` (both advanced); -1 when the table cannot grow."""
    cdef Py_ssize_t i
    cdef uint64_t h
    cdef int64_t k, s
    for i in range(lo, hi):
        k = keys[i]
        h = hp_dedup_hash(k) & d.mask
        while True:
            s = d.idx[h]
            if s < 0:
                d.idx[h] = d.nu
                d.keys[h] = k
                uniq[d.nu] = k
                inverse[j[0]] = d.nu
                d.nu += 1
                if <uint64_t>(2 * d.nu) > d.mask + 1 and _dedup_grow(d, uniq) < 0:
                    return -1
                break
            if d.keys[h] == k:
                inverse[j[0]] = s
                break
            h = (h + 1) & d.mask
        j[0] += 1
    return 0


cdef uint64_t _dedup_capacity(int64_t n) noexcept nogil:
    """Slots of the largest table a dedup of ``n`` keys may need (at most half full)."""
    cdef uint64_t cap = 16
    while cap < <uint64_t>(2 * n):
        cap <<= 1
    return cap


cdef int _unique_raw(const int64_t* keys, const int64_t* starts, const int64_t* counts,
                     Py_ssize_t nb, int64_t* uniq, int64_t* inverse,
                     int64_t* nu) noexcept nogil:
    """Dedup the blocks ``keys[starts[b] : starts[b] + counts[b]]`` in order into
    ``uniq`` / ``inverse`` (``nu`` set to the number of unique keys); -1 when the hash
    table cannot be allocated, else 0."""
    cdef int64_t n = 0, j = 0
    cdef Py_ssize_t b
    cdef DedupTable d
    cdef int rc = 0
    for b in range(nb):
        n += counts[b]
    cdef uint64_t cap = _dedup_capacity(n)
    nu[0] = 0
    if _dedup_alloc(&d, cap if cap < DEDUP_FIRST_SLOTS else DEDUP_FIRST_SLOTS) < 0:
        return -1
    d.nu = 0
    for b in range(nb):
        rc = _unique_block(keys, starts[b], starts[b] + counts[b], &d, uniq, inverse, &j)
        if rc < 0:
            break
    nu[0] = d.nu
    free(d.keys)
    free(d.idx)
    return rc


cdef tuple _unique_of_blocks(const int64_t[::1] keys, const int64_t[::1] starts,
                             const int64_t[::1] counts, int64_t n, str who):
    uniq_arr = np.empty(n, dtype=np.int64)
    inverse_arr = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] uniq = uniq_arr
    cdef int64_t[::1] inverse = inverse_arr
    cdef int64_t nu = 0
    cdef int rc
    cdef const int64_t* kp = &keys[0] if keys.shape[0] > 0 else NULL
    cdef int64_t* up = &uniq[0] if n > 0 else NULL
    cdef int64_t* ip = &inverse[0] if n > 0 else NULL
    with nogil:
        rc = _unique_raw(kp, &starts[0], &counts[0], starts.shape[0], up, ip, &nu)
    if rc < 0:
        raise MemoryError(f"{who}: cannot allocate a {_dedup_capacity(n)}-slot hash table")
    return uniq_arr[:nu].copy(), inverse_arr


def unique_inverse(const int64_t[::1] keys):
    """Unique keys in order of first occurrence, and the inverse index.

    Args:
        keys: int64[n].

    Returns:
        ``(uniq int64[u], inverse int64[n])`` with ``uniq[inverse] == keys`` and
        ``uniq`` ordered by first occurrence in ``keys`` (deterministic).
    """
    cdef int64_t[::1] whole = np.array([0, keys.shape[0]], dtype=np.int64)
    return _unique_of_blocks(keys, whole[:1], whole[1:], keys.shape[0], "unique_inverse")


cdef _addresses(list arrays):
    """int64 data addresses of NumPy arrays (kept alive by the caller), for kernels that
    run over a list of arrays without the GIL."""
    return np.array([a.ctypes.data for a in arrays], dtype=np.int64)


cdef list _int64_vectors(list arrays, str who):
    """``arrays`` as C-contiguous int64 arrays; ``ValueError`` naming the first that is not
    1-D (the list kernels' input check)."""
    out = [np.ascontiguousarray(a, dtype=np.int64) for a in arrays]
    for t, a in enumerate(out):
        if a.ndim != 1:
            raise ValueError(f"{who}: array {t} is not 1-D (shape {a.shape})")
    return out


cdef int64_t* _cursors(const int64_t* row, int64_t P) noexcept nogil:
    """A malloc'd copy of ``row[0:P]``: per-owner write positions that a table's pass
    advances (NULL when out of memory; the caller frees it)."""
    cdef int64_t* cur = <int64_t*>malloc(P * sizeof(int64_t))
    if cur != NULL:
        memcpy(cur, row, P * sizeof(int64_t))
    return cur


cdef int _per_item_threads(int64_t nbytes, Py_ssize_t items):
    """Threads of a loop that gives whole items (tables) to the threads: the kernels'
    cut-off on the bytes it touches, and no more threads than items."""
    cdef int nt = _threads(nbytes) if items > 1 else 1
    return <int>items if nt > items else nt


def unique_inverse_many(list key_arrays):
    """``[unique_inverse(k) for k in key_arrays]``, the arrays spread over the kernel
    threads in one parallel region (each array's dedup on one thread: the same bits for
    any thread count). For the per-table dedup of a batch: one call instead of one
    per table, and no Python between them to serialise the threads."""
    cdef Py_ssize_t T = len(key_arrays), t
    keys = _int64_vectors(key_arrays, "unique_inverse_many")
    uniqs = [np.empty(k.shape[0], dtype=np.int64) for k in keys]
    invs = [np.empty(k.shape[0], dtype=np.int64) for k in keys]
    cdef int64_t[::1] kptr = _addresses(keys)
    cdef int64_t[::1] uptr = _addresses(uniqs)
    cdef int64_t[::1] iptr = _addresses(invs)
    cdef int64_t[::1] bounds = np.zeros(2 * T + 1, dtype=np.int64)   # [0, n_t] pairs
    cdef int64_t[::1] nu = np.zeros(T + 1, dtype=np.int64)
    cdef int64_t[::1] rc = np.zeros(T + 1, dtype=np.int64)
    cdef int64_t total = 0
    for t in range(T):
        bounds[2 * t + 1] = keys[t].shape[0]
        total += keys[t].shape[0]
    cdef int nt = _per_item_threads(32 * total, T)
    with nogil:
        for t in prange(T, num_threads=nt, schedule='dynamic'):
            rc[t] = _unique_raw(<const int64_t*>kptr[t], &bounds[2 * t], &bounds[2 * t + 1],
                                1, <int64_t*>uptr[t], <int64_t*>iptr[t], &nu[t])
    for t in range(T):
        if rc[t] < 0:
            raise MemoryError(f"unique_inverse_many: cannot allocate a "
                              f"{_dedup_capacity(keys[t].shape[0])}-slot hash table "
                              f"for array {t}")
    return [(uniqs[t][:nu[t]].copy(), invs[t]) for t in range(T)]


def unique_blocks(const int64_t[::1] keys, const int64_t[::1] starts,
                  const int64_t[::1] counts):
    """``unique_inverse`` of the blocks ``keys[starts[b] : starts[b] + counts[b]]`` in order.

    What an owner receives for one table is one such block per source rank,
    scattered through the receive buffer; this deduplicates them without first
    gathering them into one array.

    Returns:
        ``(uniq int64[u], inverse int64[n])``, ``n = counts.sum()``: the same as
        ``unique_inverse(np.concatenate(blocks))``.
    """
    cdef Py_ssize_t nb = starts.shape[0], b, m = keys.shape[0]
    if counts.shape[0] != nb:
        raise ValueError(f"unique_blocks: {nb} starts but {counts.shape[0]} counts")
    cdef int64_t n = 0
    for b in range(nb):
        if counts[b] < 0 or starts[b] < 0 or starts[b] + counts[b] > m:
            raise ValueError(f"unique_blocks: block {b} [{starts[b]}, "
                             f"{starts[b] + counts[b]}) is outside keys[0:{m}]")
        n += counts[b]
    return _unique_of_blocks(keys, starts, counts, n, "unique_blocks")


def block_offsets(const int64_t[::1] starts, const int64_t[::1] counts, int64_t dim):
    """int64[counts.sum()]: ``starts[b] + k * dim`` for ``k < counts[b]``, block after block.

    The element offsets of rows laid out in blocks (one block per source rank).
    """
    cdef Py_ssize_t nb = starts.shape[0], b
    if counts.shape[0] != nb:
        raise ValueError(f"block_offsets: {nb} starts but {counts.shape[0]} counts")
    cdef int64_t n = 0, k, j = 0, st
    for b in range(nb):
        if counts[b] < 0:
            raise ValueError(f"block_offsets: counts[{b}] = {counts[b]} < 0")
        n += counts[b]
    out_arr = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] o = out_arr
    with nogil:
        for b in range(nb):
            st = starts[b]
            for k in range(counts[b]):
                o[j] = st + k * dim
                j += 1
    return out_arr


# ----------------------------------------------------------------------------- routing

def route(const int64_t[::1] keys, int64_t table_id, int64_t world_size):
    """Owner rank of every key: ``mix64(key ^ route_salt(table_id)) % world_size`` (int32[n])."""
    if world_size < 1 or world_size > 2147483647:
        raise ValueError(f"route: world_size must be in [1, 2^31-1], got {world_size}")
    cdef Py_ssize_t i, n = keys.shape[0]
    out_arr = np.empty(n, dtype=np.int32)
    cdef int32_t[::1] out = out_arr
    cdef uint64_t salt = hp_route_salt(table_id)
    cdef uint64_t ws = <uint64_t>world_size
    cdef int nt = _threads(12 * n)
    with nogil:
        for i in prange(n, num_threads=nt, schedule='static'):
            out[i] = <int32_t>(hp_mix64(<uint64_t>keys[i] ^ salt) % ws)
    return out_arr


def route_many(list key_arrays, const int64_t[::1] table_ids, const int64_t[::1] dims,
               int64_t world_size):
    """Routing of every table's unique ids at once, the tables over the kernel threads.

    Args:
        key_arrays: per table, int64[u_t] unique ids.
        table_ids: int64[T] each table's routing id.
        dims: int64[T] each table's row width.
        world_size: number of owners P.

    Returns:
        ``(owners, per_table, unique_off)``: per table int32[u_t] owner of each id
        (``route``); int64[P, T] ids per owner and table; per table int64[u_t] each id's
        element offset in the owner-major, table-minor packed row buffer (within an
        owner and table, ids in their order).
    """
    cdef Py_ssize_t T = len(key_arrays), t
    if table_ids.shape[0] != T or dims.shape[0] != T:
        raise ValueError(f"route_many: {T} key arrays, {table_ids.shape[0]} table ids, "
                         f"{dims.shape[0]} dims")
    if world_size < 1 or world_size > 2147483647:
        raise ValueError(f"route_many: world_size must be in [1, 2^31-1], got {world_size}")
    keys = _int64_vectors(key_arrays, "route_many")
    owners = [np.empty(a.shape[0], dtype=np.int32) for a in keys]
    offs = [np.empty(a.shape[0], dtype=np.int64) for a in keys]
    cdef int64_t P = world_size
    counts_arr = np.zeros((T, P), dtype=np.int64)
    cdef int64_t[:, ::1] counts = counts_arr
    cdef int64_t[::1] kptr = _addresses(keys)
    cdef int64_t[::1] optr = _addresses(owners)
    cdef int64_t[::1] fptr = _addresses(offs)
    cdef int64_t[::1] n = np.array([a.shape[0] for a in keys], dtype=np.int64)
    cdef int64_t total = 0
    for t in range(T):
        total += n[t]
    cdef int nt = _per_item_threads(16 * total, T)
    cdef Py_ssize_t i
    cdef int32_t o
    cdef uint64_t salt, ws = <uint64_t>P
    cdef const int64_t* kp
    cdef int32_t* op
    with nogil:
        for t in prange(T, num_threads=nt, schedule='dynamic'):
            kp = <const int64_t*>kptr[t]
            op = <int32_t*>optr[t]
            salt = hp_route_salt(table_ids[t])
            for i in range(n[t]):
                o = <int32_t>(hp_mix64(<uint64_t>kp[i] ^ salt) % ws)
                op[i] = o
                counts[t, o] += 1
    per_table = np.ascontiguousarray(counts_arr.T)
    # element starts of every (owner, table) block, owner-major: as [T, P] for the pass
    elems = per_table * np.asarray(dims, dtype=np.int64)
    flat = np.zeros(P * T, dtype=np.int64)
    if P * T > 1:
        np.cumsum(elems.ravel()[:-1], out=flat[1:])
    cdef int64_t[:, ::1] start = np.ascontiguousarray(flat.reshape(P, T).T)
    cdef int64_t* cur
    cdef int64_t* fp
    cdef int64_t d, bad = 0
    with nogil:
        for t in prange(T, num_threads=nt, schedule='dynamic'):
            cur = _cursors(&start[t, 0], P)
            if cur == NULL:
                bad += 1
            else:
                op = <int32_t*>optr[t]
                fp = <int64_t*>fptr[t]
                d = dims[t]
                for i in range(n[t]):
                    fp[i] = cur[op[i]]
                    cur[op[i]] += d
                free(cur)
    if bad:
        raise MemoryError("route_many: out of memory")
    return owners, per_table, offs


def scatter_many(list key_arrays, list owner_arrays, const int64_t[:, ::1] start,
                 int64_t[::1] out):
    """Every table's keys copied into their owners' blocks of ``out``, the tables over the
    kernel threads: table ``t``'s keys owned by ``o`` go, in their order, to ``out`` from
    ``start[t, o]`` on (the blocks of ``route_many``'s counts). ``ValueError`` for an owner
    outside ``[0, P)`` or a key placed outside ``out``."""
    cdef Py_ssize_t T = len(key_arrays), t, i
    if len(owner_arrays) != T or start.shape[0] != T:
        raise ValueError(f"scatter_many: {T} key arrays, {len(owner_arrays)} owner arrays, "
                         f"{start.shape[0]} rows of starts")
    cdef int64_t P = start.shape[1]
    keys = [np.ascontiguousarray(a, dtype=np.int64) for a in key_arrays]
    owners = [np.ascontiguousarray(a, dtype=np.int32) for a in owner_arrays]
    cdef int64_t total = 0, m = out.shape[0]
    for t in range(T):
        if owners[t].shape[0] != keys[t].shape[0]:
            raise ValueError(f"scatter_many: table {t} has {keys[t].shape[0]} keys and "
                             f"{owners[t].shape[0]} owners")
        total += keys[t].shape[0]
    cdef int64_t[::1] kptr = _addresses(keys)
    cdef int64_t[::1] optr = _addresses(owners)
    cdef int64_t[::1] n = np.array([a.shape[0] for a in keys], dtype=np.int64)
    cdef int nt = _per_item_threads(16 * total, T)
    cdef int64_t* cur
    cdef const int64_t* kp
    cdef const int32_t* op
    cdef int64_t oom = 0, outside = 0, c
    cdef int32_t o
    with nogil:
        for t in prange(T, num_threads=nt, schedule='dynamic'):
            cur = _cursors(&start[t, 0], P)
            if cur == NULL:
                oom += 1
            else:
                kp = <const int64_t*>kptr[t]
                op = <const int32_t*>optr[t]
                for i in range(n[t]):
                    o = op[i]
                    if o < 0 or o >= P:
                        outside += 1
                        break
                    c = cur[o]
                    if c < 0 or c >= m:
                        outside += 1
                        break
                    out[c] = kp[i]
                    cur[o] = c + 1
                free(cur)
    if oom:
        raise MemoryError("scatter_many: out of memory")
    if outside:
        raise ValueError(f"scatter_many: an owner outside [0, {P}) or a key placed outside "
                         f"out of {m} entries")


# ----------------------------------------------------------------------------- checks

cdef Py_ssize_t _check_offsets(const int64_t[::1] off, int64_t dim, int64_t size) noexcept nogil:
    # the first offset outside [0, size - dim], or -1
    if off.shape[0] == 0:
        return -1
    if size < dim:
        return 0
    return hp_first_above(&off[0], off.shape[0], <uint64_t>(size - dim))


cdef _require_rows(const int64_t[::1] off, int64_t dim, int64_t size, str what):
    cdef Py_ssize_t bad
    if dim < 0:
        raise ValueError(f"{what}: dim must be >= 0, got {dim}")
    with nogil:
        bad = _check_offsets(off, dim, size)
    if bad >= 0:
        raise ValueError(f"{what}: row offset [{bad}] = {off[bad]} with dim {dim} is outside "
                         f"a buffer of {size} floats")


cdef Py_ssize_t _check_bags(const int64_t[::1] bag_offsets, int64_t n) noexcept nogil:
    cdef Py_ssize_t b
    if bag_offsets[0] != 0 or bag_offsets[bag_offsets.shape[0] - 1] != n:
        return 0
    for b in range(bag_offsets.shape[0] - 1):
        if bag_offsets[b + 1] < bag_offsets[b]:
            return b + 1
    return -1


cdef _require_bags(const int64_t[::1] bag_offsets, int64_t n, str what):
    cdef Py_ssize_t bad
    if bag_offsets.shape[0] < 1:
        raise ValueError(f"{what}: bag_offsets needs at least one entry (0)")
    with nogil:
        bad = _check_bags(bag_offsets, n)
    if bad >= 0:
        raise ValueError(f"{what}: bag_offsets must rise from 0 to {n} (the number of rows); "
                         f"bad at [{bad}]")


cdef _out2d(out, Py_ssize_t rows, int64_t dim, str what):
    if out is None:
        return np.empty((rows, dim), dtype=np.float32)
    if out.shape != (rows, dim) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"{what}: out must be C-contiguous float32[{rows}, {dim}], got "
                         f"{out.dtype}{list(out.shape)}")
    return out


cdef object _sums_out(out, const int64_t[::1] out_off, int64_t n, int64_t dim, str who,
                      str count_name, float** base):
    """The output of a kernel writing ``n`` rows of ``dim`` floats: with ``out_off``,
    ``out`` itself (a flat float32 buffer, row ``i`` at ``out_off[i]``), else a
    float32[n, dim] array (``out`` or a new one). Sets ``base[0]`` to its first float
    (NULL when it has none)."""
    cdef float[::1] flat
    cdef float[:, ::1] o2
    base[0] = NULL
    if out_off is not None:
        if out is None:
            raise ValueError(f"{who}: out_off needs out (a flat float32 buffer)")
        if out_off.shape[0] != n:
            raise ValueError(f"{who}: out_off has {out_off.shape[0]} entries, "
                             f"{count_name} is {n}")
        flat = out
        _require_rows(out_off, dim, flat.shape[0], f"{who} (out_off)")
        if flat.shape[0] > 0:
            base[0] = &flat[0]
        return out
    out_arr = _out2d(out, n, dim, who)
    o2 = out_arr
    if n > 0 and dim > 0:
        base[0] = &o2[0, 0]
    return out_arr


# ----------------------------------------------------------------------------- rows

def gather_rows(const float[::1] src, const int64_t[::1] src_off, int64_t dim, out=None):
    """``out[i] = src[src_off[i] : src_off[i] + dim]`` for every i (float32[n, dim])."""
    cdef Py_ssize_t i, n = src_off.shape[0]
    _require_rows(src_off, dim, src.shape[0], "gather_rows")
    out_arr = _out2d(out, n, dim, "gather_rows")
    cdef float[:, ::1] o = out_arr
    cdef int nt = _threads(8 * n * dim + 8 * n)
    if n == 0 or dim == 0:
        return out_arr
    with nogil:
        for i in prange(n, num_threads=nt, schedule='static'):
            memcpy(&o[i, 0], &src[src_off[i]], dim * sizeof(float))
    return out_arr


def scatter_rows(const float[:, ::1] src, const int64_t[::1] src_row, float[::1] dst,
                 const int64_t[::1] dst_off):
    """``dst[dst_off[i] : dst_off[i] + dim] = src[src_row[i]]`` for every i.

    ``src_row`` may be None (row i of ``src``). Destinations must not overlap.
    """
    cdef Py_ssize_t i, n = dst_off.shape[0]
    cdef int64_t dim = src.shape[1], m = src.shape[0]
    cdef Py_ssize_t bad = -1
    cdef bint has_row = src_row is not None
    if has_row and src_row.shape[0] != n:
        raise ValueError(f"scatter_rows: src_row has {src_row.shape[0]} entries, dst_off {n}")
    if not has_row and m < n:
        raise ValueError(f"scatter_rows: {n} destinations but src has only {m} rows")
    if has_row:
        with nogil:
            for i in range(n):
                if src_row[i] < 0 or src_row[i] >= m:
                    bad = i
                    break
        if bad >= 0:
            raise ValueError(f"scatter_rows: src_row[{bad}] = {src_row[bad]} outside [0, {m})")
    _require_rows(dst_off, dim, dst.shape[0], "scatter_rows")
    cdef int nt = _threads(8 * n * dim + 16 * n)
    if n == 0 or dim == 0:
        return
    with nogil:
        for i in prange(n, num_threads=nt, schedule='static'):
            memcpy(&dst[dst_off[i]], &src[src_row[i] if has_row else i, 0], dim * sizeof(float))


# ----------------------------------------------------------------------------- pooling

def pool(const float[::1] src, const int64_t[::1] src_off, int64_t dim,
         const int64_t[::1] bag_offsets, bint mean, out=None):
    """Sum (or mean) of the rows of each bag: float32[B, dim].

    Bag ``b`` holds rows ``j`` in ``[bag_offsets[b], bag_offsets[b+1])``, row ``j``
    being ``src[src_off[j] : src_off[j] + dim]``; rows are added in increasing
    ``j``. Mean divides the sum by the bag length; an empty bag gives zeros.
    """
    cdef Py_ssize_t n = src_off.shape[0]
    cdef Py_ssize_t nb = bag_offsets.shape[0] - 1
    _require_bags(bag_offsets, n, "pool")
    _require_rows(src_off, dim, src.shape[0], "pool")
    out_arr = _out2d(out, nb, dim, "pool")
    cdef float[:, ::1] o = out_arr
    cdef Py_ssize_t b, j, c
    cdef const float* row
    cdef float inv_len
    cdef int nt = _threads(4 * (n + nb) * dim + 8 * n)
    if nb == 0 or dim == 0:
        return out_arr
    with nogil:
        for b in prange(nb, num_threads=nt, schedule='static'):
            for c in range(dim):
                o[b, c] = 0
            for j in range(bag_offsets[b], bag_offsets[b + 1]):
                row = &src[src_off[j]]
                for c in range(dim):
                    o[b, c] += row[c]
            if mean and bag_offsets[b + 1] > bag_offsets[b]:
                inv_len = <float>(bag_offsets[b + 1] - bag_offsets[b])
                for c in range(dim):
                    o[b, c] = o[b, c] / inv_len
    return out_arr


cdef _require_inverse(const int64_t[::1] inverse, int64_t num_unique, str what):
    cdef Py_ssize_t bad = -1
    if inverse.shape[0] > 0:
        if num_unique <= 0:
            bad = 0
        else:
            with nogil:
                bad = hp_first_above(&inverse[0], inverse.shape[0], <uint64_t>(num_unique - 1))
    if bad >= 0:
        raise ValueError(f"{what}: inverse[{bad}] = {inverse[bad]} is outside "
                         f"[0, {num_unique})")


# Bags per parallel work item of pool_unique.
cdef enum:
    _BAG_BLOCK = 64


def pool_unique(const float[::1] src, const int64_t[::1] unique_off,
                const int64_t[::1] inverse, int64_t dim, const int64_t[::1] bag_offsets,
                bint mean, out=None):
    """``pool`` of item rows reached through unique ids: item ``j``'s row is
    ``src[unique_off[inverse[j]] :][:dim]`` (``pool(src, unique_off[inverse], ...)``
    without writing that offset array). Same sums, same order, same bits."""
    cdef Py_ssize_t n = inverse.shape[0]
    cdef Py_ssize_t nb = bag_offsets.shape[0] - 1
    _require_bags(bag_offsets, n, "pool_unique")
    _require_rows(unique_off, dim, src.shape[0], "pool_unique")
    _require_inverse(inverse, unique_off.shape[0], "pool_unique")
    out_arr = _out2d(out, nb, dim, "pool_unique")
    cdef float[:, ::1] o = out_arr
    if nb == 0 or dim == 0:
        return out_arr
    cdef int nt = _threads(4 * (n + nb) * dim + 8 * n)
    cdef Py_ssize_t k, nblk = (nb + _BAG_BLOCK - 1) // _BAG_BLOCK
    cdef const float* sp = &src[0] if src.shape[0] > 0 else NULL
    cdef const int64_t* up = &unique_off[0] if unique_off.shape[0] > 0 else NULL
    cdef const int64_t* ip = &inverse[0] if n > 0 else NULL
    with nogil:
        for k in prange(nblk, num_threads=nt, schedule='static'):
            hp_pool_bags(&o[0, 0], sp, up, ip, &bag_offsets[0], k * _BAG_BLOCK,
                         min((k + 1) * _BAG_BLOCK, nb), dim, mean, n)
    return out_arr


def unpool_unique(const float[::1] grads, const int64_t[::1] bag_offsets,
                  const int64_t[::1] inverse, int64_t num_unique, int64_t dim, bint mean,
                  out=None, const int64_t[::1] out_off=None):
    """The gradient of ``pool_unique`` per unique id: float32[num_unique, dim].

    ``grads`` holds one ``dim``-row per bag (flat, bag-major). Unique id ``u`` gets the
    sum, over its items ``j`` in increasing order, of its bag's gradient (divided by the
    bag's length with ``mean``): ``segment_sum(grads, bag_of_rows(bag_offsets) * dim,
    dim, inverse, num_unique, bag_scales(...) if mean else None)`` without writing the
    per-item arrays, and the same bits. With ``out_off`` (int64[num_unique]) ``out`` is a
    flat float32 buffer and id ``u``'s sum goes to ``out[out_off[u] :][:dim]``.
    """
    cdef Py_ssize_t n = inverse.shape[0]
    cdef Py_ssize_t nb = bag_offsets.shape[0] - 1
    _require_bags(bag_offsets, n, "unpool_unique")
    if num_unique < 0:
        raise ValueError(f"unpool_unique: num_unique must be >= 0, got {num_unique}")
    if dim < 0:
        raise ValueError(f"unpool_unique: dim must be >= 0, got {dim}")
    if grads.shape[0] != nb * dim:
        raise ValueError(f"unpool_unique: grads has {grads.shape[0]} floats, expected "
                         f"{nb} bags x {dim}")
    _require_inverse(inverse, num_unique, "unpool_unique")
    cdef float* base
    cdef const int64_t* doff = NULL
    out_arr = _sums_out(out, out_off, num_unique, dim, "unpool_unique", "num_unique", &base)
    if out_off is not None and num_unique > 0:
        doff = &out_off[0]
    if num_unique == 0 or dim == 0:
        return out_arr
    cdef const float* gp = &grads[0] if grads.shape[0] > 0 else NULL
    cdef int nt = _threads((n * dim) // 2)
    if nt <= 1:
        with nogil:
            hp_zero_rows(base, doff, num_unique, dim)
            hp_unpool_serial(base, doff, gp, &inverse[0] if n > 0 else NULL,
                             &bag_offsets[0], nb, dim, mean)
        return out_arr
    # threads: group the items by unique id first (serial), then one thread per id
    bag_of = bag_of_rows(bag_offsets)
    scale = bag_scales(bag_offsets) if mean else None
    cdef const int64_t[::1] bo = bag_of
    cdef const float[::1] sc = scale
    cdef const float* scp = &sc[0] if mean and n > 0 else NULL
    cdef int64_t* start = <int64_t*>malloc((num_unique + 1) * sizeof(int64_t))
    cdef int64_t* order = <int64_t*>malloc((n + 1) * sizeof(int64_t))
    cdef Py_ssize_t u
    if start == NULL or order == NULL:
        free(start)
        free(order)
        raise MemoryError("unpool_unique: out of memory")
    try:
        with nogil:
            _group(inverse, num_unique, start, order)
            for u in prange(num_unique, num_threads=nt, schedule='static'):
                hp_unpool_one(base + (doff[u] if doff != NULL else u * dim), gp, order,
                              &bo[0] if n > 0 else NULL, scp, start[u], start[u + 1], dim)
    finally:
        free(start)
        free(order)
    return out_arr


def bag_of_rows(const int64_t[::1] bag_offsets):
    """Bag index of every row: int64[bag_offsets[-1]] (``np.repeat(arange(B), lengths)``)."""
    if bag_offsets.shape[0] < 1:
        raise ValueError("bag_of_rows: bag_offsets needs at least one entry (0)")
    cdef Py_ssize_t nb = bag_offsets.shape[0] - 1, b, j
    cdef int64_t n = bag_offsets[nb]
    _require_bags(bag_offsets, n, "bag_of_rows")
    out_arr = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] o = out_arr
    cdef int nt = _threads(8 * n + 8 * nb)
    with nogil:
        for b in prange(nb, num_threads=nt, schedule='static'):
            for j in range(bag_offsets[b], bag_offsets[b + 1]):
                o[j] = b
    return out_arr


def bag_scales(const int64_t[::1] bag_offsets):
    """Per-row backward scale of mean pooling: ``1 / len(bag of row)`` (float32[n])."""
    if bag_offsets.shape[0] < 1:
        raise ValueError("bag_scales: bag_offsets needs at least one entry (0)")
    cdef Py_ssize_t nb = bag_offsets.shape[0] - 1, b, j
    cdef int64_t n = bag_offsets[nb]
    _require_bags(bag_offsets, n, "bag_scales")
    out_arr = np.empty(n, dtype=np.float32)
    cdef float[::1] o = out_arr
    cdef float s
    cdef int nt = _threads(4 * n + 8 * nb)
    with nogil:
        for b in prange(nb, num_threads=nt, schedule='static'):
            if bag_offsets[b + 1] > bag_offsets[b]:
                s = 1.0 / <float>(bag_offsets[b + 1] - bag_offsets[b])
                for j in range(bag_offsets[b], bag_offsets[b + 1]):
                    o[j] = s
    return out_arr


# ----------------------------------------------------------------------------- segment sum

cdef Py_ssize_t _group(const int64_t[::1] seg, int64_t nseg, int64_t* start,
                       int64_t* order) noexcept nogil:
    """CSR of items by segment (stable); returns -1 or the index of the first bad segment."""
    cdef Py_ssize_t i, n = seg.shape[0]
    cdef int64_t s, acc = 0, c
    memset(start, 0, (nseg + 1) * sizeof(int64_t))
    for i in range(n):
        s = seg[i]
        if s < 0 or s >= nseg:
            return i
        start[s + 1] += 1
    for s in range(nseg):
        acc += start[s + 1]
        start[s + 1] = acc
    # start[s] is now segment s's first slot; fill using a running cursor per segment
    for i in range(n):
        s = seg[i]
        c = start[s]
        order[c] = i
        start[s] = c + 1
    for s in range(nseg, 0, -1):
        start[s] = start[s - 1]
    start[0] = 0
    return -1


cdef inline void _add_row(float* dst, const float* row, int64_t dim, float w,
                          bint scaled) noexcept nogil:
    """``dst += w * row`` (``dst += row`` unscaled: no multiply, exact)."""
    cdef int64_t c
    if scaled:
        for c in range(dim):
            dst[c] += w * row[c]
    else:
        for c in range(dim):
            dst[c] += row[c]


cdef Py_ssize_t _scatter_add(const float[::1] src, const int64_t[::1] src_off, int64_t dim,
                             const int64_t[::1] seg, int64_t nseg, const float[::1] scale,
                             float* base, const int64_t[::1] out_off) noexcept nogil:
    """Serial ``out[seg[j]] += scale[j] * row_j`` in increasing j; -1 or the first bad j."""
    cdef Py_ssize_t i, n = seg.shape[0]
    cdef int64_t s, c
    cdef bint has_off = out_off is not None, has_scale = scale is not None
    cdef float* dst
    cdef const float* row
    cdef float w
    for i in range(n):
        if seg[i] < 0 or seg[i] >= nseg:
            return i
    if dim == 0:
        return -1
    for s in range(nseg):
        dst = base + (out_off[s] if has_off else s * dim)
        memset(dst, 0, dim * sizeof(float))
    for i in range(n):
        s = seg[i]
        _add_row(base + (out_off[s] if has_off else s * dim), &src[src_off[i]], dim,
                 scale[i] if has_scale else 1.0, has_scale)
    return -1


def segment_sum(const float[::1] src, const int64_t[::1] src_off, int64_t dim,
                const int64_t[::1] segments, int64_t num_segments, const float[::1] scale=None,
                out=None, const int64_t[::1] out_off=None):
    """Deterministic ``out[segments[j]] += scale[j] * row_j``: float32[num_segments, dim].

    Row ``j`` is ``src[src_off[j] : src_off[j] + dim]``. Each segment's rows are
    added in increasing ``j`` (the order of ``np.add.at``), whatever the number
    of threads. ``scale`` (float32[n]) is optional; pass the bag offsets of each
    row (``src_off = bag_of_rows * dim``) to scatter pooled gradients to ids.

    With ``out_off`` (int64[num_segments]) ``out`` is a flat float32 buffer and
    segment ``s`` is written to ``out[out_off[s] : out_off[s] + dim]`` (straight
    into an exchange buffer; destinations must not overlap); ``out`` is returned.
    """
    cdef Py_ssize_t n = segments.shape[0]
    if src_off.shape[0] != n:
        raise ValueError(f"segment_sum: src_off has {src_off.shape[0]} entries, segments {n}")
    cdef bint has_scale = scale is not None
    if has_scale and scale.shape[0] != n:
        raise ValueError(f"segment_sum: scale has {scale.shape[0]} entries, segments {n}")
    if num_segments < 0:
        raise ValueError(f"segment_sum: num_segments must be >= 0, got {num_segments}")
    _require_rows(src_off, dim, src.shape[0], "segment_sum")
    cdef float* base
    cdef bint has_off = out_off is not None
    out_arr = _sums_out(out, out_off, num_segments, dim, "segment_sum", "num_segments", &base)
    cdef float* dst
    # the parallel pass needs a serial grouping pass first: worth it only for big jobs
    cdef int nt = _threads((n * dim) // 2)
    cdef int64_t* start = NULL
    cdef int64_t* order = NULL
    cdef Py_ssize_t bad = -1, s, k, c
    cdef int64_t j
    cdef const float* row
    cdef float w
    if nt > 1:
        start = <int64_t*>malloc((num_segments + 1) * sizeof(int64_t))
        order = <int64_t*>malloc((n + 1) * sizeof(int64_t))
    if nt > 1 and (start == NULL or order == NULL):
        free(start)
        free(order)
        raise MemoryError("segment_sum: out of memory")
    try:
        with nogil:
            if nt <= 1:
                # one thread: scatter-add in input order (each segment still adds its
                # rows in increasing j, so the bits equal the grouped parallel pass)
                bad = _scatter_add(src, src_off, dim, segments, num_segments, scale, base,
                                   out_off)
            else:
                bad = _group(segments, num_segments, start, order)
            if bad < 0 and dim > 0 and nt > 1:
                for s in prange(num_segments, num_threads=nt, schedule='static'):
                    dst = base + (out_off[s] if has_off else s * dim)
                    for c in range(dim):
                        dst[c] = 0
                    for k in range(start[s], start[s + 1]):
                        j = order[k]
                        _add_row(dst, &src[src_off[j]], dim, scale[j] if has_scale else 1.0,
                                 has_scale)
    finally:
        free(start)
        free(order)
    if bad >= 0:
        raise ValueError(f"segment_sum: segments[{bad}] = {segments[bad]} is outside "
                         f"[0, {num_segments})")
    return out_arr
