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
import re

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
    # never through a symlink, never over an existing file
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path


# Sanity bounds on manifest values, checked before anything is sized by them: a manifest
# is only as trustworthy as whoever could write to the directory.
MAX_WORLD_SIZE = 1 << 20
MAX_DIM = 1 << 20
MAX_STEP = (1 << 63) - 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _is_int(value, lo=0, hi=MAX_STEP):
    return type(value) is int and lo <= value <= hi


def parse_manifest(text):
    """Validated manifest dict from its JSON text; raises ValueError describing the problem.

    Besides format, version and self-checksum, every value that sizes later work is
    checked here first: step, world size (at most ``MAX_WORLD_SIZE``, and exactly one
    shard file listed per rank), file entries, and each table's id, dim and per-rank
    row counts, whose bytes must fit in the listed size of each shard file.
    """
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{MANIFEST}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{MANIFEST}: not an {FORMAT} manifest")
    version = doc.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(f"{MANIFEST}: format_version {version!r} "
                         f"is not supported (this hpctrain reads {FORMAT_VERSION})")
    expected = "sha256:" + hashlib.sha256(_canonical(doc)).hexdigest()
    if doc.get("checksum") != expected:
        raise ValueError(f"{MANIFEST}: checksum mismatch (content altered)")
    if not _is_int(doc.get("step")):
        raise ValueError(f"{MANIFEST}: step {doc.get('step')!r} is not an integer in "
                         f"[0, 2^63 - 1]")
    world = doc.get("world_size")
    if not _is_int(world, 1, MAX_WORLD_SIZE):
        raise ValueError(f"{MANIFEST}: world_size {world!r} is not an integer in "
                         f"[1, {MAX_WORLD_SIZE}]")
    files = doc.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{MANIFEST}: 'files' is not an object")
    if len(files) != world + 1:
        raise ValueError(f"{MANIFEST}: lists {len(files)} files; world_size {world} means "
                         f"{world + 1} ({DENSE_FILE} and one shard file per rank)")
    required = [DENSE_FILE] + [shard_file(r, world) for r in range(world)]
    missing = [name for name in required if name not in files]
    if missing:
        raise ValueError(f"{MANIFEST}: does not list {', '.join(missing[:3])}"
                         + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""))
    for name, entry in files.items():
        if (not isinstance(entry, dict) or not _is_int(entry.get("size"))
                or not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"])):
            raise ValueError(f"{MANIFEST}: bad entry for file {name!r}")
    if doc.get("dense_file", DENSE_FILE) != DENSE_FILE:
        raise ValueError(f"{MANIFEST}: dense_file {doc['dense_file']!r}, expected {DENSE_FILE!r}")
    _check_tables(doc.get("tables"), world, files)
    return doc


def _check_tables(tables, world, files):
    if not isinstance(tables, dict):
        raise ValueError(f"{MANIFEST}: 'tables' is not an object")
    row_bytes = [0] * world
    for name, entry in tables.items():
        where = f"{MANIFEST}: table {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: entry is not an object")
        if not _is_int(entry.get("table_id"), -(1 << 63)):
            raise ValueError(f"{where}: table_id {entry.get('table_id')!r} is not an integer")
        dim = entry.get("dim")
        if not _is_int(dim, 1, MAX_DIM):
            raise ValueError(f"{where}: dim {dim!r} is not an integer in [1, {MAX_DIM}]")
        levels = entry.get("levels", {})
        if not isinstance(levels, dict):
            raise ValueError(f"{where}: 'levels' is not an object")
        for what, rows in [("rows", entry.get("rows"))] + [
                (f"levels[{lv!r}]", n) for lv, n in levels.items()]:
            if (not isinstance(rows, list) or len(rows) != world
                    or not all(_is_int(n) for n in rows)):
                raise ValueError(f"{where}: {what} must list {world} row counts (one per rank)")
            # keys (8 bytes) and, for the table's own rows, float32 values of dim
            per_row = 8 + (4 * dim if what == "rows" else 0)
            for rank, n in enumerate(rows):
                row_bytes[rank] += n * per_row
    for rank, need in enumerate(row_bytes):
        have = files[shard_file(rank, world)]["size"]
        if need > have:
            raise ValueError(f"{MANIFEST}: the tables' row counts need at least {need} bytes in "
                             f"{shard_file(rank, world)}, which has {have}")
