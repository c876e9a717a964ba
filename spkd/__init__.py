"""spkd: distil a pretrained ImageNet teacher into a small student with Similarity-Preserving KD.

All of spkd's code lives in this one namespace, so installing spkd claims no generic top-level
name (a project may have its own `models` or `common`): `spkd.common` (the torch-free floor),
`spkd.core`, `spkd.app` (the API), `spkd.workers`, `spkd.models` (the torch engine) and `spkd.cli`
(the `spkd` command). A wheel holds them under spkd/ (setup.py maps each to its folder); a source
checkout keeps them as the repository's top-level folders, and this package's path then also covers
the repository root, so `spkd.app` is `app/` (docs/development.md, "One namespace: spkd").
"""

import sys
from pathlib import Path

# spkd's packages, from the floor up (docs/architecture.md#2-dependency-rules).
LAYERS = ("common", "core", "app", "workers", "models", "cli")

_here = Path(__file__).resolve().parent
_checkout = _here.parent
# A source checkout or an editable install: the layers are this folder's siblings, not inside it.
if not (_here / "common").is_dir() and all((_checkout / name / "__init__.py").is_file() for name in LAYERS):
    sys.modules[__name__].__path__.append(str(_checkout))
