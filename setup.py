"""Build configuration that pyproject.toml cannot express: one `spkd` namespace in the wheel.

The repository keeps its top-level folders (app/, cli/, common/, core/, models/, workers/); the
wheel installs them as spkd.app, spkd.cli, ... and nothing else at the top level, so installing
spkd never shadows a project's own `models` or `common` (docs/development.md, "One namespace:
spkd"). Subpackages are found at build time: a new folder with an __init__.py needs no entry here.
Everything else (metadata, dependencies, entry point, package data) is in pyproject.toml.
"""

from setuptools import find_packages, setup

# The same tuple as spkd.LAYERS (not imported: a build must not import the package it builds).
LAYERS = ("common", "core", "app", "workers", "models", "cli")


def packages() -> list[str]:
    """spkd and spkd.<every package under the layer folders>, e.g. spkd.core.store."""
    found = find_packages(include=[name for layer in LAYERS for name in (layer, f"{layer}.*")])
    return ["spkd", *(f"spkd.{name}" for name in found)]


setup(packages=packages(), package_dir={"spkd": "spkd", **{f"spkd.{layer}": layer for layer in LAYERS}})
