"""hpctrain's HDF5 data files: layout, writer and random-access dataset.

Layout (readable with plain h5py; written by ``hpctrain convert``)::

    /                       attrs: format = "hpctrain-data", version = 1, num_samples,
                                   features (sparse names, batch order), dense_names
    /labels                 float32[N]              chunked
    /dense                  float32[N, num_dense]   chunked (already transformed)
    /sparse/<feature>/values   int64[nnz_f]         ids of all bags, sample after sample
    /sparse/<feature>/offsets  int64[N + 1]         bag i = values[offsets[i]:offsets[i+1]]

Offsets rather than lengths are stored so that a rank reads the bags of any
sample range with two small slices (lengths are ``diff(offsets)``).
"""
import os

import numpy as np

from hpctrain.data.batch import Rows
from hpctrain.errors import DataError

FORMAT, VERSION = "hpctrain-data", 1
GAP = 256        # samples skipped within one read rather than starting a new read


def _h5py():
    import h5py
    return h5py


class HDF5Writer:
    """Append ``Rows`` to a new hpctrain HDF5 data file.

    Args:
        path: output file (overwritten).
        features: sparse feature names; dense_names: dense column names.
        chunk_rows: HDF5 chunk length in samples (ids: ``chunk_rows`` ids per chunk).
        compression: None, "gzip" or "lzf".
    """

    def __init__(self, path, features, dense_names, chunk_rows=65536, compression=None):
        for f in features:
            if "/" in f or not f:
                raise DataError(f"{path}: feature name {f!r} cannot be an HDF5 group name")
        h5py = _h5py()
        self.path, self.features = path, list(features)
        self.f = h5py.File(path, "w")
        kw = {"compression": compression, "shuffle": compression is not None}
        c = max(1, int(chunk_rows))
        nd = len(dense_names)
        self.labels = self.f.create_dataset("labels", (0,), np.float32, maxshape=(None,),
                                            chunks=(c,), **kw)
        self.dense = self.f.create_dataset("dense", (0, nd), np.float32, maxshape=(None, nd),
                                           chunks=(c, max(nd, 1)), **kw)
        self.values, self.offsets = [], []
        for name in self.features:
            g = self.f.create_group(f"sparse/{name}")
            self.values.append(g.create_dataset("values", (0,), np.int64, maxshape=(None,),
                                                chunks=(c,), **kw))
            off = g.create_dataset("offsets", (1,), np.int64, maxshape=(None,), chunks=(c,), **kw)
            off[0] = 0
            self.offsets.append(off)
        self.f.attrs["format"] = FORMAT
        self.f.attrs["version"] = VERSION
        self.f.attrs["features"] = np.array(self.features, dtype=h5py.string_dtype())
        self.f.attrs["dense_names"] = np.array(list(dense_names), dtype=h5py.string_dtype())
        self.n = 0

    def append(self, rows):
        """Append a block of samples."""
        n = len(rows)
        if n == 0:
            return
        a, b = self.n, self.n + n
        self.labels.resize((b,))
        self.labels[a:b] = rows.labels
        self.dense.resize((b, self.dense.shape[1]))
        self.dense[a:b] = rows.dense
        starts = np.concatenate(([0], np.cumsum(rows.lengths.reshape(-1))))
        for f in range(len(self.features)):
            vals = rows.values[starts[f * n]:starts[(f + 1) * n]]
            vd, od = self.values[f], self.offsets[f]
            base = int(od[a])
            vd.resize((base + vals.shape[0],))
            vd[base:] = vals
            od.resize((b + 1,))
            od[a + 1:] = base + np.cumsum(rows.lengths[f])
        self.n = b

    def close(self):
        """Write the sample count and close the file."""
        if self.f is not None:
            self.f.attrs["num_samples"] = self.n
            self.f.close()
            self.f = None


def _names(f, p, key):
    attr = f.attrs.get(key)
    if attr is None or getattr(attr, "ndim", 1) != 1:
        raise DataError(f"{p}: attribute {key} is missing or not a list of names (write the "
                        f"file with hpctrain convert)")
    return [x.decode() if isinstance(x, bytes) else str(x) for x in attr]


# deflate, the strongest filter h5py writes, expands at most about 1032:1
_MAX_FILTER_RATIO = 1032


