"""Hybrid mode: parameter-server ranks and worker groups (KunPeng-style, SSP across groups).

One job, ``S`` server ranks and ``W`` worker ranks in ``G`` groups (``hpctrain.ps``)::

    worker (group g, clock c = step)              server i
    wait ROWS(c), send PULL(c + 1) (prefetch)
    leader: wait DROWS(c), broadcast in the group
    dense forward / backward, group allreduce
    leader: DPUSH(c), DPULL(c + 1)  ───────────>  buffered; clock c applied once every
    PUSH(c) (per-id gradient sums)  ───────────>  worker and every leader pushed it
                                    <───────────  ROWS / DROWS answered once
                                                  applied >= clock - 1 - s

Workers run the collective ``Trainer`` with two hooks changed: the embedding
store is a ``PSClient`` and the dense update goes through the servers
(``ps.dense_on_servers``, the default) or, without it, is the collective
allreduce over all workers (PERSIA's layout: dense synchronous, embeddings on
the servers). Servers run ``run_server``. ``run_hybrid`` does both: every rank
calls it, and it returns the worker's ``fit`` result (None on servers).

What a worker's loss means: the mean over its group's part of each global batch
(with G = 1 the global loss, exactly as in collective mode). ``loss_parts``
keeps ``(loss sum, samples)`` per step so groups can be combined afterwards.
"""
import math
import sys
import time

import numpy as np

from hpctrain.errors import ConfigError, HpctrainError, NonFiniteError
from hpctrain.train.build import dense_optimizer, table_specs
from hpctrain.train.loop import Trainer


class PreemptedError(HpctrainError):
    """A stop signal arrived in hybrid mode, which has no checkpoint to stop at yet."""


