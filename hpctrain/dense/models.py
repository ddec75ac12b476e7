"""CTR models built from the dense layers: DLRM, Wide & Deep, DeepFM.

Every model takes this rank's dense features and the pooled embeddings from the
sparse side, returns logits, and on ``backward`` returns the embedding gradients
to send back while filling ``model.params.grad``. The gradients are ``[B, d_i]``
views of workspaces, possibly row-strided (``np.ascontiguousarray`` if a consumer
needs C order), to be treated as read-only and valid until the next backward::

    logits = model.forward(dense [B, num_dense], embs [[B, d_i] ...], training=True)  # [B]
    d_embs = model.backward(d_logits [B])                                           # [[B, d_i]]

All parameters live in one ``FlatParameters`` (``model.params``), so the dense
gradients of a step are synchronised with one allreduce.
"""
import numpy as np

from hpctrain.dense.backend import get_array_module
from hpctrain.dense.interactions import DotInteraction, FMInteraction
from hpctrain.dense.layers import Concat, Linear, MLP, Workspace
from hpctrain.dense.params import FlatParameters


class Model:
    """Shared plumbing: array module, dtype, flat parameters, input checks.

    A model with ``splits_embeddings`` calls ``on_embeddings()`` (when set) right before
    its forward first reads the embeddings, and ``on_embedding_grads(d_embs)`` as soon as
    its backward has them final. The GPU step uses the two points to let the embeddings'
    copy to the device overlap the bottom MLP and their gradients' copy back overlap the
    rest of backward (``hpctrain.train.device_step``); other models are waited for whole.
    """

    splits_embeddings = False
    on_embeddings = None
    on_embedding_grads = None

    def __init__(self, num_dense, xp, dtype):
        self.xp = get_array_module(xp)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        if num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {num_dense}")
        self.num_dense = int(num_dense)
        self.params = FlatParameters(self.xp, self.dtype)
        self.ws = Workspace(self.xp, self.dtype)

    def __call__(self, dense, embs, training=True):
        return self.forward(dense, embs, training)

    def _inputs(self, dense, embs, dims):
        xp = self.xp
        dense = xp.asarray(dense, dtype=self.dtype)
        if dense.ndim != 2 or dense.shape[1] != self.num_dense:
            raise ValueError(f"{type(self).__name__}: dense features have shape "
                             f"{tuple(dense.shape)}, expected (B, {self.num_dense})")
        b = dense.shape[0]
        if len(embs) != len(dims):
            raise ValueError(f"{type(self).__name__}: expected {len(dims)} embeddings, "
                             f"got {len(embs)}")
        out = []
        for i, (e, d) in enumerate(zip(embs, dims)):
            e = xp.asarray(e, dtype=self.dtype)
            if e.shape != (b, d):
                raise ValueError(f"{type(self).__name__}: embedding {i} has shape "
                                 f"{tuple(e.shape)}, expected ({b}, {d})")
            out.append(e)
        return dense, out

    def _d_logits(self, d_logits):
        d = self.xp.asarray(d_logits, dtype=self.dtype)
        return d.reshape(-1, 1)

    def _stack_grads(self, key, views, dims):
        """Copy ``[B, d_i]`` arrays into one buffer; return its contiguous ``[B, d_i]`` parts."""
        b = views[0].shape[0] if views else 0
        buf = self.ws.get(key, (b * sum(dims),))
        out, off = [], 0
        for v, d in zip(views, dims):
            o = buf[off:off + b * d].reshape(b, d)
            o[...] = v
            out.append(o)
            off += b * d
        return out

    def dropouts(self):
        """Every Dropout layer of the model."""
        return []

    def reseed_dropout(self, seed):
        """Restart every Dropout's generator from ``(seed, i)`` (e.g. seed = base + rank)."""
        for i, layer in enumerate(self.dropouts()):
            layer.reseed((int(seed), i))

    def state_dict(self):
        """Dict parameter name -> NumPy array (for checkpoints)."""
        return self.params.state_dict()

    def load_state_dict(self, state):
        """Load a ``state_dict`` (raises ``CheckpointError`` on any mismatch)."""
        self.params.load_state_dict(state)


