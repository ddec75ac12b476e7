"""Checks a run makes before step 1, and the line it starts with (``Trainer`` mixin).

Whatever would otherwise fail only after training (unreadable eval files, an unwritable
checkpoint directory) or silently mix two runs (another run's checkpoints or metrics in
the directories of a fresh one) is a named error before the first step; rank 0 looks and
every rank raises the same error.
"""
import os

from hpctrain.errors import ConfigError


class RunChecks:
    """Pre-flight checks and the start line of ``Trainer.fit``."""

    def _preflight(self):
        """What would otherwise fail only after training, checked before step 1: the eval
        files can be read and the checkpoint directory written (rank 0 looks, every rank
        raises the same named error)."""
        from hpctrain.errors import CheckpointError, DataError
        cfg, problem = self.cfg, None
        if self.comm.rank == 0:
            ev = cfg.data.eval
            for path in (ev.paths if ev is not None else []):
                if not os.path.isfile(path) or not os.access(path, os.R_OK):
                    why = "does not exist" if not os.path.exists(path) else \
                        "is not a readable file"
                    problem = ("data", f"{cfg.source}: data.eval.paths: {path} {why} (checked "
                                       f"before training, not after it)")
                    break
            ck = self.ckpt
            if problem is None and ck is not None:
                try:
                    ck.ensure_directory()
                    writable = os.access(ck.directory, os.W_OK | os.X_OK)
                except OSError as e:
                    writable, why = False, e.strerror
                except CheckpointError as e:
                    writable, why = False, str(e)
                else:
                    why = "not writable by this user"
                if not writable:
                    problem = ("checkpoint", f"{cfg.source}: checkpoint.directory: "
                                             f"{ck.directory}: {why} (checked before training)")
        problem = self.comm.bcast(problem)
        if problem is not None:
            raise (DataError if problem[0] == "data" else CheckpointError)(problem[1])

    def _check_fresh_start(self):
        """A fresh run never trains over another run's checkpoints or appends to its
        metrics: ``ConfigError`` naming them (decided on rank 0, raised on every rank)."""
        cfg, found = self.cfg, []
        if self.comm.rank == 0:
            if self.ckpt is not None and self.ckpt.checkpoints():
                found.append(f"checkpoints in {self.ckpt.directory}")
            path = cfg.metrics.path
            if path and os.path.isfile(path) and os.path.getsize(path) > 0:
                found.append(f"metrics in {path}")
        found = self.comm.bcast(found)
        if found:
            raise ConfigError(
                f"{cfg.source}: a fresh run would mix with another run's files "
                f"({'; '.join(found)}): continue that run with --resume, or give this one a "
                f"new [checkpoint] directory and [metrics] path")

    def _start_line(self, resume):
        """What this run starts from, where, and on what: one line on rank 0."""
        cfg, comm = self.cfg, self.comm
        what = (f"resumed at step {self.step} from {self._restored_from}" if self.step
                else "fresh start" + (" (no checkpoint to resume)" if resume else ""))
        length = (f"{cfg.steps} steps" if cfg.steps is not None else "") + (
            f"{' or ' if cfg.steps is not None else ''}{cfg.epochs} epoch(s)"
            if cfg.epochs is not None else "") or "until the stream's END"
        return (f"hpctrain: {what}; {length} of global batch {self.global_batch}; "
                f"{comm.size} rank(s) x {self.threads} thread(s); data {cfg.data.format}; "
                f"mode {cfg.mode}")
