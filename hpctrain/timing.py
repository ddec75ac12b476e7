"""Wall seconds accumulated per named phase of a step.

One timer serves two ways of cutting a step into phases::

    laps (a chain of phases)            blocks (phases around code)
    t.start()                           with t("dense"):
    dedup(...);    t.lap("dedup")           forward(...)
    exchange(...); t.lap("ids_a2a")     with t("allreduce"):
    lookup(...);   t.lap("lookup")          allreduce(...)

    t.seconds == {"dedup": 0.002, "ids_a2a": 0.011, "lookup": 0.004, "dense": ..., ...}

A phase's seconds add up over every lap and block until ``take()`` (read and start over)
or ``reset()``. Phases named at construction are always present (0.0 until timed), so a
report lists the same keys every step; other names appear when first timed. Blocks may
nest (each adds its own wall time, the outer one included).
"""
import time


class PhaseTimer:
    """Accumulated wall seconds per named phase (``time.perf_counter``).

    Args:
        phases: names always present in ``seconds`` (0.0 until timed).

    Attributes:
        seconds: dict phase -> accumulated seconds.
    """

    def __init__(self, phases=()):
        #: optional object told when a block starts and ends (``enter(phase)``/``leave()``),
        #: e.g. the trainer's stall watchdog
        self.observer = None
        self.phases = tuple(phases)
        self.seconds = dict.fromkeys(self.phases, 0.0)
        self._t = time.perf_counter()

    def start(self):
        """Start the next lap now."""
        self._t = time.perf_counter()

    def lap(self, phase):
        """Add the time since the last ``start``/``lap`` to ``phase``; the next lap starts."""
        now = time.perf_counter()
        self.add(phase, now - self._t)
        self._t = now

    def add(self, phase, seconds):
        """Add ``seconds`` measured elsewhere to ``phase``."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def __call__(self, phase):
        """A context manager adding the wall time of its block to ``phase``."""
        return _Block(self, phase)

    def take(self):
        """The accumulated seconds (a new dict); the timer starts over."""
        out = dict(self.seconds)
        self.reset()
        return out

    def reset(self):
        """Zero the named phases and forget the others."""
        self.seconds.clear()
        self.seconds.update(dict.fromkeys(self.phases, 0.0))


class _Block:
    __slots__ = ("_timer", "_phase", "_t0")

    def __init__(self, timer, phase):
        self._timer, self._phase = timer, phase

    def __enter__(self):
        if self._timer.observer is not None:
            self._timer.observer.enter(self._phase)
        self._t0 = time.perf_counter()
        return self._timer

    def __exit__(self, *exc):
        self._timer.add(self._phase, time.perf_counter() - self._t0)
        if self._timer.observer is not None:
            self._timer.observer.leave()
        return False
