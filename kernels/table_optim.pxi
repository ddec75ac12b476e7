# Fused sparse optimizer updates of one row (included by table.pyx).
#
# Every update reads the row's float32 weights, state and gradient once, computes in
# float64 and stores float32 once. The textbook equations (and their NumPy twins) are in
# hpctrain.sparse.optimizers; g below already includes weight decay: g = grad + wd * w.

from libc.math cimport fabs, pow, sqrt

# Adagrad, Adam and FTRL take square roots. With C's errno semantics (GCC's default) the
# compiler keeps sqrt scalar, so these three loops are written with AVX-512 / AVX2
# intrinsics, in the same float64 operation order as the scalar tail and the NumPy reference.
cdef extern from *:
    """
    #include <immintrin.h>
    #if defined(__AVX512F__)
    #define HT_VD 8
    typedef __m512d ht_vd;
    #define ht_load(p)       _mm512_cvtps_pd(_mm256_loadu_ps(p))
    #define ht_store(p, x)   _mm256_storeu_ps((p), _mm512_cvtpd_ps(x))
    #define ht_set1          _mm512_set1_pd
    #define ht_add           _mm512_add_pd
    #define ht_sub           _mm512_sub_pd
    #define ht_mul           _mm512_mul_pd
    #define ht_div           _mm512_div_pd
    #define ht_sqrt          _mm512_sqrt_pd
    #elif defined(__AVX2__)
    #define HT_VD 4
    typedef __m256d ht_vd;
    #define ht_load(p)       _mm256_cvtps_pd(_mm_loadu_ps(p))
    #define ht_store(p, x)   _mm_storeu_ps((p), _mm256_cvtpd_ps(x))
    #define ht_set1          _mm256_set1_pd
    #define ht_add           _mm256_add_pd
    #define ht_sub           _mm256_sub_pd
    #define ht_mul           _mm256_mul_pd
    #define ht_div           _mm256_div_pd
    #define ht_sqrt          _mm256_sqrt_pd
    #else
    #define HT_VD 0
    #endif

    static inline void ht_upd_adagrad(float* w, float* a, const float* g, int64_t d,
                                      double lr, double eps, double wd) {
        int64_t j = 0;
    #if HT_VD
        const ht_vd vlr = ht_set1(lr), veps = ht_set1(eps), vwd = ht_set1(wd);
        for (; j + HT_VD <= d; j += HT_VD) {
            ht_vd wj = ht_load(w + j);
            ht_vd gj = ht_add(ht_load(g + j), ht_mul(vwd, wj));
            ht_vd aj = ht_add(ht_load(a + j), ht_mul(gj, gj));
            ht_store(a + j, aj);
            ht_store(w + j, ht_sub(wj, ht_div(ht_mul(vlr, gj), ht_add(ht_sqrt(aj), veps))));
        }
    #endif
        for (; j < d; j++) {
            double wj = w[j], gj = (double)g[j] + wd * wj, aj = (double)a[j] + gj * gj;
            a[j] = (float)aj;
            w[j] = (float)(wj - lr * gj / (sqrt(aj) + eps));
        }
    }

    static inline void ht_upd_adam(float* w, float* m, float* v, const float* g, int64_t d,
                                   double lr, double b1, double b2, double eps, double wd,
                                   double bc1, double bc2) {
        int64_t j = 0;
    #if HT_VD
        const ht_vd vlr = ht_set1(lr), veps = ht_set1(eps), vwd = ht_set1(wd);
        const ht_vd vb1 = ht_set1(b1), vc1 = ht_set1(1.0 - b1), vb2 = ht_set1(b2);
        const ht_vd vc2 = ht_set1(1.0 - b2), vbc1 = ht_set1(bc1), vbc2 = ht_set1(bc2);
        for (; j + HT_VD <= d; j += HT_VD) {
            ht_vd wj = ht_load(w + j);
            ht_vd gj = ht_add(ht_load(g + j), ht_mul(vwd, wj));
            ht_vd mj = ht_add(ht_mul(vb1, ht_load(m + j)), ht_mul(vc1, gj));
            ht_vd vj = ht_add(ht_mul(vb2, ht_load(v + j)), ht_mul(ht_mul(vc2, gj), gj));
            ht_store(m + j, mj);
            ht_store(v + j, vj);
            ht_vd num = ht_mul(vlr, ht_div(mj, vbc1));
            ht_store(w + j, ht_sub(wj, ht_div(num, ht_add(ht_sqrt(ht_div(vj, vbc2)), veps))));
        }
    #endif
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
    static inline void ht_upd_ftrl_sqrt(float* w, float* z, float* n, const float* g, int64_t d,
                                        double lr, double l1, double l2, double wd) {
        int64_t j = 0;
    #if defined(__AVX512F__)
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
    #endif
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
    """
    void ht_upd_adagrad(float* w, float* a, const float* g, int64_t d, double lr, double eps,
                        double wd) noexcept nogil
    void ht_upd_adam(float* w, float* m, float* v, const float* g, int64_t d, double lr,
                     double b1, double b2, double eps, double wd, double bc1,
                     double bc2) noexcept nogil
    void ht_upd_ftrl_sqrt(float* w, float* z, float* n, const float* g, int64_t d, double lr,
                          double l1, double l2, double wd) noexcept nogil

