"""Reading checkpoints: verification against the manifest, dense state, resharded tables."""
import json
import os
import re

import h5py
import numpy as np

from hpctrain.checkpoint import _files, _h5tree, _tables, _validate
from hpctrain.checkpoint._collective import LocalComm
from hpctrain.errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _read_manifest_text(path):
    try:
        with open(os.path.join(path, _files.MANIFEST), encoding="utf-8") as fh:
            return fh.read(), None
    except FileNotFoundError:
        return None, f"no {_files.MANIFEST} (incomplete checkpoint)"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{_files.MANIFEST}: unreadable ({exc})"


def verify(path, comm=None, hash_files=True):
    """Check a checkpoint directory against its manifest (collective when ``comm`` is given).

    Rank 0 reads the manifest and broadcasts it; files are then checked in parallel
    (rank ``r`` checks every ``size``-th file): size, and sha256 when ``hash_files``.

    Returns:
        (manifest dict, None) when every file verifies, else (None, problem text).
    """
    comm = comm or LocalComm()
    text, problem = _read_manifest_text(path) if comm.rank == 0 else (None, None)
    text, problem = comm.bcast((text, problem), root=0)
    if problem:
        return None, problem
    try:
        manifest = _files.parse_manifest(text)
    except ValueError as exc:
        return None, str(exc)
    named = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if named and int(named.group(1)) != manifest["step"]:
        return None, (f"{_files.MANIFEST}: step {manifest['step']} but the directory is "
                      f"{os.path.basename(os.path.normpath(path))}")
    names = sorted(manifest["files"])
    local = [_files.check_file(os.path.join(path, name), manifest["files"][name], hash_files)
             for name in names[comm.rank::comm.size]]
    problems = sorted(p for ps in comm.allgather_object([p for p in local if p]) for p in ps)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return None, problems[0] + more
    return manifest, None


