# Fused sparse optimizer updates of one row (included by table.pyx).
#
# Every update reads the row's float32 weights, state and gradient once, computes in
# float64 and stores float32 once. The textbook equations (and their NumPy twins) are in
# hpctrain.sparse.optimizers; g below already includes weight decay: g = grad + wd * w.

from libc.math cimport fabs, pow, sqrt

# Adagrad, Adam and FTRL take square roots: their loops are in table_optim.h, in AVX-512,
# AVX2 and scalar variants that compute the same numbers, the widest this CPU runs chosen
# at import (HPCTRAIN_SIMD caps it, for tests and benchmarks).
cdef extern from "table_optim.h":
    int ht_optim_init(int cap) noexcept nogil
    void ht_upd_adagrad(float* w, float* a, const float* g, int64_t d, double lr, double eps,
                        double wd) noexcept nogil
    void ht_upd_adam(float* w, float* m, float* v, const float* g, int64_t d, double lr,
                     double b1, double b2, double eps, double wd, double bc1,
                     double bc2) noexcept nogil
    void ht_upd_ftrl_sqrt(float* w, float* z, float* n, const float* g, int64_t d, double lr,
                          double l1, double l2, double wd) noexcept nogil

SIMD_LEVELS = ("scalar", "avx2", "avx512f")


def _init_simd():
    import os
    cap = os.environ.get("HPCTRAIN_SIMD", "").strip() or "avx512f"
    if cap not in SIMD_LEVELS:
        raise ValueError(f"HPCTRAIN_SIMD={cap!r}: expected one of {', '.join(SIMD_LEVELS)}")
    return SIMD_LEVELS[ht_optim_init(SIMD_LEVELS.index(cap))]


_simd = _init_simd()


def simd_level():
    """The variant of the square-root optimizer updates in use: "avx512f", "avx2" or
    "scalar" (the widest this CPU runs, at most HPCTRAIN_SIMD)."""
    return _simd


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


cdef struct OptArgs:
    # one table's optimizer: kind, hyper-parameters, row width and state arrays
    int kind
    int64_t dim
    float* slot0
    float* slot1
    int64_t* opt_step
    double lr, mu, b1, b2, eps, l1, l2, lrp, wd


cdef inline void update_row(const OptArgs* a, float* w, int64_t r, const float* g) noexcept nogil:
    """The fused update of row r, whose float32 weights are at w (in place, or a widened copy
    of a reduced-precision row)."""
    cdef int64_t dim = a.dim, t
    cdef int kind = a.kind
    if kind == OPT_SGD:
        upd_sgd(w, g, dim, a.lr, a.wd)
    elif kind == OPT_MOMENTUM or kind == OPT_NESTEROV:
        upd_momentum(w, a.slot0 + r * dim, g, dim, a.lr, a.mu, kind == OPT_NESTEROV, a.wd)
    elif kind == OPT_ADAGRAD:
        upd_adagrad(w, a.slot0 + r * dim, g, dim, a.lr, a.eps, a.wd)
    elif kind == OPT_ROWWISE_ADAGRAD:
        upd_rowwise_adagrad(w, a.slot0 + r, g, dim, a.lr, a.eps, a.wd)
    elif kind == OPT_ADAM:
        t = a.opt_step[r] + 1
        a.opt_step[r] = t
        upd_adam(w, a.slot0 + r * dim, a.slot1 + r * dim, g, dim, a.lr, a.b1, a.b2, a.eps, a.wd, t)
    else:
        upd_ftrl(w, a.slot0 + r * dim, a.slot1 + r * dim, g, dim, a.lr, a.l1, a.l2, a.lrp, a.wd)
