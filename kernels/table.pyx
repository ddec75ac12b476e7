# cython: language_level=3
"""Core of one embedding table shard: a hash index over a densely packed row store.

The layout is drawn in table.pxd. Every batched method takes whole NumPy batches as typed
memoryviews, releases the GIL and runs ``prange`` loops with the thread count the caller
passes (``hpctrain._kernels._openmp.get_num_threads()``).

Loops use guided scheduling: on a shared machine a thread that starts late still finds
work left, instead of the others waiting for its fixed half.

Determinism: ``find``, ``gather`` and ``apply`` touch each row independently. ``find_or_insert``
probes every key in parallel, then inserts the missing keys serially in batch order (so row
ids and admission counts do not depend on the thread count), then initialises the new rows
in parallel. Reduced-precision rows (fp16, bf16) are widened to float32 by every read and
written back by ``apply`` with stochastic rounding whose random bits are a function of
(table, key, step, column) only, so they too are independent of threads, row ids and
shards. Input validation (dtypes, shapes, steps) is done by the Python wrapper
``hpctrain.sparse.table.EmbeddingTable``; this core still range-checks every row index so
that nothing a caller passes can touch memory outside the table.
"""
from cython.parallel cimport prange, threadid
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset

import numpy as np

from table_core cimport *

include "table_init.pxi"
include "table_optim.pxi"
include "table_admit.pxi"

cdef double MAX_LOAD = 0.8           # index load that triggers a 1.125x rehash
cdef int64_t INDEX_GROWTH_DIV = 8    # growth step of the index: 1/8 (see table_core.pxd)
cdef double MAX_LOAD_REDUCED = 0.82  # fp16/bf16 rows: 1.0625x rehash at 0.82 (table_core.pxd)
cdef int64_t INDEX_GROWTH_DIV_REDUCED = 16
cdef uint64_t SR_SALT = 0xD1B54A32D192ED03ULL  # separates SR bits from initial values
cdef double COUNTER_MAX_LOAD = 0.5   # exact admission counter map
cdef int64_t MAX_ROWS = 2147483647   # row ids are int32 in the index

cdef enum:
    PF = 32                          # prefetch distance, in batch entries (measured best)
    PF_UPDATE = 32                   # prefetch distance of the optimizer update, in rows

cdef int64_t _par_min = 1024         # batches smaller than this run on one thread


def set_parallel_threshold(int64_t n):
    """Batches with fewer than ``n`` entries run single-threaded (default 1024)."""
    global _par_min
    if n < 1:
        raise ValueError(f"parallel threshold must be >= 1, got {n}")
    _par_min = n


def parallel_threshold():
    """The current single-thread cut-off of batched table kernels."""
    return _par_min


ROW_DTYPES = ("fp32", "fp16", "bf16")   # row_dtype codes 0, 1, 2 (table_half.h)


def _init_half():
    import os
    allow = os.environ.get("HPCTRAIN_SIMD", "").strip() != "scalar"
    return "f16c" if ht_half_init(allow) else "portable"


_half = _init_half()


def half_path():
    """How fp16 rows are converted: "f16c" (the CPU's instructions) or "portable" (bit
    manipulation; also with HPCTRAIN_SIMD=scalar)."""
    return _half


def set_half_path(bint f16c):
    """Use F16C for fp16 conversions if this CPU has it (True) or the portable code (False);
    returns the path now in use. For tests and benchmarks."""
    global _half
    _half = "f16c" if ht_half_init(f16c) else "portable"
    return _half


def encode_rows(const float[:, ::1] src, int dtype):
    """(uint16[n, d] bits of src rounded to nearest even in dtype (1 fp16, 2 bf16), count of
    finite values that became Inf)."""
    cdef int64_t n = src.shape[0], d = src.shape[1], i, over = 0
    if dtype != HT_F16 and dtype != HT_BF16:
        raise ValueError(f"encode_rows: dtype code {dtype} is not fp16 (1) or bf16 (2)")
    out = np.empty((n, d), dtype=np.uint16)
    cdef uint16_t[:, ::1] o = out
    if n and d:
        with nogil:
            for i in range(n):
                over += ht_store_row_rne(dtype, &src[i, 0], &o[i, 0], d)
    return out, over


