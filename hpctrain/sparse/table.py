"""One shard of an embedding table: a dynamic hash table of rows with a fused optimizer.

``EmbeddingTable`` validates its inputs and drives the Cython core
(``hpctrain._kernels.table.TableCore``)::

    keys int64[n] --find/find_or_insert--> row indices int64[n] (-1: absent / not admitted)
    row indices   --gather-------------->  float32[n, dim] (zeros for -1)
    row indices + float32[n, dim] grads --apply_gradients--> fused optimizer update

Storage (details in docs/embedding-table.md)::

    hash index   {int64 key, uint32 row} x slots  open addressing, linear probing, load 0.71-0.8
    values       E[rows, dim]                      densely packed, freed rows reused; E is
                                                   float32, fp16 or bf16 (``row_dtype``; every
                                                   read widens to float32, hpctrain.sparse.rowdtype)
    slots        float32[rows, width] per slot     optimizer state, parallel to values
    meta         {uint32 access count, int32 last update step} per row (8 bytes)

Access counts saturate at 2^32 - 1; steps must lie in [0, 2^31 - 1].

Every batched operation uses ``hpctrain._kernels._openmp.get_num_threads()`` threads and
gives bit-identical results for any thread count. The kernels release the GIL; a lock
serialises calls on one table from several Python threads (e.g. a lookup overlapped with
an update), so that no call sees the storage while another one grows it.
"""
import math
import threading

import numpy as np

from hpctrain._kernels import table as _kernel
from hpctrain._kernels._openmp import get_num_threads
from hpctrain.comm import debug_enabled
from hpctrain.errors import NonFiniteError
from hpctrain.memory import available_memory
from hpctrain.sparse.init import INITS, default_scale
from hpctrain.sparse import rowdtype
from hpctrain.sparse.optimizers import KINDS, SparseOptimizer
from hpctrain.sparse.policies import Admission, Eviction
from hpctrain.sparse.table_args import (_as_u64, as_float32_2d, as_int64,  # noqa: F401
                                        as_step, check_out_float32)

_OPT_CODE = {kind: code for code, kind in enumerate(KINDS)}  # order of table_optim.pxi's enum
_ADM_CODE = {"exact": 1, "bloom": 2}
_META = ("access_count", "last_step", "opt_step")
# (largest value, what the row metadata stores it as) per metadata entry
_META_MAX = {"access_count": ((1 << 32) - 1, "uint32, saturating"),
             "last_step": ((1 << 31) - 1, "int32"), "opt_step": ((1 << 63) - 1, "int64")}
_MAX_COUNT = (1 << 32) - 1   # admission counts are uint32
_NORMAL_MAX = 8.58           # largest |value| / std of the normal init (Box-Muller, u1 >= 2^-53)


