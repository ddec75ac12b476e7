"""Text datasets (Criteo TSV, CSV/TSV): files, line windows, an optional line index.

Files are memory-mapped. Without shuffling, a split is read as a stream: every
rank finds the line boundaries of each window of ``global_batch`` lines (a
``memchr`` scan, no parsing) and parses only its own slice, so nothing grows
with the file size. With shuffling, a line index (20 bytes per line) gives
random access to any sample.

A position in a stream is ``(file, offset, line)``: the file number, the byte
offset of the next line and its 1-based line number (for error messages).
"""
import glob
import logging
import mmap
import os

import numpy as np

from hpctrain._kernels.data_parse import count_lines
from hpctrain.data.batch import Rows
from hpctrain.errors import DataError

log = logging.getLogger("hpctrain.data")

_SCAN = 1 << 20          # newline positions found per kernel call when scanning


def expand_paths(patterns, what):
    """Files named by ``patterns`` (glob patterns allowed, matches sorted); DataError if none."""
    files = []
    for p in patterns:
        if any(c in p for c in "*?["):
            hits = sorted(glob.glob(p))
            if not hits:
                raise DataError(f"{what}: no file matches {p!r}")
            files.extend(hits)
        elif not os.path.isfile(p):
            raise DataError(f"{p}: no such file ({what})")
        else:
            files.append(p)
    return files


class BadLines:
    """Counts bad lines on this rank and raises when ``data.bad_lines`` allows no more.

    Within an epoch, a bad line is tolerated while ``bad <= max_count`` or
    ``bad <= max_ratio * parsed``, counting the lines this rank parsed in the epoch up
    to and including it (so a file read for several epochs is judged once per pass).
    ``parsed`` and ``bad`` are the totals over all epochs.
    """

    def __init__(self, cfg, warn_first=20):
        self.max_count, self.max_ratio = cfg.max_count, cfg.max_ratio
        self.parsed = self.bad = 0
        self._epoch_parsed = self._epoch_bad = 0
        self.warn_first = warn_first
        self.recent = []       # the last 100 (path, line, reason)

    def start_epoch(self):
        self._epoch_parsed = self._epoch_bad = 0

    def record(self, parsed, bad):
        """Account for ``parsed`` lines; ``bad`` lists (index among them, path, line, reason)."""
        for i, path, line, reason in bad:
            self.bad += 1
            self._epoch_bad += 1
            seen = self._epoch_parsed + i + 1      # the ratio as of this bad line
            if self._epoch_bad > self.max_count and self._epoch_bad > self.max_ratio * seen:
                raise DataError(
                    f"{path}:{line}: {reason} (bad line {self._epoch_bad} of {seen} parsed "
                    f"on this rank in this epoch; data.bad_lines allows max_count = "
                    f"{self.max_count}, max_ratio = {self.max_ratio:g})")
            self.recent = (self.recent + [(path, line, reason)])[-100:]
            if self.bad <= self.warn_first:
                log.warning("%s:%d: skipped bad line: %s", path, line, reason)
                if self.bad == self.warn_first:
                    log.warning("further bad lines are counted, not reported")
        self.parsed += parsed
        self._epoch_parsed += parsed


