"""Feature-interaction layers: DLRM dot products, factorization machine, DCN-v2 cross.

Embedding gradients are returned as ``[B, d]`` views of a workspace (valid until
the next backward, possibly row-strided): the consumer packs them as it needs
(the sparse side concatenates per table, a GPU stages them for one transfer), so
no copy is made here that would be made again there.
"""

import numpy as np

from hpctrain.dense.backend import blas_threads, fused_kernels
from hpctrain.dense.layers import Layer


def _check_embs(who, embs, num, dim, batch):
    if len(embs) != num:
        raise ValueError(f"{who}: expected {num} embeddings, got {len(embs)}")
    for i, e in enumerate(embs):
        if e.ndim != 2 or e.shape[0] != batch or (dim is not None and e.shape[1] != dim):
            raise ValueError(f"{who}: embedding {i} has shape {tuple(e.shape)}, "
                             f"expected ({batch}, {dim if dim is not None else 'd'})")


def _parallel_map(fn, items):
    from hpctrain.workpool import parallel_map   # imports the kernels: only when used
    return parallel_map(fn, items)


class DotInteraction(Layer):
    """DLRM's interaction: pairwise dot products of the bottom-MLP output and the embeddings.

    With ``T = [x, e_1, ..., e_F]`` (``n = F + 1`` vectors of width ``d`` per sample),
    the output is ``[x, <T_i, T_j> for i > j]`` (``i >= j`` with ``self_interaction``),
    of width ``d + n(n-1)/2``, in row-major lower-triangle order (as in the DLRM paper)::

        Z = T @ T^T  [B, n, n]      row i of the lower triangle, Z[:, i, :i], is one
        y = [x | Z[:,1,:1] | Z[:,2,:2] | ... | Z[:,n-1,:n-1]]   contiguous slice of y

    On NumPy a batch is processed in row blocks whose T and Z stay in cache, and the
    packing of T (into two buffers: NumPy hands ``T @ T.mT``, one buffer twice, to BLAS's
    syrk, 2-3 times slower on these small matrices than a GEMM of T with a copy), the
    triangle's gather and its gradient's scatter are one fused kernel each
    (``hpctrain._kernels.dense_ops``: ``pack_rows``, ``tri_gather``, ``tri_scatter``, over
    the rank's threads). NumPy hands a batched product of such small matrices to BLAS one
    matrix at a time, on one core whatever its thread count, so with several kernel
    threads the row blocks themselves are spread over the threads
    (``hpctrain.workpool.parallel_map``; each block's work on one thread, the same
    bits for any thread count). The generic path (CuPy) copies row by row through slices
    (n-1 copies each) rather than fancy indexing, which runs about twice as slowly.

    Args:
        xp, dtype: array module and dtype.
        num_features: F, the number of embeddings.
        dim: d, width of x and of every embedding.
        self_interaction: include ``<T_i, T_i>``.
    """

    BLOCK_BYTES = 1 << 21

    def __init__(self, xp, dtype, num_features, dim, self_interaction=False):
        super().__init__(xp, dtype)
        n = num_features + 1
        self.num_features, self.dim, self.n = num_features, dim, n
        self.self_interaction = self_interaction
        k = 1 if self_interaction else 0
        # (row i, first output column, row length) for every non-empty triangle row.
        self._rows, col = [], dim
        for i in range(n):
            if i + k:
                self._rows.append((i, col, i + k))
                col += i + k
        self.num_pairs = col - dim
        self.out_dim = col
        self.block_rows = None  # None: from BLOCK_BYTES
        self._t = None

    def _blocks(self, rows, parallel=False):
        """Row blocks sized so a block's T and Z stay in cache between the copies and the
        batched product (NumPy); CuPy runs the whole batch at once. ``parallel``: each
        block runs on one thread (else BLAS's threads share a block)."""
        if self.xp.__name__ != "numpy":
            return ((0, rows),)
        block = self.block_rows
        if block is None:
            per_row = (self.n * self.dim + self.n * self.n) * np.dtype(self.dtype).itemsize
            block = max(128, self.BLOCK_BYTES * (1 if parallel else blas_threads()) // per_row)
        return tuple((lo, min(lo + block, rows)) for lo in range(0, rows, block))

    def _plan(self, fused, rows):
        """``(parallel, blocks)``: whether the fused path spreads its row blocks over the
        kernel threads (one block per thread at a time), and the blocks."""
        if fused is not None:
            from hpctrain._kernels import _openmp   # loaded with the fused kernels, not before
            if _openmp.get_num_threads() > 1:
                blocks = self._blocks(rows, True)
                if len(blocks) > 1:
                    return True, blocks
        return False, self._blocks(rows)

    def forward(self, x, embs, training=True):
        b, d, n = x.shape[0], self.dim, self.n
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"DotInteraction: x has shape {tuple(x.shape)}, expected (B, {d})")
        _check_embs("DotInteraction", embs, self.num_features, d, b)
        xp, ws = self.xp, self.ws
        t_all = ws.get("T", (b, n, d))
        y_all = ws.get("y", (b, self.out_dim))
        fused = fused_kernels(xp, self.dtype)
        parallel, blocks = self._plan(fused, b)
        if fused is not None:
            rows = [x, *embs]
            if parallel:
                # every block its own stretch of T's copy and Z, one thread each
                t2_all, z_all = ws.get("T2all", (b, n, d)), ws.get("Zall", (b, n, n))

                def one(block):
                    lo, hi = block
                    t = t_all[lo:hi]
                    fused.pack_rows(rows, t, t2_all[lo:hi], lo)
                    xp.matmul(t, t2_all[lo:hi].transpose(0, 2, 1), out=z_all[lo:hi])
                    fused.tri_gather(z_all[lo:hi], t, y_all[lo:hi], self.self_interaction)
                _parallel_map(one, blocks)
                self._t = t_all
                return y_all
            # T's copy and Z live only within a block: one block's worth, reused, stays in
            # cache instead of going out to memory and back.
            most = max((hi - lo for lo, hi in blocks), default=0)
            t2_blk, z_blk = ws.get("T2", (most, n, d)), ws.get("Zblock", (most, n, n))
            for lo, hi in blocks:
                t, t2, z = t_all[lo:hi], t2_blk[:hi - lo], z_blk[:hi - lo]
                fused.pack_rows(rows, t, t2, lo)
                xp.matmul(t, t2.transpose(0, 2, 1), out=z)
                fused.tri_gather(z, t, y_all[lo:hi], self.self_interaction)
            self._t = t_all
            return y_all
        z_all = ws.get("Z", (b, n, n))
        for lo, hi in blocks:
            t, z, y = t_all[lo:hi], z_all[lo:hi], y_all[lo:hi]
            t[:, 0, :] = x[lo:hi]
            for i, e in enumerate(embs):
                t[:, i + 1, :] = e[lo:hi]
            xp.matmul(t, t.transpose(0, 2, 1), out=z)
            y[:, :d] = x[lo:hi]
            for i, c, m in self._rows:
                y[:, c:c + m] = z[:, i, :m]
        self._t = t_all
        return y_all

    def backward(self, dy):
        """Returns ``(dx [B, d], [d_emb_i [B, d] for i in range(F)])``.

        The embedding gradients are row-strided views of one ``[B, F + 1, d]`` workspace.
        """
        xp, ws, t_all = self.xp, self.ws, self._t
        b, d, n = t_all.shape[0], self.dim, self.n
        fused = fused_kernels(xp, self.dtype)
        if fused is not None and not dy.flags.c_contiguous:
            dy = xp.ascontiguousarray(dy)
        # Symmetric dZ so that dT = dZ @ T covers both d<Ti,Tj>/dTi and d/dTj. Entries
        # outside the pair positions stay zero from the buffer's first allocation (the
        # fused scatter writes every entry, zeros included, into one block's dZ).
        parallel, blocks = self._plan(fused, b)
        dt_all = ws.get("dT", (b, n, d))
        dx = ws.get("dx", (b, d))
        if parallel:
            dz_all = ws.get("dZall", (b, n, n))

            def one(block):
                lo, hi = block
                fused.tri_scatter(dy[lo:hi], dz_all[lo:hi], self.self_interaction)
                xp.matmul(dz_all[lo:hi], t_all[lo:hi], out=dt_all[lo:hi])
                xp.add(dy[lo:hi, :d], dt_all[lo:hi, 0, :], out=dx[lo:hi])
            _parallel_map(one, blocks)
            return dx, [dt_all[:, i + 1, :] for i in range(self.num_features)]
        if fused is not None:
            dz_all = ws.get("dZblock", (max((hi - lo for lo, hi in blocks), default=0), n, n))
        else:
            dz_all = ws.zeros("dZ", (b, n, n))
        for lo, hi in blocks:
            g0 = dy[lo:hi]
            if fused is not None:
                dz = dz_all[:hi - lo]
                fused.tri_scatter(g0, dz, self.self_interaction)
            else:
                dz = dz_all[lo:hi]
                for i, c, m in self._rows:
                    g = g0[:, c:c + m]
                    dz[:, i, :m] = g
                    dz[:, :m, i] = g
                if self.self_interaction:
                    diag = dz.reshape(hi - lo, n * n)[:, ::n + 1]
                    diag *= 2
            xp.matmul(dz, t_all[lo:hi], out=dt_all[lo:hi])
            xp.add(g0[:, :d], dt_all[lo:hi, 0, :], out=dx[lo:hi])
        return dx, [dt_all[:, i + 1, :] for i in range(self.num_features)]


