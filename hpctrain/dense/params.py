"""One flat buffer for every dense parameter, one for every gradient.

Layers declare their parameters (``add``), then ``build`` lays them out back
to back, each start aligned to 64 bytes, and hands every layer views::

    data: | bottom.0.weight | bottom.0.bias |pad| bottom.1.weight | ... | top.2.bias |
    grad: | same layout, same offsets                                                |

Optimizers update ``data`` from ``grad`` in a few whole-buffer operations, and
data-parallel synchronisation is one allreduce of ``grad``. Padding stays zero
in both buffers, so it is inert under every optimizer.

Initial values are a pure function of ``(seed, parameter name)``, drawn on the
host in float64 and then cast, so NumPy and CuPy models with the same seed start
bit-identical and adding a layer never changes another layer's start.
"""
import zlib

import numpy as np

from hpctrain.errors import CheckpointError

ALIGN_BYTES = 64


class Param:
    """One parameter: its name, shape and place in the flat buffers.

    Attributes:
        name, shape, size: as declared.
        offset: start (in elements) inside ``FlatParameters.data``/``grad``.
        data, grad: views into the flat buffers (set by ``FlatParameters.build``).
    """

    __slots__ = ("name", "shape", "size", "init", "offset", "data", "grad", "index")

    def __init__(self, name, shape, init, index):
        self.name, self.init, self.index = name, init, index
        self.shape = tuple(int(s) for s in shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.offset = None
        self.data = self.grad = None

    def __repr__(self):
        return f"Param({self.name!r}, shape={self.shape}, offset={self.offset})"


def _fans(shape):
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[0] * receptive, shape[1] * receptive


def init_values(init, shape, rng):
    """Initial float64 values of a parameter.

    Args:
        init: "zeros", "ones", "he" (normal, std sqrt(2/fan_in)), "xavier" (uniform,
            bound sqrt(6/(fan_in+fan_out))), "xavier_normal" (normal, std
            sqrt(2/(fan_in+fan_out)): the DLRM reference's Linear weights), "normal:STD",
            "uniform:BOUND", or a callable ``(rng, shape) -> array``. Weights are
            ``[fan_in, fan_out]``.
        shape: parameter shape.
        rng: a ``numpy.random.Generator``.
    """
    if callable(init):
        return np.asarray(init(rng, shape), dtype=np.float64).reshape(shape)
    fan_in, fan_out = _fans(shape)
    if init == "zeros":
        return np.zeros(shape)
    if init == "ones":
        return np.ones(shape)
    if init == "he":
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
    if init == "xavier":
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, size=shape)
    if init == "xavier_normal":
        return rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), size=shape)
    kind, _, arg = str(init).partition(":")
    if kind == "normal" and arg:
        return rng.normal(0.0, float(arg), size=shape)
    if kind == "uniform" and arg:
        return rng.uniform(-float(arg), float(arg), size=shape)
    raise ValueError(f"unknown init {init!r}; expected zeros, ones, he, xavier, "
                     "xavier_normal, normal:STD, uniform:BOUND or a callable")