def _dataset(f, p, path, kinds, ndim, what):
    """Dataset ``path`` of file ``f`` (named ``p``), checked: kind, rank, stored size."""
    import h5py
    ds = f.get(path)
    if not isinstance(ds, h5py.Dataset):
        raise DataError(f"{p}: no dataset /{path} (an hpctrain data file has /labels, /dense and "
                        f"/sparse/<feature>/values and offsets)")
    if ds.ndim != ndim or ds.dtype.kind not in kinds:
        raise DataError(f"{p}:/{path}: expected {what}, got {ds.dtype}{list(ds.shape)}")
    declared = int(ds.size) * ds.dtype.itemsize
    if declared:
        stored = ds.id.get_storage_size()
        ratio = _MAX_FILTER_RATIO if ds.id.get_create_plist().get_nfilters() else 1
        if stored * ratio < declared:
            raise DataError(f"{p}:/{path}: declares {ds.dtype}{list(ds.shape)} ({declared} "
                            f"bytes) but the file stores only {stored} bytes of it")
    return ds


def _check_layout(f, p, features, dense_names):
    """The datasets of one file, checked against each other; returns them and the sample count."""
    labels = _dataset(f, p, "labels", "fiub", 1, "float32[N] labels")
    n = int(labels.shape[0])
    if n == 0:
        raise DataError(f"{p}: empty data file (0 samples)")
    declared = f.attrs.get("num_samples")
    if declared is not None and int(declared) != n:
        raise DataError(f"{p}: attribute num_samples = {int(declared)} but /labels has {n} rows")
    dense = _dataset(f, p, "dense", "fiu", 2, f"float32[N, {len(dense_names)}]")
    if dense.shape != (n, len(dense_names)):
        raise DataError(f"{p}:/dense: shape {list(dense.shape)}, expected [{n}, "
                        f"{len(dense_names)}] ({n} labels, {len(dense_names)} dense_names)")
    sparse = []
    for name in features:
        offsets = _dataset(f, p, f"sparse/{name}/offsets", "iu", 1, f"int64[{n + 1}] offsets")
        values = _dataset(f, p, f"sparse/{name}/values", "iu", 1, "int64 ids")
        if values.dtype.kind == "u" and values.dtype.itemsize == 8:
            raise DataError(f"{p}:/sparse/{name}/values: ids must be int64, got uint64")
        if offsets.shape != (n + 1,):
            raise DataError(f"{p}:/sparse/{name}/offsets: {offsets.shape[0]} entries, expected "
                            f"{n + 1} (one more than the {n} labels)")
        first, last = int(offsets[0]), int(offsets[n])
        if first != 0 or last != values.shape[0]:
            raise DataError(f"{p}:/sparse/{name}/offsets: runs from {first} to {last}, expected "
                            f"0 to {values.shape[0]} (the number of ids in values)")
        sparse.append((offsets, values))
    return labels, dense, sparse, n


