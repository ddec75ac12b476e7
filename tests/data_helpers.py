"""Shared helpers of the data tests: Criteo-format generators and plain reference parsers."""
import math

import numpy as np

from hpctrain.config import config_from_dict
from hpctrain.data import make_reader

MISSING = 1 << 32


def criteo_line(rng, empty=0.1):
    """One random Criteo TSV line (label, 13 ints incl. negatives, 26 hex), some fields empty."""
    f = [str(int(rng.integers(0, 2)))]
    f += ["" if rng.random() < empty else str(int(rng.integers(-3, 5000))) for _ in range(13)]
    f += ["" if rng.random() < empty else "%08x" % int(rng.integers(0, 1 << 32))
          for _ in range(26)]
    return "\t".join(f)


def write_criteo(path, n, seed=0, empty=0.1, newline_at_end=True):
    """Write ``n`` random Criteo lines to ``path``; returns the lines."""
    rng = np.random.default_rng(seed)
    lines = [criteo_line(rng, empty) for _ in range(n)]
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""))
    return lines


def ref_criteo(lines):
    """Plain-Python Criteo parser: list of (label, dense tuple, ((id,), ...)) per line."""
    out = []
    for ln in lines:
        f = ln.rstrip("\r").split("\t")
        assert len(f) == 40
        dense = tuple(np.float32(math.log1p(max(int(x), 0))) if x else np.float32(0.0)
                      for x in f[1:14])
        bags = tuple((int(x, 16) if x else MISSING,) for x in f[14:])
        out.append((float(f[0]), dense, bags))
    return out


def samples(batch):
    """A Batch as a list of (label, dense tuple, tuple of per-feature id tuples)."""
    b, nf = batch.size, len(batch.features)
    lengths = batch.lengths.reshape(nf, b)
    starts = np.concatenate(([0], np.cumsum(batch.lengths)))
    out = []
    for s in range(b):
        bags = tuple(tuple(int(v) for v in batch.values[starts[f * b + s]:starts[f * b + s + 1]])
                     for f in range(nf))
        assert all(len(bags[f]) == lengths[f, s] for f in range(nf))
        out.append((float(batch.labels[s]), tuple(batch.dense[s].tolist()), bags))
    return out


def same_samples(a, b, rtol=1e-6):
    """Assert two sample lists are equal (dense compared with a tolerance)."""
    assert len(a) == len(b), (len(a), len(b))
    for i, (x, y) in enumerate(zip(a, b)):
        assert x[0] == y[0], f"sample {i}: label {x[0]} != {y[0]}"
        np.testing.assert_allclose(x[1], y[1], rtol=rtol, atol=1e-6, err_msg=f"sample {i}")
        assert x[2] == y[2], f"sample {i}: bags differ"


def global_batches(data_cfg, split, world, G, seed=0, **kw):
    """The global batches ranks 0..world-1 read, each as one concatenated sample list."""
    readers = [make_reader(data_cfg, split, r, world, G, seed, **kw) for r in range(world)]
    out = []
    try:
        while True:
            parts = [next(r, None) for r in readers]
            if all(p is None for p in parts):
                return out
            assert all(p is not None for p in parts), "ranks disagree on the number of batches"
            assert len({(p.epoch, p.index, p.global_size) for p in parts}) == 1
            out.append([s for p in parts for s in samples(p)])
    finally:
        for r in readers:
            r.close()


def base_config(data, **top):
    """A valid config dict around a ``data`` section (one table over ``features``)."""
    features = top.pop("features")
    d = {"global_batch": 64, "steps": 10, "model": {"kind": "dlrm", "bottom": [8]},
         "tables": [{"name": "t", "features": features, "dim": 8}], "data": data}
    d.update(top)
    return d


def data_config(data, features, **top):
    """The validated ``DataConfig`` of a data section."""
    return config_from_dict(base_config(data, features=features, **top)).data
