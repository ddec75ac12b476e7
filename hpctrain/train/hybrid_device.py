"""The device path of a hybrid worker (``mode = "hybrid"`` with ``device = "gpu"``).

The worker's dense step is the collective ``DeviceStep`` (pinned reused buffers, copy
streams, events; ``hpctrain.train.device_step``) with the group in place of the world:
the sample count and the loss sum are reduced in the worker's group, never across
groups (``HybridDeviceStep``). The dense update is the hybrid one:

* ``ps.dense_on_servers = false``: the collective update on the device (NCCL allreduce
  over all workers, optimizer), nothing else.
* ``ps.dense_on_servers = true``: NCCL allreduce over the group, then the group's reduced
  gradient goes to the host and to the servers, and the servers' parameters come back to
  the device at the clock they are installed (``DenseStaging``)::

    host                                            device (compute stream)
    ...  _apply_dense(c)  ────────────────────────> NCCL allreduce in the group, clip;
                                                    leader: copy the gradient to pinned
                                                    host memory, record "grad"
    sparse update (PUSH c) while the device works
    leader: wait "grad", DPUSH(c), DPULL(c + 1)
    ...
    clock c + 1: wait for "params" of the previous install; DROWS into the pinned buffer
    (leader; broadcast in the group)  ──────────────> copy it onto the parameters, record
                                                     "params"; forward of c + 1 follows

Both copies run on the compute stream, in stream order with the kernels around them:
the gradient copy must follow the allreduce and the parameter copy must precede the
forward and follow the previous backward, so a copy stream would add two events and
overlap nothing on the device. What the host gains is kept: the copies are
asynchronous (pinned memory), and the host waits for the gradient only after it has sent
the step's sparse update, which is what the collective device step overlaps with its
optimizer. The two pinned buffers are reused every clock; the host writes the next pull
into the parameter buffer only after the previous upload has left it ("params").

The servers stay on CPUs: they only ever see host arrays.
"""
import numpy as np

from hpctrain.train.device_step import DeviceStep


class HybridDeviceStep(DeviceStep):
    """``DeviceStep`` of a hybrid worker: samples and loss reduced in the group.

    The gradients are divided by the trainer's ``_gradient_divisor`` (with one group the
    group's sample count, as in collective mode; with several the global batch's), the
    loss is the mean over the group's samples, as on the host path.

    Attributes:
        parts: ``(loss sum, samples)`` of the group in the last step.
    """

    def __init__(self, trainer):
        super().__init__(trainer)
        self.parts = None
        self._samples = None

    def reduce_count(self, batch, flags):
        """The divisor of the gradients, from the group's sample count; the flags are
        returned as they are (the hybrid worker never reduces them across groups)."""
        tr = self.trainer
        red = np.array([batch.size], dtype=np.float64)
        tr.group_comm.allreduce(red, op="sum")
        self._samples = red[0]
        return tr._gradient_divisor(batch, red[0]), np.asarray(flags, dtype=np.float64)

    def reduce_loss(self, loss_sum, n, step):
        """The group's mean loss (a non-finite one stops the job before the clock is
        pushed)."""
        tr = self.trainer
        red = np.array([loss_sum], dtype=np.float64)
        tr.group_comm.allreduce(red, op="sum")
        self.parts = (float(red[0]), float(self._samples))
        return tr._group_loss(step, red[0], self._samples)


class DenseStaging:
    """The servers' dense parameters onto the device and the group's gradient off it.

    Args:
        device: the worker's ``hpctrain.dense.device.Device`` (with ``ops``).
        size: elements of the flat dense buffer.
        dtype: its dtype.
        leader: whether this worker pushes its group's gradient (only the leader copies
            it down).

    Attributes:
        host: the pinned buffer a dense pull is written into (``buffer()``).
    """

    def __init__(self, device, size, dtype, leader):
        self.device, self.ops = device, device.ops
        self.host = self.ops.pinned(size, dtype)
        self.grad = self.ops.pinned(size, dtype) if leader else None
        self.events = {k: self.ops.event(k) for k in ("params", "grad")}
        self._uploaded = False
        self._downloading = False

    def buffer(self):
        """The pinned parameter buffer, once the previous upload has left it."""
        if self._uploaded:
            self.ops.sync(self.events["params"])
        return self.host

    def install(self, data):
        """Copy the pulled parameters (``host``) onto the device parameters ``data``,
        after every kernel queued so far and before every kernel queued later."""
        ops, s = self.ops, self.ops.current()
        with self.device.phase("dense_h2d"):
            ops.h2d(data, self.host, s)
        ops.record(self.events["params"], s)
        self._uploaded = True

    def start_download(self, grad):
        """Leader: the reduced gradient ``grad`` is final on the compute stream; copy it
        to the pinned ``grad`` buffer (read it with ``gradient()``)."""
        if self.grad is None:
            return
        ops, s = self.ops, self.ops.current()
        with self.device.phase("dense_d2h"):
            ops.d2h(self.grad, grad, s)
        ops.record(self.events["grad"], s)
        self._downloading = True

    def gradient(self):
        """Leader: wait for the download and return the pinned gradient (None on the
        other workers). It stays valid until the next ``start_download``, which the
        host issues only after it has sent this one (the send packs a copy)."""
        if self.grad is None:
            return None
        if not self._downloading:
            raise RuntimeError("DenseStaging.gradient() without a download started")
        self.ops.sync(self.events["grad"])
        self._downloading = False
        return self.grad
