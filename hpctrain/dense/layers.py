"""Dense layers with explicit forward and backward, written once for NumPy and CuPy.

Conventions shared by every layer:

* ``forward`` keeps references to what ``backward`` needs (its input and output);
  the caller must not modify an input between a layer's forward and backward.
* Outputs and input gradients live in per-layer workspaces that are reused from
  one call to the next (no allocation in the steady state): a returned array is
  valid until the same layer's next ``forward``/``backward``. Copy it to keep it.
* Parameter gradients are *written* (not accumulated) into views of the flat
  gradient buffer, then announced with ``params.grad_ready`` so a bucketed
  allreduce can start while the rest of backward runs.
* Weights are ``[in, out]`` so that ``y = x @ W + b`` is one GEMM on row-major data.
* On NumPy the element-wise work between the GEMMs runs in the fused kernels of
  ``hpctrain._kernels.dense_ops`` (``backend.fused_kernels``); CuPy, and NumPy with
  ``backend.FUSED_KERNELS = False`` (the reference in tests), run the array code.
"""
from hpctrain.dense.backend import blas_threads, fused_kernels, make_rng, uniform


class Workspace:
    """Arrays cached by name and reallocated only when the requested shape changes."""

    def __init__(self, xp, dtype):
        self.xp, self.dtype = xp, dtype
        self._bufs = {}

    def get(self, key, shape, dtype=None):
        """An uninitialised array of ``shape`` for ``key`` (last call's array if it fits)."""
        dtype = self.dtype if dtype is None else dtype
        a = self._bufs.get(key)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = self.xp.empty(shape, dtype=dtype)
            self._bufs[key] = a
        return a

    def zeros(self, key, shape):
        """Like ``get`` but zero-filled when (re)allocated; the caller keeps the zeros it needs."""
        a = self._bufs.get(key)
        if a is None or a.shape != shape:
            a = self.xp.zeros(shape, dtype=self.dtype)
            self._bufs[key] = a
        return a


class Layer:
    """Base class: ``forward(x, training=True) -> y`` and ``backward(dy) -> dx``."""

    params = ()

    def __init__(self, xp, dtype):
        self.xp, self.dtype = xp, dtype
        self.ws = Workspace(xp, dtype)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


# --- activations --------------------------------------------------------------------------
# In-place forms on caller-provided buffers, so Linear can apply them block by block.

def relu_(xp, y, mask):
    """In-place ReLU of ``y``, leaving ``y > 0`` in the bool array ``mask``.

    ``y *= (y > 0)`` keeping the mask costs less than ``maximum(y, 0)`` plus recomputing
    the mask in backward (NumPy's maximum against a scalar is slow).
    """
    xp.greater(y, 0, out=mask)
    return xp.multiply(y, mask, out=y)


def relu_grad(xp, dy, mask, out):
    """``out = dy * mask``."""
    return xp.multiply(dy, mask, out=out)


def sigmoid_(xp, y):
    """In-place logistic function of ``y``, stable for large ``|y|``."""
    # exp(-y) overflows only to inf for y << 0, and 1/(1+inf) is the right 0; silence
    # the warning rather than branch per element.
    if xp.__name__ == "numpy":
        with xp.errstate(over="ignore"):
            xp.negative(y, out=y)
            xp.exp(y, out=y)
    else:
        xp.negative(y, out=y)
        xp.exp(y, out=y)
    y += 1
    return xp.reciprocal(y, out=y)


def sigmoid_grad(xp, dy, y, out):
    """``out = dy * y * (1 - y)`` (``y`` is the sigmoid output)."""
    xp.subtract(1, y, out=out)
    out *= y
    out *= dy
    return out


ACTIVATIONS = (None, "relu", "sigmoid")