class FMInteraction(Layer):
    """Second-order factorization-machine term: ``sum_{i<j} <e_i, e_j>`` per sample.

    Computed as ``0.5 * sum_k ((sum_i e_ik)^2 - sum_i e_ik^2)`` in O(F k).

    Args:
        xp, dtype: array module and dtype.
        num_features: F.
        dim: k, width of every embedding.
    """

    def __init__(self, xp, dtype, num_features, dim):
        super().__init__(xp, dtype)
        self.num_features, self.dim = num_features, dim
        self._e = self._s = None

    def forward(self, embs, training=True):
        """Returns ``[B]``."""
        b = embs[0].shape[0] if embs else 0
        _check_embs("FMInteraction", embs, self.num_features, self.dim, b)
        xp, ws = self.xp, self.ws
        e = ws.get("E", (self.num_features, b, self.dim))
        for i, v in enumerate(embs):
            e[i] = v
        s = xp.sum(e, axis=0, out=ws.get("S", (b, self.dim)))
        # (sum_i e_i)^2 - sum_i e_i^2 per column, then over columns; plain ufuncs with
        # out= behave the same on NumPy and CuPy (einsum's out= does not).
        sq = xp.multiply(e, e, out=ws.get("E2", e.shape))
        q = xp.sum(sq, axis=0, out=ws.get("Q", s.shape))
        ss = xp.multiply(s, s, out=ws.get("SS", s.shape))
        ss -= q
        y = xp.sum(ss, axis=1, out=ws.get("y", (b,)))
        y *= 0.5
        self._e, self._s = e, s
        return y

    def backward(self, dy):
        """Returns ``[d_emb_i [B, k] for i in range(F)]``."""
        xp, e, s = self.xp, self._e, self._s
        de = self.ws.get("dE", e.shape)
        xp.subtract(s[None, :, :], e, out=de)
        de *= dy[None, :, None]
        return [de[i] for i in range(self.num_features)]


