"""Table shards in HDF5: row-alignment checks on save, owner-filtered chunked reads on load.

A table's export dict is a value tree (see ``_h5tree``). Every dict level that
holds ``"keys"`` is a *keyed level*: ``keys`` is a 1-D integer array and every
array with at least one dimension below that level (through nested dicts and
lists, but not into another keyed level) is row-aligned with it, i.e. has
``len(keys)`` rows. Scalars, strings and 0-d arrays are metadata. Resharding
keeps the rows of each keyed level whose owner is this rank; metadata comes from
the shard of old rank 0.

The entry ``SHARD_STATE`` of a table export holds state of the writing shard as a whole
that cannot be split by key (a counting Bloom filter): its arrays need not be row-aligned,
and it is read back only by the rank that reads its own old shard (same world, same
routing); a resharded load drops it (``TableReader.dropped``).
"""
import os

import numpy as np

from hpctrain.checkpoint import _h5tree, _validate
from hpctrain.errors import CheckpointError

SHARD_STATE = "shard_state"


def describe(tables):
    """Check this rank's table exports; return {name: {"dim", "rows", "schema"}}.

    ``schema`` lists (path, kind, dtype, row shape) of every member, so ranks can
    compare structures before anything is written.

    Raises:
        TypeError, ValueError: a table export that is not a valid row-aligned tree.
    """
    if not isinstance(tables, dict):
        raise TypeError(f"tables must be a dict of table name -> export dict, "
                        f"got {type(tables).__name__}")
    out = {}
    for name, export in tables.items():
        _h5tree.escape(name)
        where = f"table {name!r}"
        if not isinstance(export, dict) or "keys" not in export or "values" not in export:
            raise ValueError(f"{where}: export must be a dict with 'keys' and 'values'")
        values = export["values"]
        if not isinstance(values, np.ndarray) or values.ndim != 2:
            raise ValueError(f"{where}: 'values' must be a 2-D array [rows, dim], got "
                             f"{getattr(values, 'shape', type(values).__name__)}")
        schema = []
        _walk(export, None, "", where, schema)
        out[name] = {"dim": int(values.shape[1]), "rows": int(len(export["keys"])),
                     "schema": schema, "levels": level_rows(export)}
    return out


def level_rows(export):
    """{path of each nested keyed level ("admission/"...): its number of rows}."""
    out = {}

    def visit(node, path):
        if isinstance(node, dict):
            if path and "keys" in node and hasattr(node["keys"], "__len__"):
                out[path] = int(len(node["keys"]))
            for key, item in node.items():
                if not (path == "" and key == SHARD_STATE):
                    visit(item, f"{path}{key}/")
        elif isinstance(node, (list, tuple)):
            for i, item in enumerate(node):
                visit(item, f"{path}{i}/")

    visit(export, "")
    return out


def _walk_shard_state(node, path, where, schema):
    """Schema of the shard-local entry: any arrays, no row alignment."""
    if isinstance(node, (dict, list, tuple)):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in items:
            _walk_shard_state(item, f"{path}{key}/", where, schema)
    elif isinstance(node, np.ndarray):
        _h5tree.check_array(node, f"{where}: {path[:-1]}")
        schema.append((path[:-1], "shard", node.dtype.str, tuple(node.shape)))
    else:
        schema.append((path[:-1], "meta", type(node).__name__, ()))


def _walk(node, rows, path, where, schema):
    if path == SHARD_STATE + "/":
        _walk_shard_state(node, path, where, schema)
        return
    if isinstance(node, dict) and "keys" in node:
        keys = node["keys"]
        if not (isinstance(keys, np.ndarray) and keys.ndim == 1 and keys.dtype.kind in "iu"):
            raise ValueError(f"{where}: {path or '/'}keys must be a 1-D integer array, got "
                             f"{getattr(keys, 'dtype', type(keys).__name__)} "
                             f"{getattr(keys, 'shape', '')}")
        rows = len(keys)
        schema.append((path, "keyed", "", ()))
    if isinstance(node, (dict, list, tuple)):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in items:
            _walk(item, rows, f"{path}{key}/", where, schema)
        return
    if isinstance(node, np.ndarray) and node.ndim >= 1:
        _h5tree.check_array(node, f"{where}: {path[:-1]}")
        if rows is None:
            raise ValueError(f"{where}: array {path[:-1]} is not under a level with 'keys'")
        if node.shape[0] != rows:
            raise ValueError(f"{where}: {path[:-1]} has {node.shape[0]} rows, its keys have "
                             f"{rows} (arrays beside 'keys' must be row-aligned)")
        schema.append((path[:-1], "rows", node.dtype.str, tuple(node.shape[1:])))
    else:
        schema.append((path[:-1], "meta", type(node).__name__, ()))


