"""No module of the service's packages grows past MAX_LINES: a module that long holds more than one
concern, and is split along its seams (docs/architecture.md#1-the-picture says where things go).
common/ is not checked: its scanner (common/scan.py) is one concern, kept whole on purpose."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import ROOT

MAX_LINES = 500
CHECKED = ("app", "core", "models", "workers", "cli")


def oversized(root: Path, packages: tuple[str, ...] = CHECKED, limit: int = MAX_LINES) -> list[str]:
    """'path: N lines' for every .py file under root/<package>/ (any depth) longer than `limit`."""
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            n = len(path.read_text(errors="replace").splitlines())
            if n > limit:
                found.append(f"{path.relative_to(root).as_posix()}: {n} lines")
    return found


def test_no_module_over_the_limit() -> None:
    assert all((ROOT / p).is_dir() for p in CHECKED), CHECKED
    bad = oversized(ROOT)
    assert bad == [], f"modules over {MAX_LINES} lines, split them along their seams: {bad}"


def test_the_check_sees_nested_modules_and_skips_other_folders(tmp_path: Path) -> None:
    (tmp_path / "core" / "store").mkdir(parents=True)
    (tmp_path / "common").mkdir()
    (tmp_path / "core" / "store" / "jobs.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (tmp_path / "core" / "keys.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "common" / "scan.py").write_text("x = 1\n" * (MAX_LINES * 2))
    assert oversized(tmp_path) == [f"core/store/jobs.py: {MAX_LINES + 1} lines"]
