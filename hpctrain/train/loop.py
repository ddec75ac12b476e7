"""The collective training loop: sharded embeddings + data-parallel dense model.

One step (DESIGN.md), for this rank's slice of the global batch::

    data ─> sparse lookup (ids/rows Alltoallv) ─> dense forward ─> one small allreduce
    (sample count, loss sum, stop flags) ─> dense backward ─> one fused gradient
    allreduce ─> dense update ─> sparse backward (grads Alltoallv, fused optimizer)

With ``overlap = true`` the next batch's id exchange (dedup, route, counts, ids
Alltoallv) runs before this batch's dense work; its rows are read only after this
step's sparse update, so results are identical with and without overlap.
"""
import logging
import math
import time

import numpy as np

from hpctrain.dense.transfer import EmbeddingTransfer
from hpctrain.errors import ConfigError, NonFiniteError
from hpctrain.train.build import (BatchFeatures, build_model, dense_optimizer, feature_order,
                                  table_specs)
from hpctrain.train.best_tracking import BestTracking
from hpctrain.train.checkpointing import Checkpointing
from hpctrain.train.metrics import MetricsLogger, PhaseTimer
from hpctrain.train.predicting import Predicting
from hpctrain.train.reporting import Reporting
from hpctrain.train.run_checks import RunChecks

_log = logging.getLogger(__name__)


def _set_threads(configured, ranks_on_host, rank=0):
    """Set the threads of this rank's kernels and BLAS by the one rule of
    ``hpctrain.threads`` (config, HPCTRAIN_NUM_THREADS, OMP_NUM_THREADS, cores per rank).
    With several threads, an OpenBLAS loaded before hpctrain re-reads its thread timeout
    (``hpctrain._idle_threads.reapply_blas_timeout``), and rank 0 warns about what still
    keeps idle threads spinning (``hpctrain._idle_threads.late_warning``)."""
    from threadpoolctl import threadpool_limits

    from hpctrain._idle_threads import late_warning, reapply_blas_timeout
    from hpctrain._kernels import _openmp
    from hpctrain.threads import threads_per_rank
    n, _ = threads_per_rank(configured, ranks_on_host)
    _openmp.set_num_threads(n)
    if n > 1:
        reapply_blas_timeout()      # NumPy imported before hpctrain: OpenBLAS re-reads it
    threadpool_limits(limits=n, user_api="blas")
    if n > 1 and rank == 0:
        msg = late_warning()
        if msg:
            _log.warning("%d threads per rank: %s", n, msg)
    return n