def decode_rows(const uint16_t[:, ::1] src, int dtype):
    """float32[n, d] of the fp16 (dtype 1) or bf16 (2) bits src (exact)."""
    cdef int64_t n = src.shape[0], d = src.shape[1], i
    if dtype != HT_F16 and dtype != HT_BF16:
        raise ValueError(f"decode_rows: dtype code {dtype} is not fp16 (1) or bf16 (2)")
    out = np.empty((n, d), dtype=np.float32)
    cdef float[:, ::1] o = out
    if n and d:
        with nogil:
            for i in range(n):
                ht_load_row(dtype, &src[i, 0], &o[i, 0], d)
    return out


def stochastic_round_rows(const float[:, ::1] src, const uint16_t[:, ::1] bits, int dtype):
    """uint16[n, d]: src stochastically rounded to fp16 (dtype 1) or bf16 (2) with the given
    16 random bits per value (the rounding ``apply`` does; for tests)."""
    cdef int64_t n = src.shape[0], d = src.shape[1], i, j
    if dtype != HT_F16 and dtype != HT_BF16:
        raise ValueError(f"stochastic_round_rows: dtype code {dtype} is not fp16 (1) or bf16 (2)")
    if bits.shape[0] != n or bits.shape[1] != d:
        raise ValueError("stochastic_round_rows: bits must have the shape of src")
    out = np.empty((n, d), dtype=np.uint16)
    cdef uint16_t[:, ::1] o = out
    if n and d:
        for i in range(n):
            ht_round_row_sr(dtype, &src[i, 0], &o[i, 0], d, &bits[i, 0])
    return out


def init_rows_reference(const int64_t[::1] keys, int64_t dim, uint64_t seed, uint64_t table_id,
                        bint normal, double scale):
    """Initial rows of ``keys`` as the table computes them (float32[n, dim])."""
    cdef int64_t n = keys.shape[0], i
    out = np.empty((n, dim), dtype=np.float32)
    cdef float[:, ::1] o = out
    cdef uint64_t tkey = init_table_key(seed, table_id)
    for i in range(n):
        init_values(&o[i, 0], dim, tkey, keys[i], normal, scale)
    return out


cdef inline int64_t _lookup(const ht_slot* idx, int64_t cap, int64_t key) noexcept nogil:
    """Row of key, or -1. The index is never full, so the probe ends at an empty slot."""
    cdef int64_t p = ht_fastrange(ht_index_hash(key), cap)
    while True:
        if idx[p].row1 == 0:
            return -1
        if idx[p].key == key:
            return <int64_t>idx[p].row1 - 1
        p += 1
        if p == cap:
            p = 0


cdef inline int64_t _probe(const ht_slot* idx, int64_t cap, int64_t key) noexcept nogil:
    """Slot holding key, or the empty slot where it belongs."""
    cdef int64_t p = ht_fastrange(ht_index_hash(key), cap)
    while idx[p].row1 != 0 and idx[p].key != key:
        p += 1
        if p == cap:
            p = 0
    return p


cdef inline void _prefetch_slot(const ht_slot* s) noexcept nogil:
    # A probe reads about 2.5 slots (30 bytes) at load 0.75 and 12-byte slots straddle cache
    # lines, so it often runs into the next line: fetch both. (Past the end of the index
    # the second address is never read; prefetches do not fault.)
    ht_prefetch(s)
    ht_prefetch(<const char*>s + 64)


cdef inline void _prefetch_bytes(const void* p, int64_t nbytes, bint write) noexcept nogil:
    cdef const char* c = <const char*>p
    cdef int64_t off = 0
    while off < nbytes:
        if write:
            ht_prefetch_w(c + off)
        else:
            ht_prefetch(c + off)
        off += 64


cdef inline void _copy_row(float* dst, const float* src, int64_t nbytes) noexcept nogil:
    # constant sizes let the compiler emit straight vector moves for the common widths
    if nbytes == 64:
        memcpy(dst, src, 64)
    elif nbytes == 128:
        memcpy(dst, src, 128)
    elif nbytes == 256:
        memcpy(dst, src, 256)
    elif nbytes == 512:
        memcpy(dst, src, 512)
    else:
        memcpy(dst, src, nbytes)


cdef int64_t _check_step(int64_t step) except -1:
    # last update steps are int32 in the row metadata; a negative one marks a free row
    if step < 0 or step > HT_STEP_MAX:
        raise ValueError(f"step {step} outside [0, 2^31 - 1] (row metadata holds int32 steps)")
    return step


