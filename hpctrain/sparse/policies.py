"""Admission and eviction policies of embedding tables.

Admission decides when a new key earns a row: only once it has been seen ``min_count``
times by ``find_or_insert``. Until then it reads as zeros and receives no update. Counts
are kept either exactly (a counter map holding only keys still waiting) or approximately
in a counting Bloom filter of ``bloom_size`` 8-bit counters and ``bloom_hashes`` hashes,
which never undercounts but may admit a key early (false positive rate about
``(1 - exp(-bloom_hashes * n / bloom_size)) ** bloom_hashes`` after ``n`` distinct keys).

Eviction runs when ``EmbeddingTable.evict(step)`` is called: first every row not updated
for more than ``ttl`` steps (``step - last_step > ttl``), then, while more than
``max_rows`` rows remain, the least frequently used rows (lowest access count, ties by
oldest last update, then smallest key). Evicted keys re-enter later as new keys.
"""
import dataclasses

from hpctrain.errors import ConfigError

COUNTERS = ("exact", "bloom")
# Valid (low, high) of the integer fields (None: no upper bound). min_count is at most 255
# because the Bloom filter's counters are 8-bit.
ADMISSION_LIMITS = {"min_count": (1, 255), "bloom_size": (8, 1 << 40), "bloom_hashes": (1, 16)}
EVICTION_LIMITS = {"ttl": (0, None), "max_rows": (0, None)}


def _int_field(owner, name, value, lo, hi=None, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ConfigError(f"{owner} {name} must be an integer{' or None' if allow_none else ''}; "
                          f"got {value!r}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{owner} {name} must be {rng}; got {v}")
    return v


@dataclasses.dataclass(frozen=True)
class Admission:
    """When a new key gets a row.

    Args:
        min_count: occurrences needed before a key is stored (1 = admit at once).
        counter: ``"exact"`` (counter map) or ``"bloom"`` (counting Bloom filter).
        bloom_size: number of 8-bit counters of the Bloom filter.
        bloom_hashes: counters per key in the Bloom filter.

    Raises:
        ConfigError: naming the field when a value is invalid.
    """

    min_count: int = 1
    counter: str = "exact"
    bloom_size: int = 1 << 20
    bloom_hashes: int = 4

    def __post_init__(self):
        for name, (lo, hi) in ADMISSION_LIMITS.items():
            object.__setattr__(self, name, _int_field("admission", name, getattr(self, name),
                                                      lo, hi))
        if self.counter not in COUNTERS:
            raise ConfigError(f"admission counter must be one of {', '.join(COUNTERS)}; "
                              f"got {self.counter!r}")

    @classmethod
    def from_any(cls, spec):
        """An Admission from None (admit at once), an instance, or a dict of fields."""
        return _from_any(cls, spec, "admission")


@dataclasses.dataclass(frozen=True)
class Eviction:
    """Which rows ``evict(step)`` removes.

    Args:
        ttl: evict rows whose last update is more than ``ttl`` steps old (None: never).
        max_rows: after TTL, evict least frequently used rows down to this many (None: no cap).

    Raises:
        ConfigError: naming the field when a value is invalid.
    """

    ttl: int = None
    max_rows: int = None

    def __post_init__(self):
        for name, (lo, hi) in EVICTION_LIMITS.items():
            object.__setattr__(self, name, _int_field("eviction", name, getattr(self, name),
                                                      lo, hi, allow_none=True))

    @classmethod
    def from_any(cls, spec):
        """An Eviction from None (never evict), an instance, or a dict of fields."""
        return _from_any(cls, spec, "eviction")


def from_fields(cls, spec, what):
    """``cls(**spec)`` for a dict of dataclass fields; unknown fields name ``what``."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise ConfigError(f"unknown {what} field(s) {', '.join(map(str, unknown))}; "
                          f"valid fields: {', '.join(sorted(fields))}")
    return cls(**spec)


def _from_any(cls, spec, what):
    if spec is None:
        return cls()
    if isinstance(spec, cls):
        return spec
    if isinstance(spec, dict):
        return from_fields(cls, spec, what)
    raise ConfigError(f"{what} must be a {cls.__name__}, a dict or None; "
                      f"got {type(spec).__name__}")
