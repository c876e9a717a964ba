"""The example job specs under examples/ are valid JobSpecs that name data that exists, and the
README's `spkd run` line names one of them (no training here: that is the demo's and the engine's
tests' job)."""

from __future__ import annotations

import re

import pytest

from spkd.common.spec import JobSpec
from tests.helpers import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_there_is_an_example_and_the_readme_runs_it() -> None:
    assert ROOT / "examples" / "hymenoptera.yaml" in EXAMPLES
    readme = (ROOT / "README.md").read_text()
    runs = re.findall(r"^(?:\.venv/bin/)?spkd run (\S+)", readme, re.MULTILINE)
    assert runs and all((ROOT / r).is_file() for r in runs), runs
    assert "examples/hymenoptera.yaml" in runs


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_and_names_data_that_exists(path) -> None:
    spec = JobSpec.from_yaml(path)
    assert spec.dataset.path is not None, "an example runs with `spkd run`: it names a folder"
    # `spkd run` tries dataset.path as given (from the repository root, where the README runs it),
    # then next to the YAML file (cli/local.py resolve_dataset).
    found = [d for d in (ROOT / spec.dataset.path, path.parent / spec.dataset.path) if d.is_dir()]
    assert found, f"{path.name}: dataset.path {spec.dataset.path} is no folder"
    data = found[0]
    assert (data / "train").is_dir() and any((data / "train").iterdir())
    # Weights that need no download, so the example runs offline and from a fresh clone.
    assert spec.teacher.weights == "package" and spec.student.weights == "package"
