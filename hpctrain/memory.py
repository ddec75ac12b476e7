"""Process memory: allocator settings for training processes (glibc malloc), peak RSS.

A training step allocates and frees the same few hundred arrays of 0.1-10 MB
every step (pooled outputs, exchange plans, gradients). glibc serves a block
larger than its mmap threshold with a fresh ``mmap`` and gives it back with
``munmap`` on free, so every such array is page-faulted in again, page by page,
on every step. The threshold starts at 128 KiB and only rises when a large block
happens to be freed, so whether a process pays this depends on its allocation
history: the same sharded embedding step (2 ranks, width 16, the exchange
benchmark's workload) took 14.1 ms per step at the default and 10.4 ms tuned.

``tune_malloc`` fixes both thresholds: blocks up to 32 MiB (glibc's largest
allowed threshold) come from the heap, and the heap keeps up to 1 GiB of freed
memory instead of trimming it back to the system after each step. Memory freed
by a step is reused by the next one; the resident size is the peak of one step,
as it is with the default thresholds. Blocks above 32 MiB (embedding row stores,
windows) are not affected.
"""
import ctypes
import ctypes.util
import logging
import os
import resource
import sys

log = logging.getLogger(__name__)

# mallopt parameter numbers of glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20      # glibc's maximum (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30

_state = {"tuned": None}


def _libc():
    if not hasattr(os, "confstr"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (ValueError, OSError):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def tune_malloc(mmap_threshold=MMAP_THRESHOLD, trim_threshold=TRIM_THRESHOLD):
    """Set glibc's mmap and trim thresholds for this process (once; later calls no-op).

    Skipped (returns False) when ``HPCTRAIN_MALLOC=default`` is set, when the C
    library is not glibc, or when the process already sets them through
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (the user's values win).

    Returns:
        True when the thresholds are hpctrain's after this call.
    """
    if _state["tuned"] is not None:
        return _state["tuned"]
    choice = os.environ.get("HPCTRAIN_MALLOC", "tuned").strip().lower()
    if choice not in ("tuned", "default"):
        raise ValueError(f"HPCTRAIN_MALLOC must be 'tuned' or 'default', got {choice!r}")
    if choice == "default" or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_",
                                                            "MALLOC_TRIM_THRESHOLD_")):
        _state["tuned"] = False
        return False
    libc = _libc()
    if libc is None:
        _state["tuned"] = False
        return False
    ok = (libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
          and libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1)
    if not ok:
        log.warning("mallopt refused mmap threshold %d / trim threshold %d; the allocator "
                    "keeps its defaults", mmap_threshold, trim_threshold)
    _state["tuned"] = ok
    return ok


def malloc_tuned():
    """True / False once ``tune_malloc`` ran (whether it set the thresholds), else None."""
    return _state["tuned"]


def peak_rss_bytes():
    """Peak resident set size of this process, in bytes (``getrusage``'s ``ru_maxrss``)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


def available_memory(path="/proc/meminfo"):
    """Bytes the system can give without swapping (``MemAvailable``), or None where the
    kernel does not say (not Linux)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
