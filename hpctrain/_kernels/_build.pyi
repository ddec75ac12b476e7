"""Type stubs of hpctrain._kernels._build (kernels/_build.pyx)."""

FLAGS: str
ISA: tuple[str, ...]

def cpu_has(name: str) -> bool | None: ...
def missing() -> list[str]: ...