cdef enum:
    OPT_SGD = 0
    OPT_MOMENTUM = 1
    OPT_NESTEROV = 2
    OPT_ADAGRAD = 3
    OPT_ROWWISE_ADAGRAD = 4
    OPT_ADAM = 5
    OPT_FTRL = 6


cdef inline void upd_sgd(float* w, const float* g, int64_t d, double lr, double wd) noexcept nogil:
    cdef int64_t j
    cdef double gj
    for j in range(d):
        gj = <double>g[j] + wd * <double>w[j]
        w[j] = <float>(<double>w[j] - lr * gj)


cdef inline void upd_momentum(float* w, float* m, const float* g, int64_t d, double lr,
                              double mu, bint nesterov, double wd) noexcept nogil:
    cdef int64_t j
    cdef double gj, mj
    if nesterov:
        for j in range(d):
            gj = <double>g[j] + wd * <double>w[j]
            mj = mu * <double>m[j] + gj
            m[j] = <float>mj
            w[j] = <float>(<double>w[j] - lr * (gj + mu * mj))
    else:
        for j in range(d):
            gj = <double>g[j] + wd * <double>w[j]
            mj = mu * <double>m[j] + gj
            m[j] = <float>mj
            w[j] = <float>(<double>w[j] - lr * mj)


cdef inline void upd_adagrad(float* w, float* a, const float* g, int64_t d, double lr,
                             double eps, double wd) noexcept nogil:
    ht_upd_adagrad(w, a, g, d, lr, eps, wd)


cdef inline void upd_rowwise_adagrad(float* w, float* a, const float* g, int64_t d, double lr,
                                     double eps, double wd) noexcept nogil:
    cdef int64_t j
    cdef double gj, s = 0.0, aj, step
    for j in range(d):
        gj = <double>g[j] + wd * <double>w[j]
        s = s + gj * gj
    aj = <double>a[0] + s / <double>d
    a[0] = <float>aj
    step = lr / (sqrt(aj) + eps)
    for j in range(d):
        gj = <double>g[j] + wd * <double>w[j]
        w[j] = <float>(<double>w[j] - step * gj)


cdef inline void upd_adam(float* w, float* m, float* v, const float* g, int64_t d, double lr,
                          double b1, double b2, double eps, double wd, int64_t t) noexcept nogil:
    # Lazy Adam: t is this row's own update count (after this update), so bias correction
    # matches a dense Adam that only ever saw the steps in which this row had a gradient.
    ht_upd_adam(w, m, v, g, d, lr, b1, b2, eps, wd, 1.0 - pow(b1, <double>t),
                1.0 - pow(b2, <double>t))


cdef inline void upd_ftrl(float* w, float* z, float* n, const float* g, int64_t d, double lr,
                          double l1, double l2, double lr_power, double wd) noexcept nogil:
    # FTRL-Proximal (McMahan et al. 2013) per coordinate, with p = -lr_power:
    #   n' = n + g^2;  z += g - (n'^p - n^p) / lr * w;  n = n'
    #   w = 0 if |z| <= l1 else -(z - sign(z) l1) / (n'^p / lr + l2)
    cdef int64_t j
    cdef double gj, nj, nn, zj, pn, p = -lr_power
    if p == 0.5:
        ht_upd_ftrl_sqrt(w, z, n, g, d, lr, l1, l2, wd)
        return
    for j in range(d):
        gj = <double>g[j] + wd * <double>w[j]
        nj = <double>n[j]
        nn = nj + gj * gj
        pn = pow(nn, p)
        zj = <double>z[j] + gj - (pn - pow(nj, p)) / lr * <double>w[j]
        z[j] = <float>zj
        n[j] = <float>nn
        if fabs(zj) <= l1:
            w[j] = 0.0
        elif zj > 0:
            w[j] = <float>(-(zj - l1) / (pn / lr + l2))
        else:
            w[j] = <float>(-(zj + l1) / (pn / lr + l2))
