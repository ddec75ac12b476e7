"""HDF5 checkpoints: atomic collective save, verified restore onto any world size, export.

``CheckpointManager(directory, comm, keep_last=3)`` saves one directory per step
(``step-XXXXXXXX/``: ``dense.h5`` from rank 0, one ``tables-RRRRR-of-WWWWW.h5`` per
rank, and a ``MANIFEST.json`` of sizes and sha256 written last), finds the newest
checkpoint that verifies, and loads it onto any number of ranks by re-routing table
rows through an ``owner(table, keys)`` function. ``export_model`` writes a single
HDF5 model file for inference. Nothing is ever unpickled. Layout: docs/checkpoint.md.
"""
from hpctrain.checkpoint._restore import read_dense, verify
from hpctrain.checkpoint.export import export_model
from hpctrain.checkpoint.manager import CheckpointManager, CheckpointWarning
from hpctrain.errors import CheckpointError

__all__ = ["CheckpointManager", "CheckpointWarning", "CheckpointError", "export_model",
           "read_dense", "verify"]