def read_dense(path, manifest=None, expected=None):
    """(dense tree, state dict) from a checkpoint's dense.h5, checked (``_validate``).

    Args:
        path: the checkpoint directory.
        manifest: its parsed manifest; None reads it (sizes checked, not hashes).
        expected: the dense tree the caller expects (names, shapes, dtypes), or None.

    Raises:
        CheckpointError: naming dense.h5, the dataset and the problem.
    """
    if manifest is None:
        manifest, problem = verify(path, hash_files=False)
        if problem:
            raise CheckpointError(f"checkpoint {path}: {problem}")
    name = _files.DENSE_FILE
    with _validate.open_file(path, manifest, name) as h5:
        for group in ("dense", "state"):
            if not isinstance(h5.get(group), h5py.Group):
                raise CheckpointError(f"{name}: no /{group} group")
        dense = _h5tree.read(h5["dense"])
        state = {}
        for link, ds in h5["state"].items():
            at = f"{name}:/state/{link}"
            if not isinstance(ds, h5py.Dataset) or ds.shape != () or ds.dtype.kind not in "OS":
                raise CheckpointError(f"{at}: expected a scalar JSON string")
            _h5tree.check_storage(ds, at)
            try:
                state[_h5tree.unescape(link)] = json.loads(ds.asstr()[()])
            except (ValueError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{at}: not valid JSON ({exc})") from None
    _validate.check_dense(dense, expected, f"{name}:/dense")
    _validate.check_state(state, manifest, f"{name}:/state")
    return dense, state


def read_tables(path, manifest, owner, comm, chunk_bytes, tables_like=None):
    """This rank's rows of every table: its own old shard (``owner`` None) or, from every
    old shard, the rows ``owner`` assigns to it, ordered by old rank then row.

    Every row read is checked (``_validate``), and no key may repeat among this rank's rows;
    with ``tables_like`` (table name -> the live table's export), each table's structure must
    be that table's (entries, row dtypes and widths).

    Returns:
        (table name -> export dict, names of the tables whose shard-local state was left
        out because the rows were resharded).
    """
    names = list(manifest["tables"])
    world = manifest["world_size"]
    readers = {}
    for old_rank in [comm.rank] if owner is None else range(world):
        with _validate.open_file(path, manifest, _files.shard_file(old_rank, world),
                                 old_rank) as h5:
            for name in names:
                if name not in readers:
                    readers[name] = _tables.TableReader(h5, name, shard_local=owner is None,
                                                        dim=manifest["tables"][name]["dim"])
                    if tables_like and name in tables_like:  # before any row is read
                        _validate.check_table_schema(
                            name, readers[name].result(), tables_like[name],
                            f"{_files.shard_file(old_rank, world)}:/tables/"
                            f"{_h5tree.escape(name)}", skip_shard_state=owner is not None)
                select = None if owner is None else _selector(owner, name, comm)
                readers[name].add(h5, select, chunk_bytes)
    for name in names:
        readers[name].check_unique()
    return ({name: readers[name].result() for name in names},
            [name for name in names if readers[name].dropped])


def shard_stays(path, manifest, owner, comm, chunk_bytes):
    """True when ``owner`` keeps every row of this rank's old shard on this rank.

    When that holds on every rank of a world of the writer's size, each rank's rows
    are exactly its old shard, so each can read one file instead of all of them.
    """
    world = manifest["world_size"]
    if owner is None or world != comm.size:
        return False
    with _validate.open_file(path, manifest, _files.shard_file(comm.rank, world),
                             comm.rank) as h5:
        return all(_tables.all_owned(h5, name, _selector(owner, name, comm), chunk_bytes)
                   for name in manifest["tables"])


def _selector(owner, name, comm):
    def select(keys):
        ranks = np.asarray(owner(name, keys))
        if ranks.shape != keys.shape or ranks.dtype.kind not in "iu":
            raise ValueError(f"owner({name!r}, keys) returned {ranks.dtype}{list(ranks.shape)}, "
                             f"expected integer ranks of shape {list(keys.shape)}")
        if len(ranks) and (ranks.min() < 0 or ranks.max() >= comm.size):
            bad = ranks[(ranks < 0) | (ranks >= comm.size)][0]
            raise ValueError(f"owner({name!r}, keys) returned rank {bad}, outside "
                             f"[0, {comm.size})")
        return ranks == comm.rank
    return select


def check_tables(path, manifest, table_dims):
    """Raise CheckpointError naming the table when ``table_dims`` and the checkpoint differ."""
    if table_dims is None:
        return
    have = manifest["tables"]
    missing = [n for n in table_dims if n not in have]
    extra = [n for n in have if n not in table_dims]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no table {missing[0]!r} "
                              f"(it holds: {', '.join(map(repr, have)) or 'none'})")
    if extra:
        raise CheckpointError(f"checkpoint {path} holds table {extra[0]!r}, which the caller "
                              f"does not have (expected: {', '.join(map(repr, table_dims))})")
    for name, dim in table_dims.items():
        if dim is not None and int(dim) != have[name]["dim"]:
            raise CheckpointError(f"checkpoint {path}: table {name!r} has dim "
                                  f"{have[name]['dim']}, expected {dim}")


def row_counts(tables):
    """{table: {level path ("" for the table's rows): rows}} of loaded export dicts."""
    return {name: {"": len(t["keys"]), **_tables.level_rows(t)} for name, t in tables.items()}


def check_counts(path, manifest, gathered_counts, size):
    """Raise CheckpointError when the ranks together did not keep every row exactly once.

    Checks the table rows and, where the manifest lists them (``levels``), the rows of
    every nested keyed level (e.g. pending admission counts).
    """
    for name, info in manifest["tables"].items():
        wanted = {"": sum(info["rows"])}
        wanted.update({lv: sum(n) for lv, n in info.get("levels", {}).items()})
        for level, want in wanted.items():
            got = sum(c[name].get(level, 0) for c in gathered_counts)
            if got != want:
                what = f"rows of {level[:-1]}" if level else "rows"
                raise CheckpointError(
                    f"cannot load checkpoint {path}: table {name!r}: the ranks kept {got} "
                    f"{what} in all, the checkpoint holds {want}; owner() must give every key "
                    f"exactly one rank in [0, {size}) and agree across ranks")
