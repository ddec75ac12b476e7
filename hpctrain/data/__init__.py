"""Data readers: Criteo TSV, CSV/TSV with a schema, HDF5, synthetic; per-rank slices.

    reader = make_reader(cfg.data, "train", rank, world_size, global_batch, seed=cfg.seed)
    for batch in reader:      # Batch: labels, dense, features, values, lengths (jagged)
        ...
    reader.state() / reader.restore(state)

See docs/data.md for formats, hashing, slicing, bad lines and ``hpctrain convert``.
"""
from hpctrain.data.batch import Batch, Rows
from hpctrain.data.hashing import hash_string
from hpctrain.data.parse import CRITEO_DENSE, CRITEO_FEATURES, CRITEO_MISSING_ID
from hpctrain.data.reader import Reader, make_reader
from hpctrain.data.sources import open_dataset

__all__ = ["Batch", "Rows", "Reader", "make_reader", "open_dataset", "hash_string",
           "CRITEO_DENSE", "CRITEO_FEATURES", "CRITEO_MISSING_ID"]
