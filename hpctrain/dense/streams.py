"""The few CUDA stream operations the device step uses, on CuPy and as a NumPy twin.

The device step (``hpctrain.train.device_step``) orders its copies and kernels with
streams and events only, never with a host synchronisation in the middle of a step.
It speaks to one small interface, so the same wiring runs on a GPU (``CudaOps``) and,
in tests on any machine, on host memory (``HostOps``), which performs every operation
at once and writes it to ``log`` in call order::

    ops.current()                   the compute stream (CuPy's current stream)
    ops.stream(name)                a stream of its own (non-blocking: no implicit
                                    synchronisation with the legacy default stream)
    ops.event(name, timing=False)   an event
    ops.record(event, stream)       the event completes when the stream gets there
    ops.wait(stream, event)         the stream waits for the event (device side)
    ops.sync(event)                 the host waits for the event
    ops.done(event)                 True when complete (never blocks)
    ops.elapsed(a, b)               seconds between two timing events
    ops.pinned(n, dtype)            page-locked host array; ops.empty(n, dtype): device array
    ops.h2d(dst, src, stream)       asynchronous copy pinned host -> device
    ops.d2h(dst, src, stream)       asynchronous copy device -> pinned host
    with ops.on(stream): ...        kernels launched inside run on ``stream``

``DevicePhases`` turns pairs of timing events into seconds per phase, read once the
events are complete, so timing a step costs no synchronisation either.
"""
import contextlib
import time

import numpy as np


class CudaOps:
    """``ops`` on CuPy: streams, events and asynchronous copies of the current device.

    Copies use ``cudaMemcpyAsync`` directly: asynchronous with respect to the host
    whatever the CuPy version, provided the host side is pinned (``pinned``).
    """

    def __init__(self, cupy):
        self.cp = cupy
        self.rt = cupy.cuda.runtime

    def current(self):
        return self.cp.cuda.get_current_stream()

    def stream(self, name):
        return self.cp.cuda.Stream(non_blocking=True)

    def event(self, name=None, timing=False):
        return self.cp.cuda.Event(block=False, disable_timing=not timing)

    def record(self, event, stream):
        event.record(stream)

    def wait(self, stream, event):
        stream.wait_event(event)

    def sync(self, event):
        event.synchronize()

    def done(self, event):
        return event.done

    def elapsed(self, a, b):
        return self.cp.cuda.get_elapsed_time(a, b) / 1e3

    def pinned(self, n, dtype):
        from hpctrain.dense.transfer import pinned_empty
        return pinned_empty(n, dtype)

    def empty(self, n, dtype):
        return self.cp.empty(n, dtype=dtype)

    def h2d(self, dst, src, stream):
        self.rt.memcpyAsync(dst.data.ptr, src.ctypes.data, src.nbytes,
                            self.rt.memcpyHostToDevice, stream.ptr)

    def d2h(self, dst, src, stream):
        self.rt.memcpyAsync(dst.ctypes.data, src.data.ptr, src.nbytes,
                            self.rt.memcpyDeviceToHost, stream.ptr)

    def on(self, stream):
        return stream  # a CuPy stream is a context manager that makes itself current


class HostEvent:
    """An event of ``HostOps``: its name, the stream and time of its last record."""

    __slots__ = ("name", "timing", "stream", "t", "records")

    def __init__(self, name, timing):
        self.name, self.timing = name, timing
        self.stream, self.t, self.records = None, None, 0

    def __repr__(self):
        return f"HostEvent({self.name!r}, records={self.records})"


