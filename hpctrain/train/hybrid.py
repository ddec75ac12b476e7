"""Hybrid mode: parameter-server ranks and worker groups (KunPeng-style, SSP across groups).

One job, ``S`` server ranks and ``W`` worker ranks in ``G`` groups (``hpctrain.ps``)::

    worker (group g, clock c = step)              server i
    wait ROWS(c), send PULL(c + 1) (prefetch)
    leader: wait DROWS(c), broadcast in the group
    dense forward / backward, group allreduce
    PUSH(c) (per-id gradient sums)  ───────────>  buffered; clock c applied once every
    leader: DPUSH(c), DPULL(c + 1)  ───────────>  worker and every leader pushed it
                                    <───────────  ROWS / DROWS answered once
                                                  applied >= clock - 1 - s

Workers run the collective ``Trainer`` with two hooks changed: the embedding
store is a ``PSClient`` and the dense update goes through the servers
(``ps.dense_on_servers``, the default) or, without it, is the collective
allreduce over all workers (PERSIA's layout: dense synchronous, embeddings on
the servers). With ``device = "gpu"`` the dense step is the collective device
step with the group in place of the world (``hpctrain.train.hybrid_device``); the
servers stay on CPUs. Servers run ``run_server``. ``run_hybrid`` does both: every rank
calls it, and it returns the worker's ``fit`` result (None on servers).

What a worker's loss means: the mean over its group's part of each global batch
(with G = 1 the global loss, exactly as in collective mode). ``loss_parts``
keeps ``(loss sum, samples)`` per step so groups can be combined afterwards.

Checkpoints (``hpctrain.ps.checkpoint``): at a checkpointed clock K worker 0 sends
the servers CKPT(K) with the run state, and the servers write the checkpoint once K
is applied, in the collective format. Resuming, the workers read dense.h5 and worker
0 sends the servers RESTORE(K); the servers reshard the rows by key. A stop signal
(SIGTERM/SIGUSR1) anywhere goes to server 0, which settles the clock every worker
stops at; they train it, checkpoint it and return ``stopped = "preempted"``.

Deltas (``[online]``, ``hpctrain.ps.delta``): the workers keep the collective schedule
(``HybridOnline``) and worker 0 sends DELTA(K) after its PUSH of K, as it sends CKPT(K);
the servers write the delta of clock K once K is applied, in the collective layout.
Stream sources are read in collective mode only.
"""
import math
import os
import sys
import time

import numpy as np

from hpctrain.errors import ConfigError, NonFiniteError
from hpctrain.train.build import dense_optimizer, table_specs
from hpctrain.train.loop import Trainer
from hpctrain.train.online import Online


def _check_config(cfg):
    if cfg.mode != "hybrid" or cfg.ps is None:
        raise ConfigError(f"{cfg.source}: mode: the hybrid trainer needs mode = \"hybrid\" "
                          f"and a [ps] section, got mode {cfg.mode!r}")
    fmt = cfg.data.format
    if fmt in ("stream", "jetstream"):
        raise ConfigError(f"{cfg.source}: data.format: hybrid mode does not read streams "
                          f"({fmt!r}): waiting for stream data would be a collective across "
                          f"all worker groups at every step, and JetStream acknowledgements "
                          f"need the servers' checkpoint commits; train on a stream in "
                          f"collective mode ([online] delta export works in both modes)")


