"""Line parsers of the text formats: Criteo TSV and schema-driven CSV/TSV.

Both drive one kernel (``hpctrain._kernels.data_parse.parse_lines``) with a role
per column; this module builds the roles, maps label strings, applies the dense
transforms and turns status codes into messages.

Criteo (40 tab-separated fields, the Kaggle/Terabyte layout)::

    label  I1 .. I13 (integers)  C1 .. C26 (8-digit hex)
    dense  = log(1 + max(x, 0)), empty -> 0         (DLRM's transform)
    id     = the hex value as an integer in [0, 2^32); empty -> CRITEO_MISSING_ID = 2^32

CSV/TSV: see ``SchemaConfig``; categorical ids are ``hashing.hash_string(column, value)``.
"""
import numpy as np

from hpctrain._kernels.data_parse import parse_lines
from hpctrain.data.batch import Rows
from hpctrain.data.hashing import column_seed, hash_cross_arrays, hash_string

# Column roles and line status codes of kernels/data_parse.pyx.
R_IGNORE, R_LABEL, R_LABEL_HASH, R_DENSE_FLOAT, R_DENSE_INT, R_CAT_HASH, R_CAT_HEX, \
    R_MULTI_HASH = range(8)
S_OK, S_FIELDS, S_NUMBER, S_HEX, S_LABEL = range(5)

# An 8-digit hex id is below 2^32, so a missing categorical gets an id of its own.
CRITEO_MISSING_ID = 1 << 32
CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_FEATURES = tuple(f"C{i}" for i in range(1, 27))
CRITEO_COLUMNS = ("label",) + CRITEO_DENSE + CRITEO_FEATURES


