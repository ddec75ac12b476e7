# cython: language_level=3
"""C types and helpers of the embedding table core (cimported by kernels/table.pyx).

Memory layout of one table shard (``R`` = row capacity, ``S`` = index slots)::

    index   ht_slot[S]        packed {int64 key; uint32 row + 1}; 0 in the row field marks an
                              empty slot, so every one of the 2^64 keys is a valid key (no
                              sentinel key) and freshly mapped (zero) memory is an empty index
    values  E[R, dim]         embedding rows, densely packed: row ids are handed out from
                              0 upwards and freed rows are reused through ``free_rows``;
                              E = float32, or fp16 / bf16 (uint16 bits) with reduced-precision
                              rows (``row_dtype``; conversions in table_half.h)
    slot0   float32[R, w0]    first optimizer state (w0 = dim, or 1 for row-wise Adagrad)
    slot1   float32[R, w1]    second optimizer state (Adam, FTRL)
    meta    ht_meta[R]        {uint32 access count, saturating at 2^32 - 1; int32 last update
                              step}: 8 bytes; a negative step marks a free row
    opt_step int64[R]         per-row update count (Adam's bias-correction step), Adam only

The index and the row store grow independently: the index by 1.125x when its load passes
0.8 (rehash, row ids unchanged), so that its load stays in [0.71, 0.8]; the row store to
what a batch needs, at least 1/128 more (mremap moves pages without copying rows; 1/8 where
rows must be copied). Small growth steps keep the memory per stored row within the issue's
bound 1.25 x (8 + 4 * floats per row) at dim 16 with SGD, where the bound leaves 18 bytes per
row for the index (12 / 0.71 = 16.9 at most) and the row store's slack.

Reduced-precision (fp16, bf16) tables have small rows, so the index and the slack are a
larger share of them: their index grows by 1/16 at load 0.82 (load in [0.77, 0.82], at most
15.6 bytes per row) and their row store by 1/512 (at most 0.2% slack). fp16 at dim 64 with
row-wise Adagrad: 128 + 4 + 8 bytes of row, state and metadata, + 15.6 + 0.3 <= 156 bytes,
0.6 x the 260 bytes of the same table in float32.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <math.h>

    typedef struct __attribute__((packed)) { int64_t key; uint32_t row1; } ht_slot;
    typedef struct __attribute__((packed)) { int64_t key; uint32_t count; } ht_cslot;
    typedef struct { uint32_t access; int32_t last_step; } ht_meta;
    #define HT_ACCESS_MAX 0xFFFFFFFFu
    #define HT_STEP_MAX 0x7FFFFFFF

    #define HT_GAMMA 0x9E3779B97F4A7C15ULL

    /* splitmix64's finaliser, hp_mix64 (kernels/hp_mix64.h), for row initialisation and
       the Bloom filter */
    #include "hp_mix64.h"
    /* fp16 / bf16 rows: conversions and stochastic rounding */
    #include "table_half.h"
    /* Index hash: MurmurHash3's fmix64 of a salted key, unrelated to the routing hash
       (splitmix64), so that the keys one shard owns still spread over its whole index. */
    static inline uint64_t ht_index_hash(int64_t key) {
        uint64_t k = (uint64_t)key ^ 0x2545F4914F6CDD1DULL;
        k ^= k >> 33; k *= 0xFF51AFD7ED558CCDULL;
        k ^= k >> 33; k *= 0xC4CEB9FE1A85EC53ULL;
        return k ^ (k >> 33);
    }
    /* Bloom filter hashes: a second, independent pair of mixes of the key. */
    static inline uint64_t ht_bloom_hash(int64_t key) {
        return hp_mix64((uint64_t)key ^ 0x6A09E667F3BCC909ULL);
    }
    /* Lemire's multiply-shift range reduction: maps h to [0, n) with the high bits of h,
       so capacities need not be powers of two. */
    static inline int64_t ht_fastrange(uint64_t h, int64_t n) {
        return (int64_t)(((unsigned __int128)h * (uint64_t)n) >> 64);
    }
    static inline void ht_prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
    static inline void ht_prefetch_w(const void* p) { __builtin_prefetch(p, 1, 3); }
    /* Access counts saturate at 2^32 - 1 instead of wrapping to 0 (which would make the
       hottest row the first LFU victim). Rows are mostly unique within a batch, so the
       compare-and-swap rarely retries. */
    static inline void ht_atomic_inc_sat(uint32_t* p) {
        uint32_t v = __atomic_load_n(p, __ATOMIC_RELAXED);
        while (v != HT_ACCESS_MAX &&
               !__atomic_compare_exchange_n(p, &v, v + 1, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
        }
    }

    /* Row arrays and the index live in their own anonymous mappings: page-aligned (a row of
       16 floats is one cache line), growable without copying (mremap), and eligible for
       transparent huge pages, which matter for random access into big tables. Memory comes
       back zero-filled (an empty index, an empty Bloom filter) and untouched pages cost
       nothing, so a large initial capacity is not paid for until it is used. */
    #if defined(__linux__)
    #include <sys/mman.h>
    #define HT_ROW_GROWTH_DIV 128  /* growth remaps pages, it never copies: grow in small steps */
    #define HT_ROW_GROWTH_DIV_FINE 512  /* reduced-precision rows: smaller still (table.pyx) */
    static inline void ht_advise(void* p, size_t bytes) {
    #ifdef MADV_HUGEPAGE
        if (bytes >= ((size_t)2 << 20)) madvise(p, bytes, MADV_HUGEPAGE);
    #endif
    }
    static inline void* ht_alloc(size_t bytes) {
        void* p = mmap(NULL, bytes ? bytes : 1, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return NULL;
        ht_advise(p, bytes);
        return p;
    }
    static inline void* ht_realloc(void* p, size_t old_bytes, size_t new_bytes) {
        if (p == NULL) return ht_alloc(new_bytes);
        void* q = mremap(p, old_bytes ? old_bytes : 1, new_bytes ? new_bytes : 1, MREMAP_MAYMOVE);
        if (q == MAP_FAILED) return NULL;
        ht_advise(q, new_bytes);
        return q;
    }
    static inline void ht_free(void* p, size_t bytes) { if (p) munmap(p, bytes ? bytes : 1); }
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23    /* Linux 5.14 */
    #endif
    /* Fault in every page of [p, p + bytes) writable without changing its contents, so that
       the kernel zeroes fresh pages now rather than at first touch. madvise first; kernels
       without MADV_POPULATE_WRITE get one read and write back of a byte per page. */
    static inline void ht_populate(void* p, size_t bytes) {
        if (p == NULL || bytes == 0) return;
        uintptr_t lead = (uintptr_t)p & 4095u;     /* madvise wants a page-aligned start */
        if (madvise((char*)p - lead, bytes + lead, MADV_POPULATE_WRITE) == 0) return;
        volatile char* c = (volatile char*)p;
        for (size_t off = 0; off < bytes; off += 4096) c[off] = c[off];
        c[bytes - 1] = c[bytes - 1];
    }
    #else
    #include <stdlib.h>
    #include <string.h>
    #define HT_ROW_GROWTH_DIV 8    /* growth copies: grow geometrically */
    #define HT_ROW_GROWTH_DIV_FINE 8
    static inline void* ht_alloc(size_t bytes) {
        void* p = NULL;
        if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
        memset(p, 0, bytes);
        return p;
    }
    static inline void* ht_realloc(void* p, size_t old_bytes, size_t new_bytes) {
        void* q = ht_alloc(new_bytes);
        if (q == NULL) return NULL;
        if (p != NULL) { memcpy(q, p, old_bytes < new_bytes ? old_bytes : new_bytes); free(p); }
        return q;
    }
    static inline void ht_free(void* p, size_t bytes) { (void)bytes; free(p); }
    static inline void ht_populate(void* p, size_t bytes) { (void)p; (void)bytes; } /* memset */
    #endif
    """
    ctypedef struct ht_slot:
        int64_t key
        uint32_t row1
    ctypedef struct ht_cslot:
        int64_t key
        uint32_t count
    ctypedef struct ht_meta:
        uint32_t access
        int32_t last_step
    uint32_t HT_ACCESS_MAX
    int64_t HT_STEP_MAX
    uint64_t HT_GAMMA
    uint64_t hp_mix64(uint64_t z) noexcept nogil
    int HT_F32, HT_F16, HT_BF16
    int ht_half_init(int allow) noexcept nogil
    float ht_f16_to_f32(uint16_t h) noexcept nogil
    uint16_t ht_f32_to_f16_rne(float f) noexcept nogil
    uint16_t ht_f32_to_f16_sr(float f, uint32_t r) noexcept nogil
    float ht_bf16_to_f32(uint16_t h) noexcept nogil
    uint16_t ht_f32_to_bf16_rne(float f) noexcept nogil
    uint16_t ht_f32_to_bf16_sr(float f, uint32_t r) noexcept nogil
    void ht_load_row(int dtype, const uint16_t* src, float* dst, int64_t n) noexcept nogil
    int64_t ht_store_row_rne(int dtype, const float* src, uint16_t* dst, int64_t n) noexcept nogil
    uint64_t ht_sr_row_key(uint64_t tkey, int64_t key, int64_t step) noexcept nogil
    void ht_store_row_sr(int dtype, const float* src, uint16_t* dst, int64_t n,
                         uint64_t h) noexcept nogil
    void ht_round_row_sr(int dtype, const float* src, uint16_t* dst, int64_t n,
                         const uint16_t* r) noexcept nogil
    uint64_t ht_index_hash(int64_t key) noexcept nogil
    uint64_t ht_bloom_hash(int64_t key) noexcept nogil
    int64_t ht_fastrange(uint64_t h, int64_t n) noexcept nogil
    void ht_prefetch(const void* p) noexcept nogil
    void ht_prefetch_w(const void* p) noexcept nogil
    void ht_atomic_inc_sat(uint32_t* p) noexcept nogil
    int64_t HT_ROW_GROWTH_DIV
    int64_t HT_ROW_GROWTH_DIV_FINE
    void* ht_alloc(size_t bytes) noexcept nogil
    void* ht_realloc(void* p, size_t old_bytes, size_t new_bytes) noexcept nogil
    void ht_free(void* p, size_t bytes) noexcept nogil
    void ht_populate(void* p, size_t bytes) noexcept nogil
