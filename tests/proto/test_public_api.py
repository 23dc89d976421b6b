"""The public surface: the core stays pure, and each package's `__all__` is its exports."""

from __future__ import annotations
import __future__

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("trio", "quart", "quart_trio", "hypercorn", "asyncio", "socket", "h11", "h2")
ALLOWED_THIRD_PARTY = {"attr", "attrs", "mesh_proto"}

PROBE = """
import sys
before = set(sys.modules)
import mesh_proto
loaded = sorted({name.split(".")[0] for name in set(sys.modules) - before})
print(" ".join(loaded))
print(" ".join(name for name in sys.argv[1:] if name in sys.modules))
"""


def test_importing_the_core_loads_no_io_framework() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *FORBIDDEN],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded, forbidden = result.stdout.split("\n")[:2]
    assert forbidden == "", f"importing mesh_proto loaded {forbidden}"
    outside = set(loaded.split()) - set(sys.stdlib_module_names) - ALLOWED_THIRD_PARTY
    assert not outside, f"mesh_proto imports beyond the stdlib and attrs: {sorted(outside)}"


def public_names(package: ModuleType) -> set[str]:
    """What the package's `__init__` defines or imports under a public name (not modules)."""
    return {
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and not isinstance(value, ModuleType | __future__._Feature)
    }


@pytest.mark.parametrize("name", ["mesh_proto", "mesh_trio", "mesh_compat"])
def test_all_lists_exactly_the_public_names(name: str) -> None:
    package = importlib.import_module(name)
    exported = getattr(package, "__all__", None)
    if exported is None:
        if name == "mesh_proto":
            pytest.fail("mesh_proto must define __all__")
        pytest.skip(f"{name} defines no __all__ yet")
    assert len(exported) == len(set(exported)), "no duplicates in __all__"
    submodules = {n for n in exported if isinstance(getattr(package, n, None), ModuleType)}
    assert set(exported) - submodules == public_names(package)
    namespace: dict[str, object] = {}
    exec(f"from {name} import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(exported)


def test_the_core_exports_only_its_own_objects() -> None:
    import mesh_proto

    for name in mesh_proto.__all__:
        value = getattr(mesh_proto, name)
        module = getattr(value, "__module__", None)
        assert module is None or module.startswith(("mesh_proto", "typing", "types", "builtins")), (
            name,
            module,
        )
