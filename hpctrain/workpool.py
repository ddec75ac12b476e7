"""Work items in parallel: a rank's per-table (or per-block) work spread over its threads.

A step of a sparse store loops over its tables several times (dedup, serving rows,
pooling, gradient sums, optimizer updates), and each table's batch is small: at 4096
samples per rank a one-hot table sees a few thousand ids, a job of tens of microseconds.
Splitting every such kernel over the rank's threads costs a wake-up of the other
threads per kernel call and leaves the order-dependent passes (dedup, inserts) on one
thread. Instead, ``parallel_map`` hands whole items to the threads, one loop = one
parallel region::

    threads:  t0: table 0 ─ table 2 ─ table 4 ...      (each table's kernels on 1 thread,
              t1: table 1 ─ table 3 ─ table 5 ...       next table to whoever is free)

The dense side uses it the same way for the row blocks of DLRM's interaction, whose
batched products of small matrices BLAS runs on one core whatever its thread count.

The kernels (and NumPy's products) release the GIL, so the items' native work runs side
by side. Each item's work is the same whichever thread does it, so results are the same
bits for any thread count. With one thread, or fewer than two items, the loop runs as
before and the kernels split large jobs themselves
(``sparse_ops.set_parallel_threshold``).
"""
import itertools
import threading

from hpctrain._kernels import _openmp


class _Workers:
    """``n - 1`` daemon threads that, with the caller, drain one job's items."""

    def __init__(self, n):
        self.n = n
        self.busy = threading.Lock()      # one job at a time
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._job = None
        for i in range(n - 1):
            threading.Thread(target=self._loop, name=f"hpctrain-pool-{i + 1}",
                             daemon=True).start()

    def _loop(self):
        while True:
            self._go.acquire()
            self._drain(self._job)
            self._done.release()

    @staticmethod
    def _drain(job):
        fn, items, out, errors, counter = job
        for i in iter(counter.__next__, None):
            if i >= len(items) or errors:
                return
            try:
                out[i] = fn(items[i])
            except BaseException as exc:   # noqa: B902 -- re-raised by the caller
                errors.append(exc)
                return

    def map(self, fn, items):
        out, errors = [None] * len(items), []
        self._job = (fn, items, out, errors, itertools.count())
        for _ in range(self.n - 1):
            self._go.release()
        self._drain(self._job)
        for _ in range(self.n - 1):
            self._done.acquire()
        self._job = None
        if errors:
            raise errors[0]
        return out


_workers = {}
_lock = threading.Lock()


def parallel_map(fn, items):
    """``[fn(x) for x in items]``, the items spread over this rank's kernel threads.

    Each ``fn(x)`` must touch only its own item's state (and disjoint parts of shared
    output buffers). Exceptions propagate (the first one raised).
    """
    items = list(items)
    nt = _openmp.get_num_threads()
    if nt <= 1 or len(items) < 2 or threading.current_thread().name.startswith(
            "hpctrain-pool-"):
        return [fn(x) for x in items]
    n = min(nt, len(items))
    with _lock:
        w = _workers.get(n)
        if w is None:
            w = _workers[n] = _Workers(n)
    if not w.busy.acquire(blocking=False):      # another thread's loop holds them
        return [fn(x) for x in items]
    # one thread per item: the items are the parallel work now
    _openmp.set_num_threads(1)
    try:
        return w.map(fn, items)
    finally:
        _openmp.set_num_threads(nt)
        w.busy.release()
