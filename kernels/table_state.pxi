# Whole-table operations on a TableCore (included at the end of table.pyx): the row lists,
# metadata and copies behind export/import and eviction, storage figures, and the
# invariant check the tests use. They run rarely and hold the GIL.


def live_rows(TableCore t):
    """Stored row ids in increasing order (int64)."""
    out = np.empty(t.n_live, dtype=np.int64)
    cdef int64_t[::1] o = out
    cdef int64_t r, m = 0
    for r in range(t.row_high):
        if t.meta[r].last_step >= 0:
            o[m] = r
            m += 1
    return out


def keys_by_row(TableCore t):
    """int64[row_high]: the key of every stored row (0 for free rows), from an index scan."""
    out = np.zeros(t.row_high, dtype=np.int64)
    cdef int64_t[::1] o = out
    cdef int64_t i, r
    for i in range(t.index_cap):
        r = <int64_t>t.index[i].row1 - 1
        if r >= 0 and t.meta[r].last_step >= 0:
            o[r] = t.index[i].key
    return out


def ttl_rows(TableCore t, int64_t step, int64_t ttl):
    """Stored rows whose last update is more than ttl steps before step (increasing)."""
    rows = live_rows(t)
    cdef int64_t[::1] rv = rows
    keep = np.zeros(rows.shape[0], dtype=np.bool_)
    cdef uint8_t[::1] kv = keep.view(np.uint8)
    cdef int64_t i
    for i in range(rows.shape[0]):
        kv[i] = step - <int64_t>t.meta[rv[i]].last_step > ttl
    return rows[keep]


def meta_of(TableCore t, const int64_t[::1] rows):
    """(access_count, last_step, opt_step) int64 arrays of the given stored rows."""
    cdef int64_t m = rows.shape[0], i, r
    acc = np.empty(m, dtype=np.int64)
    last = np.empty(m, dtype=np.int64)
    ost = np.zeros(m, dtype=np.int64)
    cdef int64_t[::1] a = acc, l = last, s = ost
    for i in range(m):
        r = rows[i]
        if r < 0 or r >= t.row_high:
            raise IndexError(f"row {r} outside [0, {t.row_high})")
        a[i] = t.meta[r].access
        l[i] = t.meta[r].last_step
        if t.opt_step != NULL:
            s[i] = t.opt_step[r]
    return acc, last, ost


def copy_rows(TableCore t, const int64_t[::1] rows, int which):
    """Copy of values (which=0, as float32) or slot0 (1) or slot1 (2) at the given stored rows."""
    cdef int64_t m = rows.shape[0], i, r
    cdef int64_t w = t.dim if which == 0 else (t.w0 if which == 1 else t.w1)
    cdef const float* src = t.slot0 if which == 1 else t.slot1
    out = np.empty((m, w), dtype=np.float32)
    if m == 0 or w == 0:
        return out
    cdef float[:, ::1] o = out
    for i in range(m):
        r = rows[i]
        if r < 0 or r >= t.row_high:
            raise IndexError(f"row {r} outside [0, {t.row_high})")
        if which != 0:
            memcpy(&o[i, 0], src + r * w, w * sizeof(float))
        elif t.row_dtype == HT_F32:
            memcpy(&o[i, 0], t.values + r * t.vbytes, t.vbytes)
        else:
            ht_load_row(t.row_dtype, <const uint16_t*>(t.values + r * t.vbytes), &o[i, 0], w)
    return out


def copy_values_stored(TableCore t, const int64_t[::1] rows):
    """The values at the given stored rows as stored: float32[m, dim], or uint16[m, dim] bits
    of fp16 / bf16 rows."""
    cdef int64_t m = rows.shape[0], i, r
    out = np.empty((m, t.dim), dtype=np.float32 if t.row_dtype == HT_F32 else np.uint16)
    if m == 0:
        return out
    cdef uint8_t[:, ::1] o = out.view(np.uint8)
    for i in range(m):
        r = rows[i]
        if r < 0 or r >= t.row_high:
            raise IndexError(f"row {r} outside [0, {t.row_high})")
        memcpy(&o[i, 0], t.values + r * t.vbytes, t.vbytes)
    return out


def remove_rows(TableCore t, const int64_t[::1] rows):
    """Free the given stored rows (given in increasing order); returns how many were freed.

    Freed rows go on the free list so that the lowest row id is reused first, and the
    index is rebuilt without them.
    """
    cdef int64_t m = rows.shape[0], i, r, freed = 0
    cdef int32_t* p
    for i in range(m):
        r = rows[i]
        if r < 0 or r >= t.row_high or t.meta[r].last_step < 0:
            raise ValueError(f"row {r} is not a stored row")
    if t.free_cap < t.n_free + m:
        p = <int32_t*>realloc(t.free_rows, (t.n_free + m) * sizeof(int32_t))
        if p == NULL:
            raise MemoryError("cannot grow the free-row list")
        t.free_rows = p
        t.free_cap = t.n_free + m
    for i in range(m - 1, -1, -1):
        r = rows[i]
        if t.meta[r].last_step < 0:
            continue  # listed twice
        t.meta[r].last_step = -1
        t.meta[r].access = 0
        t._push_free(r)
        freed += 1
    t.n_live -= freed
    if freed > 0 and t._rehash(t.index_cap, True) != 0:
        raise MemoryError("cannot rebuild the hash index after eviction")
    return freed


