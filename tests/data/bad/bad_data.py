"""Bad data files: small text files kept in this directory, HDF5 files edited from a good one.

Each case is ``Case(name, fmt, build, match, bad_lines, batch)``: ``build(tmpdir)`` returns
the data file (a file of this directory, or one it writes under ``tmpdir``), ``fmt`` is
its ``data.format`` ("criteo", "csv" with ``CSV_SCHEMA``, "hdf5"), ``bad_lines`` an
optional ``[data.bad_lines]`` policy, ``batch`` the global batch of the reader, and
``match`` a regex that the one-line
``DataError`` must match, both when a reader reads the split and when ``hpctrain
convert`` converts it. Add a case by appending to ``CASES`` (and its file, if it is
one, to this directory); tests/test_data_corpus.py runs them all.
"""
import os
from dataclasses import dataclass

import h5py
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CSV_SCHEMA = {"label": "click", "dense": ["price"], "categorical": ["city"]}
CSV_FEATURES = ["city"]
TOLERANT = {"max_count": 1000, "max_ratio": 1.0}
ROWS = 50


def here(name):
    return lambda tmp: os.path.join(HERE, name)


def write_good_hdf5(path, n=ROWS, seed=0):
    """A valid hpctrain HDF5 data file of ``n`` Criteo-shaped samples."""
    from hpctrain.data import CRITEO_DENSE, CRITEO_FEATURES
    from hpctrain.data.batch import Rows
    from hpctrain.data.hdf5 import HDF5Writer
    rng = np.random.default_rng(seed)
    nf = len(CRITEO_FEATURES)
    lengths = rng.integers(0, 3, size=(nf, n))
    rows = Rows(rng.integers(0, 2, n), rng.standard_normal((n, len(CRITEO_DENSE))),
                rng.integers(0, 1000, int(lengths.sum())), lengths)
    w = HDF5Writer(path, CRITEO_FEATURES, CRITEO_DENSE, chunk_rows=16)
    w.append(rows)
    w.close()
    return path


def hdf5(edit):
    """A case builder: the good file, then ``edit(h5py.File)``."""
    def build(tmp):
        path = write_good_hdf5(os.path.join(tmp, "data.h5"))
        with h5py.File(path, "r+") as f:
            edit(f)
        return path
    return build


def replace(f, path, data=None, **kw):
    attrs = dict(f[path].attrs)
    del f[path]
    f.create_dataset(path, data=data, **kw).attrs.update(attrs)


def poke(path, index, value):
    def edit(f):
        a = f[path][...]
        a[index] = value
        f[path][...] = a
    return edit


def text(name, body):
    def build(tmp):
        path = os.path.join(tmp, name)
        with open(path, "w", newline="") as fh:
            fh.write(body)
        return path
    return build


def many_bad_lines(tmp):
    """More bad lines (wrong field count) than one global batch: every window is empty."""
    path = os.path.join(tmp, "all_bad_long.tsv")
    with open(path, "w") as fh:
        fh.write("".join("1\t2\t3\n" for _ in range(300)))
    return path


@dataclass
class Case:
    name: str
    fmt: str
    build: object
    match: str
    bad_lines: dict = None
    batch: int = 16     # the global batch the reader reads the split with


