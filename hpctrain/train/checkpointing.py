"""Saving and restoring a ``Trainer`` (``Trainer`` mixin).

A checkpoint holds the dense parameters and optimizer state, every rank's table shard
(through the embedding store's ``export``) and the run state (reader position, config,
last losses); restoring re-routes rows to their owners under the current world size,
after the checkpoint's content was checked against this model.
"""
import os

from hpctrain.errors import ConfigError


class Checkpointing:
    """``save_checkpoint`` and ``restore``."""

    def save_checkpoint(self):
        """Write a checkpoint of the current step; returns its path (all ranks)."""
        from hpctrain.versions import versions
        if self.ckpt is None:
            raise ConfigError(f"{self.cfg.source}: no [checkpoint] section: nowhere to save")
        with self.timer("checkpoint"):
            dense = {"params": self.model.state_dict(), "optimizer": self.opt.state_dict()}
            tables = self.emb.export()
            state = {"step": self.step, "reader": self._reader_state, "config": self.cfg.text,
                     "versions": versions(), "world_size": self.comm.size,
                     "seed": self.cfg.seed, "losses_tail": self.losses[-5:],
                     "window_loss": self._window_loss, **self._best_state()}
            path = self.ckpt.save(self.step, dense, tables, state, table_ids=self.table_ids)
        self._ckpt_step = self.step
        if self.online is not None:      # a delta boundary; a stream may acknowledge
            self.online.checkpointed(self.step)
        return path

    def restore(self, path=None, missing_ok=False):
        """Load a checkpoint (default: the latest complete one) onto this world.

        Rows are re-routed to their owners under the current world size, so a
        checkpoint written by any number of ranks restores here.

        Returns:
            The checkpoint's step, or None when ``missing_ok`` and there is none.
        """
        from hpctrain.errors import CheckpointError
        if self.ckpt is None:
            raise ConfigError(f"{self.cfg.source}: resuming needs a [checkpoint] section")
        if path is None and missing_ok and self.ckpt.latest(strict=True) is None:
            return None
        step, dense, tables, state = self.ckpt.load(
            path, owner=self.emb.owner_of,
            table_dims={s.name: s.dim for s in self.specs},
            dense_like={"params": self.model.state_dict(), "optimizer": self.opt.state_dict()},
            tables_like=self.emb.export())
        try:
            self.model.load_state_dict(dense["params"])
            self.opt.load_state_dict(dense["optimizer"])
            self.emb.import_(tables)
        except KeyError as e:
            raise CheckpointError(f"checkpoint of step {step}: missing entry {e}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint of step {step}: does not fit this model: "
                                  f"{e}") from None
        if state.get("reader") is not None:
            self.reader.restore(state["reader"])
            self._reader_state = state["reader"]
        self.step = int(step)
        self._ckpt_step = self.step
        if self.online is not None:
            self.online.restored(self.step)
        self._restored_from = path or os.path.join(self.ckpt.directory, f"step-{int(step):08d}")
        tail = state.get("losses_tail") or []
        self._last_loss = float(tail[-1]) if tail else float("nan")
        self._window_loss = state.get("window_loss")
        if self.best is not None:
            self.best.restore(state.get("early_stopping"))
        return self.step