def import_keys(TableCore t, const int64_t[::1] keys):
    """Rows of keys (unique), inserting absent ones without admission; rows to overwrite.

    A key imported as a row stops waiting for admission (its pending count is dropped).
    """
    cdef int64_t m = keys.shape[0], i, p, r
    out = np.empty(m, dtype=np.int64)
    cdef int64_t[::1] o = out
    if t._reserve_index(m) != 0 or t._reserve_rows(m) != 0:
        raise MemoryError(f"cannot make room for {m} imported rows")
    for i in range(m):
        p = _probe(t.index, t.index_cap, keys[i])
        if t.index[p].row1 != 0:
            o[i] = <int64_t>t.index[p].row1 - 1
            continue
        r = t._alloc_row()
        if t.adm_kind == ADM_EXACT:
            _drop_pending(t, keys[i])
        t.index[p].key = keys[i]
        t.index[p].row1 = <uint32_t>(r + 1)
        t.index_used += 1
        t.n_live += 1
        t.meta[r].access = 0
        t.meta[r].last_step = 0
        if t.opt_step != NULL:
            t.opt_step[r] = 0
        o[i] = r
    return out


def write_rows(TableCore t, const int64_t[::1] rows, values, slot0, slot1,
               const int64_t[::1] access, const int64_t[::1] last_step,
               const int64_t[::1] opt_step):
    """Overwrite stored rows with imported values, optimizer state and metadata.

    ``values`` is as stored: float32[m, dim], or uint16[m, dim] bits of fp16 / bf16 rows.
    """
    cdef int64_t m = rows.shape[0], i, r
    cdef const float[:, ::1] s0
    cdef const float[:, ::1] s1
    want = np.float32 if t.row_dtype == HT_F32 else np.uint16
    if values.dtype != want or values.shape != (m, t.dim) or not values.flags.c_contiguous:
        raise ValueError(f"write_rows: values must be C-contiguous {np.dtype(want)}"
                         f"[{m}, {t.dim}]; got {values.dtype}{list(values.shape)}")
    cdef const uint8_t[:, ::1] v = values.view(np.uint8) if m else np.empty((0, 1), np.uint8)
    if t.w0 > 0:
        s0 = slot0
    if t.w1 > 0:
        s1 = slot1
    for i in range(m):  # check everything first: a rejected import changes nothing
        r = rows[i]
        if r < 0 or r >= t.row_high or t.meta[r].last_step < 0:
            raise ValueError(f"row {r} is not a stored row")
        if access[i] < 0 or access[i] > HT_ACCESS_MAX:
            raise ValueError(f"access count {access[i]} of row {r} outside [0, 2^32 - 1]")
        if last_step[i] < 0 or last_step[i] > HT_STEP_MAX:
            raise ValueError(f"last step {last_step[i]} of row {r} outside [0, 2^31 - 1]")
    for i in range(m):
        r = rows[i]
        memcpy(t.values + r * t.vbytes, &v[i, 0], t.vbytes)
        if t.w0 > 0:
            memcpy(t.slot0 + r * t.w0, &s0[i, 0], t.w0 * sizeof(float))
        if t.w1 > 0:
            memcpy(t.slot1 + r * t.w1, &s1[i, 0], t.w1 * sizeof(float))
        t.meta[r].access = <uint32_t>access[i]
        t.meta[r].last_step = <int32_t>last_step[i]
        if t.opt_step != NULL:
            t.opt_step[r] = opt_step[i]


def nbytes(TableCore t):
    """Bytes held by each part of the table."""
    cdef int64_t rc = t.row_cap
    return {
        "index": t.index_cap * sizeof(ht_slot),
        "rows": rc * (t.vbytes + (t.w0 + t.w1) * sizeof(float)),
        "meta": rc * (sizeof(ht_meta) + (sizeof(int64_t) if t.has_opt_step else 0)),
        "free_list": t.free_cap * sizeof(int32_t),
        "admission": (t.bloom_size if t.adm_kind == ADM_BLOOM else 0)
                     + t.counter_cap * sizeof(ht_cslot),
    }


def pending_admission(TableCore t):
    """Keys counted but not yet admitted (exact counters only; -1 for a Bloom filter)."""
    return t.counter_used if t.adm_kind == ADM_EXACT else -1