cdef inline bint _has_nonfinite(const float* g, int64_t d) noexcept nogil:
    # exponent all ones = Inf or NaN; an integer OR-reduction vectorises
    cdef const uint32_t* u = <const uint32_t*>g
    cdef uint32_t bad = 0
    cdef int64_t j
    for j in range(d):
        bad |= <uint32_t>((u[j] & 0x7F800000u) == 0x7F800000u)
    return bad != 0


include "table_params.pxi"


cdef class TableCore:
    """C storage and batched kernels of one table shard (layout in table_core.pxd).

    Built from one ``TableParams``: ``TableCore(TableParams(dim=16, capacity=1024, ...))``.
    """
    # configuration
    cdef readonly TableParams params
    cdef readonly int64_t dim
    cdef readonly int opt_kind
    cdef double lr, momentum, beta1, beta2, eps, l1, l2, lr_power, weight_decay
    cdef readonly int64_t w0, w1
    cdef float init0, init1
    cdef readonly uint64_t init_key
    cdef uint64_t sr_key
    cdef readonly int row_dtype
    cdef readonly int64_t vbytes     # bytes of one stored row of values
    cdef int64_t index_growth_div
    cdef double max_load
    cdef int64_t row_growth_div
    cdef readonly bint init_normal
    cdef readonly double init_scale
    # hash index
    cdef ht_slot* index
    cdef readonly int64_t index_cap
    cdef readonly int64_t index_used
    cdef int64_t index_grow_at
    # row store
    cdef readonly int64_t row_cap
    cdef readonly int64_t row_high
    cdef readonly int64_t n_live
    cdef char* values                # float32, fp16 or bf16 rows (row_dtype)
    cdef float* slot0
    cdef float* slot1
    cdef ht_meta* meta
    cdef int64_t* opt_step
    cdef readonly bint has_opt_step
    cdef int32_t* free_rows
    cdef readonly int64_t n_free
    cdef int64_t free_cap
    # admission
    cdef readonly int64_t min_count
    cdef readonly int adm_kind
    cdef uint8_t* bloom
    cdef readonly int64_t bloom_size
    cdef readonly int bloom_hashes
    cdef ht_cslot* counters
    cdef readonly int64_t counter_cap
    cdef readonly int64_t counter_used

    def __cinit__(self, TableParams params not None):
        params.check()
        self.params = params
        cdef int64_t capacity = params.capacity
        self.dim = params.dim
        self.opt_kind = params.opt_kind
        self.lr, self.momentum, self.beta1 = params.lr, params.momentum, params.beta1
        self.beta2, self.eps, self.l1, self.l2 = params.beta2, params.eps, params.l1, params.l2
        self.lr_power, self.weight_decay = params.lr_power, params.weight_decay
        self.w0, self.w1 = params.slot0_width, params.slot1_width
        self.init0, self.init1 = params.slot0_init, params.slot1_init
        self.has_opt_step = params.has_opt_step
        self.init_key = init_table_key(params.seed, params.table_id)
        self.sr_key = hp_mix64(self.init_key ^ SR_SALT)
        self.row_dtype = params.row_dtype
        self.vbytes = self.dim * (4 if params.row_dtype == HT_F32 else 2)
        if params.row_dtype == HT_F32:
            self.max_load, self.index_growth_div = MAX_LOAD, INDEX_GROWTH_DIV
            self.row_growth_div = HT_ROW_GROWTH_DIV
        else:
            self.max_load, self.index_growth_div = MAX_LOAD_REDUCED, INDEX_GROWTH_DIV_REDUCED
            self.row_growth_div = HT_ROW_GROWTH_DIV_FINE
        self.init_normal = params.init_normal
        self.init_scale = params.init_scale
        self.min_count = params.min_count
        self.adm_kind = params.adm_kind if params.min_count > 1 else ADM_NONE
        self.bloom_size = params.bloom_size
        self.bloom_hashes = params.bloom_hashes

        self.index_cap = max(16, <int64_t>(capacity / self.max_load) + 1)
        self.index = <ht_slot*>ht_alloc(self.index_cap * sizeof(ht_slot))
        if self.index == NULL:
            raise MemoryError(f"cannot allocate a {self.index_cap}-slot hash index")
        self.index_grow_at = <int64_t>(self.index_cap * self.max_load)
        if self._grow_rows(capacity) != 0:
            raise MemoryError(f"cannot allocate {capacity} rows of dim {self.dim}")
        if self.adm_kind == ADM_BLOOM:
            self.bloom = <uint8_t*>ht_alloc(self.bloom_size)
            if self.bloom == NULL:
                raise MemoryError(f"cannot allocate a {self.bloom_size}-counter Bloom filter")
        elif self.adm_kind == ADM_EXACT:
            self.counter_cap = 1024
            self.counters = <ht_cslot*>ht_alloc(self.counter_cap * sizeof(ht_cslot))
            if self.counters == NULL:
                raise MemoryError("cannot allocate the admission counter map")

    def __dealloc__(self):
        cdef int64_t rc = self.row_cap
        ht_free(self.index, self.index_cap * sizeof(ht_slot))
        ht_free(self.values, rc * self.vbytes)
        ht_free(self.slot0, rc * self.w0 * sizeof(float))
        ht_free(self.slot1, rc * self.w1 * sizeof(float))
        ht_free(self.meta, rc * sizeof(ht_meta))
        ht_free(self.opt_step, rc * sizeof(int64_t))
        ht_free(self.bloom, self.bloom_size)
        ht_free(self.counters, self.counter_cap * sizeof(ht_cslot))
        free(self.free_rows)

    # ------------------------------------------------------------------ storage management

    cdef int _rehash(self, int64_t new_cap, bint drop_freed=False) noexcept nogil:
        """Rebuild the index with new_cap slots; with drop_freed, without the entries of rows
        freed since the last rebuild (last_step -1). Only eviction frees rows, and it
        rebuilds at once, so growth need not look at the rows (a random read per entry)."""
        cdef ht_slot* ni = <ht_slot*>ht_alloc(new_cap * sizeof(ht_slot))
        cdef int64_t i, p, used = 0
        if ni == NULL:
            return -1
        for i in range(self.index_cap):
            if self.index[i].row1 != 0 and (
                    not drop_freed or self.meta[self.index[i].row1 - 1].last_step >= 0):
                p = _probe(ni, new_cap, self.index[i].key)
                ni[p] = self.index[i]
                used += 1
        ht_free(self.index, self.index_cap * sizeof(ht_slot))
        self.index = ni
        self.index_cap = new_cap
        self.index_used = used
        self.index_grow_at = <int64_t>(new_cap * self.max_load)
        return 0

    cdef int _reserve_index(self, int64_t n_more) noexcept nogil:
        cdef int64_t need = self.index_used + n_more
        if need <= self.index_grow_at:
            return 0
        return self._rehash(max(self.index_cap + self.index_cap // self.index_growth_div,
                                <int64_t>(need / self.max_load) + 1))

    cdef int _grow_rows(self, int64_t new_cap) noexcept nogil:
        cdef int64_t old = self.row_cap
        cdef void** ptrs[5]
        cdef size_t width[5]
        cdef void* p
        cdef int k, k2
        ptrs[0] = <void**>&self.values
        ptrs[1] = <void**>&self.slot0
        ptrs[2] = <void**>&self.slot1
        ptrs[3] = <void**>&self.meta
        ptrs[4] = <void**>&self.opt_step
        width[0] = self.vbytes
        width[1] = self.w0 * sizeof(float)
        width[2] = self.w1 * sizeof(float)
        width[3] = sizeof(ht_meta)
        width[4] = sizeof(int64_t) if self.has_opt_step else 0
        for k in range(5):
            if width[k] == 0:
                continue
            p = ht_realloc(ptrs[k][0], old * width[k], new_cap * width[k])
            if p == NULL:
                for k2 in range(k):  # give back what was already grown
                    if width[k2] == 0:
                        continue
                    if old == 0:
                        ht_free(ptrs[k2][0], new_cap * width[k2])
                        ptrs[k2][0] = NULL
                    else:
                        p = ht_realloc(ptrs[k2][0], new_cap * width[k2], old * width[k2])
                        if p != NULL:
                            ptrs[k2][0] = p
                return -1
            ptrs[k][0] = p
        self.row_cap = new_cap
        return 0

    cdef int _reserve_rows(self, int64_t n_more) noexcept nogil:
        cdef int64_t need
        if n_more <= self.n_free + self.row_cap - self.row_high:
            return 0
        need = self.row_high + n_more - self.n_free
        if need > MAX_ROWS:
            return -1
        return self._grow_rows(min(MAX_ROWS,
                                   max(need, self.row_cap + self.row_cap // self.row_growth_div)))

    cdef int64_t _alloc_row(self) noexcept nogil:
        cdef int64_t r
        if self.n_free > 0:
            self.n_free -= 1
            return self.free_rows[self.n_free]
        if self.row_high == self.row_cap:
            if self.row_cap >= MAX_ROWS:
                return -1
            if self._grow_rows(min(MAX_ROWS, self.row_cap
                                   + max(self.row_cap // self.row_growth_div, 64))) != 0:
                return -1
        r = self.row_high
        self.row_high += 1
        return r

    cdef int _push_free(self, int64_t row) noexcept nogil:
        cdef int64_t nc
        cdef int32_t* p
        if self.n_free == self.free_cap:
            nc = max(64, self.free_cap * 2)
            p = <int32_t*>realloc(self.free_rows, nc * sizeof(int32_t))
            if p == NULL:
                return -1
            self.free_rows = p
            self.free_cap = nc
        self.free_rows[self.n_free] = <int32_t>row
        self.n_free += 1
        return 0

    cdef void _init_rows(self, const int64_t* rows, const int64_t* keys, int64_t m,
                         int nt) noexcept nogil:
        cdef int64_t j, r, dim = self.dim, w0 = self.w0, w1 = self.w1, vb = self.vbytes
        cdef char* values = self.values
        cdef int dt = self.row_dtype
        cdef float* slot0 = self.slot0
        cdef float* slot1 = self.slot1
        cdef int64_t* opt_step = self.opt_step
        cdef uint64_t tkey = self.init_key
        cdef bint normal = self.init_normal
        cdef double scale = self.init_scale
        cdef float init0 = self.init0, init1 = self.init1
        for j in prange(m, num_threads=nt, schedule='guided', chunksize=512):
            r = rows[j]
            if dt == HT_F32:
                init_values(<float*>(values + r * vb), dim, tkey, keys[j], normal, scale)
            else:
                init_values_reduced(dt, <uint16_t*>(values + r * vb), dim, tkey, keys[j],
                                    normal, scale)
            if w0 > 0:
                fill_floats(slot0 + r * w0, w0, init0)
            if w1 > 0:
                fill_floats(slot1 + r * w1, w1, init1)
            if opt_step != NULL:
                opt_step[r] = 0

    # ------------------------------------------------------------------ admission

    cdef int _counter_grow(self) noexcept nogil:
        cdef int64_t nc = self.counter_cap * 2, i, p
        cdef ht_cslot* nt = <ht_cslot*>ht_alloc(nc * sizeof(ht_cslot))
        if nt == NULL:
            return -1
        for i in range(self.counter_cap):
            if self.counters[i].count != 0:
                p = cmap_probe(nt, nc, self.counters[i].key)
                nt[p] = self.counters[i]
        ht_free(self.counters, self.counter_cap * sizeof(ht_cslot))
        self.counters = nt
        self.counter_cap = nc
        return 0

    cdef int _admit(self, int64_t key) noexcept nogil:
        """Count one occurrence of a key not in the table: 1 admitted, 0 not yet, -1 no memory."""
        cdef int64_t p
        if self.adm_kind == ADM_BLOOM:
            return bloom_add(self.bloom, self.bloom_size, self.bloom_hashes,
                             key) >= self.min_count
        if self.counter_used + 1 > self.counter_cap * COUNTER_MAX_LOAD:
            if self._counter_grow() != 0:
                return -1
        p = cmap_probe(self.counters, self.counter_cap, key)
        if self.counters[p].count == 0:
            self.counters[p].key = key
            self.counters[p].count = 1
            self.counter_used += 1
        elif self.counters[p].count < 0xFFFFFFFFu:
            self.counters[p].count += 1
        if self.counters[p].count >= self.min_count:
            # admitted keys leave the counter map, so it only holds keys still waiting
            cmap_delete(self.counters, self.counter_cap, p)
            self.counter_used -= 1
            return 1
        return 0

    # ------------------------------------------------------------------ batched lookups

    def find(self, const int64_t[::1] keys, int64_t[::1] out, int nt):
        """out[i] = row of keys[i], or -1."""
        cdef int64_t n = keys.shape[0], i
        if n == 0:
            return
        cdef const int64_t* k = &keys[0]
        cdef int64_t* o = &out[0]
        cdef const ht_slot* idx = self.index
        cdef int64_t cap = self.index_cap
        if n < _par_min:
            nt = 1
        with nogil:
            for i in prange(n, num_threads=nt, schedule='guided', chunksize=512):
                if i + PF < n:
                    _prefetch_slot(&idx[ht_fastrange(ht_index_hash(k[i + PF]), cap)])
                o[i] = _lookup(idx, cap, k[i])

    cdef int64_t _insert_missing(self, const int64_t* keys, int64_t* out, int64_t n, int64_t step,
                                 int64_t* new_rows, int64_t* new_keys, int* status) noexcept nogil:
        cdef int64_t i, p, r, key, n_new = 0
        cdef int adm
        status[0] = 0
        for i in range(n):
            if out[i] >= 0:
                continue
            key = keys[i]
            p = _probe(self.index, self.index_cap, key)
            if self.index[p].row1 != 0:  # a repeat of a key inserted earlier in this batch
                r = <int64_t>self.index[p].row1 - 1
                ht_atomic_inc_sat(&self.meta[r].access)
                out[i] = r
                continue
            if self.adm_kind != ADM_NONE:
                adm = self._admit(key)
                if adm < 0:
                    status[0] = -1
                    break
                if adm == 0:
                    continue
            if self.index_used + 1 > self.index_grow_at:
                if self._reserve_index(1) != 0:
                    status[0] = -1
                    break
                p = _probe(self.index, self.index_cap, key)
            r = self._alloc_row()
            if r < 0:
                status[0] = -1
                break
            self.index[p].key = key
            self.index[p].row1 = <uint32_t>(r + 1)
            self.index_used += 1
            self.n_live += 1
            self.meta[r].access = 1
            self.meta[r].last_step = <int32_t>step
            new_rows[n_new] = r
            new_keys[n_new] = key
            n_new += 1
            out[i] = r
        return n_new

    def find_or_insert(self, const int64_t[::1] keys, int64_t[::1] out, int64_t step, int nt):
        """out[i] = row of keys[i], inserting admitted missing keys; returns rows inserted."""
        cdef int64_t n = keys.shape[0], i, r, n_found = 0, n_missing, n_new = 0
        if n == 0:
            return 0
        cdef const int64_t* k = &keys[0]
        cdef int64_t* o = &out[0]
        cdef const ht_slot* idx = self.index
        cdef int64_t cap = self.index_cap
        cdef ht_meta* meta = self.meta
        cdef int64_t* new_rows = NULL
        cdef int64_t* new_keys = NULL
        cdef int status = 0
        _check_step(step)
        if n < _par_min:
            nt = 1
        with nogil:
            for i in prange(n, num_threads=nt, schedule='guided', chunksize=512):
                if i + PF < n:
                    _prefetch_slot(&idx[ht_fastrange(ht_index_hash(k[i + PF]), cap)])
                r = _lookup(idx, cap, k[i])
                o[i] = r
                if r >= 0:
                    n_found += 1
            if n_found > 0:
                for i in prange(n, num_threads=nt, schedule='guided', chunksize=512):
                    if i + PF < n and o[i + PF] >= 0:
                        ht_prefetch_w(&meta[o[i + PF]])
                    r = o[i]
                    if r >= 0:
                        ht_atomic_inc_sat(&meta[r].access)
            n_missing = n - n_found
            if n_missing > 0:
                new_rows = <int64_t*>malloc(n_missing * sizeof(int64_t))
                new_keys = <int64_t*>malloc(n_missing * sizeof(int64_t))
                if new_rows == NULL or new_keys == NULL:
                    status = -1
                elif self.adm_kind == ADM_NONE:
                    # every missing key is inserted: size both stores once for the batch
                    if self._reserve_index(n_missing) != 0 or self._reserve_rows(n_missing) != 0:
                        status = -1
                if status == 0:
                    n_new = self._insert_missing(k, o, n, step, new_rows, new_keys, &status)
                # initialise whatever was inserted, even after an error, so no row holds garbage
                self._init_rows(new_rows, new_keys, n_new, nt if n_new >= _par_min else 1)
                free(new_rows)
                free(new_keys)
        if status != 0:
            raise MemoryError(f"out of memory inserting {n_missing} keys "
                              f"({self.n_live} rows of dim {self.dim} stored)")
        return n_new

    def reserve(self, int64_t rows, bint populate):
        """Size the index and the row store for ``rows`` live rows without growing, and with
        ``populate`` fault their pages in now (``ht_populate``); returns 0, or -1 when the
        memory could not be mapped."""
        cdef int status = 0
        cdef int64_t more = rows - self.n_live
        with nogil:
            if more > 0:
                if self._reserve_index(more) != 0 or self._reserve_rows(more) != 0:
                    status = -1
            if status == 0 and populate:
                ht_populate(self.index, self.index_cap * sizeof(ht_slot))
                ht_populate(self.values, self.row_cap * self.vbytes)
                ht_populate(self.slot0, self.row_cap * self.w0 * sizeof(float))
                ht_populate(self.slot1, self.row_cap * self.w1 * sizeof(float))
                ht_populate(self.meta, self.row_cap * sizeof(ht_meta))
                if self.has_opt_step:
                    ht_populate(self.opt_step, self.row_cap * sizeof(int64_t))
        return status

    def gather(self, const int64_t[::1] rows, float[:, ::1] out, int nt, bint check_alive):
        """out[i] = values[rows[i]] as float32 (zeros for -1); returns how many indices were
        invalid."""
        cdef int64_t nbad = 0
        if rows.shape[0] == 0:
            return 0
        with nogil:
            nbad = self._gather_rows(&rows[0], NULL, &out[0, 0], NULL, rows.shape[0], nt,
                                     check_alive)
        return nbad

    def gather_into(self, const int64_t[::1] rows, const int64_t[::1] sel, float[::1] out,
                    const int64_t[::1] out_off, int nt, bint check_alive):
        """out[out_off[i] :][:dim] = values[rows[sel[i]]] as float32 (``sel`` None:
        rows[i]; zeros for -1); returns how many indices were invalid. The caller checks
        that ``sel`` indexes ``rows`` and that every destination lies inside ``out``."""
        cdef int64_t nbad = 0
        cdef const int64_t* sp = NULL
        if out_off.shape[0] == 0:
            return 0
        if sel is not None:
            sp = &sel[0]
        with nogil:
            nbad = self._gather_rows(&rows[0], sp, &out[0], &out_off[0], out_off.shape[0], nt,
                                     check_alive)
        return nbad

    cdef int64_t _gather_rows(self, const int64_t* rp, const int64_t* sp, float* o,
                              const int64_t* op, int64_t n, int nt,
                              bint check_alive) noexcept nogil:
        """Output row i is values[rp[sp[i]]] (sp NULL: rp[i]) as float32, written at
        o + op[i] (op NULL: o + i * dim), zeros for -1; returns how many were invalid."""
        cdef int64_t i, r, r2, nbad = 0
        cdef float* dst
        cdef const char* values = self.values
        cdef const ht_meta* meta = self.meta
        cdef int64_t dim = self.dim, high = self.row_high, vb = self.vbytes
        cdef int64_t rb = dim * sizeof(float)
        cdef int dt = self.row_dtype
        if n < _par_min:
            nt = 1
        for i in prange(n, num_threads=nt, schedule='guided', chunksize=512):
            if i + PF < n:
                r2 = rp[sp[i + PF]] if sp != NULL else rp[i + PF]
                if r2 >= 0 and r2 < high:
                    _prefetch_bytes(values + r2 * vb, vb, False)
            r = rp[sp[i]] if sp != NULL else rp[i]
            dst = o + (op[i] if op != NULL else i * dim)
            if r >= 0 and r < high and (not check_alive or meta[r].last_step >= 0):
                if dt == HT_F32:
                    _copy_row(dst, <const float*>(values + r * vb), rb)
                else:
                    ht_load_row(dt, <const uint16_t*>(values + r * vb), dst, dim)
            else:
                memset(dst, 0, rb)
                if r != -1:
                    nbad += 1
        return nbad

    def first_bad_row(self, const int64_t[::1] rows, bint check_alive):
        """Position of the first index that is neither -1 nor a stored row (or -1)."""
        cdef int64_t i, r
        for i in range(rows.shape[0]):
            r = rows[i]
            if r == -1:
                continue
            if r < 0 or r >= self.row_high or (check_alive and self.meta[r].last_step < 0):
                return i
        return -1

    def first_nonfinite(self, const float[:, ::1] grads):
        """Position of the first row of grads holding NaN or Inf (or -1)."""
        cdef int64_t i
        for i in range(grads.shape[0]):
            if _has_nonfinite(&grads[i, 0], grads.shape[1]):
                return i
        return -1

    def apply(self, const int64_t[::1] rows, const float[:, ::1] grads, int64_t step, int nt,
              const int64_t[::1] keys=None):
        """Apply the fused optimizer update of grads[i] to rows[i] (skipping -1).

        ``keys[i]`` is the key of rows[i]: reduced-precision rows need it (the random bits of
        stochastic rounding depend on it), float32 rows ignore it.

        Returns ``(n_bad_rows, n_nonfinite)``; the update runs only when both are 0.
        """
        cdef int64_t n = rows.shape[0], i, r, r2, nbad = 0, nnf = 0
        if n == 0:
            return 0, 0
        cdef int dt = self.row_dtype
        if dt != HT_F32 and (keys is None or keys.shape[0] != n):
            raise ValueError(f"apply: reduced-precision rows need the key of every row "
                             f"({n}); got {'none' if keys is None else keys.shape[0]}")
        cdef const int64_t* kp = &keys[0] if dt != HT_F32 else NULL
        cdef const int64_t* rp = &rows[0]
        cdef const float* gp = &grads[0, 0]
        cdef char* values = self.values
        cdef float* slot0 = self.slot0
        cdef float* slot1 = self.slot1
        cdef ht_meta* meta = self.meta
        cdef int64_t dim = self.dim, w0 = self.w0, w1 = self.w1, high = self.row_high
        cdef int64_t vb = self.vbytes
        cdef OptArgs a
        a.kind, a.dim, a.slot0, a.slot1 = self.opt_kind, dim, slot0, slot1
        a.opt_step = self.opt_step
        a.lr, a.mu, a.b1, a.b2 = self.lr, self.momentum, self.beta1, self.beta2
        a.eps, a.l1, a.l2 = self.eps, self.l1, self.l2
        a.lrp, a.wd = self.lr_power, self.weight_decay
        cdef int32_t step32 = <int32_t>_check_step(step)
        cdef uint64_t sr_key = self.sr_key
        cdef float* scratch = NULL
        cdef float* buf
        if n < _par_min:
            nt = 1
        if dt != HT_F32:
            scratch = <float*>malloc(max(nt, 1) * dim * sizeof(float))
            if scratch == NULL:
                raise MemoryError(f"cannot allocate {nt} rows of scratch for the update")
        with nogil:
            # validate everything first so a rejected batch changes nothing
            for i in prange(n, num_threads=nt, schedule='guided', chunksize=512):
                if i + PF < n:
                    r2 = rp[i + PF]
                    if r2 >= 0 and r2 < high:
                        ht_prefetch_w(&meta[r2])
                r = rp[i]
                if r != -1 and (r < 0 or r >= high or meta[r].last_step < 0):
                    nbad += 1
                if _has_nonfinite(gp + i * dim, dim):
                    nnf += 1
            if nbad == 0 and nnf == 0:
                for i in prange(n, num_threads=nt, schedule='guided', chunksize=512):
                    if i + PF_UPDATE < n:
                        r2 = rp[i + PF_UPDATE]
                        if r2 >= 0:
                            _prefetch_bytes(values + r2 * vb, vb, True)
                            if w0 > 0:
                                _prefetch_bytes(slot0 + r2 * w0, w0 * 4, True)
                            if w1 > 0:
                                _prefetch_bytes(slot1 + r2 * w1, w1 * 4, True)
                    r = rp[i]
                    if r < 0:
                        continue
                    if dt == HT_F32:
                        update_row(&a, <float*>(values + r * vb), r, gp + i * dim)
                    else:
                        # widen, update in float32, narrow with stochastic rounding
                        buf = scratch + threadid() * dim
                        ht_load_row(dt, <const uint16_t*>(values + r * vb), buf, dim)
                        update_row(&a, buf, r, gp + i * dim)
                        ht_store_row_sr(dt, buf, <uint16_t*>(values + r * vb), dim,
                                        ht_sr_row_key(sr_key, kp[i], step))
                    meta[r].last_step = step32
        free(scratch)
        return nbad, nnf


include "table_state.pxi"
