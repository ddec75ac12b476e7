"""Per-rank readers: global batches sliced by rank, epochs, shuffling, prefetch, resume.

The order of samples is a property of the data, never of the world size. An
epoch is the split's samples in file order, or -- with shuffling -- in a
permutation seeded by ``(seed, epoch)``. Global batch ``k`` is the window of
positions ``[k*G, (k+1)*G)`` of that order, and rank ``r`` of ``n`` reads only::

    window of m = G positions (the last one of an epoch may be shorter)
    |---- rank 0 ----|---- rank 1 ----| ... |---- rank n-1 ----|
    [r*m//n, (r+1)*m//n)        (= [r*b, (r+1)*b) with b = G/n for full windows)

so the ranks' slices, concatenated in rank order, are the global batch that one
rank would read. A tolerated bad line leaves its slot empty (it is bad whoever
reads it, so the global batch stays world-size independent).

``state()`` is a dict of ints that does not depend on the rank or world size;
``restore(state)`` continues with the next global batch, on any world size.
"""
import queue
import threading
import time

import numpy as np

from hpctrain.data.sources import open_dataset
from hpctrain.data.text import BadLines
from hpctrain.errors import ConfigError, DataError

STATE_VERSION = 1
_STATE_KEYS = ("version", "epoch", "row", "file", "offset", "line")
_END, _ERROR = object(), object()
_DEFAULT = object()


def state_problem(state):
    """Why ``state`` is not a reader state of this version (text), or None when it is.

    A reader state is a dict with exactly the keys ``version, epoch, row, file, offset,
    line``, all integers (not booleans): ``version`` is ``STATE_VERSION``, ``offset`` is
    -1 (unknown) or a byte offset, the others are >= 0.
    """
    if not isinstance(state, dict):
        return f"not a data reader state: expected an object, got {type(state).__name__}"
    keys = sorted(state)
    if keys != sorted(_STATE_KEYS):
        return (f"not a data reader state: keys {keys}, expected {sorted(_STATE_KEYS)}")
    for key in _STATE_KEYS:
        value = state[key]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            return f"data reader state: {key} = {value!r} is not an integer"
        lo = -1 if key == "offset" else 0
        if not lo <= int(value) < 1 << 63:
            return f"data reader state: {key} = {value} is out of range"
    if int(state["version"]) != STATE_VERSION:
        return (f"data reader state version {state['version']}, this hpctrain reads "
                f"{STATE_VERSION}")
    return None


