"""The embedding-store interface: what the trainer asks of the sparse side, and nothing more.

Three implementations answer it::

    EmbeddingCollection   one process, every row local (the twin that defines the meaning)
    ShardedEmbedding      rows sharded over the ranks of a communicator (collective mode)
    hpctrain.ps.client    rows on parameter-server ranks (hybrid mode)

A step is a *ticket*'s life::

    t = store.start_lookup(batch, step)   # dedup, route, start moving ids (non-blocking)
    outputs = store.wait_lookup(t)        # rows arrive, bags pooled: feature -> [B, dim]
    ...dense forward / backward...
    store.backward(t, grads, step)        # per-id gradients to the owners, optimizer once per id

The ticket carries everything its backward needs, so a trainer may start the
next batch's lookup before this one's backward (overlap) and no "last lookup"
is hidden in the store. ``start_lookup`` reads no row: rows are read in
``wait_lookup``, after every earlier ``backward`` has been applied, so overlap
never changes a result.

Every method of a distributed store is collective over its ranks (all call it
in the same order); the twin's are plain calls.
"""
from abc import ABC, abstractmethod


class Ticket:
    """A started lookup; only the store that issued it reads its fields.

    Attributes:
        step: the training step it was started for.
        train: False for an evaluation lookup (nothing inserted, no backward).
        state: "started" -> "waited" -> "applied" (training) or "waited" (eval).
    """

    __slots__ = ("step", "train", "state")

    def __init__(self, step, train):
        self.step, self.train, self.state = step, train, "started"

    def _mark_waited(self, who):
        if self.state != "started":
            raise RuntimeError(f"{who}.wait_lookup: this ticket was already waited for")
        self.state = "waited"

    def _mark_applied(self, who):
        if not self.train:
            raise RuntimeError(f"{who}.backward: an evaluation lookup (train=False) has no "
                               f"backward")
        if self.state != "waited":
            raise RuntimeError(f"{who}.backward: ticket of step {self.step} is {self.state}; "
                               f"backward needs a ticket returned by wait_lookup, once")
        self.state = "applied"


class EmbeddingStore(ABC):
    """Embedding tables looked up and trained by tickets (see the module docstring).

    Attributes:
        specs: the resolved ``TableSpec`` list (``table_id`` set).
        feature_to_table: dict feature name -> table name.
    """

    specs: list
    feature_to_table: dict

    @abstractmethod
    def start_lookup(self, batch, step, train=True):
        """Start looking up this rank's ``JaggedBatch``; returns a ``Ticket``.

        With ``train=False`` nothing is inserted and unknown ids read the default row.
        """

    @abstractmethod
    def wait_lookup(self, ticket):
        """Finish ``ticket``: dict feature -> float32 ``[B, dim]`` (or jagged rows)."""

    @abstractmethod
    def backward(self, ticket, grads, step):
        """Apply gradients of ``ticket``'s outputs (dict feature -> array shaped like them)."""

    @abstractmethod
    def evict(self, step):
        """Evict stale or rare rows by each table's policy; dict table -> rows evicted here."""

    @abstractmethod
    def export(self):
        """This rank's rows: dict table -> ``EmbeddingTable.export()`` state."""

    @abstractmethod
    def import_(self, tables):
        """Store rows (dict table -> export state) that ``owner_of`` places on this rank."""

    @abstractmethod
    def owner_of(self, table, keys):
        """int array: the rank of this store's communicator that holds each key of ``table``."""

    @abstractmethod
    def stats(self):
        """dict of plain numbers: ``rows`` (table -> rows held here), ``exchange`` (method),
        ``buffer_bytes`` and whatever else the implementation measures."""

    @property
    @abstractmethod
    def timers(self):
        """dict phase -> accumulated seconds since ``reset_timers``."""

    @abstractmethod
    def reset_timers(self):
        """Zero ``timers``."""

    def track_evictions(self):
        """Remember evicted keys for ``export_delta`` from now on (delta export, online mode)."""
        raise NotImplementedError(f"{type(self).__name__} does not export deltas")

    def export_delta(self, since):
        """This rank's rows updated after step ``since`` and the keys evicted since the last
        call: dict table -> ``EmbeddingTable.export_delta`` dict (keys, values, last_step,
        tombstones). Stores that cannot say raise ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} does not export deltas")

    def forward(self, batch, step, train=True):
        """``wait_lookup(start_lookup(...))``; returns ``(outputs, ticket)``."""
        ticket = self.start_lookup(batch, step, train)
        return self.wait_lookup(ticket), ticket

    def close(self):
        """Release what the store holds outside Python (windows, connections)."""


class LocalShards:
    """The store methods of a store whose rows of this rank are ``self.tables`` (dict table
    name -> ``EmbeddingTable``): the twin (every row) and the sharded store (this rank's
    shard)."""

    def evict(self, step):
        """Evict stale/rare rows of this rank's tables; dict table -> rows evicted here."""
        return {name: int(t.evict(step)) for name, t in self.tables.items()}

    def export(self):
        """This rank's rows of every table: dict table -> ``EmbeddingTable.export()``."""
        return {name: t.export() for name, t in self.tables.items()}

    def track_evictions(self):
        """Every table remembers its evicted keys for ``export_delta``."""
        for t in self.tables.values():
            t.track_evictions()

    def export_delta(self, since):
        """dict table -> ``EmbeddingTable.export_delta(since)`` of this rank's rows."""
        return {name: t.export_delta(since) for name, t in self.tables.items()}

    def import_(self, tables):
        """Store exported rows that live on this rank (dict table -> export state)."""
        for name, state in tables.items():
            self.tables[name].import_(state)