class ReLU(Layer):
    """max(x, 0)."""

    def __init__(self, xp, dtype):
        super().__init__(xp, dtype)
        self._mask = None

    def forward(self, x, training=True):
        y = self.ws.get("y", x.shape)
        y[...] = x
        self._mask = self.ws.get("mask", x.shape, dtype=bool)
        return relu_(self.xp, y, self._mask)

    def backward(self, dy):
        return relu_grad(self.xp, dy, self._mask, self.ws.get("dx", dy.shape))


class Sigmoid(Layer):
    """1 / (1 + exp(-x))."""

    def __init__(self, xp, dtype):
        super().__init__(xp, dtype)
        self._y = None

    def forward(self, x, training=True):
        y = self.ws.get("y", x.shape)
        y[...] = x
        self._y = sigmoid_(self.xp, y)
        return y

    def backward(self, dy):
        return sigmoid_grad(self.xp, dy, self._y, self.ws.get("dx", dy.shape))


class Dropout(Layer):
    """Inverted dropout: zero each value with probability ``rate``, scale the rest by 1/(1-rate).

    The mask generator is seeded (``seed``), so a run is reproducible; data-parallel
    ranks should pass different seeds so their samples get independent masks.
    """

    def __init__(self, xp, dtype, rate, seed=0):
        super().__init__(xp, dtype)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.reseed(seed)
        self._mask = None

    def reseed(self, seed):
        """Restart the mask generator from ``seed``."""
        self.rng = make_rng(self.xp, seed)

    def forward(self, x, training=True):
        if not training or self.rate == 0.0:
            self._mask = None
            return x
        xp = self.xp
        mask = uniform(xp, self.rng, self.ws.get("mask", x.shape))
        # mask <- (u >= rate) / (1 - rate), kept in the compute dtype for one multiply.
        xp.greater_equal(mask, self.rate, out=mask)
        mask *= 1.0 / (1.0 - self.rate)
        self._mask = mask
        return xp.multiply(x, mask, out=self.ws.get("y", x.shape))

    def backward(self, dy):
        if self._mask is None:
            return dy
        return self.xp.multiply(dy, self._mask, out=self.ws.get("dx", dy.shape))