class HybridOnline(Online):
    """``Online`` of a hybrid worker: the collective schedule, the servers write.

    Every worker keeps the delta schedule (every ``delta_every_steps``, every checkpoint,
    the end; so the workers' records agree), and worker 0 sends DELTA(K) to the servers
    right after its PUSH of K (``hpctrain.ps.delta``), which write the delta once K is
    applied. Progressive validation scores each batch with the rows of its training pull
    and the dense parameters of its clock (the pending dense pull is installed first), and
    gathers the scores over the worker's group: worker 0 reports group 0's part of each
    global batch, as it reports the loss (G = 1: the whole batch).
    """

    def __init__(self, trainer):
        super().__init__(trainer)
        self.comm = trainer.group_comm

    def _track_evictions(self):
        """Nothing here: the servers' tables track evictions (``run_server`` passes them
        the ``[online]`` section)."""

    def _write(self, step, with_dense):
        """Worker 0: DELTA(``step``) to every server; returns ``(path, None, None)`` (the
        path the servers commit; the row counts are in the servers' metrics files)."""
        from hpctrain.checkpoint.delta import delta_name
        from hpctrain.dense.backend import to_numpy
        from hpctrain.ps.checkpoint import dense_layout
        from hpctrain.ps.delta import request_delta
        t = self.t
        if t.worker == 0:
            dense = None
            if with_dense:
                params = None if t.dense_on_servers else to_numpy(t.model.params.data)
                dense = (dense_layout(t.model.params), t.cfg.text, params)
            t._ckpt_sends = [s for s in t._ckpt_sends if not s.test()]
            t._ckpt_sends += request_delta(t.p2p, t.roles.servers, step, t.worker, t.group,
                                           self.last_delta, dense)
        return os.path.join(self.cfg.directory, delta_name(step)), None, None

    def progressive(self, batch, pooled):
        """Score ``batch`` with the parameters its clock trains from (see the class)."""
        if self.cfg is not None and self.cfg.progressive:
            self.t._receive_dense(self.t.step + 1)
        super().progressive(batch, pooled)