class FlatParameters:
    """Every parameter a view into ``data``, every gradient a view into ``grad``.

    Args:
        xp: array module (numpy or cupy).
        dtype: parameter dtype (float32 for training, float64 for gradient checks).

    Attributes:
        data, grad: the flat 1-D buffers (``None`` until ``build``).
        params: the declared ``Param`` objects, in layout order.
    """

    def __init__(self, xp=np, dtype=np.float32):
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.params = []
        self._by_name = {}
        self.data = self.grad = None
        self.seed = None
        self._hooks = []

    # --- declaration and layout ----------------------------------------------------------
    def add(self, name, shape, init="zeros"):
        """Declare a parameter; returns its ``Param`` (views appear at ``build``)."""
        if self.data is not None:
            raise RuntimeError(f"cannot add parameter {name!r}: FlatParameters already built")
        if name in self._by_name:
            raise ValueError(f"duplicate parameter name {name!r}")
        p = Param(name, shape, init, len(self.params))
        self.params.append(p)
        self._by_name[name] = p
        return p

    def build(self, seed=0):
        """Allocate the two flat buffers, point every ``Param`` at its views, initialise.

        Args:
            seed: parameter values are a pure function of (seed, parameter name).
        """
        if self.data is not None:
            raise RuntimeError("FlatParameters.build called twice")
        align = max(1, ALIGN_BYTES // self.dtype.itemsize)
        off = 0
        for p in self.params:
            p.offset = off
            off += -(-p.size // align) * align
        host = np.zeros(off, dtype=self.dtype)
        for p in self.params:
            rng = np.random.default_rng(
                np.random.SeedSequence(int(seed), spawn_key=(zlib.crc32(p.name.encode()),)))
            host[p.offset:p.offset + p.size] = init_values(p.init, p.shape, rng).ravel()
        xp = self.xp
        self.data = host if xp is np else xp.asarray(host)
        self.grad = xp.zeros(off, dtype=self.dtype)
        for p in self.params:
            p.data = self.data[p.offset:p.offset + p.size].reshape(p.shape)
            p.grad = self.grad[p.offset:p.offset + p.size].reshape(p.shape)
        self.seed = seed
        return self

    # --- access ------------------------------------------------------------------------
    @property
    def size(self):
        """Length of the flat buffers in elements (parameters plus alignment padding)."""
        return 0 if self.data is None else int(self.data.size)

    @property
    def num_parameters(self):
        """Number of parameter values (without padding)."""
        return sum(p.size for p in self.params)

    def __getitem__(self, name):
        return self._param(name).data

    def __contains__(self, name):
        return name in self._by_name

    def __len__(self):
        return len(self.params)

    def _param(self, name):
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no parameter {name!r}; have {sorted(self._by_name)}") from None

    def param(self, name):
        """The ``Param`` named ``name``."""
        return self._param(name)

    def named(self):
        """Dict parameter name -> data view (layout order)."""
        return {p.name: p.data for p in self.params}

    def named_grads(self):
        """Dict parameter name -> gradient view (layout order)."""
        return {p.name: p.grad for p in self.params}

    def zero_grad(self):
        """Set every gradient to zero."""
        self.grad.fill(0)

    # --- gradient-ready notifications (bucketed allreduce) --------------------------------
    def add_ready_hook(self, fn):
        """Call ``fn(param)`` whenever a layer's backward has finished writing ``param.grad``."""
        self._hooks.append(fn)

    def remove_ready_hook(self, fn):
        """Stop calling ``fn``."""
        self._hooks.remove(fn)

    def grad_ready(self, *params):
        """Called by layers after writing the gradients of ``params``."""
        for fn in self._hooks:
            for p in params:
                fn(p)

    # --- checkpoints ---------------------------------------------------------------------
    def state_dict(self):
        """Dict parameter name -> NumPy copy of its values."""
        from hpctrain.dense.backend import to_numpy
        return {p.name: np.array(to_numpy(p.data)) for p in self.params}

    def load_state_dict(self, state):
        """Copy values from a ``state_dict``; names and shapes must match exactly.

        Raises:
            CheckpointError: a name is missing or unexpected, or a shape differs.
        """
        missing = [p.name for p in self.params if p.name not in state]
        extra = sorted(set(state) - set(self._by_name))
        if missing or extra:
            raise CheckpointError(f"dense parameters do not match: missing {missing}, "
                                  f"unexpected {extra}")
        for p in self.params:
            v = np.asarray(state[p.name])
            if tuple(v.shape) != p.shape:
                raise CheckpointError(f"dense parameter {p.name!r}: expected shape {p.shape}, "
                                      f"got {tuple(v.shape)}")
        for p in self.params:
            p.data[...] = self.xp.asarray(np.asarray(state[p.name], dtype=self.dtype))

    def __repr__(self):
        return (f"FlatParameters({len(self.params)} tensors, {self.num_parameters} values, "
                f"{self.dtype}, {self.xp.__name__})")
