"""Collective helpers: a one-rank world, and errors raised on every rank together.

A rank that raises alone while the others wait in their next collective would
hang the job, so every step of a collective checkpoint operation catches its
errors, gathers them, and raises ``CheckpointError`` on all ranks at once.
"""
from hpctrain.errors import CheckpointError


class LocalComm:
    """The one-rank world used when no communicator is given (tools, tests, export)."""

    rank, size = 0, 1

    def bcast(self, obj, root=0):
        return obj

    def barrier(self):
        pass

    def allgather_object(self, obj):
        return [obj]


def describe(exc):
    """One-line text of an exception for messages that cross ranks."""
    return str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"


def fail(errors, prefix="", cause=None):
    """Raise CheckpointError when any of the per-rank ``errors`` (str or None) is set."""
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        text = "; ".join(e if len(errors) == 1 else f"rank {r}: {e}" for r, e in bad)
        raise CheckpointError(prefix + text) from cause


def raise_together(comm, error, prefix="", cause=None):
    """Gather one error (str or None) per rank; raise CheckpointError on every rank if any."""
    fail(comm.allgather_object(error), prefix, cause)


def on_root(comm, fn, prefix=""):
    """``fn()`` evaluated on rank 0 and broadcast; its exception is raised on every rank."""
    value, error = None, None
    if comm.rank == 0:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            error = describe(exc)
    value, error = comm.bcast((value, error), root=0)
    if error:
        raise CheckpointError(prefix + error)
    return value