class HybridTrainer(Trainer):
    """The trainer of one worker rank in hybrid mode.

    Args:
        cfg: a validated ``Config`` with ``mode = "hybrid"``.
        roles: this job's ``hpctrain.ps.roles.Roles`` (this rank a worker).
        p2p: the ``hpctrain.comm.p2p.PointToPoint`` over the world (the servers'
            too: creating it is collective over the world).
        stream: where worker 0's live line goes.

    Attributes:
        comm: the communicator of all workers (data slices, evaluation).
        group_comm: this worker's group (dense allreduce).
        emb: the ``PSClient``.
        loss_parts: per step, ``(loss sum, samples)`` of this worker's group.
    """

    MODE = "hybrid"

    def __init__(self, cfg, roles, p2p, *, stream=None):
        _check_config(cfg)
        if roles.is_server:
            raise ValueError("HybridTrainer runs on worker ranks; servers call run_server")
        self.roles, self.p2p = roles, p2p
        self.group, self.worker = roles.group, roles.worker_index
        self.group_comm = roles.group_comm
        self.groups = roles.groups
        self.dense_on_servers = cfg.ps.dense_on_servers
        # Prefetch: the next clock's PULL leaves before this clock's dense step. With
        # s = 0 the server holds it until this clock is applied (same numbers as
        # without); with s >= 1 it hides the round trip.
        super().__init__(cfg.replace(overlap=True), roles.role_comm, stream=stream)
        self.loss_parts = []
        self._stop_sent = False
        self._ckpt_sends = []
        self.dense = None
        self._dpull = None          # the clock whose dense pull is pending
        self._dpush = None          # the clock whose reduced gradient awaits its DPUSH
        self._host = None
        self._staging = None        # DenseStaging: the pinned dense traffic of a device
        if self.dense_on_servers:
            from hpctrain.dense.backend import to_numpy
            from hpctrain.ps.dense import DenseClient
            leader = self.group_comm.rank == 0
            self.dense = DenseClient(p2p, roles.servers, self.group_comm, leader,
                                     self.worker, self.group, self.model.params.size,
                                     cfg.ps.timeout_s)
            if self.worker == 0:
                self.dense.init_servers(to_numpy(self.model.params.data))
            if self.device.pipelined:
                from hpctrain.train.hybrid_device import DenseStaging
                self._staging = DenseStaging(self.device, self.model.params.size,
                                             self.model.params.dtype, leader)
            else:
                self._host = np.empty(self.model.params.size, dtype=np.float32)

    # ------------------------------------------------------------------ hooks
    def _make_dense_comm(self, over=None):
        """Dense through the servers: the group reduces its gradients first; else all workers."""
        return super()._make_dense_comm(self.group_comm if self.dense_on_servers else over)

    def _make_online(self):
        """Delta export through the servers and progressive validation (``HybridOnline``)."""
        return HybridOnline(self) if self.cfg.online is not None else None

    def _make_store(self):
        from hpctrain.ps.client import PSClient
        return PSClient(self.specs, self.p2p, self.roles.servers, self.worker, self.group,
                        timeout_s=self.cfg.ps.timeout_s)

    def _apply_dense(self, step):
        """Dense update of ``step``: through the servers, or allreduced over all workers.

        Through the servers, the group's reduced gradient is clipped (``clip_norm``; the
        config allows it with one group only, where that is the whole gradient); on a
        device the leader starts copying it to the host. It is pushed once the step's
        sparse update has gone out (``_after_sparse_update``), and the servers' optimizers
        follow the ``schedule`` by clock.
        """
        if not self.dense_on_servers:
            super()._apply_dense(step)
            return
        from hpctrain.dense.parallel import allreduce_gradients
        with self.timer("allreduce"), self.device.phase("allreduce"):
            allreduce_gradients(self.model.params, self.dense_comm)
        self._clip_dense()
        if self._staging is not None:
            self._staging.start_download(self.model.params.grad)
        self._dpush = step

    def _after_sparse_update(self, step):
        """Leader: DPUSH the group's reduced gradient of ``step`` and DPULL ``step + 1``
        (after the step's PUSH, so that on a device the host sent the sparse update while
        the device reduced and copied the gradient)."""
        if self._dpush != step:
            return
        from hpctrain.dense.backend import to_numpy
        self._dpush = None
        with self.timer("dense_push"):
            grad = (self._staging.gradient() if self._staging is not None
                    else to_numpy(self.model.params.grad))
            self.dense.push(step, grad)
            self.dense.start_pull(step + 1)
        self._dpull = step + 1

    def _gradient_divisor(self, batch, samples):
        """What the gradients are divided by: the group's reduced sample count with one
        group (as in collective mode), else the global batch's sample count."""
        return samples if self.groups == 1 else np.float64(batch.global_size
                                                           or self.global_batch)

    def _group_loss(self, step, loss_sum, samples):
        """The group's mean loss; a non-finite one stops the job before the clock is
        pushed."""
        loss = float(loss_sum / max(samples, 1.0))
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"step {step}: the loss of group {self.group} is {loss} (non-finite); the job "
                f"stops before this clock is applied. Lower the learning rates or check the "
                f"data around this step.")
        return loss

    def _dense_step(self, batch, pooled, step, flags):
        """The collective ``_dense_step`` with the group in place of the world.

        The loss and the sample count are reduced inside the group only (no
        collective across groups); gradients are divided by the global batch's
        sample count (with G = 1 the reduced count, as in collective mode). A model on
        a device runs the device step (``hpctrain.train.hybrid_device``).
        """
        if flags[0] > 0 and not self._stop_sent:
            # a stop signal here: server 0 settles the clock every worker stops at
            self._stop_sent = True
            signum = getattr(self._watcher, "signum", None)
            self.emb.request_stop(step, signum if signum is not None else 0)
        self._receive_dense(step)
        if self.device.pipelined:
            if self._device_step is None:
                from hpctrain.train.hybrid_device import HybridDeviceStep
                self._device_step = HybridDeviceStep(self)
            loss, d_pooled, _ = self._device_step(batch, pooled, step, flags)
            self.loss_parts.append(self._device_step.parts)
        else:
            loss, d_pooled = self._host_step(batch, pooled, step)
        # [stop here (the settled stop clock), checkpoint now (worker 0's every_minutes)]
        stop = self.emb.stop_clock
        out = np.array([1.0 if stop and step >= stop else 0.0, flags[1]])
        return loss, d_pooled, out

    def _host_step(self, batch, pooled, step):
        """Forward, group loss, backward and dense update of a model on the host."""
        from hpctrain.dense.loss import bce_with_logits
        t, comm = self.timer, self.comm
        with t("dense"):
            if self.model.dropouts():
                self.model.reseed_dropout((self.cfg.seed * 1_000_003 + step) * comm.size
                                          + comm.rank)
            logits = self.model.forward(
                batch.dense, self.transfer.to_device([pooled[f] for f in self.features]))
            loss_sum, d_logits = bce_with_logits(logits, batch.labels, denom=1)
        with t("allreduce"):
            red = np.array([batch.size, loss_sum], dtype=np.float64)
            self.group_comm.allreduce(red, op="sum")
        n = self._gradient_divisor(batch, red[0])
        loss = self._group_loss(step, red[1], red[0])
        with t("dense"):
            d_logits *= 1.0 / n
            d_embs = self.transfer.to_host(self.model.backward(d_logits))
        self._apply_dense(step)
        self.loss_parts.append((float(red[1]), float(red[0])))
        return loss, dict(zip(self.features, d_embs))

    def _done(self, step):
        """The last step: the configured one, or the clock a stop signal settled on (then
        no batch after it is read or pulled)."""
        stop = self.emb.stop_clock
        return super()._done(step) or bool(stop and step >= stop)

    def _receive_dense(self, step):
        """Install the servers' dense parameters for ``step`` when that pull is pending."""
        if self._dpull != step:
            return
        self._dpull = None
        self._install_dense(step, fresh=False)

    def _install_dense(self, clock, fresh):
        """Receive the dense parameters of ``clock`` and make them the model's (on a
        device: copied up in stream order, before the next forward)."""
        buf = self._staging.buffer() if self._staging is not None else self._host
        with self.timer("dense_pull"):
            self.dense.wait_pull(clock, buf, fresh=fresh)
        if self._staging is not None:
            self._staging.install(self.model.params.data)
        else:
            xp = self.model.params.xp
            self.model.params.data[...] = buf if xp is np else xp.asarray(buf)

    def _fresh_dense(self):
        """Install the dense parameters with every clock up to ``self.step`` applied."""
        if self._dpull is not None:
            self._receive_dense(self._dpull)     # drain the prefetched pull first
        self.dense.start_pull(self.step, fresh=True)
        self._install_dense(self.step, fresh=True)

    def _report(self, log, step, window_loss, samples_per_s):
        """Live line and one JSON-lines record from worker 0 (no collective across groups)."""
        from hpctrain.memory import peak_rss_bytes
        phases = self._take_phases()
        per_rank = self.group_comm.allgather_object((phases, peak_rss_bytes()))
        names = sorted({k for p, _ in per_rank for k in p})
        st = self.emb.stats()
        k = len(window_loss)
        recent = np.asarray(self.emb.staleness[-k:] if k else [], dtype=np.int64)
        loss = float(np.mean(window_loss))
        log.live(step, loss, samples_per_s)
        rec = {"step": step, "loss": loss, "samples_per_s": samples_per_s, "group": self.group,
               "time": time.time(), "workers": self.comm.size,
               "groups": self.groups, "phases_s": {n: max(p.get(n, 0.0) for p, _ in per_rank)
                                                   for n in names},
               "peak_rss_bytes": [rss for _, rss in per_rank],
               "staleness_mean": float(recent.mean()) if recent.size else 0.0,
               "staleness_max": int(recent.max()) if recent.size else 0,
               "pull_wait_s": float(np.sum(self.emb.wait_s[-k:])) if k else 0.0,
               "sent_bytes": st["sent_bytes"], "recv_bytes": st["recv_bytes"]}
        if self.dense is not None and self.dense.staleness:
            rec["dense_staleness_max"] = int(max(self.dense.staleness[-k:]))
        rec.update(self._optimizer_metrics(step))
        log.write(rec)

    # ------------------------------------------------------------------ evaluation
    def _lockstep_comm(self):
        """Groups run at their own clocks: only a group reads in lockstep."""
        return self.group_comm

    def _predict_local(self, split, gb):
        """As the collective one (``predict``, ``evaluate``), reading every clock up to the
        current step."""
        if self.dense_on_servers and self.step > 0:
            self._fresh_dense()
        return super()._predict_local(split, gb)

    # ------------------------------------------------------------------ checkpoints
    def _dense_state(self):
        """``(params, {slot: values}, step)``: flat host copies of the dense model and its
        optimizer on this worker."""
        from hpctrain.dense.backend import to_numpy
        st = self.opt.state_dict()
        return (np.array(to_numpy(self.model.params.data)),
                {k: v for k, v in st.items() if k != "step"}, int(st["step"]))

    def save_checkpoint(self):
        """Ask the servers for the checkpoint of this clock; returns its path (all workers).

        Worker 0 sends CKPT with the run state (the others only note the step); the
        servers write the checkpoint once they have applied this clock, while the
        workers go on (``hpctrain.ps.checkpoint``).
        """
        from hpctrain.checkpoint.manager import step_dir
        from hpctrain.ps.checkpoint import dense_layout, request_checkpoint
        from hpctrain.versions import versions
        if self.ckpt is None:
            raise ConfigError(f"{self.cfg.source}: no [checkpoint] section: nowhere to save")
        if self.worker == 0:
            with self.timer("checkpoint"):
                ps = self.cfg.ps
                state = {"step": self.step, "reader": self._reader_state,
                         "config": self.cfg.text, "versions": versions(),
                         "world_size": self.roles.num_servers, "seed": self.cfg.seed,
                         "losses_tail": self.losses[-5:], "window_loss": self._window_loss,
                         "mode": "hybrid",
                         "ps": {"servers": self.roles.num_servers,
                                "workers": self.roles.num_workers, "groups": self.groups,
                                "consistency": ps.consistency, "staleness": ps.staleness,
                                "dense_on_servers": self.dense_on_servers},
                         **self._best_state()}
                dense = None if self.dense_on_servers else self._dense_state()
                self._ckpt_sends = [s for s in self._ckpt_sends if not s.test()]
                self._ckpt_sends += request_checkpoint(
                    self.p2p, self.roles.servers, self.step, self.worker, self.group, state,
                    dense_layout(self.model.params), dense)
        self._ckpt_step = self.step
        if self.online is not None:      # a delta boundary (DELTA after the CKPT)
            self.online.checkpointed(self.step)
        return os.path.join(self.ckpt.directory, step_dir(self.step))

    def restore(self, path=None, missing_ok=False):
        """Resume from a checkpoint (default: the latest complete one); collective over the
        workers, and worker 0 tells the servers (RESTORE), which wait for it.

        The checkpoint may come from a hybrid run of any S, G and W, or from a collective
        run of any size: rows are keyed, the dense model is one flat buffer, the reader
        position is global.

        Returns:
            The checkpoint's step, or None when ``missing_ok`` and there is none (the
            servers are told to start afresh).
        """
        from hpctrain.checkpoint import read_dense, verify
        from hpctrain.errors import CheckpointError
        from hpctrain.ps.checkpoint import request_restore
        if self.ckpt is None:
            raise ConfigError(f"{self.cfg.source}: resuming needs a [checkpoint] section")
        if path is None:
            path, hashed = self.ckpt.latest(strict=True), True
            if path is None:
                if not missing_ok:
                    raise CheckpointError(f"no complete checkpoint in {self.ckpt.directory}")
                if self.worker == 0:
                    self._ckpt_sends += request_restore(self.p2p, self.roles.servers, -1,
                                                        self.worker, self.group)
                return None
        else:
            path, hashed = self._resolve_checkpoint(path), False
        manifest, problem = verify(path, self.comm, hash_files=not hashed)
        if problem:
            raise CheckpointError(f"checkpoint {path}: {problem}")
        dense, state = read_dense(path, manifest)
        step = int(manifest["step"])
        try:
            self.model.load_state_dict(dense["params"])
            self.opt.load_state_dict(dense["optimizer"])
        except KeyError as e:
            raise CheckpointError(f"checkpoint of step {step}: missing dense entry {e}") from None
        if state.get("reader") is not None:
            self.reader.restore(state["reader"])
            self._reader_state = state["reader"]
        self.step = self._ckpt_step = step
        if self.online is not None:
            self.online.restored(step)
        self._restored_from = path
        tail = state.get("losses_tail") or []
        self._last_loss = float(tail[-1]) if tail else float("nan")
        self._window_loss = state.get("window_loss")
        if self.best is not None:
            self.best.restore(state.get("early_stopping"))
        if self.worker == 0:
            self._ckpt_sends += request_restore(
                self.p2p, self.roles.servers, step, self.worker, self.group, path,
                self._dense_state() if self.dense_on_servers else None)
        return step

    def _resolve_checkpoint(self, path):
        """A checkpoint path as ``CheckpointManager.load`` reads it (worker 0 decides, and
        its error is raised on every worker): a name under the checkpoint directory, and
        ``best`` (``hpctrain train --resume best``) the checkpoint ``best.json`` names."""
        from hpctrain.checkpoint.manager import resolve_best
        from hpctrain.errors import CheckpointError
        path, error = os.fspath(path), None
        if self.comm.rank == 0:
            if not os.path.isabs(path) and not os.path.exists(path):
                path = os.path.join(self.ckpt.directory, path)
            try:
                path = os.path.abspath(resolve_best(path))
            except CheckpointError as exc:
                error = str(exc)
        path, error = self.comm.bcast((path, error), root=0)
        if error:
            raise CheckpointError(f"resuming from {path}: {error}")
        return path

    def close(self):
        """Finish: install any pending dense pull, then tell the servers (DONE)."""
        if self._dpull is not None:
            self._receive_dense(self._dpull)
        if self.dense is not None:
            self.dense.finish()
        for s in self._ckpt_sends:
            s.wait()
        self._ckpt_sends = []
        self.emb.close()


