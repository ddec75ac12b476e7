"""Text datasets (Criteo TSV, CSV/TSV): files, line windows, an optional line index.

Files are read with ``pread`` into per-window buffers, never memory-mapped: a file
truncated or rewritten in place while it is read then ends in a ``DataError``
naming it, not in a SIGBUS that kills the process. Without shuffling, a split is
read as a stream: every rank reads each window of ``global_batch`` lines, finds
their boundaries (a ``memchr`` scan, no parsing) and parses only its own slice,
so nothing grows with the file size. With shuffling, a line index (20 bytes per
line) gives random access to any sample.

A position in a stream is ``(file, offset, line)``: the file number, the byte
offset of the next line and its 1-based line number (for error messages). A piece
of a window is ``(file, buf, starts, ends, line_numbers)``: byte ranges of lines
(without the newline) in ``buf``, a uint8 array of the file's bytes.
"""
import glob
import logging
import os

import numpy as np

from hpctrain._kernels.data_parse import count_lines
from hpctrain.data.batch import Rows
from hpctrain.errors import DataError

log = logging.getLogger("hpctrain.data")

_SCAN = 1 << 20          # newline positions found per kernel call when scanning
_BLOCK = 8 << 20         # bytes read at once when skipping or indexing
_MAX_WINDOW_READ = 64 << 20
_MAX_LINE = 64 << 20     # a longer line means the file is not line-oriented text
_GAP = 4 << 10           # bytes between two wanted lines still read in one go (random access)
_HEAD = 1 << 20          # bytes inspected at open
# Signatures of files that are not text: compressed data, HDF5.
_NOT_TEXT = [(b"\x1f\x8b", "gzip-compressed"), (b"BZh", "bzip2-compressed"),
             (b"\xfd7zXZ\x00", "xz-compressed"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
             (b"PK\x03\x04", "zip-compressed"), (b"\x89HDF\r\n\x1a\n", "an HDF5 file, not text")]


def expand_paths(patterns, what):
    """Files named by ``patterns`` (glob patterns allowed, matches sorted); DataError if none."""
    files = []
    for p in patterns:
        if any(c in p for c in "*?["):
            hits = sorted(h for h in glob.glob(p) if not os.path.isdir(h))
            if not hits:
                raise DataError(f"{what}: no file matches {p!r}")
            files.extend(hits)
        elif os.path.isdir(p):
            raise DataError(f"{p}: is a directory, not a data file ({what})")
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

    @property
    def epoch_parsed(self):
        """Lines parsed on this rank in the current epoch."""
        return self._epoch_parsed

    def epoch_all_bad(self):
        """True when this rank parsed lines in the current epoch and every one was bad."""
        return self._epoch_parsed > 0 and self._epoch_bad == self._epoch_parsed

    def last(self):
        """``path:line: reason`` of the last bad line, for messages."""
        if not self.recent:
            return "no bad line recorded"
        path, line, reason = self.recent[-1]
        return f"the last: {path}:{line}: {reason}"

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


def check_text(path, head):
    """Raise DataError when the first bytes of ``path`` show it is not line-oriented text."""
    for magic, what in _NOT_TEXT:
        if head.startswith(magic):
            if what.endswith("compressed"):
                raise DataError(f"{path}: {what} input is not supported; decompress it first "
                                f"(hpctrain reads plain TSV/CSV, or HDF5 from hpctrain convert)")
            raise DataError(f"{path}: {what} (set data.format = \"hdf5\" to read it)")
    if b"\n" not in head and head.count(b"\r") > 1:
        raise DataError(f"{path}: lines end in CR only (no LF in the first {len(head)} bytes); "
                        f"hpctrain reads LF or CRLF line ends: convert it, e.g. with "
                        f"tr '\\r' '\\n'")


class TextFiles:
    """The files of one split, read with ``pread``; with ``header`` each file's first line
    is skipped. Sizes are taken at open: a file that is shorter when read raises DataError."""

    def __init__(self, patterns, header, what):
        self.paths = expand_paths(patterns, what)
        self.header = header
        self.sizes, self.data_start, self.headers, self._fds = [], [], [], []
        self._line_bytes = 256.0     # running mean of line length: sizes window reads
        try:
            for p in self.paths:
                self._open(p)
        except BaseException:
            self.close()
            raise

    def _open(self, path):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise DataError(f"{path}: cannot open ({e.strerror})") from None
        self._fds.append(fd)
        size = os.fstat(fd).st_size
        if size == 0:
            raise DataError(f"{path}: empty file")
        self.sizes.append(size)
        f = len(self.sizes) - 1
        head = self._pread(f, 0, min(size, _HEAD))
        check_text(path, head)
        start = 0
        if self.header:
            buf, ends = self._lines(f, 0, 1, len(head))
            start = int(ends[0]) + 1 if ends.shape[0] and ends[0] < buf.shape[0] else size
            self.headers.append(bytes(buf[:start]).decode("utf-8", "replace").rstrip("\r\n"))
        if start >= size:
            raise DataError(f"{path}: no data lines" + (" after the header" if self.header else ""))
        self.data_start.append(start)

    def _pread(self, f, offset, n):
        """``n`` bytes of file ``f`` from ``offset`` (DataError if the file is now shorter)."""
        try:
            data = os.pread(self._fds[f], n, offset)
        except OSError as e:
            raise DataError(f"{self.paths[f]}: read error at byte {offset} "
                            f"({e.strerror})") from None
        if len(data) < n:
            raise DataError(f"{self.paths[f]}: the file ends at byte {offset + len(data)} but had "
                            f"{self.sizes[f]} bytes when opened: it was truncated or rewritten "
                            f"while being read")
        return data

    def _lines(self, f, offset, want, nbytes):
        """``(buf, ends)``: bytes of file ``f`` from ``offset`` and the ends (relative, without
        the newline) of at most ``want`` whole lines in them, at least one unless at the end
        of the file; a last line without newline ends at the end of the file."""
        size = self.sizes[f]
        nbytes = max(1, min(nbytes, size - offset))
        while True:
            buf = np.frombuffer(self._pread(f, offset, nbytes), dtype=np.uint8)
            ends = np.empty(want, dtype=np.int64)
            k = count_lines(buf, 0, nbytes, ends)
            ends = ends[:k]
            at_eof = offset + nbytes >= size
            if k == 0 and not at_eof:      # a line longer than the block: read more
                if nbytes >= _MAX_LINE:
                    raise DataError(f"{self.paths[f]}: no line end in the {nbytes} bytes from "
                                    f"byte {offset}: not a text file of this format")
                nbytes = min(2 * nbytes, _MAX_LINE, size - offset)
                continue
            if k < want and at_eof and (int(ends[-1]) + 1 if k else 0) < nbytes:
                ends = np.append(ends, nbytes)
            return buf, ends

    def first_line_no(self):
        return 2 if self.header else 1

    def start(self):
        """The position of the first data line."""
        return 0, self.data_start[0], self.first_line_no()

    def read(self, pos, count, keep=True):
        """Up to ``count`` lines from ``pos``: ``(pieces, new_pos, n)``.

        ``pieces`` are ``(file, buf, starts, ends, line_numbers)`` (empty when ``keep`` is
        false, for skipping).
        """
        file, offset, line = pos
        pieces, got = [], 0
        while got < count and file < len(self.sizes):
            want = min(count - got, _SCAN) if not keep else count - got
            nbytes = (min(_MAX_WINDOW_READ, max(1 << 16, int(want * self._line_bytes * 1.25)))
                      if keep else _BLOCK)
            buf, ends = self._lines(file, offset, want, nbytes)
            n = ends.shape[0]
            used = min(int(ends[-1]) + 1, buf.shape[0]) if n else buf.shape[0]
            if keep and n:
                starts = np.empty(n, dtype=np.int64)
                starts[0] = 0
                starts[1:] = ends[:-1] + 1
                pieces.append((file, buf, starts, ends, line + np.arange(n, dtype=np.int64)))
                self._line_bytes = 0.5 * self._line_bytes + 0.5 * used / n
            got += n
            line += n
            offset += used
            if offset >= self.sizes[file]:
                file += 1
                offset = self.data_start[file] if file < len(self.sizes) else 0
                line = self.first_line_no()
        return pieces, (file, offset, line), got

    def file_lines(self, f):
        """``(starts, ends)``: absolute byte ranges of every data line of file ``f``."""
        offset, size = self.data_start[f], self.sizes[f]
        starts, ends = [], []
        while offset < size:
            _, e = self._lines(f, offset, _SCAN, _BLOCK)
            s = np.empty(e.shape[0], dtype=np.int64)
            if e.shape[0]:
                s[0] = 0
                s[1:] = e[:-1] + 1
            starts.append(s + offset)
            ends.append(e + offset)
            offset += int(e[-1]) + 1 if e.shape[0] else size - offset
        return np.concatenate(starts), np.concatenate(ends)

    def index(self):
        """Every data line: ``(file_of_line, starts, ends, first line index of each file)``."""
        files, starts, ends, first, n = [], [], [], [], 0
        for f in range(len(self.sizes)):
            s, e = self.file_lines(f)
            first.append(n)
            files.append(np.full(s.shape[0], f, dtype=np.int32))
            starts.append(s)
            ends.append(e)
            n += s.shape[0]
        return np.concatenate(files), np.concatenate(starts), np.concatenate(ends), \
            np.array(first, dtype=np.int64)

    def lines_at(self, f, starts, ends, line_numbers):
        """One piece holding the given lines of file ``f`` (absolute ranges, increasing),
        read with one ``pread`` per run of lines less than 4 KiB apart (reading a gap costs
        about what another system call does)."""
        if starts.shape[0] == 0:
            return []
        cut = np.flatnonzero(starts[1:] - ends[:-1] > _GAP) + 1
        first = np.concatenate(([0], cut))
        last = np.concatenate((cut, [starts.shape[0]])) - 1
        lo, hi = starts[first], ends[last]
        blocks = [self._pread(f, int(a), int(b - a)) for a, b in zip(lo, hi)]
        # where each run starts in the joined buffer, minus where it starts in the file
        shift = np.concatenate(([0], np.cumsum(hi - lo)[:-1])) - lo
        shift = np.repeat(shift, last - first + 1)
        buf = np.frombuffer(b"".join(blocks), dtype=np.uint8)
        return [(f, buf, starts + shift, ends + shift, line_numbers)]

    def close(self):
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


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
        for f, buf, s, e, ln in pieces:
            a, b = max(lo - at, 0), min(hi - at, s.shape[0])
            if a < b:
                sel.append((f, buf, s[a:b], e[a:b], ln[a:b]))
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
            sel += self.files.lines_at(int(f), starts[sp[m]], ends[sp[m]],
                                       g - first[f] + self.files.first_line_no())
        rows, keep = self._parse(sel)
        if keep.all() and (order == np.arange(order.shape[0])).all():
            return rows
        kept = sp[keep]
        want = positions[np.isin(positions, kept)]
        return rows.take(np.searchsorted(kept, want))

    # ----------------------------------------------------------------- parsing
    def _parse(self, pieces):
        parts, keeps = [], []
        for f, buf, s, e, ln in pieces:
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