def write(h5file, tables, table_ids):
    """Write this rank's shards under ``/tables/<name>``."""
    root = h5file.create_group("tables", track_order=True)
    for name, export in tables.items():
        grp = _h5tree.write(root, _h5tree.escape(name), export, f"table {name!r}")
        grp.attrs["dim"] = int(export["values"].shape[1])
        grp.attrs["num_rows"] = int(len(export["keys"]))
        grp.attrs["table_id"] = int(table_ids[name])


class _Rows:
    """Pieces of one row-aligned dataset gathered across shard files.

    ``origins`` has one ``(file name, first row, mask or None)`` per piece, so that a
    problem found after gathering (a repeated key) can name the file and row.
    """

    def __init__(self, dataset):
        self.dtype = dataset.dtype
        self.tail = dataset.shape[1:]
        self.pieces = []
        self.origins = []

    def locate(self, value):
        """``file:row`` of every stored occurrence of ``value`` (a 1-D dataset's element)."""
        out = []
        for piece, (name, start, mask) in zip(self.pieces, self.origins):
            rows = np.flatnonzero(mask) if mask is not None else None
            for i in np.flatnonzero(piece == value):
                out.append(f"{name} row {start + int(i if rows is None else rows[i])}")
        return out

    def result(self):
        if not self.pieces:
            return np.empty((0, *self.tail), dtype=self.dtype)
        return self.pieces[0] if len(self.pieces) == 1 else np.concatenate(self.pieces)


def _template(obj, levels, level, root=False, shard_local=True):
    """Value tree of ``obj`` with row datasets replaced by ``_Rows``; fills ``levels``.

    ``levels`` maps the HDF5 path (relative to the table group) of each keyed
    level to {relative dataset path: _Rows}. At the table group (``root``), the
    shard-local entry is read whole when ``shard_local``, else left out.
    """
    import h5py

    if root:  # the table group: a keyed level by construction (save checks "keys")
        level = levels.setdefault(obj.name, {})
        tree = {}
        for link in obj:
            if link != SHARD_STATE:
                tree[_h5tree.unescape(link)] = _template(obj[link], levels, level)
            elif shard_local:
                tree[SHARD_STATE] = _h5tree.read(obj[link])
        return tree
    if isinstance(obj, h5py.Group):
        kind = _h5tree.kind_of(obj)
        if not kind and "keys" in obj and isinstance(obj["keys"], h5py.Dataset):
            level = levels.setdefault(obj.name, {})
        if kind in ("list", "tuple"):
            items = [_template(obj[str(i)], levels, level) for i in range(len(obj))]
            return tuple(items) if kind == "tuple" else items
        return {_h5tree.unescape(link): _template(obj[link], levels, level) for link in obj}
    if _h5tree.is_row_array(obj):
        rows = level[obj.name] = _Rows(obj)
        return rows
    return _h5tree.read(obj)


