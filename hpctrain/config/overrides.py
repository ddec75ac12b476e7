"""Command-line overrides (``--set key=value``) and the TOML text that records them.

A key is a path of table keys and array indices: ``steps``, ``dense_optimizer.lr``,
``tables[1].dim``, ``data.train.paths``. A value is a TOML value (``300``, ``0.01``,
``true``, ``[1, 2]``, ``"adam"``); anything that does not parse as one is a string
(``--set dense_optimizer.kind=adam``). Overrides apply to the parsed file before
validation, so a wrong one gets the same error naming the key as a wrong file.

The run's saved config (``Config.text``, kept in every checkpoint) is the file with the
overrides applied, written back as TOML by ``dumps``, so a resumed or exported run
sees what was trained.
"""
import copy
import math
import re

from hpctrain.errors import ConfigError

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*)((?:\[\d+\])*)$")


def parse_override(item):
    """``"a.b[2].c=value"`` -> (["a", "b", 2, "c"], value)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE (for example steps=300)")
    path = []
    for part in key.split("."):
        m = _PART.match(part)
        if not m:
            raise ConfigError(f"--set {item!r}: {part!r} is not a key (letters, digits, _ "
                              f"and -, then optional [index])")
        path.append(m.group(1))
        path.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(d, items, source="<config>"):
    """A deep copy of config dict ``d`` with every ``KEY=VALUE`` of ``items`` set."""
    out = copy.deepcopy(d)
    for item in items:
        path, value = parse_override(item)
        node = out
        for i, k in enumerate(path[:-1]):
            name = ".".join(str(p) for p in path[:i + 1])
            if isinstance(k, int):
                if not isinstance(node, list) or k >= len(node):
                    raise ConfigError(f"{source}: --set {item}: {name}: no such array element")
                node = node[k]
            else:
                if not isinstance(node, dict):
                    raise ConfigError(f"{source}: --set {item}: {name}: not a table")
                node = node.setdefault(k, {})
        last = path[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise ConfigError(f"{source}: --set {item}: no such array element")
        elif not isinstance(node, dict):
            raise ConfigError(f"{source}: --set {item}: the parent of {last!r} is not a table")
        node[last] = value
    return out


def dumps(d):
    """TOML text of a config dict (tables, arrays of tables, scalars, arrays)."""
    lines = []
    _table(d, [], lines)
    return "\n".join(lines).strip() + "\n"


def _table(d, prefix, lines):
    scalars = {k: v for k, v in d.items() if not _is_table(v) and not _is_table_array(v)}
    for k, v in scalars.items():
        lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in d.items():
        if _is_table(v):
            lines += ["", f"[{'.'.join(_key(p) for p in prefix + [k])}]"]
            _table(v, prefix + [k], lines)
        elif _is_table_array(v):
            for item in v:
                lines += ["", f"[[{'.'.join(_key(p) for p in prefix + [k])}]]"]
                _table(item, prefix + [k], lines)


def _is_table(v):
    return isinstance(v, dict)


def _is_table_array(v):
    return isinstance(v, list) and v and all(isinstance(x, dict) for x in v)


def _key(k):
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _string(k)


def _string(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")