class CrossLayer(Layer):
    """One DCN-v2 cross layer: ``x_{l+1} = x0 * (x_l @ W + b) + x_l``, W ``[D, D]``.

    Args:
        params, name: where to declare ``NAME.weight``/``NAME.bias``.
        dim: D, the width of x0 and x_l.
    """

    def __init__(self, params, name, dim):
        super().__init__(params.xp, params.dtype)
        self.name, self.dim, self.pset = name, dim, params
        self.weight = params.add(f"{name}.weight", (dim, dim), "xavier")
        self.bias = params.add(f"{name}.bias", (dim,), "zeros")
        self.params = (self.weight, self.bias)
        self._x0 = self._xl = self._u = None

    def forward(self, x0, xl, training=True):
        if x0.shape != xl.shape or x0.ndim != 2 or x0.shape[1] != self.dim:
            raise ValueError(f"{self.name}: x0 {tuple(x0.shape)} and xl {tuple(xl.shape)} must "
                             f"both be (B, {self.dim})")
        xp, ws = self.xp, self.ws
        u = xp.matmul(xl, self.weight.data, out=ws.get("u", xl.shape))
        u += self.bias.data
        y = xp.multiply(x0, u, out=ws.get("y", xl.shape))
        y += xl
        self._x0, self._xl, self._u = x0, xl, u
        return y

    def backward(self, dy):
        """Returns ``(dx0, dxl)``."""
        xp, ws = self.xp, self.ws
        du = xp.multiply(dy, self._x0, out=ws.get("du", dy.shape))
        dx0 = xp.multiply(dy, self._u, out=ws.get("dx0", dy.shape))
        xp.matmul(self._xl.T, du, out=self.weight.grad)
        xp.sum(du, axis=0, out=self.bias.grad)
        self.pset.grad_ready(*self.params)
        dxl = xp.matmul(du, self.weight.data.T, out=ws.get("dxl", dy.shape))
        dxl += dy
        return dx0, dxl


class CrossNet(Layer):
    """A stack of ``num_layers`` DCN-v2 cross layers sharing the input x0."""

    def __init__(self, params, name, dim, num_layers):
        super().__init__(params.xp, params.dtype)
        self.layers = [CrossLayer(params, f"{name}.{i}", dim) for i in range(num_layers)]
        self.params = tuple(p for layer in self.layers for p in layer.params)

    def forward(self, x0, training=True):
        x = x0
        for layer in self.layers:
            x = layer.forward(x0, x, training)
        return x

    def backward(self, dy):
        acc = None
        for layer in reversed(self.layers):
            dx0, dy = layer.backward(dy)
            if acc is None:
                acc = self.ws.get("acc", dx0.shape)
                acc[...] = dx0
            else:
                acc += dx0
        if acc is None:
            return dy
        acc += dy
        return acc