def _fill(tree):
    if isinstance(tree, _Rows):
        return tree.result()
    if isinstance(tree, dict):
        return {k: _fill(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_fill(v) for v in tree)
    return tree


def keys_datasets(h5, name):
    """The ``keys`` dataset of every keyed level of table ``name`` in shard file ``h5``."""
    import h5py

    found = []

    def visit(_, obj):
        if (isinstance(obj, h5py.Group) and not _h5tree.kind_of(obj) and "keys" in obj
                and isinstance(obj["keys"], h5py.Dataset)):
            found.append(obj["keys"])

    root = h5["/tables/" + _h5tree.escape(name)]
    visit(None, root)
    root.visititems(visit)
    return found


def all_owned(h5, name, select, chunk_bytes):
    """True when ``select`` keeps every key of every keyed level of table ``name`` in ``h5``."""
    for keys in keys_datasets(h5, name):
        step = max(1, chunk_bytes // max(1, keys.dtype.itemsize))
        for start in range(0, keys.shape[0], step):
            if not select(keys[start:start + step]).all():
                return False
    return True


class TableReader:
    """Gathers one table's rows from shard files read one after the other.

    Every chunk read is checked (``_validate``): key and value dtypes, the table's dim,
    finite floats, counters in range; ``check_unique`` then checks that no key repeats.

    Args:
        h5: the first shard file to read (its metadata and structure are used).
        name: table name.
        shard_local: whether this rank reads its own old shard only; then the shard-local
            entry of ``h5`` is kept, else it is left out and ``dropped`` says whether the
            checkpoint had one.
        dim: the table's embedding dim (from the manifest).
    """

    def __init__(self, h5, name, shard_local=True, dim=None):
        self.name = name
        self.dim = dim
        self.levels = {}
        group = h5["/tables/" + _h5tree.escape(name)]
        self.root = group.name
        self.dropped = not shard_local and SHARD_STATE in group
        self.tree = _template(group, self.levels, None, root=True, shard_local=shard_local)
        where = f"{os.path.basename(h5.filename)}:{self.root}"
        for datasets in self.levels.values():
            for path in datasets:
                _validate.check_dataset(h5[path], path[len(self.root) + 1:], dim, where)
        values = self.levels.get(self.root, {}).get(self.root + "/values")
        if values is not None:
            _validate.check_row_dtype(self.tree.get(_validate.ROW_DTYPE), values.dtype, where)

    def add(self, h5, select, chunk_bytes, keep=True):
        """Append the rows of ``h5`` that ``select(keys) -> bool mask`` keeps (None: all).

        Reads at most about ``chunk_bytes`` of rows at a time; rows keep file order.
        With ``keep`` false the rows are only checked (export's pass over a shard).
        """
        levels = {}
        _template(h5[self.root], levels, None, root=True, shard_local=False)
        extra = sorted(p for lv, ds in levels.items() for p in ds
                       if p not in self.levels.get(lv, ()))
        if extra:
            raise CheckpointError(f"{os.path.basename(h5.filename)}:{extra[0]}: not in old rank "
                                  f"0's shard of table {self.name!r} (the shards' structures "
                                  f"differ)")
        for level_path, datasets in self.levels.items():
            _read_level(h5, level_path, datasets, select, chunk_bytes, self, keep)

    def check_unique(self):
        """Raise CheckpointError naming files and rows when a keyed level repeats a key."""
        for level_path, datasets in self.levels.items():
            keys = datasets[level_path + "/keys"]
            dup = _validate.first_duplicate(keys.result())
            if dup is not None:
                raise CheckpointError(
                    f"table {self.name!r}: {level_path}/keys repeats key {dup} ("
                    f"{', '.join(keys.locate(dup)[:4])})")

    def result(self):
        """The table's export dict: rows in the order they were added."""
        return _fill(self.tree)


def _read_level(h5, level_path, datasets, select, chunk_bytes, table, keep=True):
    fname = os.path.basename(h5.filename)
    where = f"{fname}:{table.root}"
    try:
        sources = {path: h5[path] for path in datasets}
    except KeyError as exc:
        raise CheckpointError(f"{where}: table {table.name!r} at {level_path}: structure "
                              f"differs from old rank 0's shard ({exc})") from None
    keys_path = level_path + "/keys"
    n = sources[keys_path].shape[0]
    rel = {path: path[len(table.root) + 1:] for path in datasets}
    for path, rows in datasets.items():
        ds = sources[path]
        _validate.check_dataset(ds, rel[path], table.dim, where)
        if ds.shape[1:] != rows.tail or ds.dtype != rows.dtype or ds.shape[0] != n:
            raise CheckpointError(f"{where}/{rel[path]}: {ds.dtype}{list(ds.shape)}, expected "
                                  f"{rows.dtype}{[n, *rows.tail]} like old rank 0's shard")
    row_bytes = sum(r.dtype.itemsize * int(np.prod(r.tail, dtype=np.int64))
                    for r in datasets.values())
    step = max(1, chunk_bytes // max(1, row_bytes))
    for start in range(0, n, step):
        stop = min(n, start + step)
        keys = sources[keys_path][start:stop]
        mask = None if select is None else select(keys)
        if mask is not None and not mask.any():
            continue
        for path, rows in datasets.items():
            chunk = keys if path == keys_path else sources[path][start:stop]
            _validate.check_chunk(chunk, rel[path], start, keys, where)
            if not keep:
                continue
            whole = mask is None or mask.all()
            rows.pieces.append(chunk if whole else chunk[mask])
            rows.origins.append((fname, start, None if whole else mask))