def run_server(cfg, roles, p2p, stream=None, resume=False):
    """Serve this rank's shard until every worker has finished.

    With ``resume`` (the workers' ``fit(resume=...)`` must get it too) the server first
    waits for worker 0's RESTORE. A stop signal (SIGTERM/SIGUSR1) on this rank stops the
    job at a clock server 0 settles, as one on a worker does.

    Returns:
        ``(stats, server)``.
    """
    _check_config(cfg)
    from hpctrain.ps.server import Server
    from hpctrain.train.preemption import PreemptionWatcher
    make_opt = None
    if cfg.ps.dense_on_servers:
        def make_opt(params):
            return dense_optimizer(cfg, params)
    metrics = None
    if cfg.metrics.path:
        root, ext = (cfg.metrics.path.rsplit(".", 1) + [""])[:2]
        metrics = f"{root}.server{roles.server_index}" + (f".{ext}" if ext else "")
    ckpt = None
    if cfg.checkpoint is not None:
        from hpctrain.checkpoint import CheckpointManager
        ckpt = CheckpointManager(cfg.checkpoint.directory, roles.role_comm,
                                 keep_last=cfg.checkpoint.keep_last)
    with PreemptionWatcher() as watcher:
        server = Server(table_specs(cfg), p2p, roles, seed=cfg.seed,
                        consistency=cfg.ps.consistency, staleness=cfg.ps.staleness,
                        timeout_s=cfg.ps.timeout_s, make_dense_optimizer=make_opt,
                        every_clocks_log=cfg.ps.every_clocks_log, log=stream or sys.stderr,
                        metrics_path=metrics, checkpoints=ckpt, watcher=watcher,
                        online=cfg.online)
        if resume:
            server.restore()
        stats = server.run()
    return stats, server


