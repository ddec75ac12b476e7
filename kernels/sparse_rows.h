/* Row loops of kernels/sparse_ops.pyx: pooling bags of rows and scattering pooled
   gradients back to unique ids, the rows reached through two levels of indices
   (item j's row starts at src + unique_off[inverse[j]]), so no per-item offset array is
   ever written.

   Each loop is compiled for AVX-512F, AVX2 and the build's baseline, the CPU picking one
   at load time (target_clones), whatever -march the kernels are built with. Only IEEE add,
   multiply and divide are used, contraction is off (setup.py: -ffp-contract=off) and every
   output element adds its inputs in increasing item order, so every variant gives the same
   bits as the scalar loops they replace. Rows a few items ahead are prefetched: the items
   of a bag sit anywhere in a row buffer of megabytes. */
#ifndef HP_SPARSE_ROWS_H
#define HP_SPARSE_ROWS_H

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define HP_ROW_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef HP_ROW_CLONES
#define HP_ROW_CLONES
#endif

/* The first i with (uint64_t)a[i] > limit, or -1: the bounds check of index and offset
   arrays (a negative entry is a huge unsigned one). Blocks of entries are OR-reduced
   without branches, which the compiler vectorises; only a block that holds a bad entry is
   searched again for the first one. */
#define HP_CHECK_BLOCK 2048
HP_ROW_CLONES static int64_t hp_first_above(const int64_t* a, int64_t n, uint64_t limit) {
    for (int64_t b = 0; b < n; b += HP_CHECK_BLOCK) {
        int64_t e = n - b < HP_CHECK_BLOCK ? n : b + HP_CHECK_BLOCK;
        int any = 0;
        for (int64_t i = b; i < e; i++) any |= (uint64_t)a[i] > limit;
        if (any)
            for (int64_t i = b; i < e; i++)
                if ((uint64_t)a[i] > limit) return i;
    }
    return -1;
}

/* Items prefetched ahead of the one being added. */
#define HP_ROW_PF 8

static inline void hp_prefetch_row(const float* p, int64_t dim) {
#if defined(__GNUC__)
    const char* c = (const char*)p;
    for (int64_t off = 0; off < dim * (int64_t)sizeof(float); off += 64)
        __builtin_prefetch(c + off, 0, 3);
#else
    (void)p; (void)dim;
#endif
}

/* out[b] = sum (or mean) of the rows of bag b, for bags [b0, b1); item j of bag b (j in
   [bags[b], bags[b+1])) is the row at src + uoff[inv[j]]. An empty bag gives zeros. */
HP_ROW_CLONES static void hp_pool_bags(float* restrict out, const float* restrict src,
                                       const int64_t* restrict uoff,
                                       const int64_t* restrict inv,
                                       const int64_t* restrict bags, int64_t b0, int64_t b1,
                                       int64_t dim, int mean, int64_t n_items) {
    for (int64_t b = b0; b < b1; b++) {
        float* restrict o = out + b * dim;
        for (int64_t c = 0; c < dim; c++) o[c] = 0;
        const int64_t j0 = bags[b], j1 = bags[b + 1];
        for (int64_t j = j0; j < j1; j++) {
            if (j + HP_ROW_PF < n_items) hp_prefetch_row(src + uoff[inv[j + HP_ROW_PF]], dim);
            const float* restrict row = src + uoff[inv[j]];
            for (int64_t c = 0; c < dim; c++) o[c] += row[c];
        }
        if (mean && j1 > j0) {
            const float len = (float)(j1 - j0);
            for (int64_t c = 0; c < dim; c++) o[c] = o[c] / len;
        }
    }
}

/* dst = 0 for every unique id u in [0, nu) at base + doff[u] (doff NULL: u * dim). */
static inline void hp_zero_rows(float* base, const int64_t* doff, int64_t nu, int64_t dim) {
    for (int64_t u = 0; u < nu; u++)
        memset(base + (doff ? doff[u] : u * dim), 0, (size_t)dim * sizeof(float));
}

/* Serial scatter of pooled gradients to unique ids (rows zeroed first), items in
   increasing j: dst(inv[j]) += g[bag(j)] (times 1 / len(bag) with mean), bag(j) walked
   from bags. (Writing each id's first term instead of zeroing first was slower: the
   branch on "first seen" mispredicts about every third item with bags of 20.) */
HP_ROW_CLONES static void hp_unpool_serial(float* restrict base, const int64_t* restrict doff,
                                           const float* restrict g,
                                           const int64_t* restrict inv,
                                           const int64_t* restrict bags, int64_t nb,
                                           int64_t dim, int mean) {
    for (int64_t b = 0; b < nb; b++) {
        const int64_t j0 = bags[b], j1 = bags[b + 1];
        if (j1 == j0) continue;
        const float* restrict gb = g + b * dim;
        /* bag_scales' value: the double quotient rounded to float */
        const float w = mean ? (float)(1.0 / (double)(float)(j1 - j0)) : 1.0f;
        for (int64_t j = j0; j < j1; j++) {
            if (j + HP_ROW_PF < bags[nb]) {
                const int64_t u2 = inv[j + HP_ROW_PF];
                hp_prefetch_row(base + (doff ? doff[u2] : u2 * dim), dim);
            }
            const int64_t u = inv[j];
            float* restrict d = base + (doff ? doff[u] : u * dim);
            if (mean) {
                for (int64_t c = 0; c < dim; c++) d[c] += w * gb[c];
            } else {
                for (int64_t c = 0; c < dim; c++) d[c] += gb[c];
            }
        }
    }
}

/* The same sums, one unique id at a time (for the threads): d = sum over its items k in
   [start, end) of order (increasing j) of g[bag_of[j]] (times scale[j] with mean). */
HP_ROW_CLONES static void hp_unpool_one(float* restrict d, const float* restrict g,
                                        const int64_t* restrict order,
                                        const int64_t* restrict bag_of,
                                        const float* restrict scale, int64_t start,
                                        int64_t end, int64_t dim) {
    for (int64_t c = 0; c < dim; c++) d[c] = 0;
    for (int64_t k = start; k < end; k++) {
        const int64_t j = order[k];
        const float* restrict gb = g + bag_of[j] * dim;
        if (scale) {
            const float w = scale[j];
            for (int64_t c = 0; c < dim; c++) d[c] += w * gb[c];
        } else {
            for (int64_t c = 0; c < dim; c++) d[c] += gb[c];
        }
    }
}

#endif