class TextFiles:
    """The memory-mapped files of one split; with ``header`` each file's first line is skipped."""

    def __init__(self, patterns, header, what):
        self.paths = expand_paths(patterns, what)
        self.header = header
        self.bufs, self.data_start, self.headers, self._maps = [], [], [], []
        try:
            for p in self.paths:
                self._open(p)
        except BaseException:
            self.close()
            raise

    def _open(self, path):
        size = os.path.getsize(path)
        if size == 0:
            raise DataError(f"{path}: empty file")
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._maps.append(mm)
        buf = np.frombuffer(mm, dtype=np.uint8)
        start = 0
        if self.header:
            nl = np.empty(1, dtype=np.int64)
            k = count_lines(buf, 0, size, nl)
            start = int(nl[0]) + 1 if k else size
            self.headers.append(bytes(buf[:start]).decode("utf-8", "replace").rstrip("\r\n"))
        if start >= size:
            raise DataError(f"{path}: no data lines" + (" after the header" if self.header else ""))
        self.bufs.append(buf)
        self.data_start.append(start)

    def first_line_no(self):
        return 2 if self.header else 1

    def start(self):
        """The position of the first data line."""
        return 0, self.data_start[0], self.first_line_no()

    def read(self, pos, count, keep=True):
        """Up to ``count`` lines from ``pos``: ``(pieces, new_pos, n)``.

        ``pieces`` are ``(file, starts, ends, line_numbers)`` with byte ranges excluding
        the newline (empty when ``keep`` is false, for skipping).
        """
        file, offset, line = pos
        pieces, got = [], 0
        while got < count and file < len(self.bufs):
            buf = self.bufs[file]
            size = buf.shape[0]
            need = min(count - got, _SCAN) if not keep else count - got
            ends = np.empty(need, dtype=np.int64)
            k = count_lines(buf, offset, size, ends)
            ends = ends[:k]
            nxt = int(ends[-1]) + 1 if k else offset
            if k < need and nxt < size:          # the last line has no newline
                ends = np.append(ends, size)
                nxt = size
            n = ends.shape[0]
            if keep and n:
                starts = np.empty(n, dtype=np.int64)
                starts[0] = offset
                starts[1:] = ends[:-1] + 1
                pieces.append((file, starts, ends, line + np.arange(n, dtype=np.int64)))
            got += n
            line += n
            offset = nxt
            if offset >= size:
                file += 1
                offset = self.data_start[file] if file < len(self.bufs) else 0
                line = self.first_line_no()
        return pieces, (file, offset, line), got

    def file_lines(self, f):
        """``(starts, ends)`` of every data line of file ``f``."""
        buf, offset = self.bufs[f], self.data_start[f]
        size = buf.shape[0]
        starts, ends = [], []
        while offset < size:
            e = np.empty(_SCAN, dtype=np.int64)
            k = count_lines(buf, offset, size, e)
            e = e[:k]
            nxt = int(e[-1]) + 1 if k else size
            if k < _SCAN and nxt < size:        # the last line has no newline
                e = np.append(e, size)
                nxt = size
            s = np.empty(e.shape[0], dtype=np.int64)
            if e.shape[0]:
                s[0] = offset
                s[1:] = e[:-1] + 1
            starts.append(s)
            ends.append(e)
            offset = nxt
        return np.concatenate(starts), np.concatenate(ends)

    def index(self):
        """Every data line: ``(file_of_line, starts, ends, first line index of each file)``."""
        files, starts, ends, first, n = [], [], [], [], 0
        for f in range(len(self.bufs)):
            s, e = self.file_lines(f)
            first.append(n)
            files.append(np.full(s.shape[0], f, dtype=np.int32))
            starts.append(s)
            ends.append(e)
            n += s.shape[0]
        return np.concatenate(files), np.concatenate(starts), np.concatenate(ends), \
            np.array(first, dtype=np.int64)

    def close(self):
        self.bufs = []
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:   # a NumPy view still exists; the map closes when it goes
                pass
        self._maps = []