class DLRM(Model):
    """DLRM: bottom MLP on dense features, dot interaction with the embeddings, top MLP.

    Args:
        num_dense: number of dense features (>= 1).
        emb_dims: width of each pooled embedding; all equal to d.
        bottom: bottom MLP widths; a last layer of width d is appended when
            ``bottom[-1] != d`` (the MLP is ``num_dense-bottom...-d``, ReLU throughout).
        top: top MLP widths, ending in 1 (ReLU between, none after the last).
        xp: "numpy", "cupy" or the module.
        seed: parameter initialisation seed.
        dtype: float32 (training) or float64 (gradient checks).
        self_interaction: include each vector's dot product with itself.
    """

    splits_embeddings = True  # the bottom MLP runs before the embeddings are read

    def __init__(self, num_dense, emb_dims, bottom=(512, 256, 64), top=(512, 256, 1), *,
                 xp="numpy", seed=0, dtype=np.float32, self_interaction=False):
        super().__init__(num_dense, xp, dtype)
        if num_dense < 1:
            raise ValueError("DLRM needs num_dense >= 1 for its bottom MLP")
        if not emb_dims or len(set(emb_dims)) != 1:
            raise ValueError(f"DLRM needs embeddings of one width, got emb_dims={list(emb_dims)}")
        if not top or top[-1] != 1:
            raise ValueError(f"DLRM top MLP must end in 1 (a logit), got top={list(top)}")
        d = int(emb_dims[0])
        self.emb_dims = [d] * len(emb_dims)
        sizes = [num_dense, *bottom] + ([d] if not bottom or bottom[-1] != d else [])
        p = self.params
        self.bottom = MLP(p, "bottom", sizes, last_activation="relu", input_grad=False)
        self.interaction = DotInteraction(self.xp, self.dtype, len(emb_dims), d,
                                          self_interaction=self_interaction)
        self.top = MLP(p, "top", [self.interaction.out_dim, *top], last_activation=None)
        p.build(seed)

    def forward(self, dense, embs, training=True):
        dense, embs = self._inputs(dense, embs, self.emb_dims)
        x = self.bottom.forward(dense, training)
        if self.on_embeddings is not None:
            self.on_embeddings()
        z = self.interaction.forward(x, embs, training)
        y = self.top.forward(z, training)
        return y.reshape(-1).copy()

    def backward(self, d_logits):
        dz = self.top.backward(self._d_logits(d_logits))
        dx, d_embs = self.interaction.backward(dz)
        if self.on_embedding_grads is not None:
            self.on_embedding_grads(d_embs)
        self.bottom.backward(dx)
        return d_embs


class WideAndDeep(Model):
    """Wide & Deep: a linear wide part plus an MLP over dense features and embeddings.

    ``logit = dense @ w + sum_i wide_i + MLP([dense, deep_1, ..., deep_m])``, the wide
    embeddings being dim-1 rows (per-id weights) from the sparse side.

    Args:
        num_dense: number of dense features.
        wide_dims: widths of the wide embeddings, all 1.
        deep_dims: widths of the deep embeddings.
        hidden: hidden widths of the deep MLP (it ends with a width-1 layer).
        dropout: dropout rate after each hidden layer (seeded by ``seed``).
    Embeddings are passed as ``embs = wide embeddings + deep embeddings``.
    """

    def __init__(self, num_dense, wide_dims, deep_dims, hidden=(1024, 512, 256), *, xp="numpy",
                 seed=0, dtype=np.float32, dropout=0.0):
        super().__init__(num_dense, xp, dtype)
        if any(int(w) != 1 for w in wide_dims):
            raise ValueError(f"WideAndDeep wide embeddings must have dim 1, got {list(wide_dims)}")
        self.wide_dims, self.deep_dims = [1] * len(wide_dims), [int(d) for d in deep_dims]
        p = self.params
        self.wide = (Linear(p, "wide", num_dense, 1, init="zeros", bias=False, input_grad=False)
                     if num_dense else None)
        self.concat = Concat(self.xp, self.dtype)
        width = num_dense + sum(self.deep_dims)
        if width == 0:
            raise ValueError("WideAndDeep needs dense features or deep embeddings")
        self.deep = MLP(p, "deep", [width, *hidden, 1], dropout=dropout, seed=seed)
        p.build(seed)

    def dropouts(self):
        return self.deep.dropouts()

    def forward(self, dense, embs, training=True):
        dense, embs = self._inputs(dense, embs, self.wide_dims + self.deep_dims)
        nw = len(self.wide_dims)
        parts = ([dense] if self.num_dense else []) + embs[nw:]
        y = self.deep.forward(self.concat.forward(parts, training), training).reshape(-1).copy()
        if self.wide is not None:
            y += self.wide.forward(dense, training).reshape(-1)
        for e in embs[:nw]:
            y += e.reshape(-1)
        return y

    def backward(self, d_logits):
        dl = self._d_logits(d_logits)
        views = self.concat.backward(self.deep.backward(dl))
        if self.wide is not None:
            self.wide.backward(dl)
            views = views[1:]
        nw = len(self.wide_dims)
        return self._stack_grads("dwide", [dl] * nw, self.wide_dims) + views


