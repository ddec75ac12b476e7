"""A stream of samples as a directory of sealed segments, read like any other split.

A producer (``hpctrain stream-produce``, or anything that follows this layout) appends
segments; a segment becomes visible only once its ``.DONE`` marker exists::

    DIR/
      STREAM.json                  {"format": "hpctrain-stream", "version": 1,
                                    "partitions": P, "features": [...], "num_dense": D}
      part-00000/seg-00000000.tsv  records of segment ordinal 0 (= seq 0, partition 0)
      part-00000/seg-00000000.DONE {"records": n, "bytes": b} -- written after the .tsv
      part-00001/seg-00000000.tsv  ordinal 1 (= seq 0, partition 1)
      ...
      END                          optional: {"segments": N}, the stream is complete

Segment ordinal ``o`` is ``seq * P + partition``; the stream is the records of
ordinals 0, 1, 2, ... in order, so every rank sees the same sequence whatever the
world size. One record is one line of tab-separated fields::

    sample_id <TAB> label <TAB> d1,d2,...,dD <TAB> ids of feature 1 <TAB> ... ids of feature F

(label 0 or 1; dense values and ids comma-separated; an empty field is an empty bag).

Global batch ``k`` is records ``[k*G, (k+1)*G)`` of the stream and rank ``r`` of ``n``
parses its slice ``[r*G//n, (r+1)*G//n)`` of it (``hpctrain.data.reader``'s rule). A
malformed record is handled by ``data.bad_lines`` and named ``DIR/part-P/seg-S.tsv:R``
(R: 1-based record number); it leaves its slot empty.

The offset is the reader state (the same keys as every reader's, so checkpoints keep
it unchanged): ``file`` = ordinal of the next segment, ``line`` = records of it already
consumed, ``row`` = records consumed in all. A run restored from a checkpoint continues
exactly after the last record its model state includes.

When the next segment is not sealed yet the stream is idle, not ended: ``poll`` returns
None and the trainer waits (``hpctrain.train.online``); iteration ends only at ``END``.
"""
import json
import os
import queue
import threading
import time

import numpy as np

from hpctrain.data.batch import Rows
from hpctrain.data.reader import _STATE_KEYS, STATE_VERSION, state_problem
from hpctrain.errors import DataError

STREAM_FORMAT = "hpctrain-stream"
STREAM_VERSION = 1
LAYOUT = "STREAM.json"
END = "END"
_ENDED = object()


def segment_paths(directory, ordinal, partitions):
    """``(records file, DONE marker)`` of segment ``ordinal``."""
    seq, part = divmod(int(ordinal), int(partitions))
    base = os.path.join(directory, f"part-{part:05d}", f"seg-{seq:08d}")
    return base + ".tsv", base + ".DONE"


def read_layout(directory):
    """The stream's ``STREAM.json`` (a dict).

    Raises:
        DataError: missing or not a stream layout of this version.
    """
    path = os.path.join(directory, LAYOUT)
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        raise DataError(f"{directory}: no stream here (no {LAYOUT}); start the producer "
                        f"(hpctrain stream-produce) first") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable stream layout: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != STREAM_FORMAT:
        raise DataError(f"{path}: not an {STREAM_FORMAT} layout")
    if doc.get("version") != STREAM_VERSION:
        raise DataError(f"{path}: version {doc.get('version')}, this hpctrain reads "
                        f"{STREAM_VERSION}")
    for key, kind in (("partitions", int), ("num_dense", int), ("features", list)):
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            raise DataError(f"{path}: {key} must be {kind.__name__}, got {doc.get(key)!r}")
    if doc["partitions"] < 1:
        raise DataError(f"{path}: partitions must be >= 1, got {doc['partitions']}")
    return doc


def write_layout(directory, features, num_dense, partitions):
    """Create ``directory`` and its ``STREAM.json`` (kept if it is already the same)."""
    doc = {"format": STREAM_FORMAT, "version": STREAM_VERSION, "partitions": int(partitions),
           "features": list(features), "num_dense": int(num_dense)}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LAYOUT)
    if os.path.exists(path):
        old = read_layout(directory)
        if old != doc:
            raise DataError(f"{path}: the stream there has layout {old}, not {doc}")
        return path
    _write_atomic(path, json.dumps(doc, indent=1) + "\n")
    return path


