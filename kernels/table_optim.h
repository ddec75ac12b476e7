/* Fused sparse optimizer updates that take square roots (Adagrad, Adam, FTRL), with the
   instruction set chosen when the table kernel is imported.

   With C's errno semantics (GCC's default) the compiler keeps sqrt scalar, so these loops
   are written with AVX-512 / AVX2 intrinsics, in the same float64 operation order as the
   scalar loops (and the NumPy reference in hpctrain.sparse.optimizers): every variant
   computes the same numbers (setup.py turns floating-point contraction off).

   On x86-64 with GCC or Clang, each vector variant is compiled for its own instruction set
   (function target attributes), whatever -march the kernels are built with, and
   ht_optim_init() selects the widest one this CPU runs; elsewhere only the scalar loops
   exist. Included by table_optim.pxi. */
#ifndef HT_OPTIM_H
#define HT_OPTIM_H

#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HT_X86 1
#include <immintrin.h>
#else
#define HT_X86 0
#endif

enum { HT_SCALAR = 0, HT_AVX2 = 1, HT_AVX512 = 2 };
static int ht_level = HT_SCALAR;

/* Select the widest variant this CPU runs, at most `cap` (HT_*); returns the level chosen. */
static int ht_optim_init(int cap) {
    int level = HT_SCALAR;
#if HT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) level = HT_AVX512;
    else if (__builtin_cpu_supports("avx2")) level = HT_AVX2;
#endif
    ht_level = level < cap ? level : cap;
    return ht_level;
}

/* ---------------------------------------------------------------- scalar, from column j */

static inline void ht_adagrad_tail(float* w, float* a, const float* g, int64_t j, int64_t d,
                                   double lr, double eps, double wd) {
    for (; j < d; j++) {
        double wj = w[j], gj = (double)g[j] + wd * wj, aj = (double)a[j] + gj * gj;
        a[j] = (float)aj;
        w[j] = (float)(wj - lr * gj / (sqrt(aj) + eps));
    }
}

static inline void ht_adam_tail(float* w, float* m, float* v, const float* g, int64_t j,
                                int64_t d, double lr, double b1, double b2, double eps,
                                double wd, double bc1, double bc2) {
    for (; j < d; j++) {
        double wj = w[j], gj = (double)g[j] + wd * wj;
        double mj = b1 * (double)m[j] + (1.0 - b1) * gj;
        double vj = b2 * (double)v[j] + (1.0 - b2) * gj * gj;
        m[j] = (float)mj;
        v[j] = (float)vj;
        w[j] = (float)(wj - lr * (mj / bc1) / (sqrt(vj / bc2) + eps));
    }
}

/* FTRL-Proximal with lr_power = -0.5 (square roots instead of pow). */
static inline void ht_ftrl_sqrt_tail(float* w, float* z, float* n, const float* g, int64_t j,
                                     int64_t d, double lr, double l1, double l2, double wd) {
    for (; j < d; j++) {
        double wj = w[j], gj = (double)g[j] + wd * wj, nj = n[j], nn = nj + gj * gj;
        double pn = sqrt(nn);
        double zj = (double)z[j] + gj - (pn - sqrt(nj)) / lr * wj;
        z[j] = (float)zj;
        n[j] = (float)nn;
        if (fabs(zj) <= l1) w[j] = 0.0f;
        else if (zj > 0) w[j] = (float)(-(zj - l1) / (pn / lr + l2));
        else w[j] = (float)(-(zj + l1) / (pn / lr + l2));
    }
}

#if HT_X86
/* ---------------------------------------------------------------- AVX-512 (8 doubles) */
#define HT_TARGET __attribute__((target("avx512f")))
#define HT_NAME(f) f##_avx512
#define HT_VD 8
#define ht_vd            __m512d
#define ht_load(p)       _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define ht_store(p, x)   _mm256_storeu_ps((p), _mm512_cvtpd_ps(x))
#define ht_set1          _mm512_set1_pd
#define ht_add           _mm512_add_pd
#define ht_sub           _mm512_sub_pd
#define ht_mul           _mm512_mul_pd
#define ht_div           _mm512_div_pd
#define ht_sqrt          _mm512_sqrt_pd
#include "table_optim_simd.h"