class DeepFM(Model):
    """DeepFM: first-order terms + factorization machine + MLP, sharing the embeddings.

    ``logit = dense @ w + sum_i first_i + FM(e_1..e_F) + MLP([dense, e_1, ..., e_F])``.

    Args:
        num_dense: number of dense features.
        emb_dims: widths of the FM/deep embeddings; all equal to k.
        hidden: hidden widths of the deep MLP (it ends with a width-1 layer).
        wide_dims: optional dim-1 first-order embeddings, passed after the FM ones.
        dropout: dropout rate after each hidden layer.
    """

    def __init__(self, num_dense, emb_dims, hidden=(400, 400, 400), *, wide_dims=(),
                 xp="numpy", seed=0, dtype=np.float32, dropout=0.0):
        super().__init__(num_dense, xp, dtype)
        if not emb_dims or len(set(emb_dims)) != 1:
            raise ValueError(f"DeepFM needs embeddings of one width, got emb_dims={list(emb_dims)}")
        if any(int(w) != 1 for w in wide_dims):
            raise ValueError("DeepFM first-order embeddings must have dim 1, "
                             f"got {list(wide_dims)}")
        k = int(emb_dims[0])
        self.emb_dims, self.wide_dims = [k] * len(emb_dims), [1] * len(wide_dims)
        p = self.params
        self.linear = (Linear(p, "linear", num_dense, 1, init="zeros", bias=False,
                              input_grad=False) if num_dense else None)
        self.fm = FMInteraction(self.xp, self.dtype, len(emb_dims), k)
        self.concat = Concat(self.xp, self.dtype)
        self.deep = MLP(p, "deep", [num_dense + k * len(emb_dims), *hidden, 1],
                        dropout=dropout, seed=seed)
        p.build(seed)

    def dropouts(self):
        return self.deep.dropouts()

    def forward(self, dense, embs, training=True):
        dense, embs = self._inputs(dense, embs, self.emb_dims + self.wide_dims)
        nf = len(self.emb_dims)
        parts = ([dense] if self.num_dense else []) + embs[:nf]
        y = self.deep.forward(self.concat.forward(parts, training), training).reshape(-1).copy()
        y += self.fm.forward(embs[:nf], training)
        if self.linear is not None:
            y += self.linear.forward(dense, training).reshape(-1)
        for e in embs[nf:]:
            y += e.reshape(-1)
        return y

    def backward(self, d_logits):
        dl = self._d_logits(d_logits)
        views = self.concat.backward(self.deep.backward(dl))
        if self.linear is not None:
            self.linear.backward(dl)
            views = views[1:]
        d_embs = self.fm.backward(dl.reshape(-1))
        for g, v in zip(d_embs, views):
            g += v
        if self.wide_dims:
            d_embs = d_embs + self._stack_grads("dwide", [dl] * len(self.wide_dims), self.wide_dims)
        return d_embs
