"""Shared-memory segments in /dev/shm: the job's own on the way out, and stale ones of dead jobs.

MPICH maps its intra-node segment (``mpich_shm_*``, about 2 MiB per job) and every
MPI-3 shared window (the sparse exchange's rows and request board) from files in
/dev/shm. A job that ends normally unlinks them in ``MPI_Finalize``; a job that
aborts leaves them behind, and on a busy node thousands of failed runs pin
gigabytes of RAM there.

* ``unlink_own_segments()``: a failing rank unlinks every /dev/shm file its process
  maps before ``MPI_Abort`` (the mappings stay valid; the other ranks of the job are
  ended by the abort), so an aborted job leaves nothing.
* ``stale_segments()`` / ``remove_stale()``: files of this user in /dev/shm with an
  MPI prefix that no live process maps (``hpctrain clean``; ``hpctrain info`` reports
  them). A file younger than ``min_age_s`` is left alone: a job may be starting.
"""
import os
import time

SHM_DIR = "/dev/shm"
#: Name prefixes of segments MPI libraries create there (MPICH, Open MPI's vader/sm).
PREFIXES = ("mpich_shm_", "vader_segment", "sm_segment", "ompi.")


def _mapped_by(pid):
    """Paths under /dev/shm that process ``pid`` maps (empty if it cannot be read)."""
    out = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                i = line.find(SHM_DIR + "/")
                if i >= 0:
                    out.add(line[i:].strip().removesuffix(" (deleted)"))
    except OSError:
        pass
    return out


def own_segments():
    """/dev/shm files this process maps."""
    return sorted(p for p in _mapped_by("self") if os.path.exists(p))


def unlink_own_segments():
    """Unlink the /dev/shm files this process maps; returns the paths removed."""
    removed = []
    for path in own_segments():
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


_installed = False


def install_exit_cleanup():
    """At interpreter exit after an unhandled exception (``python -m mpi4py`` then aborts
    the job, skipping ``MPI_Finalize``), unlink this process's /dev/shm segments.

    Registered after mpi4py is imported, so ``atexit`` runs it before mpi4py's abort.
    """
    global _installed
    if _installed:
        return
    _installed = True
    import atexit
    import sys

    def _cleanup():
        if getattr(sys, "last_exc", None) is not None or \
                getattr(sys, "last_value", None) is not None:
            unlink_own_segments()

    atexit.register(_cleanup)


def _live_mappings():
    mapped = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            mapped |= _mapped_by(name)
    return mapped


def stale_segments(min_age_s=60.0, directory=SHM_DIR, now=None):
    """``[(path, bytes)]``: this user's MPI segments in ``directory`` no live process maps."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    uid, now = os.getuid(), time.time() if now is None else now
    candidates = []
    for name in names:
        if not name.startswith(PREFIXES):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid == uid and now - st.st_mtime >= min_age_s:
            candidates.append((path, st.st_size))
    if not candidates:
        return []
    mapped = _live_mappings()
    return [(p, n) for p, n in candidates if p not in mapped]


def remove_stale(min_age_s=60.0, directory=SHM_DIR):
    """Remove ``stale_segments``; returns ``(files removed, bytes freed)``."""
    n = freed = 0
    for path, size in stale_segments(min_age_s, directory):
        try:
            os.unlink(path)
        except OSError:
            continue
        n, freed = n + 1, freed + size
    return n, freed


def main(argv=None):
    """``hpctrain clean [--dry-run] [--min-age SECONDS]``: remove stale MPI segments."""
    import argparse
    p = argparse.ArgumentParser(prog="hpctrain clean",
                                description="Remove this user's shared-memory segments "
                                            "that aborted MPI jobs left in /dev/shm.")
    p.add_argument("--dry-run", action="store_true", help="list them, remove nothing")
    p.add_argument("--min-age", type=float, default=60.0, metavar="SECONDS",
                   help="leave files younger than this alone (a job may be starting)")
    args = p.parse_args(argv)
    stale = stale_segments(args.min_age)
    for path, size in stale:
        print(f"{'stale' if args.dry_run else 'removing'} {path} ({size / 2**20:.1f} MiB)")
    if not args.dry_run:
        n, freed = remove_stale(args.min_age)
        print(f"hpctrain clean: removed {n} segment(s), {freed / 2**20:.1f} MiB")
    else:
        print(f"hpctrain clean: {len(stale)} stale segment(s), "
              f"{sum(s for _, s in stale) / 2**20:.1f} MiB")
    return 0
