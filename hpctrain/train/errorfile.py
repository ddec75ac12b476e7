"""The run's error file: ``<run directory>/hpctrain-error.txt``.

The line a failing rank prints just before ``MPI_Abort`` is sometimes dropped by the
launcher, so the same line is appended here too. The run directory is the metrics
file's directory, else the checkpoint directory's parent; it is known once a config is
loaded (the CLI and the trainer both tell this module).
"""
import os
import time

_PATH = None


def set_from_config(cfg):
    """Remember where ``cfg``'s run writes its error file (nothing without outputs)."""
    global _PATH
    if cfg.metrics.path:
        run_dir = os.path.dirname(os.path.abspath(cfg.metrics.path))
    elif cfg.checkpoint is not None:
        run_dir = os.path.dirname(os.path.abspath(cfg.checkpoint.directory))
    else:
        return
    _PATH = os.path.join(run_dir, "hpctrain-error.txt")


def path():
    """The error file of the current run, or None."""
    return _PATH


def append(line):
    """Append ``line`` with a time stamp (never follows a symbolic link; errors ignored)."""
    if _PATH is None:
        return
    try:
        os.makedirs(os.path.dirname(_PATH), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(_PATH, flags, 0o600), "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
    except OSError:
        pass


#: Seconds between writing the error line and ``MPI_Abort``, so the launcher forwards it.
ABORT_GRACE_S = 0.5


def end_job(line, code, size):
    """Report ``line`` (stderr and this file) and end a job of ``size`` ranks with ``code``.

    With several ranks: unlink this rank's /dev/shm segments (``MPI_Abort`` skips the
    ``MPI_Finalize`` that would have), wait ``ABORT_GRACE_S`` and abort the job. A
    1-rank job returns, and its caller exits.
    """
    import sys
    sys.stdout.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    append(line)
    if size > 1:
        from hpctrain.comm.shmclean import unlink_own_segments
        from hpctrain.comm.world import abort_world
        unlink_own_segments()
        time.sleep(ABORT_GRACE_S)
        abort_world(code)