def setup_hybrid(cfg, world=None):
    """Split the world into roles and open the transport (collective over the world).

    Returns:
        ``(roles, p2p)``.

    Raises:
        ConfigError: the world does not fit ``[ps]`` (servers, groups), naming the key.
    """
    from hpctrain.comm import create_communicator
    from hpctrain.comm.p2p import PointToPoint
    from hpctrain.ps.roles import split_roles
    _check_config(cfg)
    world = world if world is not None else create_communicator("mpi")
    servers, _, _ = cfg.ps_layout(world.size)
    roles = split_roles(world, servers, cfg.ps.groups, cfg.ps.placement)
    return roles, PointToPoint(world)


def run_hybrid(cfg, world=None, max_steps=None, stream=None, resume=False):
    """Every rank of a hybrid job calls this: servers serve, workers train.

    Returns:
        On workers, the ``fit`` result (with ``ps`` stats of the client); on servers None.
    """
    roles, p2p = setup_hybrid(cfg, world)
    if roles.is_server:
        run_server(cfg, roles, p2p, stream=stream, resume=resume)
        return None
    trainer = HybridTrainer(cfg, roles, p2p, stream=stream)
    # no try/finally: after an error close() would wait for servers that wait for this
    # rank; the error must reach the launcher, which ends the whole job
    result = trainer.fit(resume=resume, max_steps=max_steps)
    trainer.close()
    result["ps"] = trainer.emb.stats()
    result["worker_index"] = roles.worker_index
    return result
