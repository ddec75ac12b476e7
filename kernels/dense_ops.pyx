# cython: language_level=3
"""Fused element-wise kernels of the dense step on NumPy (hpctrain.dense calls them).

Everything in a DLRM step that is not a matrix product, each as one pass over its data,
split over the rank's threads (``_openmp.get_num_threads``): bias + ReLU after a GEMM,
ReLU backward with the bias gradient's column sums, the dot interaction's packing of
``T = [x, e_1, ..., e_F]`` and its triangle gather/scatter, BCE-with-logits with its
gradient, and the Adam and Adagrad updates of the flat parameter buffer. Arrays are
float32 or float64 (one fused type ``real``: every argument of a call has the same one).

Numbers. Bias + ReLU, ReLU backward, the copies and the optimizer updates do the float
operations of the NumPy code they replace in the same order (``y * (y > 0)``, ``p * wd + g``,
...), so they give the same bits (``-ffp-contract=off``: no fused multiply-adds). The
reductions (bias gradient, loss sum) add in float64 over fixed chunks of ``SUM_ROWS`` rows,
chunk after chunk: their bits do not depend on the thread count nor on how a caller
splits the rows into blocks. The loss uses libm's ``exp``/``log1p`` where NumPy has its
own: the loss and its gradient may differ from NumPy's in the last bit.
"""
from cython.parallel cimport prange
from libc.math cimport exp, expf, log1p, log1pf
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset

from hpctrain._kernels._openmp import get_num_threads

cdef extern from "dense_ops.h" nogil:
    void hp_bias_act_f32(float* y, const float* b, int64_t rows, int64_t cols, int relu)
    void hp_bias_act_f64(double* y, const double* b, int64_t rows, int64_t cols, int relu)
    void hp_grad_rows_f32(const float* dy, const float* y, float* dz, double* acc,
                          int64_t rows, int64_t cols)
    void hp_grad_rows_f64(const double* dy, const double* y, double* dz, double* acc,
                          int64_t rows, int64_t cols)
    void hp_adam_f32(float* p, const float* g, float* m, float* v, int64_t n, float b1,
                     float c1, float b2, float c2, float eps, float lr, float wd, float dec,
                     int has_wd, int has_dec)
    void hp_adam_f64(double* p, const double* g, double* m, double* v, int64_t n, double b1,
                     double c1, double b2, double c2, double eps, double lr, double wd,
                     double dec, int has_wd, int has_dec)
    void hp_adagrad_f32(float* p, const float* g, float* acc, int64_t n, float lr, float eps,
                        float wd, int has_wd)
    void hp_adagrad_f64(double* p, const double* g, double* acc, int64_t n, double lr,
                        double eps, double wd, int has_wd)

ctypedef fused real:
    float
    double

#: Rows per partial sum of ``act_grad_colsum`` and ``bce_with_logits``: a sum over rows
#: adds each chunk of this many rows in row order, then the chunks in order.
SUM_ROWS = 64
cdef enum:
    _SUM_ROWS = 64

include "parallel_threshold.pxi"


def _shape_error(what, got, want):
    return ValueError(f"dense_ops.{what}: shape {tuple(got)}, expected {tuple(want)}")


# ------------------------------------------------------------------------- Linear layers

cdef inline void _bias_act(real* y, const real* b, Py_ssize_t rows, Py_ssize_t cols,
                           bint relu) noexcept nogil:
    if real is float:
        hp_bias_act_f32(y, b, rows, cols, relu)
    else:
        hp_bias_act_f64(y, b, rows, cols, relu)


# Rows per parallel work item of the row-wise kernels.
cdef enum:
    _ROW_BLOCK = 16