def _check_config(cfg):
    if cfg.mode != "hybrid" or cfg.ps is None:
        raise ConfigError(f"{cfg.source}: mode: the hybrid trainer needs mode = \"hybrid\" "
                          f"and a [ps] section, got mode {cfg.mode!r}")
    if cfg.checkpoint is not None:
        raise ConfigError(f"{cfg.source}: checkpoint: hybrid mode does not write checkpoints "
                          f"yet; remove the [checkpoint] section")
    if getattr(cfg, "online", None) is not None:
        raise ConfigError(f"{cfg.source}: online: hybrid mode has no delta export yet (rows "
                          f"live on the servers); remove the [online] section")


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
        self.dense = None
        self._dpull = None
        self._host = None
        if self.dense_on_servers:
            from hpctrain.dense.backend import to_numpy
            from hpctrain.ps.dense import DenseClient
            self.dense = DenseClient(p2p, roles.servers, self.group_comm,
                                     self.group_comm.rank == 0, self.worker, self.group,
                                     self.model.params.size, cfg.ps.timeout_s)
            if self.worker == 0:
                self.dense.init_servers(to_numpy(self.model.params.data))
            self._host = np.empty(self.model.params.size, dtype=np.float32)

    # ------------------------------------------------------------------ hooks
    def _make_dense_comm(self, over=None):
        """Dense through the servers: the group reduces its gradients first; else all workers."""
        return super()._make_dense_comm(self.group_comm if self.dense_on_servers else over)

    def _make_store(self):
        from hpctrain.ps.client import PSClient
        return PSClient(self.specs, self.p2p, self.roles.servers, self.worker, self.group,
                        timeout_s=self.cfg.ps.timeout_s)

    def _apply_dense(self, step):
        """Dense update of ``step``: through the servers, or allreduced over all workers."""
        if not self.dense_on_servers:
            super()._apply_dense(step)
            return
        from hpctrain.dense.backend import to_numpy
        from hpctrain.dense.parallel import allreduce_gradients
        with self.timer("allreduce"), self.device.phase("allreduce"):
            allreduce_gradients(self.model.params, self.dense_comm)
        with self.timer("dense_push"):
            self.dense.push(step, to_numpy(self.model.params.grad))
            self.dense.start_pull(step + 1)
        self._dpull = step + 1

    def _dense_step(self, batch, pooled, step, flags):
        """The collective ``_dense_step`` with the group in place of the world.

        The loss and the sample count are reduced inside the group only (no
        collective across groups); gradients are divided by the global batch's
        sample count (with G = 1 the reduced count, as in collective mode).
        """
        from hpctrain.dense.loss import bce_with_logits
        if flags[0] > 0:
            raise PreemptedError(f"step {step}: stop signal on worker {self.worker}; hybrid "
                                 f"mode has no checkpoint to stop at yet, so the job ends now "
                                 f"(restart it from the beginning)")
        self._receive_dense(step)
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
        n = red[0] if self.groups == 1 else np.float64(batch.global_size or self.global_batch)
        loss = float(red[1] / max(red[0], 1.0))
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"step {step}: the loss of group {self.group} is {loss} (non-finite); the job "
                f"stops before this clock is applied. Lower the learning rates or check the "
                f"data around this step.")
        with t("dense"):
            d_logits *= 1.0 / n
            d_embs = self.transfer.to_host(self.model.backward(d_logits))
        self._apply_dense(step)
        self.loss_parts.append((float(red[1]), float(red[0])))
        return loss, dict(zip(self.features, d_embs)), np.zeros(2)

    def _receive_dense(self, step):
        """Install the servers' dense parameters for ``step`` when that pull is pending."""
        if self._dpull != step:
            return
        self._dpull = None
        self._install_dense(step, fresh=False)

    def _install_dense(self, clock, fresh):
        with self.timer("dense_pull"):
            self.dense.wait_pull(clock, self._host, fresh=fresh)
        xp = self.model.params.xp
        self.model.params.data[...] = self._host if xp is np else xp.asarray(self._host)

    def _fresh_dense(self):
        """Install the dense parameters with every clock up to ``self.step`` applied."""
        if self._dpull is not None:
            self._receive_dense(self._dpull)     # drain the prefetched pull first
        self.dense.start_pull(self.step, fresh=True)
        self._install_dense(self.step, fresh=True)

    def _report(self, log, step, window_loss, samples_per_s):
        """Live line and one JSON-lines record from worker 0 (no collective across groups)."""
        from hpctrain.memory import peak_rss_bytes
        phases = self.timer.take()
        phases.update({f"sparse.{k}": v for k, v in self.emb.timers.items()})
        self.emb.reset_timers()
        for k, v in phases.items():
            self.phase_totals[k] = self.phase_totals.get(k, 0.0) + v
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
        log.write(rec)

    # ------------------------------------------------------------------ evaluation
    def predict(self, split="eval", global_batch=None):
        """As the collective ``predict``, reading every clock up to the current step."""
        if self.dense_on_servers and self.step > 0:
            self._fresh_dense()
        return super().predict(split, global_batch)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self):
        raise ConfigError(f"{self.cfg.source}: checkpoint: hybrid mode does not write "
                          f"checkpoints yet")

    def restore(self, path=None, missing_ok=False):
        if missing_ok and path is None:
            return None
        raise ConfigError(f"{self.cfg.source}: checkpoint: hybrid mode cannot resume from a "
                          f"checkpoint yet")

    def close(self):
        """Finish: install any pending dense pull, then tell the servers (DONE)."""
        if self._dpull is not None:
            self._receive_dense(self._dpull)
        if self.dense is not None:
            self.dense.finish()
        self.emb.close()


def run_server(cfg, roles, p2p, stream=None):
    """Serve this rank's shard until every worker has finished; returns the server's stats."""
    _check_config(cfg)
    from hpctrain.ps.server import Server
    make_opt = None
    if cfg.ps.dense_on_servers:
        def make_opt(params):
            return dense_optimizer(cfg, params)
    metrics = None
    if cfg.metrics.path:
        root, ext = (cfg.metrics.path.rsplit(".", 1) + [""])[:2]
        metrics = f"{root}.server{roles.server_index}" + (f".{ext}" if ext else "")
    server = Server(table_specs(cfg), p2p, roles, seed=cfg.seed,
                    consistency=cfg.ps.consistency, staleness=cfg.ps.staleness,
                    timeout_s=cfg.ps.timeout_s, make_dense_optimizer=make_opt,
                    every_clocks_log=cfg.ps.every_clocks_log, log=stream or sys.stderr,
                    metrics_path=metrics)
    return server.run(), server


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
        run_server(cfg, roles, p2p, stream=stream)
        return None
    trainer = HybridTrainer(cfg, roles, p2p, stream=stream)
    # no try/finally: after an error close() would wait for servers that wait for this
    # rank; the error must reach the launcher, which ends the whole job
    result = trainer.fit(resume=resume, max_steps=max_steps)
    trainer.close()
    result["ps"] = trainer.emb.stats()
    result["worker_index"] = roles.worker_index
    return result
