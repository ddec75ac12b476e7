"""What an online run adds to the collective trainer: deltas, stream waits, progressive AUC.

``Online`` is created by ``Trainer`` when the config has an ``[online]`` section or
reads a stream (``data.format = "stream"``); the trainer calls it at three points::

    batch = wait_for_batch(...)      # stream idle: wait, report, stop on SIGTERM/USR1
    progressive(batch, pooled)       # score the batch before training on it
    ...train the step...
    export(step)                     # every delta_every_steps, and at every checkpoint

Deltas (``hpctrain.checkpoint.delta``) hold the rows updated since the previous
delta and the keys evicted since, so a serving copy (``hpctrain serve-sync``) that
applies them in order holds the trainer's rows. A checkpoint is always also a delta
boundary: a run resumed from it continues the delta chain without losing the
tombstones of evictions between the last delta and the checkpoint.

In hybrid mode the workers keep this schedule and the servers write the deltas
(``hpctrain.train.hybrid.HybridOnline``, ``hpctrain.ps.delta``).
"""
import sys
import time

import numpy as np

from hpctrain.dense.backend import to_numpy
from hpctrain.errors import ConfigError, DataError
from hpctrain.train.evaluation import evaluate_arrays


class Online:
    """Delta export, stream waiting and progressive validation of one trainer.

    Args:
        trainer: the ``Trainer`` (its ``cfg``, ``comm``, ``emb``, ``model``, ``reader``).

    Attributes:
        last_delta: the step of the last delta (or checkpoint) the next delta continues from.
        idle_s: seconds spent waiting for stream data since the last report.
        deltas: ``(step, rows, tombstones, seconds)`` of the deltas since the last report
            (rows and tombstones None where this rank does not know them: hybrid workers).
        comm: the ranks whose progressive scores are gathered into one metric (the
            trainer's ``comm``; a hybrid worker's group).
    """

    def __init__(self, trainer):
        self.t = trainer
        self.cfg = trainer.cfg.online
        self.last_delta = 0
        self.idle_s = 0.0
        self.deltas = []
        self.stop_reason = None
        self._y, self._z = [], []
        self._total = [0, 0.0]          # samples, loss sum (all ranks, cumulative)
        self.comm = trainer.comm
        if self.cfg is not None:
            self._track_evictions()

    def _track_evictions(self):
        """The store remembers evicted keys from now on (the tombstones of the deltas)."""
        try:
            self.t.emb.track_evictions()
        except NotImplementedError as exc:
            raise ConfigError(f"{self.t.cfg.source}: online: {exc} (delta export needs "
                              f"a store that tracks evictions)") from None

    # ------------------------------------------------------------------ deltas
    def export(self, step, force=False, boundary=False):
        """Write the delta of ``step`` when one is due (or ``force``); returns its path.

        ``boundary``: ``step`` will be checkpointed or is the last one, so its delta holds
        the dense weights even when it is on the delta grid but not the dense one (the
        forced export that follows finds it written).
        """
        c = self.cfg
        if c is None or step <= self.last_delta:
            return None
        on_grid = step % c.delta_every_steps == 0
        if not (on_grid or force):
            return None
        t = self.t
        t0 = time.perf_counter()
        with t.timer("delta"):
            with_dense = force or boundary or \
                (step // c.delta_every_steps) % c.dense_every == 0
            path, rows, gone = self._write(step, with_dense)
        self.deltas.append((step, rows, gone, time.perf_counter() - t0))
        self.last_delta = step
        return path

    def _write(self, step, with_dense):
        """Write the delta of ``step`` from ``last_delta`` (collective over the trainer's
        ranks); returns ``(path, rows, tombstones)``, the counts over all ranks."""
        from hpctrain.checkpoint.delta import write_delta
        c, t = self.cfg, self.t
        dense = {"params": t.model.state_dict()} if with_dense else None
        tables = t.emb.export_delta(self.last_delta)
        path = write_delta(c.directory, step, self.last_delta, tables, t.comm, dense,
                           keep_last=c.keep_last,
                           info={"config": t.cfg.text} if with_dense else None)
        counts = np.array([sum(int(x["keys"].shape[0]) for x in tables.values()),
                           sum(int(x["tombstones"].shape[0]) for x in tables.values())],
                          dtype=np.float64)
        t.comm.allreduce(counts, op="sum")
        return path, int(counts[0]), int(counts[1])

    def checkpointed(self, step):
        """A checkpoint of ``step`` is committed: the delta of ``step``, and the stream
        source (JetStream) may acknowledge the records the checkpoint covers."""
        self.export(step, force=True)
        commit = getattr(self.t.reader, "commit", None)
        if commit is not None:
            commit(self.t._reader_state)

    def finish(self, log, step):
        """At the end of a run: the last step's delta, and a record of what is unreported."""
        self.export(step, force=True)
        if self.deltas or self._y:
            self.report(log, step)

    def restored(self, step):
        """After a restore: the delta chain continues from the checkpoint's step."""
        self.last_delta = int(step)

    # ------------------------------------------------------------------ stream
    def wait_for_batch(self, watcher):
        """The next stream batch of every rank, waiting while the stream is idle.

        Every poll ends in one small allreduce so all ranks agree: go on when each has a
        batch, stop when the stream ended or a rank caught SIGTERM/USR1 (``stop_reason``
        is set; the trainer then checkpoints and stops). Rank 0 reports the wait on the
        live line every ``data.stream.idle_report_seconds``.

        Returns:
            ``(batch, reader state)``, or ``(None, None)`` at the end or on a stop.
        """
        t = self.t
        reader, comm, sc = t.reader, t.comm, t.cfg.data.stream
        held, t0, reported = None, time.monotonic(), time.monotonic()
        while True:
            if held is None and not reader.ended:
                held = reader.poll(sc.poll_seconds)
            flags = np.array([held is not None, reader.ended,
                              watcher is not None and watcher.signalled], dtype=np.float64)
            comm.allreduce(flags, op="sum")
            if flags[2] > 0:
                self.stop_reason = (watcher.reason if watcher is not None and watcher.signalled
                                    else None) or "signal"
                break
            if flags[0] == comm.size:
                self.idle_s += time.monotonic() - t0
                return held, reader.state()
            if flags[1] == comm.size:
                self.stop_reason = None       # the stream's END: training is done
                break
            if flags[1] > 0 and flags[0] > 0:
                raise DataError(f"stream {reader.directory}: some ranks reached its END while "
                                f"others read another batch (was the stream rewritten?)")
            if time.monotonic() - reported >= sc.idle_report_seconds:
                reported = time.monotonic()
                self._say_idle(time.monotonic() - t0)
        self.idle_s += time.monotonic() - t0
        return None, None

    def _say_idle(self, seconds):
        if self.t.comm.rank != 0:
            return
        w = self.t.reader.waiting_for
        what = f"segment {w[0]}" if w else "the next segment"
        out = self.t.stream or sys.stdout
        out.write(f"step {self.t.step}  stream idle {seconds:.0f} s: waiting for {what}\n")
        out.flush()

    # ------------------------------------------------------------------ progressive validation
    def progressive(self, batch, pooled):
        """Score ``batch`` with the model as it is before this step's update."""
        if self.cfg is None or not self.cfg.progressive:
            return
        t = self.t
        if batch.size == 0:     # still a window entry: every rank gathers in report()
            self._y.append(np.zeros(0))
            self._z.append(np.zeros(0))
            return
        with t.timer("progressive"):
            z = t.model.forward(batch.dense, [pooled[f] for f in t.features], training=False)
            self._y.append(np.asarray(batch.labels, dtype=np.float64))
            self._z.append(np.asarray(to_numpy(z), dtype=np.float64).ravel())  # GPU logits too

    def report(self, log, step):
        """One JSON record: progressive metrics of the window, deltas written, idle time."""
        if self.cfg is None and not getattr(self.t.reader, "streaming", False):
            return
        rec = {"step": step, "time": time.time()}
        if self._y:
            from hpctrain.train.evaluation import gather_eval
            y, z = gather_eval(self.comm, np.concatenate(self._y), np.concatenate(self._z))
            self._y, self._z = [], []
            m = evaluate_arrays(y, z)
            self._total[0] += m["count"]
            self._total[1] += m["logloss"] * m["count"]
            m["cumulative_logloss"] = self._total[1] / max(self._total[0], 1)
            m["cumulative_count"] = self._total[0]
            rec["progressive"] = m
        if self.deltas:
            rec["deltas"] = [{"step": s, **({"rows": r, "tombstones": g} if r is not None
                                            else {}), "seconds": sec}
                             for s, r, g, sec in self.deltas]
            self.deltas = []
        rec["stream_idle_s"] = self.idle_s
        self.idle_s = 0.0
        log.write(rec)