class HDF5Dataset:
    """Random-access samples of one or more hpctrain HDF5 files (concatenated in order).

    Every file's layout is checked at open (datasets present, dtypes, shapes, sizes backed
    by the file, offsets spanning the ids); every read checks what it returns (offsets
    that do not decrease, labels in [0, 1], finite dense values), so a malformed file is a
    ``DataError`` naming the file, the dataset and the row.

    Args:
        paths: the files. rows: ``(start, end)`` sample range over all files, or None.
        split: "train" or "eval", for messages.
    """

    random_access = True

    def __init__(self, paths, rows, split):
        h5py = _h5py()
        self.paths, self.files, counts, self._datasets = list(paths), [], [], []
        self._sizes = []
        try:
            for p in self.paths:
                try:
                    f = h5py.File(p, "r")
                except OSError as e:
                    raise DataError(f"{p}: not a readable HDF5 file ({e})") from None
                self.files.append(f)
                if f.attrs.get("format") != FORMAT:
                    raise DataError(f"{p}: not an hpctrain data file (attribute format = "
                                    f"{f.attrs.get('format')!r}; write one with hpctrain convert)")
                version = f.attrs.get("version", -1)
                if isinstance(version, np.generic):
                    version = version.item()
                if type(version) is not int or version != VERSION:
                    raise DataError(f"{p}: data file version {version!r}, this hpctrain reads "
                                    f"{VERSION}")
                feats, dn = _names(f, p, "features"), _names(f, p, "dense_names")
                if len(self.files) == 1:
                    self.features, self.dense_names = tuple(feats), tuple(dn)
                elif tuple(feats) != self.features or tuple(dn) != self.dense_names:
                    raise DataError(f"{p}: features {feats} / dense {dn} differ from "
                                    f"{self.paths[0]}'s {list(self.features)} / "
                                    f"{list(self.dense_names)}")
                labels, dense, sparse, n = _check_layout(f, p, feats, dn)
                self._sizes.append(self._size_now(len(self.files) - 1))
                # dataset handles, looked up once (a path lookup costs as much as a small read)
                self._datasets.append((labels, dense, sparse))
                counts.append(n)
        except BaseException:
            self.close()
            raise
        self.num_dense = len(self.dense_names)
        self.first = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        total = int(self.first[-1])
        self.lo, hi = (0, total) if rows is None else rows
        if hi > total:
            raise DataError(f"data.{split}.rows = [{rows[0]}, {rows[1]}] but "
                            f"{', '.join(self.paths)} hold only {total} samples")
        self.num_samples = hi - self.lo

    def _read_range(self, a, b):
        """Rows of global samples [a, b), all in one file, checked."""
        fi = int(np.searchsorted(self.first, a, side="right")) - 1
        labels, dense, sparse = self._datasets[fi]
        base = int(self.first[fi])
        a, b = a - base, b - base
        p = self.paths[fi]

        def bad(message):
            # HDF5 reads past the end of a file as zeros: name a shrunken file as such
            self._check_size(fi)
            return DataError(f"{p}{message}")

        try:
            values, lengths = [], np.empty((len(self.features), b - a), dtype=np.int64)
            for k, (offsets, vals) in enumerate(sparse):
                off = offsets[a:b + 1].astype(np.int64, copy=False)
                lengths[k] = np.diff(off)
                if (lengths[k] < 0).any():
                    i = int(np.flatnonzero(lengths[k] < 0)[0])
                    raise bad(f":/sparse/{self.features[k]}/offsets[{a + i + 1}] = {off[i + 1]} "
                              f"is less than offsets[{a + i}] = {off[i]} (offsets must not "
                              f"decrease)")
                if off[0] < 0 or off[-1] > vals.shape[0]:
                    raise bad(f":/sparse/{self.features[k]}/offsets[{a}:{b + 1}] leave "
                              f"[0, {vals.shape[0]}], the ids in values")
                values.append(vals[off[0]:off[-1]].astype(np.int64, copy=False))
            y, x = labels[a:b], dense[a:b]
        except OSError as e:
            raise bad(f": cannot read samples {a}..{b - 1} ({e})") from None
        wrong = ~((y >= 0) & (y <= 1))
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise bad(f":/labels[{a + i}] = {y[i]}: a label must be in [0, 1]")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            i, j = (int(v[0]) for v in np.nonzero(~np.isfinite(x)))
            raise bad(f":/dense[{a + i}, {j}] = {x[i, j]}: dense values must be finite")
        self._check_size(fi)
        return Rows(y, x, np.concatenate(values) if values else np.zeros(0), lengths)

    def _size_now(self, fi):
        try:
            return os.fstat(self.files[fi].id.get_vfd_handle()).st_size
        except (OSError, TypeError, ValueError, AttributeError):  # not the sec2 driver
            return os.path.getsize(self.paths[fi])

    def _check_size(self, fi):
        size = self._size_now(fi)
        if size < self._sizes[fi]:
            raise DataError(f"{self.paths[fi]}: the file has {size} bytes but had "
                            f"{self._sizes[fi]} when opened: it was truncated or rewritten "
                            f"while being read")

    def fetch(self, positions):
        """Samples at split positions ``positions`` (unique), in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.shape[0] == 0:
            return Rows.empty(self.num_dense, len(self.features))
        order = np.argsort(positions, kind="stable")
        g = positions[order] + self.lo
        # One read per cluster of nearby samples: each h5py call costs far more than
        # reading a few unneeded rows. Clusters never cross a file boundary.
        fi = np.searchsorted(self.first, g, side="right")
        cut = np.flatnonzero((np.diff(g) > GAP) | (np.diff(fi) != 0)) + 1
        bounds = np.concatenate(([0], cut, [g.shape[0]]))
        parts = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            a, b = int(g[s]), int(g[e - 1]) + 1
            block = self._read_range(a, b)
            parts.append(block if b - a == e - s else block.take(g[s:e] - a))
        rows = Rows.concat(parts, self.num_dense, len(self.features))
        if (order == np.arange(order.shape[0])).all():
            return rows
        return rows.take(np.argsort(order, kind="stable"))

    def close(self):
        self._datasets = []
        for f in self.files:
            try:
                f.close()
            except Exception:
                pass
        self.files = []