cdef void _drop_pending(TableCore t, int64_t key) noexcept:
    cdef int64_t p = cmap_probe(t.counters, t.counter_cap, key)
    if t.counters[p].count != 0:
        cmap_delete(t.counters, t.counter_cap, p)
        t.counter_used -= 1


def pending_counts(TableCore t):
    """(keys, counts) int64 arrays of the keys waiting for admission, in increasing key order.

    Exact counters only; empty for a Bloom filter or a table without admission.
    """
    cdef int64_t m = t.counter_used if t.adm_kind == ADM_EXACT else 0, i, j = 0
    keys = np.empty(m, dtype=np.int64)
    counts = np.empty(m, dtype=np.int64)
    cdef int64_t[::1] kv = keys, cv = counts
    if m:
        for i in range(t.counter_cap):
            if t.counters[i].count != 0:
                kv[j] = t.counters[i].key
                cv[j] = t.counters[i].count
                j += 1
    order = np.argsort(keys, kind="stable")
    return keys[order], counts[order]


def set_pending(TableCore t, const int64_t[::1] keys, const int64_t[::1] counts):
    """Restore pending admission counts (unique keys, counts in [1, 2^32 - 1]).

    Exact counters: each key's count is set (replacing a count already there); keys stored as
    rows are skipped, a key is either a row or pending. Bloom filter: each key is counted
    ``count`` times (the filter never undercounts). No admission: nothing to restore.
    Returns how many keys were restored.
    """
    cdef int64_t m = keys.shape[0], i, p, c, done = 0
    for i in range(m):
        if counts[i] < 1 or counts[i] > HT_ACCESS_MAX:
            raise ValueError(f"pending count {counts[i]} of key {keys[i]} outside [1, 2^32 - 1]")
    if t.adm_kind == ADM_NONE:
        return 0
    for i in range(m):
        if _lookup(t.index, t.index_cap, keys[i]) >= 0:
            continue
        if t.adm_kind == ADM_BLOOM:
            c = min(counts[i], 255)  # counters saturate at 255
            while c > 0:
                bloom_add(t.bloom, t.bloom_size, t.bloom_hashes, keys[i])
                c -= 1
        else:
            if t.counter_used + 1 > t.counter_cap * COUNTER_MAX_LOAD:
                if t._counter_grow() != 0:
                    raise MemoryError("cannot grow the admission counter map")
            p = cmap_probe(t.counters, t.counter_cap, keys[i])
            if t.counters[p].count == 0:
                t.counters[p].key = keys[i]
                t.counter_used += 1
            t.counters[p].count = <uint32_t>counts[i]
        done += 1
    return done


def bloom_counters(TableCore t):
    """A copy of the counting Bloom filter (uint8[bloom_size]); empty without one."""
    if t.adm_kind != ADM_BLOOM:
        return np.empty(0, dtype=np.uint8)
    out = np.empty(t.bloom_size, dtype=np.uint8)
    cdef uint8_t[::1] o = out
    memcpy(&o[0], t.bloom, t.bloom_size)
    return out


def set_bloom_counters(TableCore t, const uint8_t[::1] counters):
    """Replace the counting Bloom filter's counters (same size as the filter)."""
    if t.adm_kind != ADM_BLOOM:
        raise ValueError("the table has no Bloom filter")
    if counters.shape[0] != t.bloom_size:
        raise ValueError(f"Bloom filter has {t.bloom_size} counters; got {counters.shape[0]}")
    memcpy(t.bloom, &counters[0], t.bloom_size)


def check_invariants(TableCore t):
    """Raise AssertionError if the index and the row store disagree (for tests)."""
    cdef int64_t i, r, used = 0, live = 0
    seen = np.zeros(t.row_high, dtype=np.uint8)
    cdef uint8_t[::1] sv = seen
    for i in range(t.index_cap):
        r = <int64_t>t.index[i].row1 - 1
        if r >= 0:
            used += 1
            if r >= t.row_high:
                raise AssertionError(f"index slot {i} points at row {r} >= {t.row_high}")
            if t.meta[r].last_step < 0:
                raise AssertionError(f"index slot {i} points at free row {r}")
            if sv[r]:
                raise AssertionError(f"row {r} indexed twice")
            sv[r] = 1
            if _lookup(t.index, t.index_cap, t.index[i].key) != r:
                raise AssertionError(f"key {t.index[i].key} not reachable from its home")
    for r in range(t.row_high):
        if t.meta[r].last_step >= 0:
            live += 1
            if not sv[r]:
                raise AssertionError(f"stored row {r} missing from the index")
    if used != t.index_used or live != t.n_live:
        raise AssertionError(f"counts: index {used} vs {t.index_used}, rows {live} vs {t.n_live}")
    if t.n_live + t.n_free != t.row_high:
        raise AssertionError(f"rows: {t.n_live} live + {t.n_free} free != {t.row_high}")