class LineParser:
    """Parse text lines of one format into ``Rows``.

    Attributes:
        columns: column names in file order.
        features: sparse feature names (batch order). dense_names: dense column names.
        transforms: per dense column, "none" | "log1p" | "standardize".
        mean, std: float64[num_dense] standardisation statistics (NaN where unused/unset).
    """

    def __init__(self, columns, roles, slots, delim, strip, features, dense_names,
                 transforms, seps=None, missing_id=0, label_positive=None, label_negative=None,
                 crossed=()):
        self.columns = list(columns)
        # the kernel fills `features`; crosses (name, [feature index, ...]) follow them
        self.crossed = [(name, list(idx)) for name, idx in crossed]
        self.kernel_features = tuple(features)
        self.features = self.kernel_features + tuple(name for name, _ in self.crossed)
        self.dense_names = tuple(dense_names)
        self.transforms = list(transforms)
        self.roles = np.asarray(roles, dtype=np.int32)
        self.slots = np.asarray(slots, dtype=np.int32)
        self.seeds = np.array([column_seed(c) for c in self.columns], dtype=np.uint64)
        self.seps = np.frombuffer(bytes(ord(s) for s in (seps or [","] * len(columns))),
                                  dtype=np.uint8).copy()
        self.delim, self.strip, self.missing_id = ord(delim), bool(strip), int(missing_id)
        self.mean = np.full(len(dense_names), np.nan)
        self.std = np.full(len(dense_names), np.nan)
        self.has_multi = bool((self.roles == R_MULTI_HASH).any())
        self.num_single = int(((self.roles == R_CAT_HASH) | (self.roles == R_CAT_HEX)).sum())
        # the parser writes a line's bags in column order; this maps them to features
        sparse = (self.roles == R_CAT_HASH) | (self.roles == R_CAT_HEX) | \
            (self.roles == R_MULTI_HASH)
        self.bag_order = self.slots[sparse].astype(np.int32)
        self.label_col = int(np.flatnonzero((self.roles == R_LABEL) |
                                            (self.roles == R_LABEL_HASH))[0])
        name = self.columns[self.label_col]
        self.pos_hashes = np.array([hash_string(name, v) for v in label_positive or []], np.uint64)
        self.neg_hashes = (None if label_negative is None else
                           np.array([hash_string(name, v) for v in label_negative], np.uint64))

    @classmethod
    def criteo(cls):
        """The Criteo TSV parser (label, 13 integers, 26 hex categoricals)."""
        roles = [R_LABEL] + [R_DENSE_INT] * 13 + [R_CAT_HEX] * 26
        slots = [0] + list(range(13)) + list(range(26))
        return cls(CRITEO_COLUMNS, roles, slots, "\t", False, CRITEO_FEATURES, CRITEO_DENSE,
                   ["log1p"] * 13, missing_id=CRITEO_MISSING_ID)

    @classmethod
    def from_schema(cls, schema, columns):
        """The parser of a CSV/TSV ``SchemaConfig`` whose file columns are ``columns``."""
        role = {schema.label: (R_LABEL_HASH if schema.label_positive else R_LABEL, 0)}
        role.update({c.name: (R_DENSE_FLOAT, i) for i, c in enumerate(schema.dense)})
        feats = list(schema.categorical) + [c.name for c in schema.multi_valued]
        role.update({c: (R_CAT_HASH, feats.index(c)) for c in schema.categorical})
        role.update({c.name: (R_MULTI_HASH, feats.index(c.name)) for c in schema.multi_valued})
        seps = {c.name: c.separator for c in schema.multi_valued}
        roles = [role.get(c, (R_IGNORE, 0)) for c in columns]
        return cls(columns, [r for r, _ in roles], [s for _, s in roles], schema.delimiter,
                   schema.strip, feats, [c.name for c in schema.dense],
                   [c.transform for c in schema.dense],
                   seps=[seps.get(c, ",") for c in columns],
                   label_positive=schema.label_positive, label_negative=schema.label_negative,
                   crossed=[(c.name, [feats.index(x) for x in c.columns])
                            for c in schema.crossed])

    def set_stats(self, mean, std):
        """Standardisation statistics for the dense columns (NaN: not standardised)."""
        self.mean, self.std = np.asarray(mean, np.float64), np.asarray(std, np.float64)

    def parse_raw(self, buf, starts, ends):
        """Run the kernel. Returns ``(labels, dense_raw, ids, lengths_sm, status, err_col)``
        for every line (bad lines have status != 0 and no ids)."""
        starts = np.ascontiguousarray(starts, dtype=np.int64)
        ends = np.ascontiguousarray(ends, dtype=np.int64)
        n, nf = starts.shape[0], len(self.kernel_features)
        cap = n * self.num_single
        if self.has_multi:
            cap += int((ends - starts).sum()) + n * nf
        labels = np.zeros(n)
        label_hash = np.zeros(n, dtype=np.uint64)
        dense = np.zeros((n, len(self.dense_names)))
        ids = np.empty(max(cap, 1), dtype=np.int64)
        lengths = np.zeros((n, nf), dtype=np.int64)
        status = np.zeros(n, dtype=np.int32)
        err_col = np.zeros(n, dtype=np.int32)
        w = parse_lines(buf, starts, ends, self.roles, self.slots, self.seeds, self.seps,
                        self.delim, self.strip, self.missing_id, labels, label_hash, dense,
                        ids, lengths, status, err_col)
        if w < 0:
            raise RuntimeError("parse_lines: id buffer too small (a bug in the capacity bound)")
        if self.roles[self.label_col] == R_LABEL_HASH:
            pos = np.isin(label_hash, self.pos_hashes)
            labels = pos.astype(np.float64)
            if self.neg_hashes is not None:
                bad = (status == S_OK) & ~pos & ~np.isin(label_hash, self.neg_hashes)
                status[bad], err_col[bad] = S_LABEL, self.label_col
        return labels, dense, ids[:w], lengths, status, err_col

    def parse(self, buf, starts, ends):
        """Parse lines into ``(Rows of the good lines, status, err_col)``."""
        labels, dense, ids, lengths, status, err_col = self.parse_raw(buf, starts, ends)
        good = status == S_OK
        if not good.all():
            # Lines rejected after the kernel (labels) still hold ids: drop them here.
            ids = ids[np.repeat(good, lengths.sum(axis=1))]
            labels, dense, lengths = labels[good], dense[good], lengths[good]
        rows = Rows.from_sample_major(labels, self.transform(dense), ids, lengths, self.bag_order)
        if self.crossed:
            # crossed columns are one-hot categoricals, which come first: feature f's ids
            # are values[f * n:(f + 1) * n]
            n = len(rows)
            crosses = [hash_cross_arrays(name, [rows.values[f * n:(f + 1) * n] for f in idx])
                       for name, idx in self.crossed]
            rows = Rows(rows.labels, rows.dense, np.concatenate([rows.values] + crosses),
                        np.vstack([rows.lengths, np.ones((len(crosses), n), dtype=np.int64)]))
        return rows, status, err_col

    def transform(self, dense):
        """Apply each dense column's transform to raw float64 values; returns float32."""
        out = np.empty(dense.shape, dtype=np.float32)
        for j, t in enumerate(self.transforms):
            x = dense[:, j]
            if t == "log1p":
                x = np.log1p(np.maximum(x, 0.0))
            elif t == "standardize":
                if not np.isfinite(self.mean[j]):
                    raise RuntimeError(f"dense column {self.dense_names[j]!r}: standardisation "
                                       f"statistics were not set")
                x = (x - self.mean[j]) / self.std[j]
            out[:, j] = x
        return out

    def reason(self, buf, start, end, status, col):
        """A human-readable reason for a bad line's status code."""
        if status == S_FIELDS:
            return f"wrong field count: {col} fields, expected {len(self.columns)}"
        text = bytes(buf[start:end]).rstrip(b"\r").split(bytes([self.delim]))
        value = text[col].decode("utf-8", "replace") if col < len(text) else ""
        value = value if len(value) <= 40 else value[:37] + "..."
        what = {S_NUMBER: "non-numeric value", S_HEX: "bad hex value (1-8 hex digits)",
                S_LABEL: "bad label"}.get(status, f"status {status}")
        return f"{what} {value!r} in column {self.columns[col]!r}"

