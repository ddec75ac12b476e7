"""Data-parallel synchronisation of the replicated dense parameters.

Every rank holds the same dense parameters and computes gradients on its slice
of the global batch with losses divided by the GLOBAL batch size, so one
allreduce with op "sum" of the flat gradient buffer gives every rank the
gradient of the whole batch, and the ranks stay identical step after step.

Debug mode (``HPCTRAIN_DEBUG=1`` or ``debug=True``) checks across ranks before a
collective that the buffers agree (size, dtype) and after it that the values are
finite, and after ``broadcast_parameters`` that every rank holds the same bits,
naming the ranks and parameters that disagree. (Communicators made in debug mode
add their own generic checks around every collective.)
"""
import hashlib

import numpy as np

from hpctrain.comm import debug_enabled as _env_debug
from hpctrain.dense.backend import is_device_array, to_numpy
from hpctrain.dense.transfer import HostStaging
from hpctrain.errors import CommError, NonFiniteError


def debug_enabled(debug=None):
    """``debug`` when given, else whether ``HPCTRAIN_DEBUG`` is set true (as for communicators)."""
    return bool(debug) if debug is not None else _env_debug()


def takes_device_buffers(comm):
    """Whether ``comm`` can reduce CuPy arrays directly (NCCL, CUDA-aware MPI): its
    "device_buffers" capability (``hpctrain.comm.base.Communicator.capabilities``)."""
    return "device_buffers" in getattr(comm, "capabilities", ())


_STAGING = {}


def _staged(comm, buf, fn):
    """Run ``fn(b)`` on ``buf`` itself, or on a pinned host copy when ``comm`` cannot read it."""
    if is_device_array(buf) and not takes_device_buffers(comm):
        return _STAGING.setdefault(id(comm), HostStaging()).run(buf, fn)
    fn(buf)
    return buf


def _check_ready(params, comm, what):
    """Raise CommError on every rank when ranks disagree on the buffer layout."""
    mine = (params.grad.size, str(params.dtype), tuple(p.name for p in params.params))
    alls = comm.allgather_object(mine)
    bad = [r for r, s in enumerate(alls) if s != alls[0]]
    if bad:
        r = bad[0]
        raise CommError(f"{what}: ranks {bad} disagree with rank 0 on the dense buffer "
                        f"(size/dtype {alls[r][:2]} vs {alls[0][:2]}, "
                        f"{len(alls[r][2])} vs {len(alls[0][2])} tensors)")


def _ensure_finite(params, comm, what):
    """Raise NonFiniteError (on every rank: the reduced values agree) naming bad tensors."""
    xp = params.xp
    if bool(xp.isfinite(params.grad).all()):
        return
    bad = [p.name for p in params.params if not bool(xp.isfinite(p.grad).all())]
    raise NonFiniteError(f"{what}: non-finite dense gradients on rank {comm.rank} in {bad}")


def allreduce_gradients(params, comm, op="sum", debug=None):
    """Reduce ``params.grad`` across ranks with ONE fused allreduce, in place.

    Args:
        params: the model's ``FlatParameters``.
        comm: an hpctrain ``Communicator`` (MPI for NumPy, NCCL for CuPy; a CuPy
            buffer with a communicator that cannot read device memory is staged
            through pinned host memory).
        op: "sum" (losses divided by the global batch) or "mean".
        debug: force the cross-rank checks on/off (default: ``HPCTRAIN_DEBUG``).

    Raises:
        CommError, NonFiniteError: in debug mode, ranks disagree or values are not finite.
    """
    dbg = debug_enabled(debug)
    if dbg:
        _check_ready(params, comm, "allreduce_gradients")
    _staged(comm, params.grad, lambda b: comm.allreduce(b, op=op))
    if dbg:
        _ensure_finite(params, comm, "allreduce_gradients")
    return params.grad


def broadcast_parameters(params, comm, root=0, debug=None):
    """Overwrite every rank's ``params.data`` with ``root``'s (one broadcast).

    In debug mode, then verifies that all ranks hold identical parameters.
    """
    if debug_enabled(debug):
        _check_ready(params, comm, "broadcast_parameters")
    _staged(comm, params.data, lambda b: comm.bcast(b, root=root))
    if debug_enabled(debug):
        check_parameters_identical(params, comm)
    return params


