"""Durable files and the checkpoint manifest: fsync, sha256, MANIFEST.json.

The manifest is the commit record of a checkpoint: it is written last, lists
every other file with its size and sha256, and carries a checksum of its own
content, so a missing, truncated or altered file is detected before loading.
"""
import errno
import hashlib
import json
import os
import platform

import h5py
import numpy as np

FORMAT = "hpctrain-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
DENSE_FILE = "dense.h5"
_BLOCK = 8 << 20


def shard_file(rank, world_size):
    """File name of the table shards written by ``rank`` of ``world_size``."""
    return f"tables-{rank:05d}-of-{world_size:05d}.h5"


def versions():
    """Versions recorded with every checkpoint."""
    import hpctrain
    return {"hpctrain": getattr(hpctrain, "__version__", "unknown"),
            "python": platform.python_version(), "numpy": np.__version__,
            "h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version}


def open_h5(path, mode):
    """``h5py.File`` without HDF5 file locking (unsupported on many parallel file systems).

    Checkpoint files are never written concurrently: each is written by one rank
    under a temporary directory and is immutable once the manifest exists.
    """
    try:
        return h5py.File(path, mode, locking=False)
    except TypeError:  # h5py older than 3.5
        return h5py.File(path, mode)


def fsync_dir(path):
    """Make the entries of directory ``path`` durable (where the file system allows it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_and_digest(path):
    """fsync ``path`` and return ``{"size": bytes, "sha256": hex}`` of its content."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
        while True:
            block = fh.read(_BLOCK)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return {"size": size, "sha256": digest.hexdigest()}


def check_file(path, expected, hash_file=True):
    """Problem with ``path`` against its manifest entry, or None when it matches.

    Checks the size, and the sha256 of the content when ``hash_file``.
    """
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return f"{name}: missing or unreadable ({exc.strerror})"
    if size != expected["size"]:
        return (f"{name}: size {size} bytes, manifest says {expected['size']} "
                f"({'truncated' if size < expected['size'] else 'grown'})")
    if not hash_file:
        return None
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while True:
                block = fh.read(_BLOCK)
                if not block:
                    break
                digest.update(block)
    except OSError as exc:
        return f"{name}: read error ({exc.strerror})"
    if digest.hexdigest() != expected["sha256"]:
        return (f"{name}: sha256 mismatch (content altered): expected {expected['sha256']}, "
                f"got {digest.hexdigest()}")
    return None


def _canonical(doc):
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def write_manifest(directory, doc):
    """Write ``directory/MANIFEST.json`` (with its self-checksum) and fsync it."""
    doc = dict(doc)
    doc["checksum"] = "sha256:" + hashlib.sha256(_canonical(doc)).hexdigest()
    path = os.path.join(directory, MANIFEST)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path


def parse_manifest(text):
    """Validated manifest dict from its JSON text; raises ValueError describing the problem."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{MANIFEST}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{MANIFEST}: not an {FORMAT} manifest")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{MANIFEST}: format_version {doc.get('format_version')!r} "
                         f"is not supported (this hpctrain reads {FORMAT_VERSION})")
    expected = "sha256:" + hashlib.sha256(_canonical(doc)).hexdigest()
    if doc.get("checksum") != expected:
        raise ValueError(f"{MANIFEST}: checksum mismatch (content altered)")
    world = doc.get("world_size")
    files = doc.get("files")
    if not isinstance(world, int) or world < 1 or not isinstance(files, dict):
        raise ValueError(f"{MANIFEST}: bad world_size or files entry")
    required = [DENSE_FILE] + [shard_file(r, world) for r in range(world)]
    missing = [name for name in required if name not in files]
    if missing:
        raise ValueError(f"{MANIFEST}: does not list {', '.join(missing)}")
    for name, entry in files.items():
        if (os.path.basename(name) != name or not isinstance(entry, dict)
                or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str)):
            raise ValueError(f"{MANIFEST}: bad entry for file {name!r}")
    return doc