def bias_act(real[:, ::1] y, real[::1] bias, bint relu):
    """In place: ``y += bias`` (when not None), then ``y *= (y > 0)`` when ``relu``.

    The backward pass reads the ReLU mask off the output's sign (``y > 0``), so none is kept.
    """
    cdef Py_ssize_t rows = y.shape[0], cols = y.shape[1], i
    cdef const real* bp = NULL
    if bias is not None:
        if bias.shape[0] != cols:
            raise _shape_error("bias_act bias", (bias.shape[0],), (cols,))
        bp = &bias[0]
    if rows == 0 or cols == 0:
        return
    cdef int nt = _threads(rows * cols * sizeof(real))
    cdef Py_ssize_t nb = (rows + _ROW_BLOCK - 1) // _ROW_BLOCK
    for i in prange(nb, nogil=True, num_threads=nt, schedule="static"):
        _bias_act(&y[i * _ROW_BLOCK, 0], bp, min(_ROW_BLOCK, rows - i * _ROW_BLOCK), cols, relu)


cdef inline void _grad_rows(const real* dy, const real* y, real* dz, double* acc,
                            Py_ssize_t rows, Py_ssize_t cols) noexcept nogil:
    if real is float:
        hp_grad_rows_f32(dy, y, dz, acc, rows, cols)
    else:
        hp_grad_rows_f64(dy, y, dz, acc, rows, cols)


def act_grad_colsum(const real[:, ::1] dy, const real[:, ::1] y, real[:, ::1] dz,
                    double[:, ::1] partial, Py_ssize_t row0):
    """ReLU backward and the bias gradient's partial sums of rows ``row0 .. row0 + len(dy)``.

    ``dz = dy * (y > 0)`` (``y`` the ReLU output; with ``y`` None there is no ReLU and ``dz``,
    which may be None, is not written), and for every chunk ``c`` of ``SUM_ROWS`` rows
    (global rows ``c * SUM_ROWS ...``) ``partial[c] += `` its rows of ``dz`` in row order, in
    float64 (``partial`` None: no sums). A chunk that starts in this call starts from 0, one
    that started in the previous call (whose rows end at ``row0``) continues its sum:
    splitting the rows into blocks at any boundary gives the same bits. ``colsum_finish``
    adds the chunks.
    """
    cdef Py_ssize_t rows = dy.shape[0], cols = dy.shape[1]
    cdef bint relu = y is not None, sums = partial is not None
    if not relu and not sums:
        raise ValueError("dense_ops.act_grad_colsum: neither y nor partial given")
    if relu and (y.shape[0] != rows or y.shape[1] != cols):
        raise _shape_error("act_grad_colsum y", (y.shape[0], y.shape[1]), (rows, cols))
    if relu and dz is None:
        raise ValueError("dense_ops.act_grad_colsum: dz is None with y given")
    if relu and (dz.shape[0] != rows or dz.shape[1] != cols):
        raise _shape_error("act_grad_colsum dz", (dz.shape[0], dz.shape[1]), (rows, cols))
    if row0 < 0:
        raise ValueError(f"dense_ops.act_grad_colsum: row0 must be >= 0, got {row0}")
    if rows == 0:
        return
    cdef Py_ssize_t c0 = row0 // _SUM_ROWS, c1 = (row0 + rows - 1) // _SUM_ROWS + 1
    if sums and (partial.shape[0] < c1 or partial.shape[1] != cols):
        raise _shape_error("act_grad_colsum partial", (partial.shape[0], partial.shape[1]),
                           (c1, cols))
    if cols == 0:
        return
    cdef int nt = _threads(rows * cols * sizeof(real) * (3 if relu else 1))
    cdef Py_ssize_t c, lo, hi
    for c in prange(c0, c1, nogil=True, num_threads=nt, schedule="static"):
        lo = c * _SUM_ROWS
        if lo < row0:
            lo = row0
        elif sums:
            memset(&partial[c, 0], 0, cols * sizeof(double))
        hi = (c + 1) * _SUM_ROWS
        if hi > row0 + rows:
            hi = row0 + rows
        _grad_rows(&dy[lo - row0, 0], &y[lo - row0, 0] if relu else NULL,
                   &dz[lo - row0, 0] if relu else NULL, &partial[c, 0] if sums else NULL,
                   hi - lo, cols)