HT_TARGET static void ht_ftrl_sqrt_avx512(float* w, float* z, float* n, const float* g,
                                          int64_t d, double lr, double l1, double l2,
                                          double wd) {
    int64_t j = 0;
    const __m512d vlr = _mm512_set1_pd(lr), vl1 = _mm512_set1_pd(l1), vl2 = _mm512_set1_pd(l2);
    const __m512d vwd = _mm512_set1_pd(wd), zero = _mm512_setzero_pd();
    for (; j + 8 <= d; j += 8) {
        __m512d wj = ht_load(w + j);
        __m512d gj = _mm512_add_pd(ht_load(g + j), _mm512_mul_pd(vwd, wj));
        __m512d nj = ht_load(n + j);
        __m512d nn = _mm512_add_pd(nj, _mm512_mul_pd(gj, gj));
        __m512d pn = _mm512_sqrt_pd(nn);
        __m512d sig = _mm512_div_pd(_mm512_sub_pd(pn, _mm512_sqrt_pd(nj)), vlr);
        __m512d zj = _mm512_sub_pd(_mm512_add_pd(ht_load(z + j), gj), _mm512_mul_pd(sig, wj));
        ht_store(z + j, zj);
        ht_store(n + j, nn);
        __mmask8 pos = _mm512_cmp_pd_mask(zj, zero, _CMP_GT_OQ);
        __m512d shr = _mm512_mask_blend_pd(pos, _mm512_add_pd(zj, vl1),
                                           _mm512_sub_pd(zj, vl1));
        __m512d q = _mm512_add_pd(_mm512_div_pd(pn, vlr), vl2);
        __m512d wn = _mm512_div_pd(_mm512_sub_pd(zero, shr), q);
        __mmask8 keep = _mm512_cmp_pd_mask(_mm512_abs_pd(zj), vl1, _CMP_GT_OQ);
        ht_store(w + j, _mm512_maskz_mov_pd(keep, wn));
    }
    ht_ftrl_sqrt_tail(w, z, n, g, j, d, lr, l1, l2, wd);
}
#undef HT_TARGET
#undef HT_NAME
#undef HT_VD
#undef ht_vd
#undef ht_load
#undef ht_store
#undef ht_set1
#undef ht_add
#undef ht_sub
#undef ht_mul
#undef ht_div
#undef ht_sqrt

/* ---------------------------------------------------------------- AVX2 (4 doubles) */
#define HT_TARGET __attribute__((target("avx2")))
#define HT_NAME(f) f##_avx2
#define HT_VD 4
#define ht_vd            __m256d
#define ht_load(p)       _mm256_cvtps_pd(_mm_loadu_ps(p))
#define ht_store(p, x)   _mm_storeu_ps((p), _mm256_cvtpd_ps(x))
#define ht_set1          _mm256_set1_pd
#define ht_add           _mm256_add_pd
#define ht_sub           _mm256_sub_pd
#define ht_mul           _mm256_mul_pd
#define ht_div           _mm256_div_pd
#define ht_sqrt          _mm256_sqrt_pd
#include "table_optim_simd.h"
#undef HT_TARGET
#undef HT_NAME
#undef HT_VD
#undef ht_vd
#undef ht_load
#undef ht_store
#undef ht_set1
#undef ht_add
#undef ht_sub
#undef ht_mul
#undef ht_div
#undef ht_sqrt
#endif  /* HT_X86 */

/* ---------------------------------------------------------------- dispatch */

static inline void ht_upd_adagrad(float* w, float* a, const float* g, int64_t d,
                                  double lr, double eps, double wd) {
#if HT_X86
    if (ht_level == HT_AVX512) { ht_adagrad_avx512(w, a, g, d, lr, eps, wd); return; }
    if (ht_level == HT_AVX2) { ht_adagrad_avx2(w, a, g, d, lr, eps, wd); return; }
#endif
    ht_adagrad_tail(w, a, g, 0, d, lr, eps, wd);
}

static inline void ht_upd_adam(float* w, float* m, float* v, const float* g, int64_t d,
                               double lr, double b1, double b2, double eps, double wd,
                               double bc1, double bc2) {
#if HT_X86
    if (ht_level == HT_AVX512) {
        ht_adam_avx512(w, m, v, g, d, lr, b1, b2, eps, wd, bc1, bc2);
        return;
    }
    if (ht_level == HT_AVX2) { ht_adam_avx2(w, m, v, g, d, lr, b1, b2, eps, wd, bc1, bc2); return; }
#endif
    ht_adam_tail(w, m, v, g, 0, d, lr, b1, b2, eps, wd, bc1, bc2);
}

static inline void ht_upd_ftrl_sqrt(float* w, float* z, float* n, const float* g, int64_t d,
                                    double lr, double l1, double l2, double wd) {
#if HT_X86
    if (ht_level == HT_AVX512) { ht_ftrl_sqrt_avx512(w, z, n, g, d, lr, l1, l2, wd); return; }
#endif
    ht_ftrl_sqrt_tail(w, z, n, g, 0, d, lr, l1, l2, wd);
}

#endif  /* HT_OPTIM_H */