class EmbeddingTable:
    """A dynamic-vocabulary embedding table shard with a fused sparse optimizer.

    Args:
        name: table name (used in error messages).
        dim: row width.
        optimizer: a SparseOptimizer, an optimizer kind name, or a dict of its fields.
        table_id: table id, part of every row's initial value.
        seed: model seed, part of every row's initial value.
        init: ``"uniform"`` (in [-a, a)) or ``"normal"`` (std s).
        init_scale: a or s; default ``1 / sqrt(dim)``.
        capacity: rows to allocate up front (the table grows past it).
        admission: Admission, dict or None (admit every key at once).
        eviction: Eviction, dict or None (``evict`` removes nothing).
        debug: extra checks: duplicate indices in ``apply_gradients``, freed rows in
            ``gather``. Also on when ``HPCTRAIN_DEBUG`` is set true (``debug_enabled``).
        row_dtype: how rows are stored: ``"fp32"``, ``"fp16"`` or ``"bf16"``
            (``hpctrain.sparse.rowdtype``). Reads give float32 either way; reduced rows are
            written back by the optimizer with stochastic rounding and need the rows' keys
            in ``apply_gradients``. Optimizer state stays float32.

    Raises:
        ConfigError: on invalid optimizer, admission or eviction settings.
        TypeError, ValueError: on other invalid arguments.
    """

    def __init__(self, name, dim, optimizer="adagrad", *, table_id=0, seed=0, init="uniform",
                 init_scale=None, capacity=1024, admission=None, eviction=None, debug=False,
                 row_dtype="fp32"):
        if not isinstance(name, str) or not name:
            raise TypeError(f"table name must be a non-empty str; got {name!r}")
        if isinstance(dim, bool) or not hasattr(dim, "__index__") or int(dim) < 1:
            raise ValueError(f"table {name!r}: dim must be an integer >= 1; got {dim!r}")
        if init not in INITS:
            raise ValueError(f"table {name!r}: init must be one of {', '.join(INITS)}; "
                             f"got {init!r}")
        if init_scale is not None:
            if isinstance(init_scale, bool) \
                    or not isinstance(init_scale, (int, float, np.number)) \
                    or not math.isfinite(init_scale) or init_scale <= 0:
                raise ValueError(f"table {name!r}: init_scale must be a finite number > 0; "
                                 f"got {init_scale!r}")
        if isinstance(capacity, bool) or not hasattr(capacity, "__index__") \
                or not 1 <= int(capacity) <= (1 << 31) - 1:
            raise ValueError(f"table {name!r}: capacity must be an integer in [1, 2^31 - 1]; "
                             f"got {capacity!r}")
        rowdtype.check(row_dtype, f"table {name!r}: row_dtype")
        if init_scale is not None and init_scale * (1 if init == "uniform" else _NORMAL_MAX) \
                > rowdtype.MAX_FINITE[row_dtype]:
            raise ValueError(f"table {name!r}: init_scale {init_scale} gives initial values past "
                             f"{row_dtype}'s largest finite value "
                             f"{rowdtype.MAX_FINITE[row_dtype]:g}")
        self._name = name
        self._dim = int(dim)
        self._row_dtype = row_dtype
        self._table_id = int(table_id) if hasattr(table_id, "__index__") else table_id
        self._seed = seed
        self._opt = SparseOptimizer.from_any(optimizer)
        self._admission = Admission.from_any(admission)
        self._eviction = Eviction.from_any(eviction)
        self._init = init
        self._init_scale = default_scale(self._dim) if init_scale is None else float(init_scale)
        self._debug = bool(debug) or debug_enabled()
        self._slots = self._opt.slot_specs(self._dim)
        widths = [w for _, w, _ in self._slots] + [0, 0]
        inits = [v for _, _, v in self._slots] + [0.0, 0.0]
        o, a = self._opt, self._admission
        self._lock = threading.Lock()
        self._tombstones = None      # keys evicted since the last export_delta, when tracked
        self._core = _kernel.TableCore(_kernel.TableParams(
            dim=self._dim, capacity=int(capacity),
            opt_kind=_OPT_CODE[o.kind], lr=o.lr, momentum=o.momentum, beta1=o.beta1,
            beta2=o.beta2, eps=o.eps, l1=o.l1, l2=o.l2, lr_power=o.lr_power,
            weight_decay=o.weight_decay, slot0_width=widths[0], slot1_width=widths[1],
            slot0_init=inits[0], slot1_init=inits[1], has_opt_step=o.kind == "adam",
            seed=_as_u64(seed, "seed"), table_id=_as_u64(table_id, "table_id"),
            init_normal=init == "normal", init_scale=self._init_scale,
            min_count=a.min_count, adm_kind=_ADM_CODE[a.counter], bloom_size=a.bloom_size,
            bloom_hashes=a.bloom_hashes, row_dtype=rowdtype.CODES[row_dtype]))

    # ------------------------------------------------------------------ properties

    name = property(lambda self: self._name, doc="Table name.")
    dim = property(lambda self: self._dim, doc="Row width.")
    table_id = property(lambda self: self._table_id, doc="Table id (part of the init formula).")
    seed = property(lambda self: self._seed, doc="Seed (part of the init formula).")
    optimizer = property(lambda self: self._opt, doc="The SparseOptimizer.")
    admission = property(lambda self: self._admission, doc="The Admission policy.")
    eviction = property(lambda self: self._eviction, doc="The Eviction policy.")
    init = property(lambda self: self._init, doc='"uniform" or "normal".')
    init_scale = property(lambda self: self._init_scale, doc="Init half-width / std.")
    debug = property(lambda self: self._debug, doc="Whether debug checks run.")
    row_dtype = property(lambda self: self._row_dtype,
                         doc='How rows are stored: "fp32", "fp16" or "bf16".')
    slot_names = property(lambda self: [s for s, _, _ in self._slots],
                          doc="Names of the optimizer state slots, in export order.")

    def __len__(self):
        return self._core.n_live

    def __repr__(self):
        dt = "" if self._row_dtype == "fp32" else f", row_dtype={self._row_dtype!r}"
        return (f"EmbeddingTable({self._name!r}, dim={self._dim}, optimizer={self._opt.kind!r}, "
                f"rows={len(self)}, table_id={self._table_id}{dt})")

    # ------------------------------------------------------------------ batched operations

    def find(self, keys):
        """Row indices of ``keys`` (int64[n]), -1 where absent; read-only.

        Raises:
            TypeError, ValueError: for keys that are not a 1-D integer array.
        """
        k = as_int64(keys, "keys", uint64_bits=True)
        out = np.empty(k.shape[0], dtype=np.int64)
        with self._lock:
            self._core.find(k, out, get_num_threads())
        return out

    def find_or_insert(self, keys, step):
        """Row indices of ``keys``, inserting (freshly initialised) keys that are admitted.

        Each occurrence counts once toward a key's admission count and access count.
        Keys not (yet) admitted get -1.

        Args:
            keys: int64[n] feature ids (callers normally pass unique keys).
            step: training step, recorded as the last update step of new rows.

        Returns:
            int64[n] row indices.
        """
        k = as_int64(keys, "keys", uint64_bits=True)
        s = as_step(step)
        out = np.empty(k.shape[0], dtype=np.int64)
        with self._lock:
            self._core.find_or_insert(k, out, s, get_num_threads())
        return out

    def reserve(self, rows, populate=True):
        """Make room for ``rows`` live rows at once, as a preallocated table would.

        The index and the row store are sized so that inserting up to ``rows`` rows in
        all never grows them, and with ``populate`` their pages are faulted in now: the
        kernel zeroes fresh memory at first touch, which costs more than the insert
        itself on many machines (benchmarks/README.md, *Threads inside a rank*), so a
        reserved table pays it here instead of in the training steps. Rows are still
        created (and initialised) at first sight; ``len(table)`` is unchanged.

        Raises:
            ValueError: ``rows`` is not an integer in [0, 2^31 - 1].
            MemoryError: the memory cannot be mapped, or populating it would take more
                than the memory the system has available (naming the table and both sizes).
        """
        if isinstance(rows, bool) or not hasattr(rows, "__index__") \
                or not 0 <= int(rows) <= (1 << 31) - 1:
            raise ValueError(f"table {self._name!r}: reserve rows must be an integer in "
                             f"[0, 2^31 - 1]; got {rows!r}")
        rows = int(rows)
        if rows <= len(self):
            return
        if populate:
            need = self.reserve_bytes(rows) - self.memory_stats()["bytes_total"]
            avail = available_memory()
            if avail is not None and need > avail:
                raise MemoryError(f"table {self._name!r}: reserving {rows:,} rows needs about "
                                  f"{need / 2**30:.2f} GiB more memory; the system has "
                                  f"{avail / 2**30:.2f} GiB available")
        with self._lock:
            if self._core.reserve(rows, bool(populate)) != 0:
                raise MemoryError(f"table {self._name!r}: could not map memory for "
                                  f"{rows:,} rows of dim {self._dim}")

    def reserve_bytes(self, rows):
        """Bytes the index, rows, optimizer state and metadata take when reserved for
        ``rows`` rows (an estimate at the index's highest load)."""
        c = self._core
        per_row = c.vbytes + 4 * (c.w0 + c.w1) + 8 + (8 if c.has_opt_step else 0)
        return int(rows * (per_row + 12 / 0.8))

    def gather(self, indices, out=None):
        """Rows at ``indices`` as float32[n, dim]; zeros where the index is -1.

        Args:
            indices: int64[n] row indices from find/find_or_insert.
            out: optional float32[n, dim] C-contiguous array to fill.

        Raises:
            IndexError: naming the first index that is not a row of this table.
        """
        idx = as_int64(indices, "indices")
        shape = (idx.shape[0], self._dim)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        else:
            check_out_float32(out, "out", shape)
        with self._lock:
            nbad = self._core.gather(idx, out, get_num_threads(), self._debug)
        if nbad:
            self._raise_bad_index(idx, "indices", self._debug)
        return out

    def gather_into(self, indices, out, out_off, select=None):
        """Rows at ``indices`` written into a flat buffer: row ``i`` (of
        ``indices[select[i]]`` when ``select`` is given) goes to
        ``out[out_off[i] : out_off[i] + dim]`` as float32, zeros where the index is -1.
        One pass from the table into, e.g., an exchange buffer, instead of a gather and a
        scatter.

        Args:
            indices: int64[n] row indices from find/find_or_insert.
            out: C-contiguous writeable float32[m] buffer.
            out_off: int64[k] element offset of each output row in ``out``.
            select: optional int64[k] entries of ``indices`` (default: k = n, in order).

        Raises:
            IndexError: naming the first index that is not a row of this table.
            ValueError: a destination outside ``out`` or a ``select`` entry outside
                ``indices``.
        """
        idx = as_int64(indices, "indices")
        off = as_int64(out_off, "out_off")
        check_out_float32(out, "out")
        sel = None
        if select is not None:
            sel = as_int64(select, "select")
            if sel.shape[0] != off.shape[0]:
                raise ValueError(f"select has {sel.shape[0]} entries, out_off "
                                 f"{off.shape[0]}")
            if sel.shape[0] and (sel.min() < 0 or sel.max() >= idx.shape[0]):
                bad = int(np.flatnonzero((sel < 0) | (sel >= idx.shape[0]))[0])
                raise ValueError(f"select[{bad}] = {sel[bad]} is outside [0, {idx.shape[0]})")
        elif off.shape[0] != idx.shape[0]:
            raise ValueError(f"out_off has {off.shape[0]} entries, indices {idx.shape[0]}")
        if off.shape[0] and (off.min() < 0 or off.max() + self._dim > out.shape[0]):
            bad = int(np.flatnonzero((off < 0) | (off + self._dim > out.shape[0]))[0])
            raise ValueError(f"out_off[{bad}] = {off[bad]} with dim {self._dim} is outside a "
                             f"buffer of {out.shape[0]} floats")
        with self._lock:
            nbad = self._core.gather_into(idx, sel, out, off, get_num_threads(), self._debug)
        if nbad:
            self._raise_bad_index(idx, "indices", self._debug)
        return out

    def apply_gradients(self, indices, grads, step, keys=None):
        """Apply the optimizer to the rows at ``indices`` (unique; -1 entries skipped).

        Nothing is updated when any input is rejected.

        Args:
            indices: int64[n] unique row indices.
            grads: float32[n, dim] one gradient per index.
            step: training step, recorded as the rows' last update step.
            keys: int64[n] the keys ``indices`` were found for (entries at -1 indices are
                ignored). Required with fp16/bf16 rows: the random bits of their stochastic
                rounding are a function of (table, key, step, column); ignored with fp32.

        Raises:
            NonFiniteError: if grads hold NaN or Inf (names the table and row).
            IndexError: naming the first index that is not a row of this table.
            ValueError: on duplicate indices (debug mode), keys that do not belong to the
                indices (debug mode), missing keys (reduced rows) or mismatched shapes.
        """
        idx = as_int64(indices, "indices")
        g = as_float32_2d(grads, "grads", (idx.shape[0], self._dim))
        s = as_step(step)
        k = None
        if self._row_dtype != "fp32":
            if keys is None:
                raise ValueError(f"table {self._name!r}: {self._row_dtype} rows need the keys "
                                 f"of the updated rows (apply_gradients(..., keys=...))")
            k = as_int64(keys, "keys", uint64_bits=True)
            if k.shape != idx.shape:
                raise ValueError(f"table {self._name!r}: keys has shape {k.shape}; expected "
                                 f"{idx.shape} like indices")
        if self._debug:
            self._check_unique(idx)
            if k is not None:
                self._check_keys(idx, k)
        with self._lock:
            nbad, nnf = self._core.apply(idx, g, s, get_num_threads(), k)
        if nbad:
            self._raise_bad_index(idx, "indices", True)
        if nnf:
            i = self._core.first_nonfinite(g)
            raise NonFiniteError(f"table {self._name!r}: gradient row {i} (index {idx[i]}) holds "
                                 f"NaN or Inf ({nnf} such rows); no row was updated")

    def _check_keys(self, idx, keys):
        found = np.empty(keys.shape[0], dtype=np.int64)
        with self._lock:
            self._core.find(keys, found, get_num_threads())
        bad = np.flatnonzero((idx >= 0) & (found != idx))
        if bad.size:
            i = bad[0]
            raise ValueError(f"table {self._name!r}: keys[{i}] = {keys[i]} is stored at row "
                             f"{found[i]}, not at indices[{i}] = {idx[i]}")

    def evict(self, step):
        """Evict rows by the table's Eviction policy; returns how many rows were evicted.

        First rows whose last update is more than ``ttl`` steps before ``step``, then the
        least frequently used rows (ties: older last update, then smaller key) until at
        most ``max_rows`` remain. Freed rows are reused by later inserts.
        """
        s = as_step(step)
        with self._lock:
            return self._evict(s)

    def _evict(self, s):
        ev = self._eviction
        n = 0
        if ev.ttl is not None:
            n += self._remove(_kernel.ttl_rows(self._core, s, ev.ttl))
        if ev.max_rows is not None and len(self) > ev.max_rows:
            rows = _kernel.live_rows(self._core)
            access, last, _ = _kernel.meta_of(self._core, rows)
            keys = _kernel.keys_by_row(self._core)[rows]
            order = np.lexsort((keys, last, access))
            n += self._remove(np.sort(rows[order[:len(rows) - ev.max_rows]]))
        return n

    def _remove(self, rows):
        """Free ``rows`` (increasing), first noting their keys when evictions are tracked."""
        if self._tombstones is not None and rows.shape[0]:
            self._tombstones.append(_kernel.keys_by_row(self._core)[rows])
        return _kernel.remove_rows(self._core, rows)

    def remove(self, keys):
        """Remove the rows of ``keys`` (absent keys are ignored); returns how many were removed.

        Serving copies apply a delta's tombstones with it (``hpctrain.train.serving``).
        """
        k = as_int64(keys, "keys", uint64_bits=True)
        out = np.empty(k.shape[0], dtype=np.int64)
        with self._lock:
            self._core.find(k, out, get_num_threads())
            rows = np.unique(out[out >= 0])
            return self._remove(rows) if rows.shape[0] else 0

    # ------------------------------------------------------------------ deltas

    def track_evictions(self):
        """From now on, remember the keys of evicted rows until ``export_delta`` takes them.

        Off by default: a table that nobody exports deltas of keeps no list that grows.
        """
        with self._lock:
            if self._tombstones is None:
                self._tombstones = []

    def export_delta(self, since):
        """The rows updated after step ``since`` and the keys evicted since the last call.

        A delta is what a serving copy needs to catch up (docs/online.md): keys and values,
        no optimizer state. Applying ``tombstones`` (delete) and then ``keys``/``values``
        (upsert) to the table as it was at step ``since`` gives this table's rows now.

        Args:
            since: a training step; rows whose last update step is greater are returned.

        Returns:
            ``{"keys": int64[n], "values": float32[n, dim], "last_step": int64[n],
            "tombstones": int64[m]}``; rows in increasing row order; tombstones sorted,
            unique, without the keys stored again since their eviction (those are rows).
            Tombstones are empty unless ``track_evictions`` was called; they are handed
            out once.
        """
        since = int(since)
        with self._lock:
            rows = _kernel.live_rows(self._core)
            _, last, _ = _kernel.meta_of(self._core, rows)
            rows = rows[last > since]
            keys = _kernel.keys_by_row(self._core)[rows] if rows.shape[0] else \
                np.empty(0, dtype=np.int64)
            values = _kernel.copy_rows(self._core, rows, 0)
            gone = np.empty(0, dtype=np.int64)
            if self._tombstones:
                gone = np.setdiff1d(np.concatenate(self._tombstones), keys)
                self._tombstones = []
        return {"keys": keys, "values": values, "last_step": last[last > since],
                "tombstones": gone}

    # ------------------------------------------------------------------ state

    def export(self):
        """Every stored row, in increasing row order, as row-aligned arrays.

        Returns:
            ``{"keys": int64[n], "values": float32[n, dim], "slots": {name: float32[n, w]},
            "access_count": int64[n], "last_step": int64[n], "opt_step": int64[n],
            "admission": {"keys": int64[m], "counts": int64[m]}}``; ``opt_step`` is Adam's
            per-row update count (zeros for other optimizers). ``values`` are as stored: with
            fp16 rows float16, with bf16 rows uint16 (the bits; ``rowdtype.to_float32``
            widens them), and a reduced-precision table adds ``"row_dtype": "fp16"`` or
            ``"bf16"`` (a float32 table adds nothing). ``admission`` holds the keys
            the exact admission counter has seen fewer than ``min_count`` times and their
            counts, in increasing key order (empty without an exact counter); it is a keyed
            level of its own, row-aligned with its own ``keys``. A table counting with a
            Bloom filter adds ``"shard_state": {"bloom_counters": uint8[bloom_size],
            "bloom_hashes": int}``: the filter cannot be split by key, so it belongs to this
            shard as a whole (checkpoints restore it only onto the same shard).
        """
        with self._lock:
            return self._export()

    def _export(self):
        rows = _kernel.live_rows(self._core)
        access, last, ost = _kernel.meta_of(self._core, rows)
        pkeys, pcounts = _kernel.pending_counts(self._core)
        state = {
            "keys": _kernel.keys_by_row(self._core)[rows],
            "values": self._stored_values(rows),
            "slots": {name: _kernel.copy_rows(self._core, rows, i + 1)
                      for i, (name, _, _) in enumerate(self._slots)},
            "access_count": access, "last_step": last, "opt_step": ost,
            "admission": {"keys": pkeys, "counts": pcounts},
        }
        if self._row_dtype != "fp32":
            state["row_dtype"] = self._row_dtype
        if self._core.adm_kind == _ADM_CODE["bloom"]:
            state["shard_state"] = {"bloom_counters": _kernel.bloom_counters(self._core),
                                    "bloom_hashes": int(self._core.bloom_hashes)}
        return state

    def import_(self, state):
        """Store the rows of ``state`` (as ``export`` returns it, possibly filtered or
        concatenated row-wise), overwriting keys already present. Admission is bypassed.

        Pending admission counts (``state["admission"]``, optional) are restored after the
        rows: with an exact counter each key gets its count (replacing one already there),
        with a Bloom filter each key is counted that many times, without admission they are
        dropped (every key is admitted at first sight). A key stored as a row is never also
        pending. ``state["shard_state"]`` (optional) replaces the Bloom filter's counters.
        ``state["row_dtype"]`` (optional, as ``export`` writes it) says how ``values`` are
        stored (absent: numbers, float32 or any dtype that converts to it without loss);
        values of another precision than this table's are converted: widened exactly, or
        narrowed with round to nearest even. Nothing is changed when the state is rejected.

        Raises:
            TypeError, ValueError: naming the entry that is missing, mistyped or misshapen,
                a slot this optimizer does not have, a repeated key, a metadata value or a
                pending count out of range (with its key), Bloom filter counters that do
                not fit this table's filter, an unknown ``row_dtype`` or values whose dtype
                is not the one it stores, or a finite value past the range of this table's
                row dtype (with its key).
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict as export() returns; "
                            f"got {type(state).__name__}")
        for req in ("keys", "values"):
            if req not in state:
                raise ValueError(f"table {self._name!r}: state lacks {req!r}")
        keys = as_int64(state["keys"], "state['keys']", uint64_bits=True)
        n = keys.shape[0]
        values = self._values_to_store(state, keys)
        slots = state.get("slots") or {}
        if not isinstance(slots, dict):
            raise TypeError(f"state['slots'] must be a dict; got {type(slots).__name__}")
        extra = sorted(set(slots) - set(self.slot_names))
        if extra:
            raise ValueError(f"table {self._name!r}: state has slot(s) {extra} that optimizer "
                             f"{self._opt.kind!r} does not have (it has {self.slot_names})")
        arrs = []
        for name, width, _ in self._slots:
            if name not in slots:
                raise ValueError(f"table {self._name!r}: state['slots'] lacks {name!r} "
                                 f"(optimizer {self._opt.kind!r})")
            arrs.append(as_float32_2d(slots[name], f"state['slots'][{name!r}]", (n, width)))
        arrs += [None] * (2 - len(arrs))
        meta = []
        for name in _META:
            if name in state:
                a = as_int64(state[name], f"state[{name!r}]")
                if a.shape != (n,):
                    raise ValueError(f"state[{name!r}] has shape {a.shape}; expected {(n,)}")
                self._check_range(a, keys, 0, *_META_MAX[name], f"state[{name!r}]")
            else:
                a = np.zeros(n, dtype=np.int64)
            meta.append(a)
        self._check_unique_keys(keys, "state['keys']")
        pkeys, pcounts = self._pending_of(state)
        bloom = self._bloom_of(state)
        with self._lock:
            rows = _kernel.import_keys(self._core, keys)
            _kernel.write_rows(self._core, rows, values, arrs[0], arrs[1], *meta)
            if bloom is not None:
                _kernel.set_bloom_counters(self._core, bloom)
            _kernel.set_pending(self._core, pkeys, pcounts)

    def _stored_values(self, rows):
        v = _kernel.copy_values_stored(self._core, rows)
        return v.view(np.float16) if self._row_dtype == "fp16" else v

    def _values_to_store(self, state, keys):
        """``state["values"]`` converted to this table's stored form (float32, or uint16 bits
        of fp16 / bf16), checked against ``state["row_dtype"]``."""
        n, src = keys.shape[0], state.get("row_dtype")
        if src is None:
            values = as_float32_2d(state["values"], "state['values']", (n, self._dim))
            src = "fp32"
        else:
            if not isinstance(src, str) or src not in rowdtype.ROW_DTYPES:
                raise ValueError(f"table {self._name!r}: state['row_dtype'] = {src!r} is not "
                                 f"one of {', '.join(rowdtype.ROW_DTYPES)}")
            values = np.asarray(state["values"])
            want = rowdtype.STORED[src]
            if values.dtype != want:
                raise ValueError(f"table {self._name!r}: state['values'] is {values.dtype}, but "
                                 f"state['row_dtype'] = {src!r} is stored as {want}")
            if values.shape != (n, self._dim):
                raise ValueError(f"state['values'] has shape {values.shape}; expected "
                                 f"{(n, self._dim)}")
            values = np.ascontiguousarray(values)
        dt = self._row_dtype
        if src == dt:
            return values.view(np.uint16) if dt == "fp16" else values
        f32 = values if src == "fp32" else rowdtype.to_float32(values, src)
        if dt == "fp32":
            return np.ascontiguousarray(f32)
        bits, over = _kernel.encode_rows(np.ascontiguousarray(f32), rowdtype.CODES[dt])
        if over:
            stored = bits.view(np.float16) if dt == "fp16" else bits
            i, j = np.argwhere(rowdtype.overflowed(f32, stored, dt))[0]
            raise ValueError(f"table {self._name!r}: state['values'][{i}, {j}] = {f32[i, j]} "
                             f"(key {keys[i]}) is past the largest finite {dt} value "
                             f"{rowdtype.MAX_FINITE[dt]:g}; {over} such value(s) (rows are "
                             f"narrowed with round to nearest even, never clipped)")
        return bits

    def initial_rows(self, keys):
        """float32[n, dim]: the rows ``keys`` get when inserted (in this table's precision),
        whether stored or not; read-only."""
        k = as_int64(keys, "keys", uint64_bits=True)
        rows = _kernel.init_rows_reference(k, self._dim, _as_u64(self._seed, "seed"),
                                           _as_u64(self._table_id, "table_id"),
                                           self._init == "normal", self._init_scale)
        if self._row_dtype != "fp32" and k.shape[0]:
            code = rowdtype.CODES[self._row_dtype]
            rows = _kernel.decode_rows(_kernel.encode_rows(rows, code)[0], code)
        return rows

    def _check_range(self, a, keys, lo, hi, what, argname):
        bad = np.flatnonzero((a < lo) | (a > hi))
        if bad.size:
            i = bad[0]
            raise ValueError(f"table {self._name!r}: {argname}[{i}] = {a[i]} (key {keys[i]}) is "
                             f"outside [{lo}, {hi}] ({what}); {bad.size} such value(s)")

    def _check_unique_keys(self, keys, argname):
        if keys.shape[0] > 1:
            sk = np.sort(keys)
            dup = sk[1:][sk[1:] == sk[:-1]]
            if dup.size:
                raise ValueError(f"table {self._name!r}: {argname} repeats key {dup[0]}")

    def _pending_of(self, state):
        """Validated (keys, counts) of ``state["admission"]`` (empty when absent)."""
        adm = state.get("admission")
        if adm is None:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        if not isinstance(adm, dict) or "keys" not in adm or "counts" not in adm:
            raise ValueError(f"table {self._name!r}: state['admission'] must be a dict with "
                             f"'keys' and 'counts'; got {type(adm).__name__} "
                             f"{sorted(adm) if isinstance(adm, dict) else ''}")
        pkeys = as_int64(adm["keys"], "state['admission']['keys']", uint64_bits=True)
        pcounts = as_int64(adm["counts"], "state['admission']['counts']")
        if pcounts.shape != pkeys.shape:
            raise ValueError(f"state['admission']['counts'] has shape {pcounts.shape}; "
                             f"expected {pkeys.shape} like its keys")
        self._check_range(pcounts, pkeys, 1, _MAX_COUNT, "uint32 admission count",
                          "state['admission']['counts']")
        self._check_unique_keys(pkeys, "state['admission']['keys']")
        return pkeys, pcounts

    def _bloom_of(self, state):
        """Validated Bloom filter counters of ``state["shard_state"]``, or None."""
        shard = state.get("shard_state")
        if shard is None or "bloom_counters" not in shard:
            return None
        counters = np.asarray(shard["bloom_counters"])
        if self._core.adm_kind != _ADM_CODE["bloom"]:
            if self._core.adm_kind == 0:
                return None  # no admission: every key is admitted at first sight anyway
            raise ValueError(f"table {self._name!r}: state holds Bloom filter counters but the "
                             f"table counts admissions exactly; drop state['shard_state'] to "
                             f"start counting afresh")
        a = self._admission
        hashes = shard.get("bloom_hashes")
        if counters.dtype != np.uint8 or counters.shape != (a.bloom_size,) \
                or hashes != a.bloom_hashes:
            raise ValueError(f"table {self._name!r}: state['shard_state'] holds a Bloom filter "
                             f"of {counters.dtype}{list(counters.shape)} with {hashes} hashes; "
                             f"this table's is uint8[{a.bloom_size}] with {a.bloom_hashes}")
        return np.ascontiguousarray(counters)

    def memory_stats(self):
        """Storage figures: row/slot counts, bytes per part, bytes per row and its bound.

        ``bytes_per_row`` counts the index, rows, optimizer state and metadata (not the
        admission counters); ``bound_bytes_per_row`` is 1.25 x (8 + 4 * (dim + state floats)),
        the bound of float32 rows (fp16/bf16 tables stay well below it; their own target is
        in docs/embedding-table.md).
        """
        c = self._core
        with self._lock:
            nb = _kernel.nbytes(c)
        table_bytes = nb["index"] + nb["rows"] + nb["meta"] + nb["free_list"]
        n = len(self)
        return {
            "rows": n, "row_capacity": c.row_cap, "rows_ever": c.row_high, "free_rows": c.n_free,
            "index_slots": c.index_cap, "index_load": c.index_used / c.index_cap,
            "bytes_index": nb["index"], "bytes_rows": nb["rows"], "bytes_meta": nb["meta"],
            "bytes_free_list": nb["free_list"], "bytes_admission": nb["admission"],
            "pending_admission": _kernel.pending_admission(c),
            "bytes_total": table_bytes + nb["admission"],
            "bytes_per_row": table_bytes / n if n else float("nan"),
            "bound_bytes_per_row": 1.25 * (8 + 4 * (self._dim + self._opt.slot_floats(self._dim))),
        }

    # ------------------------------------------------------------------ helpers

    def _check_unique(self, idx):
        live = idx[idx >= 0]
        if live.size > 1:
            s = np.sort(live)
            dup = s[1:][s[1:] == s[:-1]]
            if dup.size:
                pos = np.flatnonzero(idx == dup[0])
                raise ValueError(f"table {self._name!r}: indices must be unique; index {dup[0]} "
                                 f"appears at positions {pos[:4].tolist()}")

    def _raise_bad_index(self, idx, argname, check_alive):
        i = self._core.first_bad_row(idx, check_alive)
        r = idx[i]
        what = "a freed row" if 0 <= r < self._core.row_high else \
            f"outside [-1, {self._core.row_high})"
        raise IndexError(f"table {self._name!r}: {argname}[{i}] = {r} is {what}")
