"""Host <-> device movement of pooled embeddings, their gradients, and staged buffers.

Embedding tables stay in host memory; only a batch's pooled rows cross PCIe.
Both directions go through page-locked (pinned) host buffers, so the copies are
DMA transfers that run asynchronously on the current CUDA stream, and all
features of a batch move in ONE transfer, packed feature-major::

    pinned host:  | f0: [B, d0] | f1: [B, d1] | ... |   (each block row-major)
    device:       | f0: [B, d0] | f1: [B, d1] | ... |   -> contiguous [B, d_i] views

With NumPy as the backend every helper here is the identity (no copy), so code
written against it runs unchanged on CPU-only machines without CuPy.
"""
import numpy as np

from hpctrain.dense.backend import is_device_array


def cupy_available():
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDA driver errors without a GPU
        return False


def pinned_empty(n, dtype=np.float32):
    """A 1-D NumPy array of ``n`` elements in pinned host memory (plain memory without CuPy)."""
    dtype = np.dtype(dtype)
    if not cupy_available():
        return np.empty(n, dtype=dtype)
    import cupy
    mem = cupy.cuda.alloc_pinned_memory(max(1, n) * dtype.itemsize)
    return np.frombuffer(mem, dtype=dtype, count=n)  # the array keeps ``mem`` alive


class _Pinned:
    """A growable pinned host buffer plus a device buffer, guarded by a CUDA event."""

    def __init__(self, xp, dtype):
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.host = self.dev = None
        self.event = None

    def ensure(self, n):
        if self.host is None or self.host.size < n:
            self.host = pinned_empty(n, self.dtype)
            self.dev = self.xp.empty(n, dtype=self.dtype)
        if self.event is not None:
            # The previous asynchronous copy may still read/write the pinned buffer.
            self.event.synchronize()
        return self.host[:n], self.dev[:n]

    def record(self):
        self.event = self.xp.cuda.Event(disable_timing=True)
        self.event.record()


class EmbeddingTransfer:
    """Pooled embeddings host -> device and their gradients device -> host, pinned.

    Args:
        xp: the dense side's array module.
        dtype: the model dtype.
    """

    def __init__(self, xp, dtype=np.float32):
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.on_device = xp is not np
        self._up = _Pinned(xp, dtype) if self.on_device else None
        self._down = _Pinned(xp, dtype) if self.on_device else None

    def to_device(self, embs):
        """``[B, d_i]`` host arrays -> arrays on the dense side's device (one H2D copy).

        The device arrays are views of a buffer reused by the next call.
        """
        if not self.on_device:
            return [np.asarray(e, dtype=self.dtype) for e in embs]
        sizes = [int(np.prod(e.shape)) for e in embs]
        host, dev = self._up.ensure(sum(sizes))
        off = 0
        for e, n in zip(embs, sizes):
            host[off:off + n].reshape(e.shape)[...] = e
            off += n
        dev.set(host, stream=self.xp.cuda.get_current_stream())
        self._up.record()
        out, off = [], 0
        for e, n in zip(embs, sizes):
            out.append(dev[off:off + n].reshape(e.shape))
            off += n
        return out

    def to_host(self, grads):
        """``[B, d_i]`` device arrays -> NumPy arrays (one D2H copy into pinned memory).

        The NumPy arrays are views of a pinned buffer reused by the next call;
        they are complete when this returns.
        """
        if not self.on_device:
            return [np.asarray(g) for g in grads]
        xp = self.xp
        sizes = [int(np.prod(g.shape)) for g in grads]
        host, dev = self._down.ensure(sum(sizes))
        off = 0
        for g, n in zip(grads, sizes):
            dev[off:off + n].reshape(g.shape)[...] = g
            off += n
        stream = xp.cuda.get_current_stream()
        dev.get(stream=stream, out=host)
        stream.synchronize()
        out, off = [], 0
        for g, n in zip(grads, sizes):
            out.append(host[off:off + n].reshape(g.shape))
            off += n
        return out


class HostStaging:
    """Runs a host-buffer collective on a device buffer: copy down, operate, copy back.

    Used when the communicator cannot read device memory (MPI without CUDA awareness).
    """

    def __init__(self):
        self._host = None

    def run(self, buf, fn):
        """``fn(host)`` on a pinned host copy of device ``buf``, then copied back into ``buf``."""
        if not is_device_array(buf):
            fn(buf)
            return buf
        import cupy
        n = buf.size
        if self._host is None or self._host.size < n or self._host.dtype != buf.dtype:
            self._host = pinned_empty(n, buf.dtype)
        host = self._host[:n]
        stream = cupy.cuda.get_current_stream()
        buf.reshape(-1).get(stream=stream, out=host)
        stream.synchronize()
        fn(host)
        buf.reshape(-1).set(host, stream=stream)
        stream.synchronize()
        return buf