CASES = [
    # text: what is not plain text, and files with nothing to read
    Case("criteo_gzip", "criteo", here("criteo_gzip.tsv.gz"),
         r"criteo_gzip.tsv.gz: gzip-compressed input is not supported"),
    Case("criteo_bzip2", "criteo", here("criteo_bzip2.tsv.bz2"),
         r"criteo_bzip2.tsv.bz2: bzip2-compressed input is not supported"),
    Case("criteo_cr_only", "criteo", here("criteo_cr_only.tsv"),
         r"criteo_cr_only.tsv: lines end in CR only"),
    Case("criteo_hdf5_file", "criteo", lambda tmp: write_good_hdf5(os.path.join(tmp, "x.tsv")),
         r"x.tsv: an HDF5 file, not text \(set data.format = \"hdf5\""),
    Case("criteo_empty", "criteo", here("criteo_empty.tsv"), r"criteo_empty.tsv: empty file"),
    Case("criteo_directory", "criteo", lambda tmp: tmp, r": is a directory, not a data file"),
    Case("criteo_no_line_end", "criteo", text("one.tsv", "1\t" * (70 << 19)),
         r"one.tsv: no line end in the \d+ bytes from byte 0"),
    Case("csv_header_only", "csv", here("csv_header_only.csv"),
         r"csv_header_only.csv: no data lines after the header"),
    # text: bad lines
    Case("criteo_bad_line_strict", "criteo", here("criteo_bad_line.tsv"),
         r"criteo_bad_line.tsv:7: non-numeric value '12x' in column 'I3'"),
    Case("criteo_all_bad_tolerated", "criteo", here("criteo_all_bad.tsv"),
         r"all 20 lines of the split are bad \(the last: .*criteo_all_bad.tsv:20: wrong field "
         r"count: 39 fields, expected 40\)|no good sample.*criteo_all_bad.tsv:20",
         bad_lines=TOLERANT, batch=32),  # fewer lines than one batch
    Case("criteo_all_bad_strict", "criteo", here("criteo_all_bad.tsv"),
         r"criteo_all_bad.tsv:1: wrong field count: 39 fields, expected 40"),
    Case("criteo_many_bad_tolerated", "criteo", many_bad_lines,
         r"every one of the \d+ lines this rank parsed in epoch 0 is bad \(the last: "
         r".*all_bad_long.tsv:\d+: wrong field count|no good sample.*all_bad_long.tsv:300",
         bad_lines=TOLERANT),
    # HDF5: layout
    Case("hdf5_not_hdf5", "hdf5", text("data.h5", "label\tI1\n"),
         r"data.h5: not a readable HDF5 file"),
    Case("hdf5_version_2", "hdf5", hdf5(lambda f: f.attrs.modify("version", 2)),
         r"data.h5: data file version 2, this hpctrain reads 1"),
    Case("hdf5_no_features_attr", "hdf5", hdf5(lambda f: f.attrs.__delitem__("features")),
         r"data.h5: attribute features is missing"),
    Case("hdf5_missing_group", "hdf5", hdf5(lambda f: f.__delitem__("sparse/C7")),
         r"data.h5: no dataset /sparse/C7/offsets"),
    Case("hdf5_missing_labels", "hdf5", hdf5(lambda f: f.__delitem__("labels")),
         r"data.h5: no dataset /labels"),
    Case("hdf5_labels_strings", "hdf5", hdf5(lambda f: replace(
        f, "labels", np.array([b"yes"] * ROWS))),
         r"data.h5:/labels: expected float32\[N\] labels, got \|S3\[50\]"),
    Case("hdf5_dense_transposed", "hdf5", hdf5(lambda f: replace(f, "dense", f["dense"][...].T)),
         r"data.h5:/dense: shape \[13, 50\], expected \[50, 13\]"),
    Case("hdf5_float_ids", "hdf5", hdf5(lambda f: replace(
        f, "sparse/C2/values", f["sparse/C2/values"][...].astype(np.float64))),
         r"data.h5:/sparse/C2/values: expected int64 ids, got float64"),
    Case("hdf5_fewer_labels", "hdf5", hdf5(lambda f: replace(f, "labels", f["labels"][:-3])),
         r"data.h5: attribute num_samples = 50 but /labels has 47 rows"),
    Case("hdf5_fewer_dense_rows", "hdf5", hdf5(lambda f: replace(f, "dense", f["dense"][:-3])),
         r"data.h5:/dense: shape \[47, 13\], expected \[50, 13\] \(50 labels"),
    Case("hdf5_num_samples_attr", "hdf5", hdf5(lambda f: f.attrs.modify("num_samples", 10**9)),
         r"data.h5: attribute num_samples = 1000000000 but /labels has 50 rows"),
    Case("hdf5_declares_huge", "hdf5", hdf5(lambda f: replace(
        f, "labels", shape=(10**10,), dtype=np.float32, chunks=(1024,))),
         r"data.h5:/labels: declares float32\[10000000000\] \(40000000000 bytes\) but the file "
         r"stores only \d+ bytes"),
    Case("hdf5_offsets_short", "hdf5", hdf5(lambda f: replace(
        f, "sparse/C1/offsets", f["sparse/C1/offsets"][:-1])),
         r"data.h5:/sparse/C1/offsets: 50 entries, expected 51"),
    Case("hdf5_offsets_end", "hdf5", hdf5(poke("sparse/C4/offsets", -1, 10**6)),
         r"data.h5:/sparse/C4/offsets: runs from 0 to 1000000, expected 0 to \d+"),
    # HDF5: values, found when the rows are read
    Case("hdf5_offsets_decrease", "hdf5", hdf5(poke("sparse/C3/offsets", 20, 0)),
         r"data.h5:/sparse/C3/offsets\[21\] = \d+ is less than offsets\[20\] = 0|"
         r"data.h5:/sparse/C3/offsets\[20\] = 0 is less than offsets\[19\] = \d+"),
    Case("hdf5_label_2", "hdf5", hdf5(poke("labels", 33, 2.0)),
         r"data.h5:/labels\[33\] = 2.0: a label must be in \[0, 1\]"),
    Case("hdf5_label_nan", "hdf5", hdf5(poke("labels", 5, np.nan)),
         r"data.h5:/labels\[5\] = nan: a label must be in \[0, 1\]"),
    Case("hdf5_dense_inf", "hdf5", hdf5(poke("dense", (41, 2), np.inf)),
         r"data.h5:/dense\[41, 2\] = inf: dense values must be finite"),
]