def colsum_finish(const double[:, ::1] partial, Py_ssize_t rows, real[::1] out):
    """``out[j] = sum of partial[c, j]`` over the chunks of ``rows`` rows, in chunk order."""
    cdef Py_ssize_t n = (rows + _SUM_ROWS - 1) // _SUM_ROWS, cols = out.shape[0], c, j
    if partial.shape[0] < n or partial.shape[1] != cols:
        raise _shape_error("colsum_finish partial", (partial.shape[0], partial.shape[1]),
                           (n, cols))
    cdef double s
    with nogil:
        for j in range(cols):
            s = 0.0
            for c in range(n):
                s = s + partial[c, j]
            out[j] = <real>s


# ------------------------------------------------------------------ DLRM dot interaction

def pack_rows(list arrays, real[:, :, ::1] t, real[:, :, ::1] copy, Py_ssize_t row0):
    """``t[r, k, :] = arrays[k][row0 + r, :]``: rows of ``n`` ``[B, d]`` arrays (any row
    stride, unit column stride) side by side, for one block of ``len(t)`` rows; and, unless
    None, the same into ``copy``. ``t @ copy.mT`` is a GEMM; ``t @ t.mT``, one buffer twice,
    NumPy hands to BLAS's syrk, 2-3 times slower on these small matrices."""
    cdef Py_ssize_t rows = t.shape[0], n = t.shape[1], d = t.shape[2], k, r
    if len(arrays) != n:
        raise ValueError(f"dense_ops.pack_rows: {len(arrays)} arrays for {n} slots")
    cdef bint twice = copy is not None
    if twice and (copy.shape[0] != rows or copy.shape[1] != n or copy.shape[2] != d):
        raise _shape_error("pack_rows copy", (copy.shape[0], copy.shape[1], copy.shape[2]),
                           (rows, n, d))
    cdef real[:, :] a
    cdef int64_t[::1] addr = _int64_buffer(n)
    cdef int64_t[::1] stride = _int64_buffer(n)
    for k in range(n):
        a = arrays[k]
        if a.shape[1] != d or a.shape[0] < row0 + rows or row0 < 0:
            raise _shape_error(f"pack_rows array {k}", (a.shape[0], a.shape[1]),
                               (row0 + rows, d))
        if d and a.strides[1] != sizeof(real):
            raise ValueError(f"dense_ops.pack_rows: array {k} has a column stride of "
                             f"{a.strides[1]} bytes, expected {sizeof(real)}")
        if rows and d:
            addr[k] = <int64_t>&a[row0, 0]
        stride[k] = a.strides[0]
    if rows == 0 or d == 0:
        return
    cdef int nt = _threads(rows * n * d * sizeof(real) * (3 if twice else 2))
    for r in prange(rows, nogil=True, num_threads=nt, schedule="static"):
        _pack_row(&t[r, 0, 0], &copy[r, 0, 0] if twice else NULL, &addr[0], &stride[0], r, n,
                  d)


cdef inline void _pack_row(real* dst, real* dst2, const int64_t* addr, const int64_t* stride,
                           Py_ssize_t r, Py_ssize_t n, Py_ssize_t d) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(n):
        memcpy(dst + k * d, <const char*>addr[k] + r * stride[k], d * sizeof(real))
    if dst2 != NULL:  # from the row just written, in L1
        memcpy(dst2, dst, n * d * sizeof(real))


cdef _int64_buffer(Py_ssize_t n):
    import numpy as np
    return np.empty(n, dtype=np.int64)


def tri_gather(const real[:, :, ::1] z, const real[:, :, ::1] t, real[:, ::1] y,
               bint self_interaction):
    """``y = [t[:, 0, :] | z[:, 1, :1] | z[:, 2, :2] | ... | z[:, n-1, :n-1]]`` per row, the
    lower triangle of each ``n x n`` ``z`` row by row (diagonal included with
    ``self_interaction``): DotInteraction's output."""
    cdef Py_ssize_t rows = z.shape[0], n = z.shape[1], d = t.shape[2], r
    cdef Py_ssize_t k = 1 if self_interaction else 0
    cdef Py_ssize_t width = d + n * (n - 1) // 2 + k * n
    if z.shape[2] != n:
        raise _shape_error("tri_gather z", (rows, n, z.shape[2]), (rows, n, n))
    if t.shape[0] != rows or t.shape[1] != n:
        raise _shape_error("tri_gather t", (t.shape[0], t.shape[1], t.shape[2]), (rows, n, d))
    if y.shape[0] != rows or y.shape[1] != width:
        raise _shape_error("tri_gather y", (y.shape[0], y.shape[1]), (rows, width))
    if rows == 0:
        return
    cdef int nt = _threads(rows * (n * n + width) * sizeof(real))
    for r in prange(rows, nogil=True, num_threads=nt, schedule="static"):
        _gather_row(&z[r, 0, 0], &t[r, 0, 0], &y[r, 0], n, d, k)