class TextDataset:
    """A split of a text format: stream windows, or random access after ``build_index``.

    Args:
        files: the split's ``TextFiles``.
        parser: a ``LineParser`` for the format.
        rows: ``(start, end)`` data-line range of the split over all its files, or None.
        bad_lines: the rank's ``BadLines`` policy.
        split: "train" or "eval", for messages.
    """

    random_access = False

    def __init__(self, files, parser, rows, bad_lines, split):
        self.files, self.parser, self.rows, self.bad_lines = files, parser, rows, bad_lines
        self.split = split
        self.features, self.dense_names = parser.features, parser.dense_names
        self.num_dense = len(parser.dense_names)
        self.limit = None if rows is None else rows[1] - rows[0]
        self._index = None
        self.num_samples = None

    # ----------------------------------------------------------------- streaming
    def start(self):
        """The stream position of the split's first sample (after ``rows[0]`` skipped lines)."""
        pos = self.files.start()
        if self.rows is not None and self.rows[0]:
            skipped = 0
            while skipped < self.rows[0]:
                _, pos, got = self.files.read(pos, min(_SCAN, self.rows[0] - skipped), keep=False)
                if got == 0:
                    raise self._short(skipped)
                skipped += got
        return pos

    def seek(self, row):
        """The stream position after the split's first ``row`` samples."""
        pos, skipped = self.start(), 0
        while skipped < row:
            _, pos, got = self.files.read(pos, min(_SCAN, row - skipped), keep=False)
            if got == 0:
                raise DataError(f"data.{self.split}: cannot resume at sample {row}: the files "
                                f"hold only {skipped} (from the split's start)")
            skipped += got
        return pos

    def _short(self, total):
        return DataError(f"data.{self.split}.rows = [{self.rows[0]}, {self.rows[1]}] but "
                         f"{', '.join(self.files.paths)} hold only {total} data lines")

    def window(self, pos, row, count):
        """The next window of at most ``count`` lines from ``pos`` (``row`` lines of the
        split already read): ``(pieces, new_pos, n)``; ``n == 0`` at the end of the split."""
        if self.limit is not None:
            count = min(count, self.limit - row)
            if count <= 0:
                return [], pos, 0
        pieces, pos, n = self.files.read(pos, count)
        if self.limit is not None and n < count:
            raise self._short(self.rows[0] + row + n)
        return pieces, pos, n

    def parse_window(self, pieces, lo, hi):
        """Parse lines ``[lo, hi)`` of a window into ``Rows`` (bad lines dropped)."""
        sel, at = [], 0
        for f, s, e, ln in pieces:
            a, b = max(lo - at, 0), min(hi - at, s.shape[0])
            if a < b:
                sel.append((f, s[a:b], e[a:b], ln[a:b]))
            at += s.shape[0]
        return self._parse(sel)[0]

    # ----------------------------------------------------------------- random access
    def build_index(self):
        """Index every line so that ``fetch`` reads any sample (20 bytes per line)."""
        files, starts, ends, first = self.files.index()
        total = starts.shape[0]
        lo, hi = (0, total) if self.rows is None else self.rows
        if hi > total:
            raise self._short(total)
        self._index = (files[lo:hi], starts[lo:hi], ends[lo:hi], first, lo)
        self.num_samples = hi - lo
        self.random_access = True

    def fetch(self, positions):
        """Samples at split positions ``positions`` (unique), in that order; bad lines dropped."""
        files, starts, ends, first, lo = self._index
        positions = np.asarray(positions, dtype=np.int64)
        order = np.argsort(positions, kind="stable")
        sp = positions[order]
        fl = files[sp]
        sel = []
        for f in np.unique(fl):
            m = fl == f
            g = sp[m] + lo
            sel.append((int(f), starts[sp[m]], ends[sp[m]],
                        g - first[f] + self.files.first_line_no()))
        rows, keep = self._parse(sel)
        if keep.all() and (order == np.arange(order.shape[0])).all():
            return rows
        kept = sp[keep]
        want = positions[np.isin(positions, kept)]
        return rows.take(np.searchsorted(kept, want))

    # ----------------------------------------------------------------- parsing
    def _parse(self, pieces):
        parts, keeps = [], []
        for f, s, e, ln in pieces:
            buf = self.files.bufs[f]
            rows, status, err_col = self.parser.parse(buf, s, e)
            bad = np.flatnonzero(status)
            self.bad_lines.record(s.shape[0], [
                (int(i), self.files.paths[f], int(ln[i]),
                 self.parser.reason(buf, int(s[i]), int(e[i]), int(status[i]), int(err_col[i])))
                for i in bad])
            parts.append(rows)
            keeps.append(status == 0)
        nf = len(self.features)
        keep = np.concatenate(keeps) if keeps else np.zeros(0, dtype=bool)
        return Rows.concat(parts, self.num_dense, nf), keep

    def close(self):
        self.files.close()
