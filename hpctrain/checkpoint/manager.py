"""CheckpointManager: collective, atomic HDF5 checkpoints that restore onto any world size.

Layout, manifest and protocol are documented in docs/checkpoint.md::

    <directory>/
      step-00000100/
        MANIFEST.json                 written last: sizes and sha256 of every file
        dense.h5                      rank 0: /dense (parameters, optimizer state), /state
        tables-00000-of-00004.h5      rank r's table shards: /tables/<name>/{keys, values, ...}
        ...
      step-00000200/
      .step-00000300.tmp-1a2b3c4d/    a save in progress (or one that crashed): ignored
      best.json                       keep-the-best: {"checkpoint": "step-00000100", ...}

A save whose ``state["best"]`` names its own step (``{"step", "metric", "value"}``,
``[eval] keep_best``) points ``best.json`` at it once it is complete; pruning never deletes
the checkpoint ``best.json`` names, and ``load("best")`` reads it.
"""
import json
import operator
import os
import re
import secrets
import shutil
import stat
import time
import warnings

import numpy as np

from hpctrain.checkpoint import _files, _h5tree, _restore, _tables
from hpctrain.checkpoint._collective import (LocalComm, describe, fail, on_root,
                                             raise_together)
from hpctrain.errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d+)$")
_SCRATCH = re.compile(r"^\.step-\d+\.(tmp|old|trash)-[0-9a-f]+$")
_CHUNK_BYTES = 64 << 20
#: The keep-the-best pointer file in a checkpoint directory (no symlink: a plain JSON file).
BEST_FILE = "best.json"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (partial or corrupt) or could not be cleaned up."""


def step_dir(step):
    """Directory name of the checkpoint of ``step``."""
    return f"step-{step:08d}"


def read_best(directory):
    """The ``best.json`` of a checkpoint directory as a dict (``checkpoint``: the step
    directory's name, ``step``, ``metric``, ``value``), or None when there is none."""
    try:
        with open(os.path.join(directory, BEST_FILE), encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{os.path.join(directory, BEST_FILE)}: unreadable: "
                              f"{describe(exc)}") from None
    if not isinstance(doc, dict) or not _STEP_DIR.match(str(doc.get("checkpoint", ""))):
        raise CheckpointError(f"{os.path.join(directory, BEST_FILE)}: names no step-XXXXXXXX "
                              f"checkpoint")
    return doc


def resolve_best(path):
    """``path`` itself, or the checkpoint a ``best`` / ``best.json`` path points to (``DIR/best``,
    ``DIR/best.json``: the best checkpoint of the checkpoint directory ``DIR``)."""
    path = os.fspath(path)
    if os.path.basename(path) not in ("best", BEST_FILE) or os.path.isdir(path):
        return path
    directory = os.path.dirname(os.path.abspath(path))
    doc = read_best(directory)
    if doc is None:
        raise CheckpointError(f"{directory}: no best checkpoint ({BEST_FILE} is written by "
                              f"runs with [eval] keep_best = true)")
    return os.path.join(directory, doc["checkpoint"])


def _write_best(directory, step, best):
    """Point ``best.json`` at the checkpoint of ``step`` (written aside, fsynced, renamed)."""
    doc = {"checkpoint": step_dir(step), "step": int(step), "metric": best.get("metric"),
           "value": best.get("value")}
    tmp = os.path.join(directory, f".{BEST_FILE}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, default=_json_default)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, os.path.join(directory, BEST_FILE))
    _files.fsync_dir(directory)


def _consistency(gathered):
    """Problem text when ranks disagree on step or tables at save, else None."""
    errors = [(r, g[0]) for r, g in enumerate(gathered) if g[0]]
    if errors:
        return "; ".join(e if len(gathered) == 1 else f"rank {r}: {e}" for r, e in errors)
    step0, tables0 = gathered[0][1], gathered[0][2]
    for rank, (_, step, tables, _, _) in enumerate(gathered):
        if step != step0:
            return f"rank {rank} saves step {step}, rank 0 saves step {step0}"
        if set(tables) != set(tables0):
            diff = sorted(set(tables) ^ set(tables0))
            return (f"ranks pass different tables: {', '.join(map(repr, diff))} "
                    f"on rank {rank} or rank 0 but not both")
        for name, (dim, _, schema, _) in tables.items():
            if dim != tables0[name][0]:
                return f"table {name!r}: dim {dim} on rank {rank}, {tables0[name][0]} on rank 0"
            if schema != tables0[name][2]:
                diff = sorted(set(map(str, schema)) ^ set(map(str, tables0[name][2])))
                return (f"table {name!r}: export structure differs between rank {rank} and "
                        f"rank 0 ({'; '.join(diff[:4])})")
    return None


def _table_ids(tables, table_ids):
    ids = {}
    for pos, name in enumerate(sorted(tables)):
        if table_ids is not None and name in table_ids:
            ids[name] = int(table_ids[name])
        elif isinstance(tables[name].get("table_id"), (int, np.integer)):
            ids[name] = int(tables[name]["table_id"])
        else:
            ids[name] = pos
    return {name: ids[name] for name in tables}


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-able")


class CheckpointManager:
    """Saves and restores training checkpoints under one directory.

    Every method except ``checkpoints`` is collective: all ranks of ``comm`` call it
    together, rank 0 takes the decisions (which checkpoint, whether it is valid) and
    broadcasts them, and an error on any rank is raised as ``CheckpointError`` on all.

    Args:
        directory: where ``step-XXXXXXXX/`` checkpoint directories live (shared by all ranks).
        comm: a ``hpctrain.comm.base.Communicator`` (only ``rank``, ``size``, ``bcast``,
            ``barrier`` and ``allgather_object`` are used); None for a single process.
        keep_last: number of complete checkpoints kept; older ones are deleted after a
            new one is complete. None keeps all.
        chunk_bytes: bound on the bytes of table rows read at once when loading.
    """

    def __init__(self, directory, comm=None, keep_last=3, *, chunk_bytes=_CHUNK_BYTES):
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.comm = comm if comm is not None else LocalComm()
        self.keep_last = keep_last
        self.chunk_bytes = int(chunk_bytes)
        self._warned_group = False

    # ---------------------------------------------------------------- listing
    def checkpoints(self):
        """Paths of the ``step-*`` directories present (not verified), oldest step first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        found = sorted((int(m.group(1)), n) for n in names if (m := _STEP_DIR.match(n)))
        return [os.path.join(self.directory, n) for _, n in found]

    def latest(self, strict=False):
        """Path of the newest complete checkpoint whose files verify, or None.

        Newer partial or corrupt checkpoints are skipped with a ``CheckpointWarning``
        (on rank 0) naming the directory and the problem.

        Args:
            strict: when ``step-*`` directories exist but none verifies, raise instead of
                returning None (``--resume``: starting afresh would train over a run's
                files). None is then returned only when there is no checkpoint at all.

        Raises:
            CheckpointError: (``strict``) naming each checkpoint and why it was rejected;
                and, always, when the directory is writable by other users.
        """
        return self._find_latest(strict)[0]

    def _find_latest(self, strict=False):
        candidates = on_root(self.comm, self._listing, f"listing {self.directory}: ")
        rejected = []
        for path in reversed(candidates):
            manifest, problem = _restore.verify(path, self.comm)
            if manifest is not None:
                return path, manifest
            rejected.append(f"{os.path.basename(path)}: {problem}")
            if self.comm.rank == 0:
                warnings.warn(f"skipping checkpoint {path}: {problem}; trying an older one",
                              CheckpointWarning, stacklevel=3)
        if strict and rejected:
            more = f"; and {len(rejected) - 8} more" if len(rejected) > 8 else ""
            raise CheckpointError(f"none of the {len(rejected)} checkpoint(s) in "
                                  f"{self.directory} verifies: {'; '.join(rejected[:8])}{more}")
        return None, None

    def _listing(self):
        """``checkpoints()`` of a directory that only this user can write to."""
        self._check_private()
        return self.checkpoints()

    def ensure_directory(self):
        """Create the directory if needed (private: 0700) and refuse one that others can
        write to (this rank only; ``CheckpointError``)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._check_private()

    def _check_private(self):
        """Refuse a directory others can write to; warn once when its group can.

        Whoever can create entries here can plant a checkpoint that ``latest()`` prefers
        (the highest step wins), or a symlink where a file will be written.
        """
        try:
            st = os.stat(self.directory)
        except FileNotFoundError:
            return
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_IWOTH:
            raise CheckpointError(
                f"checkpoint directory {self.directory} is writable by every user (mode "
                f"{mode:o}): anyone could plant a checkpoint that a resume would load; make it "
                f"private (chmod go-w {self.directory})")
        if mode & stat.S_IWGRP and not self._warned_group:
            self._warned_group = True
            warnings.warn(f"checkpoint directory {self.directory} is writable by its group "
                          f"(mode {mode:o}): every member could plant a checkpoint that a resume "
                          f"would load; make it private (chmod g-w {self.directory})",
                          CheckpointWarning, stacklevel=4)

    # ------------------------------------------------------------------- save
    def save(self, step, dense, tables, state=None, *, table_ids=None):
        """Write the checkpoint of ``step`` atomically; return its directory.

        Args:
            step: the training step (int >= 0); names the directory ``step-XXXXXXXX``.
            dense: value tree of dense parameters and dense optimizer state (rank 0's is
                written). By convention the optimizer state sits under ``dense["optimizer"]``,
                which ``export_model`` leaves out.
            tables: table name -> this rank's shard as ``EmbeddingTable.export()`` returns it.
                Every rank passes the same table names with the same structure.
            state: JSON-able dict (reader positions, RNG state, config text, versions); rank 0's
                is written.
            table_ids: table name -> table id recorded with the shards; default: the export's
                ``table_id`` entry when present, else the position in sorted table names.

        Raises:
            CheckpointError: on every rank, when arguments are invalid or disagree across
                ranks, or any rank fails to write; nothing is published then.
        """
        comm = self.comm
        error, cause, summary, tmp, ids = None, None, None, None, None
        try:
            step = operator.index(step)
            if step < 0:
                raise ValueError(f"step must be >= 0, got {step}")
            described = _tables.describe(tables)
            summary = {n: (d["dim"], d["rows"], d["schema"], d["levels"])
                       for n, d in described.items()}
            ids = _table_ids(tables, table_ids)
            if comm.rank == 0:
                self.ensure_directory()
                tmp = os.path.join(self.directory,
                                   f".{step_dir(step)}.tmp-{secrets.token_hex(4)}")
                # Only this user can create entries while the files are written, so no
                # name in it can be a planted symlink; _publish opens it up for reading.
                os.mkdir(tmp, 0o700)
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            error, cause = describe(exc), exc
        gathered = comm.allgather_object((error, step, summary, tmp, ids))
        tmp, ids = gathered[0][3], gathered[0][4]  # rank 0 decides
        problem = _consistency(gathered)
        if problem:
            if comm.rank == 0 and tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"cannot save checkpoint of step {step}: {problem}") from cause
        rows = [{name: (desc[1], desc[3]) for name, desc in g[2].items()} for g in gathered]

        written = {}
        try:
            name = _files.shard_file(comm.rank, comm.size)
            self._write_shards(os.path.join(tmp, name), step, tables, ids)
            written[name] = _files.fsync_and_digest(os.path.join(tmp, name))
            if comm.rank == 0:
                name = _files.DENSE_FILE
                self._write_dense(os.path.join(tmp, name), step, dense, state)
                written[name] = _files.fsync_and_digest(os.path.join(tmp, name))
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error, cause = f"writing {name}: {describe(exc)}", exc
        gathered = comm.allgather_object((error, written))
        errors = [e for e, _ in gathered]
        if any(errors) and comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        fail(errors, f"cannot save checkpoint of step {step}: ", cause)

        final = None
        if comm.rank == 0:
            files = {}
            for _, part in gathered:
                files.update(part)
            try:
                final = self._publish(tmp, step, files, summary, rows, ids)
            except Exception as exc:  # noqa: BLE001
                error, cause = f"publishing {tmp}: {describe(exc)}", exc
            best = state.get("best") if isinstance(state, dict) else None
            if final is not None and isinstance(best, dict) and best.get("step") == step:
                try:
                    _write_best(self.directory, step, best)
                except Exception as exc:  # noqa: BLE001
                    error, cause = f"writing {BEST_FILE}: {describe(exc)}", exc
            if final is not None:
                self._prune(final)
        raise_together(comm, error, f"cannot save checkpoint of step {step}: ", cause)
        return comm.bcast(final, root=0)

    def _write_shards(self, path, step, tables, ids):
        with _files.open_h5(path, "w") as h5:
            self._stamp(h5, "tables", step)
            h5.attrs["rank"] = self.comm.rank
            h5.attrs["tables"] = json.dumps(list(tables))
            h5.attrs["table_ids"] = json.dumps(ids)
            _tables.write(h5, tables, ids)

    def _write_dense(self, path, step, dense, state):
        state = {} if state is None else state
        if not isinstance(state, dict):
            raise TypeError(f"state must be a JSON-able dict, got {type(state).__name__}")
        if dense is not None and not isinstance(dense, dict):
            raise TypeError(f"dense must be a dict of name -> array (or nested dict), "
                            f"got {type(dense).__name__}")
        with _files.open_h5(path, "w") as h5:
            self._stamp(h5, "dense", step)
            _h5tree.write(h5, "dense", {} if dense is None else dense, "dense")
            grp = h5.create_group("state", track_order=True)
            for key, value in state.items():
                try:
                    text = json.dumps(value, default=_json_default)
                except (TypeError, ValueError) as exc:
                    raise TypeError(f"state[{key!r}] is not JSON-able: {exc}") from None
                grp.create_dataset(_h5tree.escape(key), data=text, dtype=_h5tree.STRING_DTYPE)

    def _stamp(self, h5, kind, step):
        h5.attrs["format"] = _files.FORMAT
        h5.attrs["format_version"] = _files.FORMAT_VERSION
        h5.attrs["kind"] = kind
        h5.attrs["step"] = step
        h5.attrs["world_size"] = self.comm.size
        h5.attrs["versions"] = json.dumps(_files.versions())

    def _publish(self, tmp, step, files, summary, rows, ids):
        """Manifest, fsync, rename: after this returns the checkpoint is complete."""
        manifest = {
            "format": _files.FORMAT, "format_version": _files.FORMAT_VERSION,
            "step": step, "world_size": self.comm.size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dense_file": _files.DENSE_FILE,
            "tables": {name: self._table_entry(ids[name], dim, [r[name] for r in rows])
                       for name, (dim, _, _, _) in summary.items()},
            "files": files, "versions": _files.versions(),
        }
        _files.write_manifest(tmp, manifest)
        # readable like the checkpoint directory, writable by this user only
        os.chmod(tmp, stat.S_IMODE(os.stat(self.directory).st_mode) & ~0o022 | 0o700)
        _files.fsync_dir(tmp)
        final = os.path.join(self.directory, step_dir(step))
        old = None
        if os.path.exists(final):  # re-saving a step: move the old one aside first
            old = os.path.join(self.directory, f".{step_dir(step)}.old-{secrets.token_hex(4)}")
            os.rename(final, old)
        os.rename(tmp, final)
        _files.fsync_dir(self.directory)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def _table_entry(table_id, dim, per_rank):
        """Manifest entry of a table: per-rank rows, and rows of each nested keyed level."""
        entry = {"table_id": table_id, "dim": dim, "rows": [n for n, _ in per_rank]}
        levels = per_rank[0][1]
        if levels:
            entry["levels"] = {lv: [lv_rows.get(lv, 0) for _, lv_rows in per_rank]
                               for lv in levels}
        return entry

    def _prune(self, final):
        """Delete checkpoints beyond ``keep_last`` (never ``final``) and stale scratch dirs.

        Failures here only warn: the new checkpoint is already complete.
        """
        try:
            self._prune_unsafe(final)
        except Exception as exc:  # noqa: BLE001 - only rank 0 prunes; never raise alone
            warnings.warn(f"could not clean up {self.directory}: {exc}", CheckpointWarning,
                          stacklevel=4)

    def _prune_unsafe(self, final):
        problems = []
        def step_of(path):
            return int(_STEP_DIR.match(os.path.basename(path)).group(1))

        step = step_of(final)
        others = [p for p in self.checkpoints() if p != final]
        complete = [p for p in others if os.path.exists(os.path.join(p, _files.MANIFEST))]
        newer = [p for p in complete if step_of(p) > step]
        if newer:
            warnings.warn(f"{self.directory} holds checkpoints newer than step {step} "
                          f"({', '.join(os.path.basename(p) for p in newer)}); latest() prefers "
                          f"them", CheckpointWarning, stacklevel=5)
        # Incomplete step directories older than the new checkpoint are debris.
        doomed = [p for p in others if p not in complete and step_of(p) < step]
        if self.keep_last is not None:
            best = read_best(self.directory)      # kept besides the last keep_last
            best = os.path.join(self.directory, best["checkpoint"]) if best else None
            rotated = [p for p in complete if p != best]
            doomed += rotated[:max(0, len(rotated) - self.keep_last + 1)]
        for name in os.listdir(self.directory):
            if _SCRATCH.match(name):
                doomed.append(os.path.join(self.directory, name))
        for path in doomed:
            # Rename first so a half-deleted directory never looks like a checkpoint.
            trash = os.path.join(self.directory, f".{os.path.basename(path).lstrip('.')}"
                                 f".trash-{secrets.token_hex(4)}")
            try:
                if _STEP_DIR.match(os.path.basename(path)):
                    os.rename(path, trash)
                    path = trash
                shutil.rmtree(path)
            except OSError as exc:
                problems.append(f"{path}: {exc.strerror}")
        if problems:
            warnings.warn(f"could not delete old checkpoints: {'; '.join(problems)}",
                          CheckpointWarning, stacklevel=5)

    # ------------------------------------------------------------------- load
    def load(self, path=None, owner=None, *, table_dims=None, dense_like=None, tables_like=None,
             verify_files=True):
        """Restore a checkpoint onto the current world (collective).

        Args:
            path: checkpoint directory (absolute, relative, or a name under ``directory``);
                None loads ``latest()``. Rank 0's value is used.
            owner: function ``(table_name, keys int64[n]) -> int[n]`` giving each key's rank in
                the *current* world. Every rank then reads the shard files of all old ranks
                in row chunks and keeps the rows it owns, ordered by old rank, then row (when
                the world size is the writer's and ``owner`` keeps every old shard where it
                was, each rank reads only its own file). None requires the world size of the
                writer and gives each rank its old shard.
            table_dims: table name -> embedding dim the caller expects; checked against the
                checkpoint (missing, extra or different tables are errors). None: no check.
            dense_like: the dense tree the caller would save now, e.g. ``{"params":
                model.state_dict(), "optimizer": opt.state_dict()}``: each of its top-level
                members must be in the checkpoint with the same names, shapes and
                compatible dtypes, and finite. None: only the checks every load makes
                (finite values outside ``optimizer``, numeric ``params``).
            tables_like: table name -> the export of the caller's (empty) table, e.g.
                ``ShardedEmbedding.export()``: each table read must have its structure (the
                same entries, row dtypes and widths: optimizer slots, counters, Bloom filter).
            verify_files: check sizes and sha256 of every file first (default True; the check
                is skipped for ``path=None``, where ``latest()`` has just done it).

        Returns:
            ``(step, dense, tables, state)``: the step, the dense value tree, table name ->
            export dict of the rows this rank owns now, and the state dict.

        Raises:
            CheckpointError: on every rank, naming the checkpoint, file or table at fault:
                files that disagree with the manifest, tables that are missing or have
                another dim, rows that are not finite, keys that repeat, counters out of
                range, dense values that do not match ``dense_like`` (docs/checkpoint.md).
        """
        comm = self.comm
        if path is None:
            path, manifest = self._find_latest(strict=True)
            if path is None:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
        else:
            path = on_root(comm, lambda: self._resolve(path), "checkpoint path: ")
            manifest, problem = _restore.verify(path, comm, hash_files=verify_files)
            if problem:
                raise CheckpointError(f"checkpoint {path}: {problem}")
        _restore.check_tables(path, manifest, table_dims)
        if owner is None and manifest["world_size"] != comm.size:
            raise CheckpointError(f"checkpoint {path} was written by {manifest['world_size']} "
                                  f"ranks; loading it on {comm.size} needs owner= to route rows "
                                  f"to their new ranks")
        try:
            stays = _restore.shard_stays(path, manifest, owner, comm, self.chunk_bytes)
        except Exception:  # noqa: BLE001 - the full read below reports the problem
            stays = False
        if all(comm.allgather_object(stays)):
            owner = None  # same world, same routing: every rank's rows are its old shard
        error, cause, dense, state, tables, dropped = None, None, None, None, {}, []
        try:
            dense, state = _restore.read_dense(path, manifest, dense_like)
            tables, dropped = _restore.read_tables(path, manifest, owner, comm,
                                                   self.chunk_bytes, tables_like)
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            error, cause = describe(exc), exc
        gathered = comm.allgather_object((error, _restore.row_counts(tables)))
        fail([e for e, _ in gathered], f"cannot load checkpoint {path}: ", cause)
        _restore.check_counts(path, manifest, [c for _, c in gathered], comm.size)
        if dropped and comm.rank == 0:
            warnings.warn(f"checkpoint {path}: rows were resharded (written by "
                          f"{manifest['world_size']} ranks, loaded on {comm.size}), so the "
                          f"shard-local state of table(s) {', '.join(map(repr, dropped))} "
                          f"(the Bloom filter of admission counts) is not restored; those "
                          f"tables start counting admissions afresh", CheckpointWarning,
                          stacklevel=2)
        return manifest["step"], dense, tables, state

    def best(self):
        """Path of the best checkpoint (``best.json``, ``[eval] keep_best``), or None."""
        doc = read_best(self.directory)
        return os.path.join(self.directory, doc["checkpoint"]) if doc else None

    def _resolve(self, path):
        path = os.fspath(path)
        if not os.path.isabs(path) and not os.path.exists(path):
            path = os.path.join(self.directory, path)
        return os.path.abspath(resolve_best(path))