class _Prefetcher:
    """Runs a generator in a daemon thread, ``depth`` items ahead, through a bounded queue.

    ``busy_seconds`` is the CPU time the thread spent producing items (not waiting
    for room in the queue): the reader's load on the cores.
    """

    def __init__(self, gen, depth):
        self._gen, self._q, self._stop = gen, queue.Queue(maxsize=depth), threading.Event()
        self._busy = 0.0     # written by the thread only; a float store is atomic
        self._thread = threading.Thread(target=self._run, name="hpctrain-data", daemon=True)
        self._thread.start()

    @property
    def busy_seconds(self):
        """CPU seconds the thread has spent producing items so far."""
        return self._busy

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _run(self):
        try:
            while True:
                # thread CPU time, so waits on the queue and on the GIL are not counted
                t0 = time.thread_time()
                try:
                    item = next(self._gen, _END)
                finally:
                    self._busy += time.thread_time() - t0
                if item is _END:
                    break
                if not self._put(item):
                    return
            self._put((_END, None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put((_ERROR, e))
        finally:
            self._gen.close()

    def get(self):
        return self._q.get()

    def close(self):
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)


class Reader:
    """Iterates over this rank's slices of the global batches of one split.

    Use ``make_reader`` to build one. ``for batch in reader`` continues where the
    last iteration stopped; ``reset()`` goes back to the start, ``close()`` (or a
    ``with`` block) stops the prefetch thread and closes the files.

    Attributes:
        features, num_dense: what each ``Batch`` holds.
        num_samples: samples per epoch (None: endless, or a text stream not yet counted).
    """

    def __init__(self, dataset, rank, world_size, global_batch, seed, epochs, drop_last,
                 shuffle, shuffle_block, prefetch, bad_lines, split):
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.global_batch, self.seed, self.epochs = global_batch, seed, epochs
        self.drop_last, self.shuffle, self.shuffle_block = drop_last, shuffle, shuffle_block
        self.prefetch, self.bad_lines, self.split = prefetch, bad_lines, split
        self.features, self.num_dense = tuple(dataset.features), dataset.num_dense
        self._initial = {"version": STATE_VERSION, "epoch": 0, "row": 0, "file": 0,
                         "offset": -1, "line": 0}
        self._state = dict(self._initial)
        self._source = None          # a _Prefetcher or a generator, started on demand
        self._busy_closed = 0.0      # busy seconds of prefetch threads already stopped
        self._done = False
        self._order = (None, None)

    @property
    def num_samples(self):
        return self.dataset.num_samples

    @property
    def batches_per_epoch(self):
        """Global batches per epoch, or None when the split's size is not known."""
        n = self.dataset.num_samples
        if n is None:
            return None
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        if self._source is None:
            gen = self._generate(dict(self._state))
            self._source = _Prefetcher(gen, self.prefetch) if self.prefetch > 0 else gen
        if isinstance(self._source, _Prefetcher):
            batch, state = self._source.get()
            if batch is _ERROR:
                self._stop()
                self._done = True
                raise state
        else:
            batch, state = next(self._source, (_END, None))
        if batch is _END:
            self._stop()
            self._done = True
            raise StopIteration
        self._state = state
        return batch

    def _epoch_order(self, epoch, n):
        """Sample positions of ``epoch`` in shuffled order (blocks of ``shuffle_block``)."""
        if self._order[0] != epoch:
            k = self.shuffle_block
            rng = np.random.default_rng([self.seed, epoch, 0x5EED])
            perm = rng.permutation(-(-n // k)).astype(np.int64)
            starts = perm * k
            lens = np.minimum(k, n - starts)
            order = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def _slice(self, m):
        n, r = self.world_size, self.rank
        return r * m // n, (r + 1) * m // n

    def _generate(self, st):
        ds, G = self.dataset, self.global_batch
        epoch, row = st["epoch"], st["row"]
        while self.epochs is None or epoch < self.epochs:
            yielded, from_start, tail = False, row == 0, None
            if self.bad_lines is not None:
                self.bad_lines.start_epoch()
            if ds.random_access:
                n = ds.num_samples
                order = self._epoch_order(epoch, n) if self.shuffle else None
                while n is None or row < n:
                    m = G if n is None else min(G, n - row)
                    if m < G and self.drop_last:
                        break
                    lo, hi = self._slice(m)
                    pos = (np.arange(row + lo, row + hi, dtype=np.int64) if order is None
                           else order[row + lo:row + hi])
                    rows = ds.fetch(pos)
                    meta = dict(epoch=epoch, index=row // G, global_size=m, offset=lo)
                    row += m
                    yielded = True
                    yield rows.to_batch(self.features, **meta), \
                        dict(self._initial, epoch=epoch, row=row)
            else:
                if row == 0:
                    pos = ds.start()
                elif st is not None and st["offset"] >= 0:
                    pos = (st["file"], st["offset"], st["line"])
                else:
                    pos = ds.seek(row)
                while True:
                    pieces, nxt, m = ds.window(pos, row, G)
                    if m == 0 or (m < G and self.drop_last):
                        tail = (pieces, m)
                        break
                    lo, hi = self._slice(m)
                    rows = ds.parse_window(pieces, lo, hi)
                    meta = dict(epoch=epoch, index=row // G, global_size=m, offset=lo)
                    row, pos = row + m, nxt
                    yielded = True
                    yield rows.to_batch(self.features, **meta), \
                        dict(self._initial, epoch=epoch, row=row, file=pos[0], offset=pos[1],
                             line=pos[2])
            if not yielded and from_start:
                raise self._no_batch(tail)
            if self.bad_lines is not None and self.bad_lines.epoch_all_bad():
                raise DataError(f"data.{self.split}: every one of the "
                                f"{self.bad_lines.epoch_parsed} lines this rank parsed in epoch "
                                f"{epoch} is bad ({self.bad_lines.last()}); nothing was read")
            epoch, row, st = epoch + 1, 0, None

    def _no_batch(self, tail):
        """The error of an epoch too short for one global batch, saying what the split holds.

        A text split's lines are parsed for it: under the strict policy that raises the first
        bad line (file:line), otherwise the message says how many of them are good.
        """
        what = f"data.{self.split}: an epoch yields no batch"
        G = self.global_batch
        if tail is None:
            return DataError(f"{what}: the split has {self.dataset.num_samples} samples, fewer "
                             f"than one global batch of {G}")
        pieces, m = tail
        good = len(self.dataset.parse_window(pieces, 0, m)) if m else 0
        if m and not good:
            return DataError(f"{what}: all {m} lines of the split are bad "
                             f"({self.bad_lines.last()})")
        return DataError(f"{what}: the split has {m} lines ({good} good), fewer than one global "
                         f"batch of {G}")

    # ------------------------------------------------------------------ state
    def state(self):
        """The position after the last batch returned: a dict of ints, rank-independent."""
        return dict(self._state)

    def restore(self, state):
        """Continue after the batch at which ``state`` was taken (any rank, any world size).

        Raises:
            DataError: ``state`` is not a reader state of this version.
        """
        problem = state_problem(state)
        if problem:
            raise DataError(f"data.{self.split}: {problem}")
        self._stop()
        self._state = {k: int(state[k]) for k in _STATE_KEYS}
        self._done = False

    def reset(self):
        """Go back to the first batch of the first epoch."""
        self.restore(self._initial)

    @property
    def busy_seconds(self):
        """CPU seconds the prefetch thread(s) spent producing batches (0 without prefetch).

        Counts producing work only, not waits for a free queue slot, over every
        prefetch thread this reader has run (a ``restore`` or ``reset`` starts a new one).
        """
        src = self._source
        live = src.busy_seconds if isinstance(src, _Prefetcher) else 0.0
        return self._busy_closed + live

    def stats(self):
        """Counters of this rank: lines parsed and bad lines skipped (text formats)."""
        b = self.bad_lines
        return {"lines_parsed": b.parsed if b else 0, "bad_lines": b.bad if b else 0}

    # ------------------------------------------------------------------ shutdown
    def _stop(self):
        src, self._source = self._source, None
        if src is not None:      # a _Prefetcher (joins its thread) or a generator
            src.close()
            if isinstance(src, _Prefetcher):
                self._busy_closed += src.busy_seconds

    def close(self):
        """Stop the prefetch thread and close the files."""
        self._stop()
        self._done = True
        if hasattr(self.dataset, "close"):
            self.dataset.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._stop()
        except Exception:
            pass


def make_reader(data_cfg, split, rank, world_size, global_batch, seed=0, *, epochs=_DEFAULT,
                drop_last=None, shuffle=None, prefetch=None):
    """The reader of ``split`` for ``rank`` of ``world_size``.

    Args:
        data_cfg: a ``DataConfig`` (``Config.data``).
        split: "train" or "eval".
        rank, world_size: this rank and the number of ranks reading.
        global_batch: samples per global batch (all ranks together).
        seed: the run seed: shuffling order, and synthetic data unless ``data.seed`` is set.
        epochs: passes over the split before the iteration ends; None for endless.
            Default: endless for "train", 1 for "eval".
        drop_last: drop an epoch's final partial global batch. Default: True for "train",
            False for "eval" (which must see every sample).
        shuffle: shuffle each epoch. Default: ``data.shuffle`` for "train", False for "eval".
        prefetch: batches prepared ahead in a background thread (0: none). Default:
            ``data.prefetch``.

    Raises:
        ConfigError: ``global_batch`` not divisible by ``world_size``, or shuffling an
            endless split. DataError: missing, empty or malformed data files.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if data_cfg.format == "stream":
        from hpctrain.data.stream import make_stream_reader
        return make_stream_reader(data_cfg, split, rank, world_size, global_batch,
                                  shuffle=shuffle, prefetch=prefetch)
    if data_cfg.format == "jetstream":
        from hpctrain.data.jetstream import make_jetstream_reader
        return make_jetstream_reader(data_cfg, split, rank, world_size, global_batch,
                                     prefetch=prefetch)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size = {world_size})")
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    if global_batch % world_size:
        raise ConfigError(f"global batch {global_batch} is not divisible by the world size "
                          f"{world_size}")
    train = split == "train"
    epochs = (None if train else 1) if epochs is _DEFAULT else epochs
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1 or None, got {epochs}")
    drop_last = train if drop_last is None else bool(drop_last)
    shuffle = (data_cfg.shuffle and train) if shuffle is None else bool(shuffle)
    prefetch = data_cfg.prefetch if prefetch is None else int(prefetch)
    sc = data_cfg.split(split)
    if shuffle and data_cfg.format == "synthetic" and sc.num_samples is None:
        raise ConfigError(f"data.{split}: shuffling needs a finite split (set num_samples)")
    bad_lines = BadLines(data_cfg.bad_lines) if data_cfg.format in ("criteo", "csv") else None
    ds = open_dataset(data_cfg, split, seed, bad_lines, index=shuffle)
    return Reader(ds, rank, world_size, global_batch, seed, epochs, drop_last, shuffle,
                  data_cfg.shuffle_block, prefetch, bad_lines, split)
