"""A stall watchdog: a rank stuck in one phase of a step longer than a deadline ends the job.

A deadlock (ranks in different collectives), an endless loop, or a hung file system would
otherwise hold the job until its time limit. The trainer's phase timer tells the watchdog
when each timed block (data, exchange, dense, allreduce, sparse update, report, eval,
checkpoint) starts and ends; a background thread checks every few seconds whether the
innermost open block has run past ``stall_timeout_s``. If so it prints one line naming the
rank, the phase, the step and how long it has waited, writes it to the run's error file,
unlinks this rank's /dev/shm segments and aborts the MPI job (Horovod's stall inspector is
the same idea). Every rank runs one, so the stuck rank and the ranks waiting for it all
report; the first deadline to pass ends the job.

Phases in ``exempt`` never time out (an idle online stream waiting for data is not a stall).
"""
import os
import threading
import time


class Watchdog:
    """Ends the job when one timed phase outlasts ``timeout_s`` (see module doc).

    Args:
        timeout_s: seconds one phase may last.
        rank, size: this rank's place in the job (for the message and the abort).
        step_of: callable returning the current step (for the message).
        exempt: phase names that never time out.
        on_stall: called with the message instead of aborting (tests).
    """

    def __init__(self, timeout_s, rank, size, step_of, exempt=(), on_stall=None,
                 poll_s=None):
        self.timeout_s = float(timeout_s)
        self.rank, self.size, self.step_of = rank, size, step_of
        self.exempt = set(exempt)
        self._on_stall = on_stall
        self._stack = []
        self._stop = threading.Event()
        poll = poll_s if poll_s is not None else min(5.0, max(0.05, self.timeout_s / 10))
        self._thread = threading.Thread(target=self._run, args=(poll,), daemon=True,
                                        name="hpctrain-watchdog")
        self._thread.start()

    def enter(self, phase):
        self._stack.append((phase, time.monotonic()))

    def leave(self):
        if self._stack:
            self._stack.pop()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=1.0)

    def _run(self, poll):
        while not self._stop.wait(poll):
            top = self._stack[-1] if self._stack else None
            if top is None or top[0] in self.exempt:
                continue
            waited = time.monotonic() - top[1]
            if waited > self.timeout_s:
                self._stall(top[0], waited)
                return

    def _stall(self, phase, waited):
        msg = (f"hpctrain: rank {self.rank}/{self.size}: StallError: no progress for "
               f"{waited:.0f} s in phase {phase!r} of step {self.step_of() + 1} (stall_timeout_s "
               f"= {self.timeout_s:g}): a deadlock, a stuck rank or a hung file system; ending "
               f"the job")
        if self._on_stall is not None:
            self._on_stall(msg)
            return
        from hpctrain.train import errorfile
        errorfile.end_job(msg, 3, self.size)
        # a 1-rank job: this thread ends the process, past MPI_Finalize too
        from hpctrain.comm.shmclean import unlink_own_segments
        unlink_own_segments()
        os._exit(3)