class HostOps:
    """The NumPy twin of ``CudaOps``: every operation runs at once, in host memory.

    Copies, events and waits are logged as tuples in call order (timing events, which
    only feed ``DevicePhases``, as "mark")::

        ("h2d", stream, nbytes)  ("d2h", stream, nbytes)  ("record", stream, event)
        ("mark", stream, event)  ("wait", stream, event)  ("sync", event)  ("on", stream)
        ("pinned", n)  ("alloc", n)

    Waiting on an event that was never recorded raises: on a GPU that wait would
    silently order nothing.
    """

    def __init__(self):
        self.log = []
        self._stream = "compute"

    def current(self):
        return self._stream

    def stream(self, name):
        return name

    def event(self, name=None, timing=False):
        return HostEvent(name or "event", timing)

    def record(self, event, stream):
        event.stream, event.t = stream, time.perf_counter()
        event.records += 1
        self.log.append(("mark" if event.timing else "record", stream, event.name))

    def _recorded(self, event, what):
        if not event.records:
            raise RuntimeError(f"{what} on event {event.name!r}, which was never recorded")

    def wait(self, stream, event):
        self._recorded(event, f"stream {stream!r} waits")
        self.log.append(("wait", stream, event.name))

    def sync(self, event):
        self._recorded(event, "the host waits")
        if not event.timing:
            self.log.append(("sync", event.name))

    def done(self, event):
        return event.records > 0

    def elapsed(self, a, b):
        return b.t - a.t

    def pinned(self, n, dtype):
        self.log.append(("pinned", int(n)))
        return np.empty(n, dtype=dtype)

    def empty(self, n, dtype):
        self.log.append(("alloc", int(n)))
        return np.empty(n, dtype=dtype)

    def h2d(self, dst, src, stream):
        dst[...] = src
        self.log.append(("h2d", stream, int(src.nbytes)))

    def d2h(self, dst, src, stream):
        dst[...] = src
        self.log.append(("d2h", stream, int(src.nbytes)))

    @contextlib.contextmanager
    def on(self, stream):
        self.log.append(("on", stream))
        prev, self._stream = self._stream, stream
        try:
            yield stream
        finally:
            self._stream = prev


class DevicePhases:
    """Seconds per named device phase, from timing events recorded on the streams.

    ``start``/``stop`` (or ``with span(name)``) record events on a stream; ``take()``
    converts the intervals whose events are complete and keeps the others for later,
    so reading phases never waits for the device unless ``wait=True``. With
    ``intervals`` set to a list, every interval is also kept as
    ``(name, start_s, stop_s)`` relative to the first event (for ``hidden_fraction``).
    """

    def __init__(self, ops):
        self.ops = ops
        self.intervals = None
        self._open = {}
        self._pending = []
        self._seconds = {}
        self._ref = None

    def start(self, name, stream=None):
        ev = self.ops.event(f"{name}<", timing=True)
        self.ops.record(ev, self.ops.current() if stream is None else stream)
        if self._ref is None:
            self._ref = ev
        self._open[name] = ev

    def stop(self, name, stream=None):
        ev = self.ops.event(f"{name}>", timing=True)
        self.ops.record(ev, self.ops.current() if stream is None else stream)
        self._pending.append((name, self._open.pop(name), ev))
        if len(self._pending) > 64:  # nobody takes them (a subclass's own step): stay small
            self._collect()

    @contextlib.contextmanager
    def span(self, name):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def take(self, wait=False):
        """Seconds per phase of the intervals complete now (all of them with ``wait``);
        the totals start over."""
        self._collect(wait)
        out, self._seconds = self._seconds, {}
        return out

    def _collect(self, wait=False):
        left = []
        for name, a, b in self._pending:
            if wait:
                self.ops.sync(b)
            elif not self.ops.done(b):
                left.append((name, a, b))
                continue
            self._seconds[name] = self._seconds.get(name, 0.0) + self.ops.elapsed(a, b)
            if self.intervals is not None:
                self.intervals.append((name, self.ops.elapsed(self._ref, a),
                                       self.ops.elapsed(self._ref, b)))
        self._pending = left


def hidden_fraction(intervals, copies=("h2d", "d2h"),
                    compute=("forward", "backward", "allreduce", "update")):
    """How much of the copies' time ran while the compute stream was busy.

    Args:
        intervals: ``(name, start_s, stop_s)`` as ``DevicePhases.intervals`` keeps them.
        copies, compute: the phase names of each kind.

    Returns:
        ``(hidden_s, copy_s, fraction)``; fraction is 1.0 when there were no copies.
    """
    busy = sorted((a, b) for n, a, b in intervals if n in compute and b > a)
    merged = []
    for a, b in busy:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    hidden = total = 0.0
    for n, a, b in intervals:
        if n not in copies or b <= a:
            continue
        total += b - a
        hidden += sum(max(0.0, min(b, y) - max(a, x)) for x, y in merged)
    return hidden, total, (hidden / total if total > 0 else 1.0)