def _write_atomic(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_segment(directory, ordinal, partitions, lines):
    """Seal segment ``ordinal``: its records file, then its ``DONE`` marker.

    Args:
        lines: the records, one str or bytes each, without newlines.

    Returns:
        The records file's path.
    """
    data, done = segment_paths(directory, ordinal, partitions)
    os.makedirs(os.path.dirname(data), exist_ok=True)
    body = b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines)
    tmp = f"{data}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, data)
    _write_atomic(done, json.dumps({"records": len(lines), "bytes": len(body)}) + "\n")
    return data


def end_stream(directory, segments):
    """Mark the stream complete after ``segments`` segments."""
    _write_atomic(os.path.join(directory, END), json.dumps({"segments": int(segments)}) + "\n")


def format_record(sample_id, label, dense, bags):
    """One record line (str) from a sample's id, label, dense values and per-feature ids."""
    d = ",".join(repr(float(x)) for x in dense)
    return "\t".join([str(int(sample_id)), str(int(label)), d] +
                     [",".join(str(int(i)) for i in bag) for bag in bags])


class StreamReader:
    """This rank's slices of the global batches of a segment stream (see the module doc).

    Args:
        directory: the stream directory.
        rank, world_size, global_batch: as for every reader.
        bad_lines: a ``hpctrain.data.text.BadLines`` (the bad-record policy).
        poll_seconds: how often an idle stream is looked at again.
        prefetch: batches prepared ahead by the background thread (at least 1).

    Attributes:
        streaming: True (the trainer waits on ``poll`` instead of ending at an idle stream).
        features, num_dense: from ``STREAM.json``.
        ended: the stream's ``END`` was reached.
    """

    streaming = True
    num_samples = None
    batches_per_epoch = None

    def __init__(self, directory, rank, world_size, global_batch, bad_lines, poll_seconds=0.2,
                 prefetch=2, split="train"):
        self.directory = os.path.abspath(directory)
        layout = read_layout(self.directory)
        self._setup(layout["features"], layout["num_dense"], layout["partitions"], rank,
                    world_size, global_batch, bad_lines, poll_seconds, prefetch, split)

    def _setup(self, features, num_dense, partitions, rank, world_size, global_batch,
               bad_lines, poll_seconds, prefetch, split):
        """The state every stream reader starts with (the offset at the first record)."""
        self.rank, self.world_size, self.global_batch = rank, world_size, global_batch
        self.bad_lines, self.poll_seconds = bad_lines, float(poll_seconds)
        self.prefetch, self.split = max(1, int(prefetch)), split
        self.features, self.num_dense = tuple(features), int(num_dense)
        self.partitions = partitions
        # the reader state of hpctrain.data.reader (version, epoch, row, file, offset, line)
        self._initial = dict(dict.fromkeys(_STATE_KEYS, 0), version=STATE_VERSION, offset=-1)
        self._state = dict(self._initial)
        self._thread, self._q, self._stop_ev = None, None, None
        self.ended = False
        self._waiting = None       # (segment path, since) while the thread waits for it
        self._busy = 0.0

    # ------------------------------------------------------------------ consuming
    def poll(self, timeout=None):
        """The next batch, or None when none is ready within ``timeout`` seconds (idle) or
        the stream has ended (``ended``). Errors of the reading thread are raised here."""
        if self.ended:
            return None
        if self._thread is None:
            self._start()
        try:
            item = self._q.get(timeout=self.poll_seconds if timeout is None else timeout)
        except queue.Empty:
            return None
        if item[0] is _ENDED:
            self.ended = True
            self._stop()
            return None
        if isinstance(item[0], BaseException):
            self._stop()
            raise item[0]
        batch, state = item
        self._state = state
        return batch

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            batch = self.poll()
            if batch is not None:
                return batch
            if self.ended:
                raise StopIteration

    @property
    def waiting_for(self):
        """``(segment file, idle seconds)`` while the next segment is not sealed, else None."""
        w = self._waiting
        return None if w is None else (w[0], time.monotonic() - w[1])

    # ------------------------------------------------------------------ the reading thread
    def _start(self):
        self._q, self._stop_ev = queue.Queue(maxsize=self.prefetch), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(dict(self._state),),
                                        name="hpctrain-stream", daemon=True)
        self._thread.start()

    def _put(self, item):
        while not self._stop_ev.is_set():
            try:
                self._q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, st):
        try:
            for item in self._generate(st):
                if not self._put(item):
                    return
            self._put((_ENDED, None))
        except BaseException as exc:  # handed to poll(), which raises it
            self._put((exc, None))

    def _segment(self, ordinal):
        """The record lines of sealed segment ``ordinal``, waiting for its seal; None at END
        or when stopped."""
        data, done = segment_paths(self.directory, ordinal, self.partitions)
        end = os.path.join(self.directory, END)
        since = None
        while not os.path.exists(done):
            if os.path.exists(end):
                try:
                    with open(end, encoding="utf-8") as fh:
                        total = int(json.load(fh)["segments"])
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise DataError(f"{end}: unreadable end marker: {exc}") from None
                if ordinal >= total:
                    return None
            if since is None:
                since = time.monotonic()
                self._waiting = (os.path.relpath(data, self.directory), since)
            if self._stop_ev.wait(self.poll_seconds):
                return None
        self._waiting = None
        t0 = time.thread_time()
        rel = data
        try:
            with open(done, encoding="utf-8") as fh:
                seal = json.load(fh)
            with open(data, "rb") as fh:
                body = fh.read()
        except (OSError, ValueError) as exc:
            raise DataError(f"{rel}: sealed segment unreadable: {exc}") from None
        if len(body) != seal.get("bytes"):
            raise DataError(f"{rel}: {len(body)} bytes, its DONE marker says {seal.get('bytes')}")
        lines = body.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        if len(lines) != seal.get("records"):
            raise DataError(f"{rel}: {len(lines)} records, its DONE marker says "
                            f"{seal.get('records')}")
        self._busy += time.thread_time() - t0
        return rel, lines

    def _generate(self, st):
        G = self.global_batch
        ordinal, line, row = st["file"], st["line"], st["row"]
        seg = None
        while True:
            window = []                      # (segment name, record index, line) x G
            while len(window) < G:
                if seg is None:              # read only when needed: never wait ahead
                    seg = self._segment(ordinal)
                    if seg is None:
                        return               # END (a partial last batch is dropped) or stop
                name, lines = seg
                take = min(G - len(window), len(lines) - line)
                window.extend((name, line + i, lines[line + i]) for i in range(take))
                line += take
                if line == len(lines):
                    ordinal, line, seg = ordinal + 1, 0, None
            batch = self._batch(window, row)
            row += G
            yield batch, dict(self._initial, row=row, file=ordinal, line=line)

    def _batch(self, window, row):
        """This rank's slice of the global batch ``window`` (records of global row ``row``
        on), parsed; its parsing time counts in ``busy_seconds``."""
        t0 = time.thread_time()
        G, r, n = self.global_batch, self.rank, self.world_size
        lo, hi = r * G // n, (r + 1) * G // n
        rows, ids = self._parse(window[lo:hi])
        batch = rows.to_batch(self.features, epoch=0, index=row // G, global_size=G, offset=lo)
        batch.sample_ids = ids
        self._busy += time.thread_time() - t0
        return batch

    def _parse(self, records):
        """Rows of ``records`` (good ones) and their sample ids; bad ones go to the policy."""
        nf, nd = len(self.features), self.num_dense
        labels, dense, ids, bags, bad = [], [], [], [[] for _ in range(nf)], []
        for i, (name, rec, text) in enumerate(records):
            try:
                sid, y, d, feats = self._record(text, nf, nd)
            except ValueError as exc:
                bad.append((i, name, rec + 1, str(exc)))
                continue
            ids.append(sid)
            labels.append(y)
            dense.append(d)
            for f in range(nf):
                bags[f].append(feats[f])
        if self.bad_lines is not None:
            self.bad_lines.record(len(records), bad)
        elif bad:
            _, name, rec, why = bad[0]
            raise DataError(f"{name}:{rec}: {why}")
        m = len(labels)
        lengths = np.array([[len(b) for b in bags[f]] for f in range(nf)],
                           dtype=np.int64).reshape(nf, m)
        values = [np.asarray(x, dtype=np.int64) for f in range(nf) for x in bags[f]]
        rows = Rows(np.asarray(labels, dtype=np.float32),
                    np.asarray(dense, dtype=np.float32).reshape(m, nd),
                    np.concatenate(values) if values else np.zeros(0, np.int64), lengths)
        return rows, np.asarray(ids, dtype=np.int64)

    @staticmethod
    def _record(text, nf, nd):
        fields = text.split(b"\t")
        if len(fields) != 3 + nf:
            raise ValueError(f"{len(fields)} fields, expected {3 + nf} (id, label, dense and "
                             f"{nf} features)")
        try:
            sid = int(fields[0])
        except ValueError:
            raise ValueError(f"sample id {fields[0][:40]!r} is not an integer") from None
        if fields[1] not in (b"0", b"1"):
            raise ValueError(f"label {fields[1][:40]!r} is not 0 or 1")
        d = fields[2].split(b",") if fields[2] else []
        if len(d) != nd:
            raise ValueError(f"{len(d)} dense values, expected {nd}")
        try:
            dv = [float(x) for x in d]
        except ValueError:
            raise ValueError(f"dense values {fields[2][:40]!r} are not numbers") from None
        if not all(np.isfinite(dv)):
            raise ValueError("a dense value is not finite")
        feats = []
        for f in range(nf):
            fld = fields[3 + f]
            try:
                feats.append([int(x) for x in fld.split(b",")] if fld else [])
            except ValueError:
                raise ValueError(f"feature {f + 1}: ids {fld[:40]!r} are not integers") from None
        return sid, float(fields[1] == b"1"), dv, feats

    # ------------------------------------------------------------------ state
    def state(self):
        """The offset after the last batch returned (a reader state: see the module doc)."""
        return dict(self._state)

    def restore(self, state):
        """Continue after the batch at which ``state`` was taken (any rank, any world size).

        Raises:
            DataError: ``state`` is not a reader state.
        """
        problem = state_problem(state)
        if problem:
            raise DataError(f"data.{self.split}: not a stream offset: {problem}")
        self._stop()
        self._state = {k: int(state[k]) for k in _STATE_KEYS}
        self.ended = False

    def reset(self):
        """Back to the first record of the stream."""
        self.restore(self._initial)

    @property
    def busy_seconds(self):
        """CPU seconds the reading thread spent reading and parsing."""
        return self._busy

    def stats(self):
        b = self.bad_lines
        return {"lines_parsed": b.parsed if b else 0, "bad_lines": b.bad if b else 0}

    def _stop(self):
        t, self._thread = self._thread, None
        if t is not None:
            self._stop_ev.set()
            while t.is_alive():
                try:
                    while True:
                        self._q.get_nowait()
                except queue.Empty:
                    pass
                t.join(timeout=0.05)
        self._waiting = None

    def close(self):
        """Stop the reading thread."""
        self._stop()
        self.ended = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._stop()
        except Exception:
            pass


def make_stream_reader(data_cfg, split, rank, world_size, global_batch, shuffle=None,
                       prefetch=None):
    """The ``StreamReader`` of ``data_cfg`` (format "stream"); see ``make_reader``.

    Raises:
        ConfigError: shuffling, or a global batch not divisible by the world size.
        DataError: not the train split; no stream in the directory.
    """
    from hpctrain.data.text import BadLines
    from hpctrain.errors import ConfigError
    if split != "train":
        raise DataError(f"data.{split}: a stream is read for training only; measure online "
                        f"runs by progressive validation ([online] progressive)")
    if shuffle or (shuffle is None and data_cfg.shuffle):
        raise ConfigError("data.shuffle: a stream is read in order (its offset is a position)")
    if global_batch < 1 or global_batch % world_size:
        raise ConfigError(f"global batch {global_batch} is not divisible by the world size "
                          f"{world_size}")
    sc = data_cfg.split(split)
    sub = data_cfg.stream
    return StreamReader(sc.paths[0], rank, world_size, global_batch, BadLines(data_cfg.bad_lines),
                        poll_seconds=sub.poll_seconds,
                        prefetch=data_cfg.prefetch if prefetch is None else prefetch,
                        split=split)
