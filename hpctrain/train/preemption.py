"""Stop cleanly on preemption: a signal sets a flag, all ranks agree before they stop.

Slurm warns a job before its time limit with ``--signal=B:USR1@SECONDS`` (the batch
script forwards the signal to every rank) and sends ``SIGTERM`` on preemption,
``scancel`` and at the time limit itself, ``KillWait`` seconds before ``SIGKILL``.
A rank must not stop on its own: the others would hang in their next collective,
and checkpoints written at different steps cannot be combined. So a signal only
sets a flag, and the training loop asks :meth:`PreemptionWatcher.should_stop` at a
step boundary; that is one allreduce (MAX) of a single int, so every rank gets the
same answer at the same step, checkpoints that step and exits::

    with PreemptionWatcher() as watcher:
        for step in ...:
            train_step()
            if watcher.should_stop(comm):      # collective: every rank calls it
                checkpoint(step); break

Signal handlers can only be installed from the main thread (a Python rule); the
watcher must be installed before the first signal can arrive, because the default
action of ``SIGUSR1`` is to terminate the process.
"""
import signal
import threading
import warnings


#: Signals watched by default: Slurm's warning signal and the termination signal.
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def _signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class PreemptionWatcher:
    """Flag set by SIGUSR1/SIGTERM, turned into a decision all ranks share.

    Args:
        signals: signal numbers to watch (default ``SIGUSR1`` and ``SIGTERM``).
        install: install the handlers now (else call :meth:`install`).

    Attributes:
        signum: the first signal received on this rank, or None.
        stopped: True once :meth:`should_stop` has returned True (it then keeps
            returning True without communicating, on every rank alike).
    """

    def __init__(self, signals=DEFAULT_SIGNALS, install=True):
        self.signals = tuple(int(s) for s in signals)
        if not self.signals:
            raise ValueError("PreemptionWatcher: signals must name at least one signal")
        self.signum = None
        self.stopped = False
        self._previous = {}
        if install:
            self.install()

    # ------------------------------------------------------------------ handlers
    @property
    def installed(self):
        """True while this watcher's handlers are installed."""
        return bool(self._previous)

    def install(self):
        """Install the handlers, remembering the previous ones; returns self.

        Outside the main thread Python cannot install handlers: the watcher then
        warns and only reports signals delivered through :meth:`trigger` or by
        other ranks, so the collective agreement still works.
        """
        if self._previous:
            return self
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("PreemptionWatcher: not in the main thread, signal handlers not "
                          f"installed (signals {[_signal_name(s) for s in self.signals]} keep "
                          "their current action)", RuntimeWarning, stacklevel=2)
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def close(self):
        """Restore the handlers that were installed before this watcher."""
        previous, self._previous = self._previous, {}
        for s, handler in previous.items():
            # None means the previous handler was not installed from Python; the
            # closest restorable action is the default one.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.close()
        return False

    def _handler(self, signum, frame):
        # Runs between bytecodes of the main thread: only record, act later.
        if self.signum is None:
            self.signum = signum

    def trigger(self, signum=signal.SIGUSR1):
        """Act as if ``signum`` had been received (for programmatic stops and tests)."""
        self._handler(int(signum), None)

    # ------------------------------------------------------------------ decision
    @property
    def signalled(self):
        """True when this rank has received one of the watched signals."""
        return self.signum is not None

    @property
    def reason(self):
        """Human-readable cause of the stop, e.g. ``"SIGUSR1"``, or None."""
        return None if self.signum is None else _signal_name(self.signum)

    def should_stop(self, comm=None):
        """Whether every rank should checkpoint and stop now (collective).

        Every rank of ``comm`` must call this at the same step: it is one
        allreduce (MAX) of one int, True on all ranks when any rank was signalled.

        Args:
            comm: a hpctrain ``Communicator`` or None for a single process.

        Returns:
            bool, identical on every rank of ``comm``.
        """
        if self.stopped:
            return True
        flag = self.signum is not None
        if comm is not None and comm.size > 1:
            flag = comm.any_true(flag)
        self.stopped = bool(flag)
        return self.stopped