class Linear(Layer):
    """``y = act(x @ W + b)`` with W ``[in, out]``, optionally fused ReLU/sigmoid.

    On NumPy, batches are processed in row blocks of about ``BLOCK_BYTES`` of output
    per BLAS thread (or ``block_rows`` rows when set): each block's GEMM is followed at
    once by its bias and activation (and in backward the activation gradient by the
    input-gradient GEMM) while the block is still in the core's cache, which hides most
    of their memory traffic behind the GEMMs. The weight-gradient GEMM runs once over
    the whole batch. CuPy runs whole batches.

    On NumPy (float32/float64) bias and ReLU are one pass (``dense_ops.bias_act``), and
    ReLU backward with the bias gradient's column sums another
    (``dense_ops.act_grad_colsum``), over the whole batch unless ``block_rows`` is set
    (single passes gain nothing from the blocks): no mask is kept (the output's sign is
    the mask), and the bias gradient adds in float64 over fixed chunks of rows, the same
    bits for any block size and thread count. Sigmoid, and CuPy, run the array code.

    Args:
        params: the ``FlatParameters`` to declare ``NAME.weight`` and ``NAME.bias`` in.
        name: parameter name prefix.
        in_features, out_features: sizes.
        activation: None, "relu" or "sigmoid", applied in place on the output.
        init: weight init (``hpctrain.dense.params.init_values``); default "xavier_normal",
            N(0, sqrt(2 / (in + out))), the initialisation of the DLRM reference
            (facebookresearch/dlrm, ``dlrm_s_pytorch.py``, ``create_mlp``) for every layer.
        bias: whether there is a bias.
        bias_init: bias init; default N(0, sqrt(1 / out)), the DLRM reference's.
        input_grad: False when nothing needs ``dx`` (first layer on raw features):
            backward then skips one GEMM and returns None.
    """

    BLOCK_BYTES = 1 << 20  # per BLAS thread: a core's share of a block stays in its L2

    def __init__(self, params, name, in_features, out_features, activation=None, init=None,
                 bias=True, input_grad=True, bias_init=None):
        super().__init__(params.xp, params.dtype)
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: unknown activation {activation!r}; "
                             f"expected one of {list(ACTIVATIONS)}")
        self.name, self.in_features, self.out_features = name, int(in_features), int(out_features)
        self.activation = activation
        # The DLRM reference's initialisation: with He-scaled weights and zero biases, the
        # first Adagrad step (a step of lr on every weight) blew the loss up ~13x on the
        # DLRM benchmark; with these it never exceeds the first step's (benchmarks/README.md).
        init = init or "xavier_normal"
        if bias_init is None:
            bias_init = f"normal:{(1.0 / max(1, self.out_features)) ** 0.5!r}"
        self.pset = params
        self.weight = params.add(f"{name}.weight", (in_features, out_features), init)
        self.bias = params.add(f"{name}.bias", (out_features,), bias_init) if bias else None
        self.params = (self.weight,) + ((self.bias,) if bias else ())
        self.input_grad = input_grad
        self._x = self._y = self._mask = self._fused = None
        self._ones_rows = -1
        self.block_rows = None  # None: from BLOCK_BYTES and the BLAS thread count

    def _blocks(self, rows, fused=None):
        if self.xp.__name__ != "numpy":
            return ((0, rows),)
        step = self.block_rows
        if step is None and fused is not None:
            # One pass per kernel over the whole batch: at 2 BLAS threads 1-2% faster than
            # blocks (fewer GEMM calls, fewer wake-ups of the kernel threads), the same at 1.
            return ((0, rows),)
        if step is None:
            per_row = self.dtype.itemsize * max(1, self.out_features)
            step = max(256, self.BLOCK_BYTES * blas_threads() // per_row)
        if rows <= step:
            return ((0, rows),)
        return tuple((lo, min(lo + step, rows)) for lo in range(0, rows, step))

    def forward(self, x, training=True):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{self.name}: expected input [B, {self.in_features}], "
                             f"got {tuple(x.shape)}")
        xp, w, act = self.xp, self.weight.data, self.activation
        b = x.shape[0]
        y = self.ws.get("y", (b, self.out_features))
        bias = None if self.bias is None else self.bias.data
        fused = fused_kernels(xp, self.dtype) if act != "sigmoid" else None
        # The fused ReLU keeps no mask: backward reads it off the output's sign.
        mask = self.ws.get("mask", y.shape, dtype=bool) if act == "relu" and not fused else None
        for lo, hi in self._blocks(b, fused) if (act or bias is not None) else ((0, b),):
            yb = y[lo:hi]
            xp.matmul(x[lo:hi], w, out=yb)
            if fused is not None:
                if act or bias is not None:
                    fused.bias_act(yb, bias, act == "relu")
                continue
            if bias is not None:
                yb += bias
            if act == "relu":
                relu_(xp, yb, mask[lo:hi])
            elif act == "sigmoid":
                sigmoid_(xp, yb)
        self._x, self._y, self._mask = x, y, mask
        self._fused = fused
        return y

    def backward(self, dy):
        xp, w, act, x = self.xp, self.weight.data, self.activation, self._x
        b = x.shape[0]
        fused = self._fused
        if fused is not None and not dy.flags.c_contiguous:
            dy = xp.ascontiguousarray(dy)
        dz = dy if act is None else self.ws.get("dz", dy.shape)
        dx = self.ws.get("dx", x.shape) if self.input_grad else None
        # Fused: ReLU backward and the bias gradient's partial column sums in one pass
        # per block, in fixed chunks of rows (the same bits for any blocks and threads).
        partial = None
        if fused is not None and self.bias is not None:
            chunks = -(-b // fused.SUM_ROWS)
            partial = self.ws.get("bias_partial", (chunks, self.out_features), dtype=xp.float64)
        run = act or dx is not None or partial is not None
        for lo, hi in self._blocks(b, fused) if run else ():
            if fused is not None:
                if partial is not None or act:
                    fused.act_grad_colsum(dy[lo:hi], self._y[lo:hi] if act else None,
                                          dz[lo:hi] if act else None, partial, lo)
            elif act == "relu":
                relu_grad(xp, dy[lo:hi], self._mask[lo:hi], dz[lo:hi])
            elif act == "sigmoid":
                sigmoid_grad(xp, dy[lo:hi], self._y[lo:hi], dz[lo:hi])
            if dx is None:
                continue
            if self.out_features == 1:
                # An outer product: BLAS GEMM with k = 1 is several times slower than this.
                xp.multiply(dz[lo:hi], w.T, out=dx[lo:hi])
            else:
                xp.matmul(dz[lo:hi], w.T, out=dx[lo:hi])
        xp.matmul(x.T, dz, out=self.weight.grad)
        if partial is not None:
            fused.colsum_finish(partial, b, self.bias.grad)
        elif self.bias is not None:
            # ones @ dz: a GEMV reads dz once, faster than a column-wise sum reduction.
            ones = self.ws.get("ones", (b,))
            if self._ones_rows != b:
                ones.fill(1)
                self._ones_rows = b
            xp.matmul(ones, dz, out=self.bias.grad)
        self.pset.grad_ready(*self.params)
        return dx


class MLP(Layer):
    """A stack of ``Linear`` layers: ``sizes = [in, h1, ..., out]``.

    Args:
        params, name: where to declare ``NAME.<i>.weight``/``.bias``.
        sizes: layer widths including the input width.
        activation: activation of hidden layers.
        last_activation: activation of the last layer (None for logits).
        input_grad: whether ``backward`` returns the input gradient.
        dropout: rate of a Dropout after every hidden activation (0 for none).
        seed: dropout seed.
    """

    def __init__(self, params, name, sizes, activation="relu", last_activation=None,
                 input_grad=True, dropout=0.0, seed=0):
        super().__init__(params.xp, params.dtype)
        if len(sizes) < 2:
            raise ValueError(f"{name}: an MLP needs at least [in, out] sizes, got {sizes}")
        n = len(sizes) - 1
        self.layers = []
        for i in range(n):
            last = i == n - 1
            act = last_activation if last else activation
            self.layers.append(Linear(params, f"{name}.{i}", sizes[i], sizes[i + 1], act,
                                      input_grad=input_grad or i > 0))
            if dropout and not last:
                self.layers.append(Dropout(self.xp, self.dtype, dropout, seed=(seed, i)))
        self.params = tuple(p for layer in self.layers for p in layer.params)
        self.sizes = list(sizes)

    def dropouts(self):
        """The Dropout layers (for reseeding per rank)."""
        return [layer for layer in self.layers if isinstance(layer, Dropout)]

    def forward(self, x, training=True):
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy


class Concat(Layer):
    """Concatenate ``[B, d_i]`` arrays along columns; backward returns column views of ``dy``."""

    def __init__(self, xp, dtype):
        super().__init__(xp, dtype)
        self._bounds = None

    def forward(self, xs, training=True):
        b = xs[0].shape[0]
        widths = [x.shape[1] for x in xs]
        y = self.ws.get("y", (b, sum(widths)))
        start, bounds = 0, []
        for x, w in zip(xs, widths):
            if x.shape[0] != b:
                raise ValueError(f"Concat: input {len(bounds)} has {x.shape[0]} rows, expected {b}")
            y[:, start:start + w] = x
            bounds.append((start, start + w))
            start += w
        self._bounds = bounds
        return y

    def backward(self, dy):
        return [dy[:, a:b] for a, b in self._bounds]