def parameter_digests(params):
    """One short digest per parameter of its exact bytes."""
    host = to_numpy(params.data)
    return [hashlib.blake2b(np.ascontiguousarray(host[p.offset:p.offset + p.size]).tobytes(),
                            digest_size=16).hexdigest() for p in params.params]


def check_parameters_identical(params, comm):
    """Raise CommError on every rank unless all ranks hold bit-identical parameters.

    The message names each disagreeing rank and its first differing parameters.
    """
    alls = comm.allgather_object(parameter_digests(params))
    names = [p.name for p in params.params]
    diffs = []
    for r, dig in enumerate(alls):
        if len(dig) != len(alls[0]):
            diffs.append(f"rank {r}: {len(dig)} tensors vs {len(alls[0])} on rank 0")
            continue
        bad = [n for n, a, b in zip(names, dig, alls[0]) if a != b]
        if bad:
            diffs.append(f"rank {r}: {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else ""))
    if diffs:
        raise CommError("dense parameters differ from rank 0's: " + "; ".join(diffs))


class BucketedAllreduce:
    """The gradient allreduce split into buckets that start while backward still runs.

    Buckets are contiguous ranges of the flat gradient buffer taken from its end
    (backward produces the last layers' gradients first). A layer's backward
    announces its finished gradients (``params.grad_ready``); when every parameter
    of the next bucket is done, its ``iallreduce`` starts. ``wait()`` starts what
    is left and completes everything; call it once after each backward::

        sync = BucketedAllreduce(model.params, comm)
        model.backward(d_logits)      # buckets start as layers finish
        sync.wait()                   # all gradients reduced
        opt.step()

    Every rank starts the buckets in the same order, as non-blocking collectives
    require.

    Args:
        params: the model's ``FlatParameters``.
        comm: an hpctrain ``Communicator``.
        bucket_bytes: target bucket size (a bucket holds whole parameters).
        op: "sum" or "mean".
        debug: as in ``allreduce_gradients``.
    """

    def __init__(self, params, comm, bucket_bytes=1 << 22, op="sum", debug=None):
        self.params, self.comm, self.op = params, comm, op
        self.debug = debug_enabled(debug)
        per = max(1, int(bucket_bytes) // params.dtype.itemsize)
        self.buckets, self._bucket_of, members = [], {}, []
        hi, cur = params.size, []
        for p in reversed(params.params):
            cur.append(p)
            if hi - p.offset >= per:
                self.buckets.append((p.offset, hi))
                members.append(cur)
                hi, cur = p.offset, []
        if cur:
            self.buckets.append((0, hi))
            members.append(cur)
        for k, ps in enumerate(members):
            for p in ps:
                self._bucket_of[p.index] = k
        self._sizes = [len(ps) for ps in members]
        # CuPy buffers behind a host-only communicator are staged once, in wait().
        self._overlap = not (is_device_array(params.grad) and not takes_device_buffers(comm))
        self._reset()
        params.add_ready_hook(self._on_ready)

    def _reset(self):
        self._left = list(self._sizes)
        self._seen = set()
        self._next = 0
        self._handles = []

    def _on_ready(self, p):
        if p.index in self._seen:
            return
        self._seen.add(p.index)
        k = self._bucket_of[p.index]
        self._left[k] -= 1
        if self._overlap:
            self._start_ready()

    def _start_ready(self, all_=False):
        while self._next < len(self.buckets) and (all_ or self._left[self._next] == 0):
            lo, hi = self.buckets[self._next]
            self._handles.append(self.comm.iallreduce(self.params.grad[lo:hi], op=self.op))
            self._next += 1

    def wait(self):
        """Start the remaining buckets, wait for all of them; returns ``params.grad``."""
        if self.debug:
            _check_ready(self.params, self.comm, "BucketedAllreduce")
        try:
            if self._overlap:
                self._start_ready(all_=True)
                for h in self._handles:
                    h.wait()
            else:
                _staged(self.comm, self.params.grad,
                        lambda b: self.comm.allreduce(b, op=self.op))
        finally:
            self._reset()
        if self.debug:
            _ensure_finite(self.params, self.comm, "BucketedAllreduce")
        return self.params.grad

    def close(self):
        """Stop listening to gradient announcements."""
        self.params.remove_ready_hook(self._on_ready)
