"""Open the dataset of one split for any format (``open_dataset``).

A dataset has ``features``, ``num_dense``, ``random_access`` and ``num_samples``
(None when unknown or endless) and either ``fetch(positions)`` (random access)
or ``start()/window()/parse_window()`` (a text stream); ``Reader`` drives both.
"""
import os
import threading

import numpy as np

from hpctrain.data.hdf5 import HDF5Dataset
from hpctrain.data.parse import S_OK, LineParser
from hpctrain.data.synthetic import SyntheticDataset
from hpctrain.data.text import BadLines, TextDataset, TextFiles, expand_paths
from hpctrain.errors import DataError

_stats_cache = {}
_stats_lock = threading.Lock()


def open_dataset(data_cfg, split, seed, bad_lines=None, index=False):
    """The dataset of ``split`` ("train" or "eval") described by ``data_cfg``.

    Args:
        data_cfg: a ``DataConfig``.
        split: "train" or "eval".
        seed: the run seed (synthetic data uses ``data_cfg.seed`` when set).
        bad_lines: the rank's ``BadLines`` (text formats); a fresh one when None.
        index: index text files for random access (needed to shuffle them).

    Raises:
        DataError: missing, empty or malformed files.
    """
    sc = data_cfg.split(split)
    fmt = data_cfg.format
    if fmt == "synthetic":
        data_seed = data_cfg.seed if data_cfg.seed is not None else seed
        return SyntheticDataset(data_cfg.synthetic, data_seed, split, sc.num_samples)
    if fmt == "hdf5":
        return HDF5Dataset(expand_paths(sc.paths, f"data.{split}.paths"), sc.rows, split)
    bad_lines = bad_lines if bad_lines is not None else BadLines(data_cfg.bad_lines)
    if fmt == "criteo":
        files = TextFiles(sc.paths, False, f"data.{split}.paths")
        parser = LineParser.criteo()
    else:
        schema = data_cfg.schema
        files = TextFiles(sc.paths, schema.header, f"data.{split}.paths")
        try:
            parser = LineParser.from_schema(schema, resolve_columns(schema, files))
            if any(c.transform == "standardize" for c in schema.dense):
                parser.set_stats(*dense_stats(data_cfg))
        except BaseException:
            files.close()
            raise
    ds = TextDataset(files, parser, sc.rows, bad_lines, split)
    if index:
        ds.build_index()
    return ds


def resolve_columns(schema, files):
    """The column names of CSV ``files``: from their headers (checked against the schema)
    or ``schema.columns``. DataError names the file when they disagree."""
    if not schema.header:
        return list(schema.columns)
    cols = None
    for path, header in zip(files.paths, files.headers):
        names = header.split(schema.delimiter)
        names = [x.strip() for x in names] if schema.strip else names
        if cols is None:
            cols, first = names, path
        elif names != cols:
            raise DataError(f"{path}:1: header {names} differs from {first}'s {cols}")
    path = files.paths[0]
    if schema.columns is not None and cols != schema.columns:
        raise DataError(f"{path}:1: header {cols} does not match data.schema.columns "
                        f"{schema.columns}")
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise DataError(f"{path}:1: duplicate column names {dup} in the header")
    roles = [("label", schema.label)] + [("dense", c.name) for c in schema.dense] + \
        [("categorical", c) for c in schema.categorical] + \
        [("multi_valued", c.name) for c in schema.multi_valued] + \
        [("ignore", c) for c in schema.ignore]
    for role, c in roles:
        if c not in cols:
            raise DataError(f"{path}:1: the header has no column {c!r} (data.schema.{role}); "
                            f"it has {cols}")
    named = {c for _, c in roles}
    missing = [c for c in cols if c not in named]
    if missing:
        raise DataError(f"{path}:1: columns {missing} have no role in data.schema; list them "
                        f"under dense, categorical, multi_valued or ignore")
    return cols


def dense_stats(data_cfg):
    """Mean and standard deviation of each dense CSV column over the train split.

    Columns with explicit ``mean``/``std`` keep them; the others (with transform
    "standardize") are computed from the train split's good lines, raw values, missing
    values counted as 0. A constant column gets std 1. Cached per file set.
    """
    schema, sc = data_cfg.schema, data_cfg.split("train")
    paths = expand_paths(sc.paths, "data.train.paths")
    key = (tuple((p, os.path.getmtime(p), os.path.getsize(p)) for p in paths), sc.rows,
           repr(schema))
    with _stats_lock:
        hit = _stats_cache.get(key)
    if hit is not None:
        return hit
    mean = np.array([np.nan if c.mean is None else c.mean for c in schema.dense])
    std = np.array([np.nan if c.std is None else c.std for c in schema.dense])
    todo = [j for j, c in enumerate(schema.dense)
            if c.transform == "standardize" and c.mean is None]
    if todo:
        files = TextFiles(paths, schema.header, "data.train.paths")
        try:
            parser = LineParser.from_schema(schema, resolve_columns(schema, files))
            ds = TextDataset(files, parser, sc.rows, None, "train")
            count, m, m2 = 0, np.zeros(len(todo)), np.zeros(len(todo))
            pos, row = ds.start(), 0
            while True:
                pieces, pos, n = ds.window(pos, row, 1 << 16)
                if n == 0:
                    break
                row += n
                for _, buf, s, e, _ in pieces:
                    _, dense, _, _, status, _ = parser.parse_raw(buf, s, e)
                    x = dense[status == S_OK][:, todo]
                    if x.shape[0] == 0:
                        continue
                    # Chan et al.'s pairwise update keeps the variance accurate for large values.
                    cm, cn = x.mean(axis=0), x.shape[0]
                    cm2 = ((x - cm) ** 2).sum(axis=0)
                    delta, total = cm - m, count + cn
                    m = m + delta * cn / total
                    m2 = m2 + cm2 + delta ** 2 * count * cn / total
                    count = total
        finally:
            files.close()
        if count == 0:
            raise DataError(f"data.train: no good lines to compute standardisation statistics "
                            f"from ({', '.join(paths)})")
        sd = np.sqrt(m2 / count)
        mean[todo] = m
        std[todo] = np.where(sd > 0, sd, 1.0)
    with _stats_lock:
        _stats_cache[key] = (mean, std)
    return mean, std
