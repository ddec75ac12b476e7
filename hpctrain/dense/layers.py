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
"""
from hpctrain.dense.backend import make_rng, uniform


class Workspace:
    """Arrays cached by name and reallocated only when the requested shape changes."""

    def __init__(self, xp, dtype):
        self.xp, self.dtype = xp, dtype
        self._bufs = {}

    def get(self, key, shape, dtype=None):
        """An uninitialised array of ``shape`` for ``key`` (the same one as last time if it fits)."""
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

def relu_forward_(xp, ws, y):
    """In-place ReLU of ``y``; keeps the mask ``y > 0`` in ``ws`` for the backward.

    ``y *= (y > 0)`` with the mask kept costs less than ``maximum(y, 0)`` followed by
    recomputing the mask in backward (NumPy's maximum with a scalar is slow).
    """
    mask = ws.get("relu_mask", y.shape, dtype=bool)
    xp.greater(y, 0, out=mask)
    return xp.multiply(y, mask, out=y)


def relu_backward(xp, ws, y, dy):
    """``dy * (y > 0)`` into a workspace array, with the mask kept by ``relu_forward_``."""
    dz = ws.get("relu_dz", y.shape)
    return xp.multiply(dy, ws.get("relu_mask", y.shape, dtype=bool), out=dz)


def sigmoid_forward_(xp, ws, y):
    """In-place logistic function of ``y``, stable for large ``|y|``."""
    # 1/(1+exp(-y)) overflows exp for y << 0 only into inf, which gives the right 0;
    # silence the warning rather than branch per element.
    if xp.__name__ == "numpy":
        with xp.errstate(over="ignore"):
            xp.negative(y, out=y)
            xp.exp(y, out=y)
    else:
        xp.negative(y, out=y)
        xp.exp(y, out=y)
    y += 1
    return xp.reciprocal(y, out=y)


def sigmoid_backward(xp, ws, y, dy):
    """``dy * y * (1 - y)`` into a workspace array (``y`` is the sigmoid output)."""
    dz = ws.get("sigmoid_dz", y.shape)
    xp.subtract(1, y, out=dz)
    dz *= y
    dz *= dy
    return dz


_ACTIVATIONS = {None: (None, None), "relu": (relu_forward_, relu_backward),
                "sigmoid": (sigmoid_forward_, sigmoid_backward)}


class ReLU(Layer):
    """max(x, 0)."""

    def __init__(self, xp, dtype):
        super().__init__(xp, dtype)
        self._y = None

    def forward(self, x, training=True):
        y = self.ws.get("y", x.shape)
        y[...] = x
        self._y = relu_forward_(self.xp, self.ws, y)
        return y

    def backward(self, dy):
        return relu_backward(self.xp, self.ws, self._y, dy)


class Sigmoid(Layer):
    """1 / (1 + exp(-x))."""

    def __init__(self, xp, dtype):
        super().__init__(xp, dtype)
        self._y = None

    def forward(self, x, training=True):
        y = self.ws.get("y", x.shape)
        y[...] = x
        self._y = sigmoid_forward_(self.xp, self.ws, y)
        return y

    def backward(self, dy):
        return sigmoid_backward(self.xp, self.ws, self._y, dy)


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

    Args:
        params: the ``FlatParameters`` to declare ``NAME.weight`` and ``NAME.bias`` in.
        name: parameter name prefix.
        in_features, out_features: sizes.
        activation: None, "relu" or "sigmoid", applied in place on the output.
        init: weight init; default "he" before a ReLU, "xavier" otherwise.
        bias: whether there is a bias.
        input_grad: False when nothing needs ``dx`` (first layer on raw features):
            backward then skips one GEMM and returns None.
    """

    def __init__(self, params, name, in_features, out_features, activation=None, init=None,
                 bias=True, input_grad=True):
        super().__init__(params.xp, params.dtype)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"{name}: unknown activation {activation!r}; "
                             f"expected one of {list(_ACTIVATIONS)}")
        self.name, self.in_features, self.out_features = name, int(in_features), int(out_features)
        self.activation = activation
        self._act_fwd, self._act_bwd = _ACTIVATIONS[activation]
        init = init or ("he" if activation == "relu" else "xavier")
        self.pset = params
        self.weight = params.add(f"{name}.weight", (in_features, out_features), init)
        self.bias = params.add(f"{name}.bias", (out_features,), "zeros") if bias else None
        self.params = (self.weight,) + ((self.bias,) if bias else ())
        self.input_grad = input_grad
        self._x = self._y = None

    def forward(self, x, training=True):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{self.name}: expected input [B, {self.in_features}], "
                             f"got {tuple(x.shape)}")
        xp = self.xp
        y = self.ws.get("y", (x.shape[0], self.out_features))
        xp.matmul(x, self.weight.data, out=y)
        if self.bias is not None:
            y += self.bias.data
        if self._act_fwd is not None:
            self._act_fwd(xp, self.ws, y)
        self._x, self._y = x, y
        return y

    def backward(self, dy):
        xp = self.xp
        dz = dy if self._act_bwd is None else self._act_bwd(xp, self.ws, self._y, dy)
        xp.matmul(self._x.T, dz, out=self.weight.grad)
        if self.bias is not None:
            xp.sum(dz, axis=0, out=self.bias.grad)
        self.pset.grad_ready(*self.params)
        if not self.input_grad:
            return None
        dx = self.ws.get("dx", self._x.shape)
        if self.out_features == 1:
            # An outer product: BLAS GEMM with k = 1 is several times slower than this.
            return xp.multiply(dz, self.weight.data.T, out=dx)
        return xp.matmul(dz, self.weight.data.T, out=dx)


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
            # The last layer of a logit head gets Xavier: it is not followed by a ReLU.
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
