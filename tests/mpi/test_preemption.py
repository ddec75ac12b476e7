"""PreemptionWatcher across ranks: one signalled rank stops every rank at the same step."""
import os
import signal

import numpy as np
import pytest
from mpi4py import MPI

from hpctrain.train.preemption import PreemptionWatcher

pytestmark = pytest.mark.mpi


def _comms():
    from hpctrain.comm import create_communicator
    return [("mpi", create_communicator("mpi", MPI.COMM_WORLD)),
            ("debug", create_communicator("mpi", MPI.COMM_WORLD, debug=True))]


@pytest.mark.parametrize("name", [n for n, _ in _comms()])
def test_any_signalled_rank_stops_all_at_same_step(name):
    comm = dict(_comms())[name]
    world = MPI.COMM_WORLD
    for signalled_rank in sorted({0, world.size - 1}):   # run twice: first and last rank
        stop_at = 3 + signalled_rank
        with PreemptionWatcher() as w:
            stopped_step = None
            for step in range(10):
                if world.rank == signalled_rank and step == stop_at:
                    os.kill(os.getpid(), signal.SIGUSR1)
                if w.should_stop(comm):
                    stopped_step = step
                    break
            assert w.signalled == (world.rank == signalled_rank)
        steps = world.allgather(stopped_step)
        assert steps == [stop_at] * world.size, steps


def test_no_signal_never_stops():
    world = MPI.COMM_WORLD
    with PreemptionWatcher() as w:
        answers = [w.should_stop(dict(_comms())["mpi"]) for _ in range(5)]
    assert answers == [False] * 5
    # every rank answered the same (and the world is still usable)
    buf = np.array([sum(answers)], dtype=np.int64)
    world.Allreduce(MPI.IN_PLACE, buf)
    assert buf[0] == 0


def test_stop_is_latched_without_communicating():
    world = MPI.COMM_WORLD
    w = PreemptionWatcher(install=False)
    if world.rank == 0:
        w.trigger(signal.SIGTERM)
    assert w.should_stop(dict(_comms())["mpi"])
    # A sub-communicator only rank 0 has must not be needed any more: the answer is latched.
    assert w.should_stop(None) and w.stopped
