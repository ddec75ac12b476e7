"""Host <-> device movement of pooled embeddings, their gradients, and staged buffers.

Embedding tables stay in host memory; only a batch's pooled rows cross PCIe.
Both directions go through page-locked (pinned) host buffers, so the copies are
DMA transfers that run asynchronously on the current CUDA stream, and all
features of a batch move in ONE transfer, packed feature-major::

    pinned host:  | f0: [B, d0] | f1: [B, d1] | ... |   (each block row-major)
    device:       | f0: [B, d0] | f1: [B, d1] | ... |   -> contiguous [B, d_i] views

With NumPy as the backend every helper here is the identity (no copy), so code
written against it runs unchanged on CPU-only machines without CuPy.

``StepTransfer`` is the trainer's version: inputs up and gradients down on two copy
streams, ordered by events instead of host synchronisation, written against
``hpctrain.dense.streams`` so that its NumPy twin (``HostOps``) runs the same wiring in
tests on every machine.
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


class StepTransfer:
    """One training step's traffic between the host tables and the device model.

    Two copy streams beside the compute stream, ordered by events only, so copies run
    while kernels do and the host waits once per step, for the gradients it needs::

        host                  h2d stream            compute stream             d2h stream
        pack dense|labels|    wait released(k-1)
        embs into pinned up   copy dense|labels ─inputs─> bottom MLP
                              copy embs ─────────embs───> interaction, top, loss sum
                                                          -> loss slot; backward until
                                                          the embedding grads are final
                                                          ──────────grads───────────> pack grads
                                                          rest of backward; released  | loss slot
        host waits down <───────────────────────────────────────────────down──────── copy down

    The pinned buffers (``up``, ``down``) and their device twins are reused from step
    to step and grow when a batch needs more. The loss sum travels in the last slot of
    ``down``, so reading it costs no extra synchronisation. The host never overwrites
    ``up`` before the previous upload has left it, and the h2d stream never overwrites
    the device inputs before the previous backward has released them.

    Args:
        ops: ``hpctrain.dense.streams.CudaOps`` (GPU) or ``HostOps`` (the NumPy twin).
        dtype: the model dtype; inputs are cast to it while packing.
        phases: optional ``DevicePhases``: "h2d" and "d2h" are timed on the copy streams.
    """

    def __init__(self, ops, dtype=np.float32, phases=None):
        self.ops, self.dtype, self.phases = ops, np.dtype(dtype), phases
        self.h2d_stream, self.d2h_stream = ops.stream("h2d"), ops.stream("d2h")
        self.events = {k: ops.event(k) for k in ("inputs", "embs", "grads", "down", "released")}
        self.up_host = self.up_dev = self.down_host = self.down_dev = None
        self.loss_slot = None
        self._shapes, self._m = [], 0
        self._released = False  # a backward has released the device inputs at least once

    def _grow(self, which, n):
        host, dev = getattr(self, f"{which}_host"), getattr(self, f"{which}_dev")
        if host is None or host.size < n:
            host, dev = self.ops.pinned(n, self.dtype), self.ops.empty(n, self.dtype)
            setattr(self, f"{which}_host", host)
            setattr(self, f"{which}_dev", dev)
        return host, dev

    def upload(self, head, embs):
        """Pack host arrays into pinned memory and start their copies to the device.

        Args:
            head: arrays the model needs first (dense features, labels).
            embs: the pooled embeddings, ``[B, d_i]``, needed later (``wait_embeddings``).

        Returns:
            ``(head_views, emb_views)``: device arrays of the same shapes, valid until
            the next ``upload``.
        """
        ops, ev = self.ops, self.events
        arrays = list(head) + list(embs)
        sizes = [int(np.prod(np.shape(a), dtype=np.int64)) for a in arrays]
        n, nh = sum(sizes), sum(sizes[:len(head)])
        if self.up_host is not None:
            ops.sync(ev["embs"])  # the previous copy has left the pinned buffer (done by now)
        host, dev = self._grow("up", max(n, 1))
        off = 0
        for a, s in zip(arrays, sizes):
            host[off:off + s].reshape(np.shape(a))[...] = a
            off += s
        s = self.h2d_stream
        if self._released:
            ops.wait(s, ev["released"])
        if self.phases is not None:
            self.phases.start("h2d", s)
        ops.h2d(dev[:nh], host[:nh], s)
        ops.record(ev["inputs"], s)
        ops.h2d(dev[nh:n], host[nh:n], s)
        ops.record(ev["embs"], s)
        if self.phases is not None:
            self.phases.stop("h2d", s)
        views, off = [], 0
        for a, size in zip(arrays, sizes):
            views.append(dev[off:off + size].reshape(np.shape(a)))
            off += size
        self._shapes = [np.shape(e) for e in embs]
        self._m = n - nh + 1
        down_host, down_dev = self._grow("down", self._m)
        self.loss_slot = down_dev[self._m - 1:self._m].reshape(())
        return views[:len(head)], views[len(head):]

    def wait_inputs(self):
        """The compute stream waits for the head arrays (dense features, labels)."""
        self.ops.wait(self.ops.current(), self.events["inputs"])

    def wait_embeddings(self):
        """The compute stream waits for the pooled embeddings."""
        self.ops.wait(self.ops.current(), self.events["embs"])

    def start_download(self, grads):
        """Embedding gradients are final on the compute stream: start copying them down.

        On the d2h stream, after the compute stream's "grads" event: the gradients and
        the loss slot are packed into the device ``down`` buffer, then copied to pinned
        ``down`` in one transfer. Read them with ``finish_download``.
        """
        ops, ev, s = self.ops, self.events, self.d2h_stream
        ops.record(ev["grads"], ops.current())
        ops.wait(s, ev["grads"])
        with ops.on(s):
            if self.phases is not None:
                self.phases.start("d2h", s)
            off = 0
            for g, shape in zip(grads, self._shapes):
                size = int(np.prod(shape, dtype=np.int64))
                self.down_dev[off:off + size].reshape(shape)[...] = g
                off += size
            ops.d2h(self.down_host[:self._m], self.down_dev[:self._m], s)
            if self.phases is not None:
                self.phases.stop("d2h", s)
        ops.record(ev["down"], s)

    def release_inputs(self):
        """The compute stream is done with this step's inputs (after backward)."""
        self.ops.record(self.events["released"], self.ops.current())
        self._released = True

    def finish_download(self):
        """Wait for the gradients; returns ``(grads, loss_sum)``.

        ``grads`` are ``[B, d_i]`` NumPy views of the pinned buffer, valid until the next
        step's download; ``loss_sum`` is the loss slot's value as a float.
        """
        self.ops.sync(self.events["down"])
        out, off = [], 0
        for shape in self._shapes:
            size = int(np.prod(shape, dtype=np.int64))
            out.append(self.down_host[off:off + size].reshape(shape))
            off += size
        return out, float(self.down_host[self._m - 1])
