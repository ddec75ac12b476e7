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


def _names(attr):
    return [x.decode() if isinstance(x, bytes) else str(x) for x in attr]


class HDF5Dataset:
    """Random-access samples of one or more hpctrain HDF5 files (concatenated in order).

    Args:
        paths: the files. rows: ``(start, end)`` sample range over all files, or None.
        split: "train" or "eval", for messages.
    """

    random_access = True

    def __init__(self, paths, rows, split):
        h5py = _h5py()
        self.paths, self.files, counts = list(paths), [], []
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
                if int(f.attrs.get("version", -1)) != VERSION:
                    raise DataError(f"{p}: data file version {f.attrs.get('version')}, "
                                    f"this hpctrain reads {VERSION}")
                feats, dn = _names(f.attrs["features"]), _names(f.attrs["dense_names"])
                if len(self.files) == 1:
                    self.features, self.dense_names = tuple(feats), tuple(dn)
                elif tuple(feats) != self.features or tuple(dn) != self.dense_names:
                    raise DataError(f"{p}: features {feats} / dense {dn} differ from "
                                    f"{self.paths[0]}'s {list(self.features)} / "
                                    f"{list(self.dense_names)}")
                n = int(f["labels"].shape[0])
                if n == 0:
                    raise DataError(f"{p}: empty data file (0 samples)")
                counts.append(n)
        except BaseException:
            self.close()
            raise
        self.num_dense = len(self.dense_names)
        # dataset handles, looked up once (a path lookup costs as much as a small read)
        self._datasets = [(f["labels"], f["dense"],
                           [(f[f"sparse/{n}/offsets"], f[f"sparse/{n}/values"])
                            for n in self.features]) for f in self.files]
        self.first = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        total = int(self.first[-1])
        self.lo, hi = (0, total) if rows is None else rows
        if hi > total:
            raise DataError(f"data.{split}.rows = [{rows[0]}, {rows[1]}] but "
                            f"{', '.join(self.paths)} hold only {total} samples")
        self.num_samples = hi - self.lo

    def _read_range(self, a, b):
        """Rows of global samples [a, b), all in one file."""
        fi = int(np.searchsorted(self.first, a, side="right")) - 1
        labels, dense, sparse = self._datasets[fi]
        base = int(self.first[fi])
        a, b = a - base, b - base
        values, lengths = [], np.empty((len(self.features), b - a), dtype=np.int64)
        for k, (offsets, vals) in enumerate(sparse):
            off = offsets[a:b + 1]
            lengths[k] = np.diff(off)
            values.append(vals[off[0]:off[-1]])
        return Rows(labels[a:b], dense[a:b],
                    np.concatenate(values) if values else np.zeros(0), lengths)

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