cdef inline void _gather_row(const real* z, const real* t, real* y, Py_ssize_t n,
                             Py_ssize_t d, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t i, m
    memcpy(y, t, d * sizeof(real))
    y += d
    for i in range(n):
        m = i + k
        memcpy(y, z + i * n, m * sizeof(real))
        y += m


def tri_scatter(const real[:, ::1] g, real[:, :, ::1] dz, bint self_interaction):
    """The gradient of ``tri_gather`` into a symmetric ``dz`` (every entry written): pair
    ``(i, j)``'s column of ``g`` at ``dz[:, i, j]`` and ``dz[:, j, i]``; the diagonal twice
    its column with ``self_interaction``, else 0. ``g``'s first ``d`` columns are skipped."""
    cdef Py_ssize_t rows = dz.shape[0], n = dz.shape[1], r
    cdef Py_ssize_t k = 1 if self_interaction else 0
    cdef Py_ssize_t pairs = n * (n - 1) // 2 + k * n
    if dz.shape[2] != n or g.shape[0] != rows or g.shape[1] < pairs:
        raise _shape_error("tri_scatter g", (g.shape[0], g.shape[1]), (rows, f"d + {pairs}"))
    if rows == 0:
        return
    cdef Py_ssize_t d = g.shape[1] - pairs
    cdef int nt = _threads(rows * (n * n + pairs) * sizeof(real))
    for r in prange(rows, nogil=True, num_threads=nt, schedule="static"):
        _scatter_row(&g[r, 0] + d, &dz[r, 0, 0], n, k)


cdef inline void _scatter_row(const real* g, real* dz, Py_ssize_t n,
                              Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t i, j
    for i in range(n):
        for j in range(i):
            dz[i * n + j] = g[j]
            dz[j * n + i] = g[j]
        dz[i * n + i] = 2 * g[i] if k else 0
        g += i + k


# ------------------------------------------------------------------------------- loss

def bce_with_logits(const real[::1] z, const real[::1] y, real[::1] grad, double scale):
    """BCE on logits: returns the sum over samples of ``max(z, 0) - z y + log1p(exp(-|z|))``
    (float64 over chunks of ``SUM_ROWS`` samples, rounded to the logits' dtype) and writes
    ``grad = (sigmoid(z) - y) * scale``, ``sigmoid(z) = [1 or e] / (1 + e)``, ``e = exp(-|z|)``."""
    cdef Py_ssize_t n = z.shape[0], nc = (n + _SUM_ROWS - 1) // _SUM_ROWS, c
    if y.shape[0] != n or grad.shape[0] != n:
        raise _shape_error("bce_with_logits", (y.shape[0], grad.shape[0]), (n, n))
    if n == 0:
        return 0.0
    import numpy as np
    cdef double[::1] part = np.empty(nc, dtype=np.float64)
    cdef real s = <real>scale
    cdef int nt = _threads(n * sizeof(real) * 3)
    for c in prange(nc, nogil=True, num_threads=nt, schedule="static"):
        part[c] = _bce_chunk(&z[0], &y[0], &grad[0], c * _SUM_ROWS,
                             min((c + 1) * _SUM_ROWS, n), s)
    cdef double total = 0.0
    for c in range(nc):
        total = total + part[c]
    return <real>total


cdef inline double _bce_chunk(const real* z, const real* y, real* grad, Py_ssize_t lo,
                              Py_ssize_t hi, real scale) noexcept nogil:
    cdef double acc = 0.0
    cdef real zi, e, sig, per
    cdef Py_ssize_t i
    for i in range(lo, hi):
        zi = z[i]
        if real is float:
            e = expf(-zi if zi >= 0 else zi)
            per = log1pf(e)
        else:
            e = exp(-zi if zi >= 0 else zi)
            per = log1p(e)
        per = per + (zi if zi > 0 else 0)
        per = per - zi * y[i]
        acc += per
        sig = (<real>1 if zi >= 0 else e) / (1 + e)
        grad[i] = (sig - y[i]) * scale
    return acc


# -------------------------------------------------------------------------- optimizers

# Elements per parallel work item of the optimizer updates.
cdef enum:
    _FLAT_BLOCK = 16384

def _check_flat(what, Py_ssize_t n, lengths):
    for k, m in enumerate(lengths):
        if m != n:
            raise ValueError(f"dense_ops.{what}: buffer {k + 1} has {m} elements, "
                             f"the parameters {n}")


def adam(real[::1] p, const real[::1] g, real[::1] m, real[::1] v, double beta1,
         double beta2, double eps, double step_size, double weight_decay, double decay):
    """One Adam step over flat buffers, the NumPy rule's operations in its order::

        p *= decay                           (decay != 1: AdamW's decoupled decay)
        g' = p * weight_decay + g            (weight_decay != 0: L2 folded into g)
        m = m * b1 + g' * (1 - b1);  v = v * b2 + (g' * g') * (1 - b2)
        p -= m / (sqrt(v) + eps) * step_size

    with every constant rounded to the buffers' dtype first (``eps`` and ``step_size``
    already bias-corrected by the caller).
    """
    _check_flat("adam", p.shape[0], (g.shape[0], m.shape[0], v.shape[0]))
    cdef Py_ssize_t n = p.shape[0], i
    cdef real b1 = <real>beta1, c1 = <real>(1.0 - beta1), b2 = <real>beta2
    cdef real c2 = <real>(1.0 - beta2), e = <real>eps, lr = <real>step_size
    cdef real wd = <real>weight_decay, dec = <real>decay
    cdef bint has_wd = weight_decay != 0.0, has_decay = decay != 1.0
    cdef int nt = _threads(n * sizeof(real) * 7)
    cdef Py_ssize_t nb = (n + _FLAT_BLOCK - 1) // _FLAT_BLOCK, lo
    for i in prange(nb, nogil=True, num_threads=nt, schedule="static"):
        lo = i * _FLAT_BLOCK
        if real is float:
            hp_adam_f32(&p[lo], &g[lo], &m[lo], &v[lo], min(_FLAT_BLOCK, n - lo), b1, c1, b2,
                        c2, e, lr, wd, dec, has_wd, has_decay)
        else:
            hp_adam_f64(&p[lo], &g[lo], &m[lo], &v[lo], min(_FLAT_BLOCK, n - lo), b1, c1, b2,
                        c2, e, lr, wd, dec, has_wd, has_decay)


def adagrad(real[::1] p, const real[::1] g, real[::1] acc, double lr, double eps,
            double weight_decay):
    """One Adagrad step over flat buffers, the NumPy rule's operations in its order::

        g' = p * weight_decay + g            (weight_decay != 0)
        acc += g' * g';  p -= g' / (sqrt(acc) + eps) * lr
    """
    _check_flat("adagrad", p.shape[0], (g.shape[0], acc.shape[0]))
    cdef Py_ssize_t n = p.shape[0], i
    cdef real r_lr = <real>lr, e = <real>eps, wd = <real>weight_decay
    cdef bint has_wd = weight_decay != 0.0
    cdef int nt = _threads(n * sizeof(real) * 5)
    cdef Py_ssize_t nb = (n + _FLAT_BLOCK - 1) // _FLAT_BLOCK, lo
    for i in prange(nb, nogil=True, num_threads=nt, schedule="static"):
        lo = i * _FLAT_BLOCK
        if real is float:
            hp_adagrad_f32(&p[lo], &g[lo], &acc[lo], min(_FLAT_BLOCK, n - lo), r_lr, e, wd,
                           has_wd)
        else:
            hp_adagrad_f64(&p[lo], &g[lo], &acc[lo], min(_FLAT_BLOCK, n - lo), r_lr, e, wd,
                           has_wd)
