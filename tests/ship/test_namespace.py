"""Installing spkd claims one top-level name, `spkd` (docs/development.md, "One namespace: spkd"):
the wheel holds spkd/app, spkd/models, ... and no top-level app/ or models/, a fresh virtualenv with
it installed imports and uses spkd from a project that has its own `models`, `common` and `core`
packages, and the `spkd` command still runs. A source checkout resolves spkd.<layer> to its own
folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from spkd import LAYERS
from tests.helpers import ROOT, module_imports

# Where our Python lives: a bare `import app` from any of them would load a second copy of a module.
SOURCES = (*LAYERS, "tests", "bench", "scripts", "docker", "examples")


def bare_imports(path: Path) -> list[str]:
    """The imports of a bare layer name (`app`, `models.pipeline`) in one Python file."""
    rel = path.relative_to(ROOT)
    return [f"{rel}:{line}: {name}" for line, name in module_imports(path) if name.split(".")[0] in LAYERS]


def test_our_code_imports_itself_through_spkd() -> None:
    files = [p for folder in SOURCES for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 100
    bad = [hit for path in files for hit in bare_imports(path)]
    assert bad == [], f"{len(bad)} imports not through spkd (write from spkd.core import store): {bad[:20]}"


def test_a_source_checkout_resolves_spkd_to_its_own_folders(tmp_path: Path) -> None:
    code = "import spkd.app, spkd.models, spkd.cli.main; print(spkd.app.__file__, spkd.models.__file__)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() and str(ROOT / "app" / "__init__.py") in res.stdout
    assert str(ROOT / "models" / "__init__.py") in res.stdout


# What a build needs, as the images' build context has it (.dockerignore): no .venv, no caches.
PACKAGE_FILES = ("pyproject.toml", "setup.py", "README.md", "spkd", *LAYERS)


def clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH: nothing of the checkout on the path."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """spkd's wheel, built offline (setuptools from .venv) from a copy of the checkout's package
    files, so the build leaves no build/ or egg-info in the checkout."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in PACKAGE_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    res = subprocess.run([*pip, "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (found,) = out.glob("spkd-*.whl")
    return found


def test_the_wheel_holds_only_the_spkd_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"spkd"}, sorted(tops)
    # Every package folder of the checkout is in it, under spkd/.
    packages = {
        str(p.parent.relative_to(ROOT)) for layer in LAYERS for p in (ROOT / layer).rglob("__init__.py")
    }
    missing = [p for p in sorted(packages) if f"spkd/{p}/__init__.py" not in names]
    assert len(packages) >= 10 and missing == [], missing
    assert "spkd/__init__.py" in names and "spkd/models/pipeline.py" in names
    # Package data: the dashboard and the API's data files.
    for folder in ("app/static", "app/data"):
        files = [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, folder
        absent = [str(p.relative_to(ROOT)) for p in files if f"spkd/{p.relative_to(ROOT)}" not in names]
        assert absent == [], absent
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "spkd = spkd.cli.main:app" in zipfile.ZipFile(wheel).read(entry_points).decode()


# Run in the user's project: its own models/common/core first on sys.path (the current folder).
USER_CODE = r"""
import json, sys
import common, core, models
from models.decode import load_rgb as own
assert own() == "the project's own" and common.MINE and core.MINE
import numpy as np
from spkd.common.decode import load_rgb
from spkd.common.preprocess import EvalConfig, eval_batch
import spkd, spkd.models.pipeline  # the engine resolves spkd.models, not the project's models

image = load_rgb(sys.argv[1])
batch = eval_batch([image], EvalConfig(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0))
print(json.dumps({"shape": list(np.asarray(batch).shape), "spkd": spkd.__file__,
                  "models": models.__file__, "engine": spkd.models.pipeline.__file__}))
"""


def install_into_fresh_venv(wheel: Path, venv: Path) -> Path:
    """A new virtualenv with the wheel installed (pip from .venv, offline, no dependencies) and this
    environment's packages (torch, fastapi, ...) visible instead of reinstalled; its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index"]
    res = subprocess.run([*pip, str(wheel)], env=clean_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.check_output([python, "-c", purelib], env=clean_env(), text=True).strip())
    # This environment's site-packages as a plain path entry: its .pth files (the editable finder of
    # the checkout's own install among them) are not run, so only the wheel provides spkd.
    (site / "zz_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return site


def test_an_installed_wheel_works_next_to_a_project_with_its_own_models(wheel: Path, tmp_path: Path) -> None:
    site = install_into_fresh_venv(wheel, tmp_path / "venv")
    assert (site / "spkd" / "models" / "pipeline.py").is_file() and not (site / "models").exists()
    project = tmp_path / "project"
    for name in ("models", "common", "core"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text("MINE = True\n")
    (project / "models" / "decode.py").write_text('def load_rgb():\n    return "the project\'s own"\n')
    Image.new("RGB", (40, 30), "red").save(project / "a.png")

    python = tmp_path / "venv" / "bin" / "python"
    run = {"cwd": project, "env": clean_env(), "capture_output": True, "text": True, "timeout": 300}
    res = subprocess.run([python, "-c", USER_CODE, "a.png"], **run)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["shape"] == [1, 3, 32, 32]
    assert out["spkd"] == str(site / "spkd" / "__init__.py")
    assert out["engine"] == str(site / "spkd" / "models" / "pipeline.py")
    assert out["models"] == str(project / "models" / "__init__.py")

    version = subprocess.run([tmp_path / "venv" / "bin" / "spkd", "--version"], **run)
    assert version.returncode == 0, version.stderr[-3000:]
    assert version.stdout.strip() == "spkd 0.1.0"
