"""The validating reader every section parser uses: ``Node`` and the number checks.

A ``Node`` wraps one TOML table and its key path. Each typed getter (``integer``,
``number``, ``string``, ...) marks its key as known and raises a ``ConfigError`` naming
the file and the full key path::

    run.toml: tables[2].optimizer.lr: expected a finite number > 0, got -0.1

``finish()`` then rejects every key nobody asked for, with a close match as hint.
"""
import difflib
import os

from hpctrain.errors import ConfigError

#: Integers beyond int64 reach no kernel: every integer key is at most this.
INT64_MAX = 2**63 - 1
#: What one rank's arrays, the kernels (int32 row ids) and MPI's int counts can hold.
INT32_MAX = 2**31 - 1

MISSING = object()


def kind_of(v):
    """"an integer", "a string", ... : how an error message names a TOML value's type."""
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


class Node:
    """One TOML table being validated; ``finish()`` rejects the keys nobody asked for."""

    def __init__(self, data, path, source):
        self.data, self.path, self.source, self.used = data, path, source, set()
        # data paths are relative to the config file's folder; outputs to the working directory
        self.base = config_folder(source)

    def key(self, key):
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def error(self, key, msg):
        where = self.key(key) if key is not None else (self.path or "<top level>")
        return ConfigError(f"{self.source}: {where}: {msg}")

    def has(self, key):
        return key in self.data

    def raw(self, key, default=MISSING):
        self.used.add(key)
        if key not in self.data:
            if default is MISSING:
                raise self.error(key, "required key is missing")
            return default
        return self.data[key]

    def integer(self, key, default=MISSING, lo=None, hi=INT64_MAX):
        if key not in self.data:
            return self.raw(key, default)
        return check_int(self, key, self.raw(key), lo, hi)

    def number(self, key, default=MISSING, lo=None, lo_incl=True, hi=None, hi_incl=True):
        if key not in self.data:
            return self.raw(key, default)
        return check_float(self, key, self.raw(key), lo, lo_incl, hi, hi_incl)

    def boolean(self, key, default=MISSING):
        if key not in self.data:
            return self.raw(key, default)
        v = self.raw(key)
        if not isinstance(v, bool):
            raise self.error(key, f"expected true or false, got {kind_of(v)} {v!r}")
        return v

    def string(self, key, default=MISSING, choices=None):
        if key not in self.data:
            return self.raw(key, default)
        v = self.raw(key)
        if not isinstance(v, str):
            raise self.error(key, f"expected a string, got {kind_of(v)} {v!r}")
        if choices is not None and v not in choices:
            raise self.error(key, f"expected one of {', '.join(map(repr, choices))}, got {v!r}")
        return v

    def strings(self, key, default=MISSING, nonempty=False, unique=True):
        if key not in self.data:
            return self.raw(key, default)
        v = self.raw(key)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.error(key, f"expected an array of strings, got {kind_of(v)} {v!r}")
        if nonempty and not v:
            raise self.error(key, "must not be empty")
        if unique and len(set(v)) != len(v):
            dup = sorted({x for x in v if v.count(x) > 1})
            raise self.error(key, f"duplicate entries {dup}")
        return list(v)

    def integers(self, key, default=MISSING, lo=None, nonempty=True, hi=INT64_MAX):
        if key not in self.data:
            return self.raw(key, default)
        v = self.raw(key)
        if not isinstance(v, list):
            raise self.error(key, f"expected an array of integers, got {kind_of(v)} {v!r}")
        if nonempty and not v:
            raise self.error(key, "must not be empty")
        return [check_int(self, key, x, lo, hi, idx=i) for i, x in enumerate(v)]

    def paths(self, key, default=MISSING):
        if key not in self.data:
            return self.raw(key, default)
        v = self.raw(key)
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise self.error(key, f"expected a path or a non-empty array of paths, got {v!r}")
        return [resolve(x, self.base) for x in v]

    def node(self, key, required=False):
        v = self.raw(key, MISSING if required else None)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self.error(key, f"expected a table, got {kind_of(v)} {v!r}")
        return Node(v, self.key(key), self.source)

    def nodes(self, key, required=False):
        v = self.raw(key, MISSING if required else [])
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            raise self.error(key, f"expected an array of tables ([[{self.key(key)}]]), got {v!r}")
        return [Node(x, f"{self.key(key)}[{i}]", self.source) for i, x in enumerate(v)]

    def finish(self):
        unknown = [k for k in self.data if k not in self.used]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, sorted(self.used), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else \
                f"; valid keys here: {', '.join(sorted(self.used))}"
            raise self.error(k, f"unknown key{hint}")


def check_int(node, key, v, lo, hi, idx=None):
    """``v`` if it is an integer in [lo, hi] (None: unbounded), else a ConfigError."""
    name = node.key(key) + (f"[{idx}]" if idx is not None else "")
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{node.source}: {name}: expected an integer, got {kind_of(v)} {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if hi is not None and hi >= INT64_MAX and (lo is None or v >= lo):
            raise ConfigError(f"{node.source}: {name}: {v} does not fit a 64-bit integer")
        top = None if hi is None or hi >= INT64_MAX else hi
        rng = f">= {lo}" if top is None else f"in [{lo}, {top}]" if lo is not None else \
            f"<= {top}"
        raise ConfigError(f"{node.source}: {name}: expected an integer {rng}, got {v}")
    return v


def check_float(node, key, v, lo, lo_incl, hi, hi_incl):
    """``float(v)`` if it is a finite number within the bounds, else a ConfigError."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise node.error(key, f"expected a number, got {kind_of(v)} {v!r}")
    v = float(v)
    bad = v != v or v in (float("inf"), float("-inf"))
    bad |= lo is not None and (v < lo or (v == lo and not lo_incl))
    bad |= hi is not None and (v > hi or (v == hi and not hi_incl))
    if bad:
        parts = []
        if lo is not None:
            parts.append(f"{'>=' if lo_incl else '>'} {lo:g}")
        if hi is not None:
            parts.append(f"{'<=' if hi_incl else '<'} {hi:g}")
        raise node.error(key, f"expected a finite number {' and '.join(parts)}, got {v!r}")
    return v


def resolve(p, base=None):
    """``p`` after ``~`` and ``$VAR`` expansion, made absolute against the folder ``base``
    (None: the working directory)."""
    p = os.path.expandvars(os.path.expanduser(p))
    return os.path.abspath(os.path.join(base, p) if base is not None else p)


def config_folder(source):
    """The folder of the config file ``source`` names; None when it names no file (a dict,
    a string, the config stored in a checkpoint)."""
    return os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else None
