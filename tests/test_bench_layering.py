"""Benchmarks sit on top of the trainer: nothing outside ``hpctrain.bench`` imports them."""
import ast
import pathlib

import hpctrain

PKG = pathlib.Path(hpctrain.__file__).parent


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_nothing_outside_bench_imports_bench():
    offenders = [f"{p.relative_to(PKG.parent)} imports {name}"
                 for p in sorted(PKG.rglob("*.py")) if "bench" not in p.relative_to(PKG).parts
                 for name in _imports(p) if name.split(".")[:2] == ["hpctrain", "bench"]]
    assert not offenders, "\n".join(offenders)


def test_moved_helpers():
    from hpctrain.bench import common
    from hpctrain.memory import peak_rss_bytes
    from hpctrain.versions import versions
    assert peak_rss_bytes() > 0
    v = versions()
    assert v["hpctrain"] == hpctrain.__version__ and v["threads"] >= 1
    assert common.versions is versions