class Trainer(RunChecks, BestTracking, Reporting, Checkpointing, Predicting):
    """Trains the model a ``Config`` describes on the ranks of ``comm``.

    The sparse side is an ``EmbeddingStore`` used only through its interface
    (tickets), so a subclass changes where rows live by overriding two hooks:
    ``_make_store()`` (default: ``ShardedEmbedding`` over ``comm``) and
    ``_apply_dense(step)`` (default: allreduce the flat gradient over ``comm``,
    then the dense optimizer). The hybrid mode's workers do exactly that
    (``hpctrain.train.hybrid``).

    Args:
        cfg: a validated ``hpctrain.config.Config``.
        comm: a ``hpctrain.comm`` communicator (default: MPI over COMM_WORLD).
        stream: where rank 0's live line goes (default stdout).

    Attributes:
        step: the number of completed steps.
        losses: global mean loss of every step run by this trainer (all ranks).
        emb: the ``EmbeddingStore``; model: the dense model; opt: its optimizer.
    """

    #: The config ``mode`` this class trains.
    MODE = "collective"

    def __init__(self, cfg, comm=None, *, stream=None):
        from hpctrain.comm import create_communicator
        from hpctrain.dense.parallel import broadcast_parameters

        if cfg.mode != self.MODE:
            raise ConfigError(f"{cfg.source}: mode: {cfg.mode!r} is trained by "
                              f"hpctrain.train.create_trainer, not by {type(self).__name__}")
        self.cfg = cfg
        from hpctrain.train import errorfile
        errorfile.set_from_config(cfg)
        self.comm = comm if comm is not None else create_communicator("mpi")
        self.threads = _set_threads(cfg.threads, self.comm.local_size, self.comm.rank)
        self.device = self._make_device()  # before any collective: a missing GPU fails here
        if cfg.malloc == "tuned":
            from hpctrain.memory import tune_malloc
            tune_malloc()
        self.global_batch, self.local_batch = cfg.batch_sizes(self.comm.size)
        self.specs = table_specs(cfg)
        self.table_ids = {s.name: s.table_id for s in self.specs}
        self.features, _, _ = feature_order(cfg)
        self.jagged = BatchFeatures(cfg)
        self.emb = self._make_store()
        self.reader = self._reader("train", self.global_batch)
        num_dense = cfg.data.num_dense()
        if num_dense is None:
            num_dense = self.reader.num_dense
        self.model = build_model(cfg, num_dense, xp=self.device.xp)
        broadcast_parameters(self.model.params, self.comm)
        self.dense_comm = self._make_dense_comm()
        self.opt = dense_optimizer(cfg, self.model.params)
        self.transfer = EmbeddingTransfer(self.device.xp)  # for steps outside the device path
        self._device_step = None   # the DeviceStep, made at the first device-path step
        self.step = 0
        self.losses = []
        self.timer = PhaseTimer()
        self.phase_totals = {}     # seconds per phase over this trainer's life (this rank)
        self.stream = stream
        self.ckpt = None
        if cfg.checkpoint is not None:
            from hpctrain.checkpoint import CheckpointManager
            self.ckpt = CheckpointManager(cfg.checkpoint.directory, self.comm,
                                          keep_last=cfg.checkpoint.keep_last)
        self._reader_state = self.reader.state()
        self._ckpt_step = None
        self._watcher = None
        self.online = self._make_online()
        self._last_loss = float("nan")
        self._window_loss = None    # mean loss of the last reported window (live line)
        self._restored_from = None
        self.best = None            # [eval] keep_best / early_stopping (hpctrain.train.best)
        if cfg.eval.keep_best or cfg.eval.early_stopping is not None:
            from hpctrain.train.best import BestTracker
            self.best = BestTracker(cfg.eval)
        self._grad_norm = None      # the reduced dense gradient's norm before clipping

    # ------------------------------------------------------------------ hooks
    def _make_store(self):
        """The embedding store of this trainer (collective: rows sharded over ``comm``)."""
        from hpctrain.sparse.sharded import ShardedEmbedding
        return ShardedEmbedding(self.specs, self.comm, seed=self.cfg.seed,
                                exchange=self.cfg.exchange,
                                node_group_size=self.cfg.node_group_size)

    def _apply_dense(self, step):
        """Average the flat dense gradient over ``dense_comm``, clip it (``clip_norm``) and
        take the optimizer step at the learning rate of ``step`` (``schedule``)."""
        from hpctrain.dense.parallel import allreduce_gradients
        with self.timer("allreduce"), self.device.phase("allreduce"):
            allreduce_gradients(self.model.params, self.dense_comm)
        with self.timer("dense"), self.device.phase("update"):
            self._clip_dense()
            self.opt.step(step)

    def _after_sparse_update(self, step):
        """Hook: the step's sparse update is done, its export, evaluation and checkpoint
        follow (nothing here; a hybrid worker sends its group's dense gradient now, so the
        device reduces and copies it while the host runs the sparse update)."""

    def _clip_dense(self):
        """``dense_optimizer.clip_norm``: scale the reduced gradient (the same bits on every
        rank, so every rank clips alike) to that L2 norm at most."""
        clip = self.cfg.dense_optimizer.get("clip_norm")
        if clip is not None:
            from hpctrain.dense.schedule import clip_gradient
            self._grad_norm = clip_gradient(self.model.params.grad, clip)

    def _make_device(self):
        """Where the dense model trains (``cfg.device``; the GPU from ``comm.local_rank``)."""
        from hpctrain.dense.device import select_device
        return select_device(self.cfg.device, self.comm.local_rank, self.cfg.source)

    def _make_dense_comm(self, over=None):
        """The communicator of the dense gradient allreduce over the ranks of ``over``
        (default ``comm``): ``over`` itself on CPU, NCCL over the same ranks on a GPU.
        A subclass passes another group (the hybrid mode: the worker's group)."""
        return self.device.collective(self.comm if over is None else over)

    # ------------------------------------------------------------------ pieces
    def _reader(self, split, global_batch, evaluation=False):
        """The reader of ``split``; for ``evaluation`` every sample exactly once, in order
        (the train split included: one pass, last partial batch kept, no shuffling)."""
        from hpctrain.data import make_reader
        cfg = self.cfg
        if not evaluation:
            return make_reader(cfg.data, split=split, rank=self.comm.rank,
                               world_size=self.comm.size, global_batch=global_batch,
                               seed=cfg.seed, epochs=cfg.epochs if split == "train" else 1)
        sc = cfg.data.split(split)
        if cfg.data.format == "synthetic" and getattr(sc, "num_samples", 0) is None:
            raise ConfigError(f"{cfg.source}: data.{split}.num_samples: the synthetic {split} "
                              f"split is endless; evaluating it needs a sample count")
        return make_reader(cfg.data, split=split, rank=self.comm.rank,
                           world_size=self.comm.size, global_batch=global_batch,
                           seed=cfg.seed, epochs=1, drop_last=False, shuffle=False)

    def _make_online(self):
        """Delta export, stream waits and progressive validation (``hpctrain.train.online``);
        None for an offline run."""
        if self.cfg.online is None and not getattr(self.reader, "streaming", False):
            return None
        from hpctrain.train.online import Online
        return Online(self)

    def _next_batch(self, it):
        if self.online is not None and getattr(self.reader, "streaming", False):
            with self.timer("data"):
                return self.online.wait_for_batch(self._watcher)
        from hpctrain.errors import DataError
        with self.timer("data"):
            try:
                batch, problem = next(it, None), None
            except DataError as e:
                batch, problem = None, f"rank {self.comm.rank}: {e}"
            # a bad file seen by one rank is named on every rank's output, rank 0's included
            # (one small allreduce; ranks that read in lockstep: the data-parallel ranks)
            comm = self._lockstep_comm()
            if comm.size > 1 and comm.any_true(problem is not None):
                found = [p for p in comm.allgather_object(problem) if p is not None]
                raise DataError("; ".join(found))
            if problem is not None:
                raise DataError(problem)
            state = self.reader.state() if batch is not None else None
        return batch, state

    def _lockstep_comm(self):
        """The ranks that read their batches in lockstep (a data error is shared over them)."""
        return self.comm

    def _dense_step(self, batch, pooled, step, flags):
        """Forward, global loss, backward, gradient allreduce, dense update.

        Returns ``(loss, d_pooled, flags)`` where flags are summed over ranks.
        """
        from hpctrain.dense.loss import bce_with_logits
        if self.device.pipelined:  # model on a GPU (or the NumPy twin of that path)
            if self._device_step is None:
                from hpctrain.train.device_step import DeviceStep
                self._device_step = DeviceStep(self)
            return self._device_step(batch, pooled, step, flags)
        t, comm = self.timer, self.comm
        with t("dense"):
            if self.model.dropouts():
                self.model.reseed_dropout((self.cfg.seed * 1_000_003 + step) * comm.size
                                          + comm.rank)
            logits = self.model.forward(batch.dense, [pooled[f] for f in self.features])
            loss_sum, d_logits = bce_with_logits(logits, batch.labels, denom=1)
        with t("allreduce"):
            red = np.array([batch.size, loss_sum, *flags], dtype=np.float64)
            comm.allreduce(red, op="sum")
        n, loss = red[0], float(red[1] / max(red[0], 1.0))
        if n == 0:
            from hpctrain.errors import DataError
            raise DataError(f"step {step}: the global batch holds no sample on any rank (every "
                            f"line of it was bad?); see data.bad_lines in "
                            f"docs/configuration.md")
        if not math.isfinite(loss):
            self._non_finite(step, loss)
        with t("dense"):
            d_logits *= 1.0 / n
            d_embs = self.model.backward(d_logits)
        self._apply_dense(step)
        return loss, dict(zip(self.features, d_embs)), red[2:]

    def _non_finite(self, step, loss):
        last = self.ckpt.latest() if self.ckpt is not None else None
        raise NonFiniteError(
            f"step {step}: the global loss is {loss} (non-finite); training stopped before "
            f"applying this step's updates. Last good checkpoint: {last or 'none'}. Lower "
            f"the learning rates or check the data around this step.")

    # ------------------------------------------------------------------ training
    def fit(self, resume=False, max_steps=None, watcher=None):
        """Train until ``cfg.steps``/``cfg.epochs`` (or a stop signal); return a summary.

        Args:
            resume: continue from the latest complete checkpoint (True), a given
                checkpoint path (str), or start fresh (False). With True and no
                checkpoint yet, training starts from step 0.
            max_steps: stop after this many steps of this call (tests, preemption drills).
            watcher: a ``PreemptionWatcher`` (default: one for SIGUSR1/SIGTERM).

        Returns:
            dict with ``step``, ``loss`` (last step's), ``stopped`` ("done", "preempted",
            "max_steps", "early_stopped"), ``checkpoint`` (last written), ``eval`` (final
            metrics or None) and ``best`` (``[eval] keep_best``/``early_stopping``: metric,
            value, step and, with keep_best, checkpoint of the best evaluation; else None).
        """
        from hpctrain.train.preemption import PreemptionWatcher
        cfg, comm, t = self.cfg, self.comm, self.timer
        if resume:
            self.restore(None if resume is True else resume, missing_ok=resume is True)
        self._preflight()
        if self.step == 0:
            self._check_fresh_start()
        own_watcher = watcher is None
        watcher = watcher or PreemptionWatcher()
        from hpctrain.train.watchdog import Watchdog
        stall = Watchdog(cfg.stall_timeout_s, comm.rank, comm.size, lambda: self.step,
                         exempt=("data",) if getattr(self.reader, "streaming", False) else ())
        t.observer = stall
        self._watcher = watcher
        mcfg = cfg.metrics
        per_epoch = getattr(self.reader, "batches_per_epoch", None)
        total = cfg.steps
        if cfg.epochs is not None and per_epoch:
            total = min(total or cfg.epochs * per_epoch, cfg.epochs * per_epoch)
        log = MetricsLogger(mcfg.path, comm, total, stream=self.stream,
                            start_step=self.step if resume else 0, tensorboard=mcfg.tensorboard,
                            epochs=cfg.epochs, steps_per_epoch=per_epoch)
        ck = cfg.checkpoint
        last_ckpt_time, last_ckpt = time.monotonic(), None
        stopped, loss = "done", float("nan")
        it = iter(self.reader)
        # a stream's next batch is waited for after this step is trained (and exported)
        streaming = getattr(self.reader, "streaming", False)
        window_t0, window_samples, window_loss = time.perf_counter(), 0, []
        steps_this_call = 0
        log.message(self._start_line(resume))
        try:
            if max_steps == 0:
                # no step: the checkpoint of the current weights (step 0 of a fresh run: the
                # initial model, to compare with another framework from the same start)
                result = {"step": self.step, "loss": self._last_loss, "stopped": "max_steps",
                          "eval": None, "checkpoint": None}
                if ck is not None:
                    result["checkpoint"] = self.save_checkpoint()
                return result
            if self._done(self.step):
                # a resubmitted or requeued run whose step count is reached: nothing to
                # train; the final evaluation (if any) is that of the same model
                log.message(f"step {self.step} of {cfg.steps} already reached: nothing to "
                            f"train")
                loss = self._last_loss
            elif self.best is not None and self.best.stopped:
                log.message(f"early stopped at step {self.step} (no {self.best.metric} "
                            f"improvement in {self.best.bad} evaluations): nothing to train")
                stopped, loss = "early_stopped", self._last_loss
            elif self._missed_eval(self.step):
                with t("eval"):     # stopped right after training it: count it now
                    metrics = self.evaluate()
                self._log_eval(log, metrics)
                if self._count_eval(metrics) and ck is not None:
                    last_ckpt = self.save_checkpoint()
            batch, state = (None, None) if self._done(self.step) or stopped != "done" \
                else self._next_batch(it)
            next_ticket = None
            if batch is not None:
                with t("exchange"):
                    next_ticket = self.emb.start_lookup(self.jagged(batch), self.step + 1)
            while batch is not None:
                step = self.step + 1
                ticket = next_ticket
                with t("exchange"):
                    pooled = self.emb.wait_lookup(ticket)
                steps_this_call += 1
                last_step = self._done(step) or (max_steps is not None
                                                 and steps_this_call >= max_steps)
                # an evaluation that may stop the run: the next lookup waits for it
                defer = self._may_stop_at(step)
                nxt, nxt_state, next_ticket = None, None, None
                if not last_step and not streaming:
                    nxt, nxt_state = self._next_batch(it)
                if cfg.overlap and nxt is not None and not defer:
                    with t("exchange"):
                        next_ticket = self.emb.start_lookup(self.jagged(nxt), step + 1)
                ckpt_due = (comm.rank == 0 and ck is not None and ck.every_minutes is not None
                            and time.monotonic() - last_ckpt_time >= 60.0 * ck.every_minutes)
                if self.online is not None:
                    self.online.progressive(batch, pooled)
                loss, d_pooled, flags = self._dense_step(
                    batch, pooled, step, (float(watcher.signalled), float(ckpt_due)))
                with t("sparse_update"):
                    self.emb.backward(ticket, d_pooled, step)
                    if any(s.eviction is not None for s in self.specs):
                        self.emb.evict(step)
                self._after_sparse_update(step)
                self.step, self._reader_state = step, state
                if self.online is not None:     # dense weights too where a checkpoint follows
                    self.online.export(step, boundary=last_step or flags[0] > 0 or flags[1] > 0
                                       or bool(ck is not None and ck.every_steps
                                               and step % ck.every_steps == 0))
                self.losses.append(loss)
                window_samples += int(batch.global_size or self.global_batch)
                window_loss.append(loss)
                preempted = flags[0] > 0
                if nxt is not None and not cfg.overlap and not preempted and not defer:
                    with t("exchange"):
                        next_ticket = self.emb.start_lookup(self.jagged(nxt), step + 1)
                if step % mcfg.every_steps == 0 or (nxt is None and not streaming) or preempted:
                    dt = time.perf_counter() - window_t0
                    self._report(log, step, window_loss, window_samples / max(dt, 1e-9))
                    self._window_loss = float(np.mean(window_loss))
                    if self.online is not None:
                        self.online.report(log, step)
                    window_t0, window_samples, window_loss = time.perf_counter(), 0, []
                new_best = False    # evaluated before the checkpoint: it holds the count
                if cfg.eval.interval and step % cfg.eval.interval == 0 and nxt is not None \
                        and not preempted:
                    t_eval = time.perf_counter()
                    with t("eval"):
                        metrics = self.evaluate()
                    self._log_eval(log, metrics)
                    new_best = self._count_eval(metrics)
                    window_t0 += time.perf_counter() - t_eval   # samples/s: training time only
                if ck is not None and (preempted or flags[1] > 0 or new_best or
                                       (ck.every_steps and step % ck.every_steps == 0)) \
                        and not self._final_eval_follows(nxt, streaming, preempted):
                    t_save = time.perf_counter()
                    last_ckpt = self.save_checkpoint()
                    last_ckpt_time = time.monotonic()
                    window_t0 += time.perf_counter() - t_save   # samples/s: training time only
                if preempted:
                    stopped = "preempted"
                    log.message(f"stopping at step {step}: {watcher.reason or 'signal'} on some "
                                f"rank; checkpoint {last_ckpt or '(no checkpoint configured)'}")
                    break
                if self.best is not None and self.best.stopped:
                    stopped = "early_stopped"
                    b = self.best
                    log.message(f"early stopping at step {step}: no {b.metric} improvement in "
                                f"{b.bad} evaluations; best " + (
                                    f"{b.best:.6f} at step {b.best_step}" if b.best_step
                                    else "none (no finite value)"))
                    break
                if defer and nxt is not None:
                    with t("exchange"):
                        next_ticket = self.emb.start_lookup(self.jagged(nxt), step + 1)
                if streaming and not last_step:
                    nxt, nxt_state = self._next_batch(it)
                    if nxt is not None:
                        with t("exchange"):
                            next_ticket = self.emb.start_lookup(self.jagged(nxt), step + 1)
                batch, state = nxt, nxt_state
            else:
                if steps_this_call == 0 and self.step == 0 and (
                        self.online is None or self.online.stop_reason is None):
                    raise ConfigError(f"{cfg.source}: data.train yields no batch")
            if self.online is not None and self.online.stop_reason is not None \
                    and stopped != "preempted":
                stopped = "preempted"
                if ck is not None and self._ckpt_step != self.step:
                    last_ckpt = self.save_checkpoint()
                log.message(f"stopping at step {self.step}: {self.online.stop_reason} while "
                            f"waiting for stream data; checkpoint "
                            f"{last_ckpt or '(no checkpoint configured)'}")
            if max_steps is not None and steps_this_call >= max_steps and stopped == "done" \
                    and not self._done(self.step):
                stopped = "max_steps"
            # the loss of the last reported window (the live line's), not of one batch
            loss = self._window_loss if self._window_loss is not None else loss
            result = {"step": self.step, "loss": loss, "stopped": stopped, "eval": None}
            if self.online is not None:      # the last step's delta, checkpoint or not
                self.online.finish(log, self.step)
            final_save = stopped in ("done", "max_steps", "early_stopped") and ck is not None
            if final_save and self.best is None and self._ckpt_step != self.step:
                last_ckpt = self.save_checkpoint()
            if stopped == "done":
                if cfg.data.eval is not None and cfg.eval.at_end:
                    with t("eval"):
                        result["eval"] = self.evaluate()
                    self._log_eval(log, result["eval"])
                    self._count_eval(result["eval"])
            # keep_best, early stopping: after the final evaluation, so that it counts
            if final_save and self._ckpt_step != self.step:
                last_ckpt = self.save_checkpoint()
            result["checkpoint"] = last_ckpt
            result["best"] = self._best_result()
            return result
        finally:
            t.observer = None
            stall.close()
            log.close()
            if own_watcher:
                watcher.close()

    def _done(self, step):
        return self.cfg.steps is not None and step >= self.cfg.steps
