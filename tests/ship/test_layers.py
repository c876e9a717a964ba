"""The dependency rules of docs/architecture.md#2-dependency-rules, read from the source: which of
our packages each package may import (at module level or inside a function), and that the
torch-free floors (common, core, app) stay torch-free when imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, module_imports

OURS = {"common", "core", "app", "models", "workers", "cli"}
# Which other packages of ours each one may import (a package may always import itself). The
# arrows only point down: common is the floor, core and models stand on it side by side (the API
# never reaches the torch engine), workers join core to models, cli may use anything.
ALLOWED = {
    "common": set(),
    "core": {"common"},
    "app": {"core", "common"},
    "models": {"common"},
    "workers": {"core", "models", "common"},
    "cli": OURS,
}
# Imported by common, core and app (any module of theirs): never.
TORCH = ("torch", "torchvision", "timm")


def imports_of(package: str) -> list[tuple[str, str]]:
    """(file, imported module without its `spkd.`) for every import of one of our packages under
    `package/`."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for _, name in module_imports(path):
            # spkd.<package>...: checked as <package>...; a bare <package> import is another
            # copy of the module (test_namespace.py fails it), so it is checked here too.
            parts = name.split(".")
            if parts[0] == "spkd" and len(parts) > 1:
                parts = parts[1:]
            if parts[0] in OURS:
                found.append((str(path.relative_to(ROOT)), ".".join(parts)))
    return found


def test_every_package_of_ours_has_a_rule() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "spkd"}
    assert packages == OURS == set(ALLOWED), "a new top-level package needs its row in ALLOWED and the docs"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package: str) -> None:
    may = ALLOWED[package] | {package}
    bad = [f"{file}: {name}" for file, name in imports_of(package) if name.split(".")[0] not in may]
    assert bad == [], f"{package}/ may import only {sorted(may)} of ours: {bad}"


# A fresh interpreter imports every module of the package (walking its folders), then lists what
# of TORCH got loaded: a module-level import anywhere below would show here.
IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
names = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": [m for m in sys.argv[2:] if m in sys.modules]}))
"""


@pytest.mark.parametrize("package", ["common", "core", "app"])
def test_torch_free_floors_never_import_torch(package: str) -> None:
    res = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, f"spkd.{package}", *TORCH],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.splitlines()[-1])
    assert len(out["modules"]) >= 3, out  # the walk found the package's modules
    assert out["loaded"] == [], f"importing every module of {package}/ loaded {out['loaded']}"
