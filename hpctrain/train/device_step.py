"""The dense step of a trainer whose model lives on a GPU (``device = "gpu"``).

The embedding tables stay on the host; per step the pooled rows go up and their
gradients come down through ``hpctrain.dense.transfer.StepTransfer`` (pinned reused
buffers, two copy streams, events). The host waits for the device once, for the
embedding gradients the sparse update needs; the local loss sum rides in the same
copy, so the loss costs no extra synchronisation::

    host                                          device (compute stream)
    upload dense|labels|embs  ─────────────────>  forward, loss sum -> slot (async)
    allreduce [samples, flags] (MPI, while the device computes)
    scale, backward           ─────────────────>  backward; embedding grads copied down
    wait for the grads + loss sum <──────────────
    allreduce [loss sum] (MPI); non-finite check
    _apply_dense(step)        ─────────────────>  NCCL allreduce, optimizer (async, while
                                                  the host runs the sparse update)

With ``HostOps`` (``hpctrain.dense.streams``) and NumPy the same code runs on any
machine and gives the losses of the plain CPU step bit for bit; the tests compare them.
"""
import math

import numpy as np

from hpctrain.dense.loss import bce_with_logits_sum
from hpctrain.dense.transfer import StepTransfer


class DeviceStep:
    """``Trainer._dense_step`` for a model on a device (``trainer.device.pipelined``).

    The two host reductions are methods (``reduce_count``, ``reduce_loss``), so a
    subclass changes over which ranks they run and what the loss means: the hybrid
    worker's (``hpctrain.train.hybrid_device.HybridDeviceStep``) reduces in its group.

    Args:
        trainer: the ``Trainer``; its ``device``, ``model``, ``comm``, ``timer``,
            ``features`` and ``_apply_dense`` hook are used.

    Attributes:
        transfer: the ``StepTransfer``.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        dev = trainer.device
        self.device, self.phases = dev, dev.phases
        model = trainer.model
        self.transfer = StepTransfer(dev.ops, model.dtype, phases=dev.phases)
        self.split = bool(model.splits_embeddings)
        self._in_step = False
        if self.split:
            model.on_embeddings = self._embeddings_needed
            model.on_embedding_grads = self._grads_final

    def _embeddings_needed(self):
        if not self._in_step:  # evaluation: inputs came through CuPy's own copies
            return
        self.phases.stop("forward")
        self.transfer.wait_embeddings()
        self.phases.start("forward")

    def _grads_final(self, grads):
        if self._in_step:
            self.transfer.start_download(grads)

    def __call__(self, batch, pooled, step, flags):
        """Forward, global loss, backward, dense update; returns ``(loss, d_pooled, flags)``
        as ``Trainer._dense_step`` does, ``d_pooled`` being host arrays."""
        tr = self.trainer
        t, comm, model, tx, ph = tr.timer, tr.comm, tr.model, self.transfer, self.phases
        with t("h2d"):
            (dense, labels), embs = tx.upload([batch.dense, batch.labels],
                                              [pooled[f] for f in tr.features])
        self._in_step = True
        try:
            with t("dense"):
                if model.dropouts():  # the seeds of Trainer._dense_step
                    model.reseed_dropout((tr.cfg.seed * 1_000_003 + step) * comm.size
                                         + comm.rank)
                tx.wait_inputs()
                if not self.split:
                    tx.wait_embeddings()
                ph.start("forward")
                logits = model.forward(dense, embs)
                d_logits = bce_with_logits_sum(logits, labels, out=tx.loss_slot)
                ph.stop("forward")
            with t("allreduce"):  # on the host while the device runs the forward
                n, flags = self.reduce_count(batch, flags)
            with t("dense"):
                ph.start("backward")
                d_logits *= 1.0 / n
                d_embs = model.backward(d_logits)
                if not self.split:
                    tx.start_download(d_embs)
                tx.release_inputs()
                ph.stop("backward")
        finally:
            self._in_step = False
        with t("d2h"):
            grads, loss_sum = tx.finish_download()
        with t("allreduce"):
            loss = self.reduce_loss(loss_sum, n, step)
        tr._apply_dense(step)
        for name, seconds in self.device.take_phases().items():
            t.add(f"gpu.{name}", seconds)
        return loss, dict(zip(tr.features, grads)), flags

    def reduce_count(self, batch, flags):
        """``(n, flags)``: the global batch's sample count (the gradients' divisor) and the
        flags, summed over ``trainer.comm`` in one host allreduce."""
        red = np.array([batch.size, *flags], dtype=np.float64)
        self.trainer.comm.allreduce(red, op="sum")
        return red[0], red[1:]

    def reduce_loss(self, loss_sum, n, step):
        """The global mean loss from this rank's loss sum (summed over ``trainer.comm``);
        a non-finite one stops the run (``Trainer._non_finite``)."""
        red = np.array([loss_sum], dtype=np.float64)
        self.trainer.comm.allreduce(red, op="sum")
        loss = float(red[0] / max(n, 1.0))
        if not math.isfinite(loss):
            self.trainer._non_finite(step, loss)
        return loss
