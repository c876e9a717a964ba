"""The dependency rules of docs/architecture.md#2-dependency-rules, read from the source: which of
our packages each package may import (at module level or inside a function)."""

from __future__ import annotations

import ast

import pytest

from tests.helpers import ROOT

OURS = {"app", "core", "workers", "models", "cli"}
TORCH_FREE_MODELS = {"models", "models.spec", "models.callbacks", "models.errors", "models.scan"}
ALLOWED = {
    "app": {"app", "core"},
    "core": {"core"},
    "workers": {"workers", "core", "models"},
    "models": {"models"},
}


def imports_of(package: str) -> list[tuple[str, str]]:
    """(file, imported module) for every import of one of our packages under `package/`."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] in OURS:
                    found.append((str(path.relative_to(ROOT)), name))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package: str) -> None:
    bad = []
    for file, name in imports_of(package):
        top = name.split(".")[0]
        if top in ALLOWED[package]:
            continue
        # app and core may use the torch-free part of models (the spec, errors, callbacks, scanner)
        if package in ("app", "core") and top == "models":
            parts = name.split(".")
            if ".".join(parts[:2]) in TORCH_FREE_MODELS or name in TORCH_FREE_MODELS:
                continue
        bad.append(f"{file}: {name}")
    assert bad == [], f"{package}/ may import only {sorted(ALLOWED[package])}: {bad}"
