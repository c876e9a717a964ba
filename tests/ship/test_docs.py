"""The repository's references lead somewhere: the code and docs cite docs/architecture.md (by an
anchor that exists), never a design file outside the repository or the tracker's issue numbers."""

from __future__ import annotations

import re
import subprocess

from tests.helpers import ROOT

TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".yml", ".yaml", ".js", ".html", ".css", ".example"}
ARCH = ROOT / "docs" / "architecture.md"


def tracked_text_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if any(f.endswith(s) for s in TEXT_SUFFIXES) and (ROOT / f).is_file()]


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_no_reference_to_files_or_tickets_outside_the_repository() -> None:
    this = "tests/ship/test_docs.py"
    bad = []
    for name in tracked_text_files():
        if name == this:
            continue
        for n, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1):
            if "DESIGN.md" in line or re.search(r"\b(issue|ticket) #?\d+\b", line, re.IGNORECASE):
                bad.append(f"{name}:{n}: {line.strip()[:100]}")
    assert bad == [], "cite docs/architecture.md instead:\n" + "\n".join(bad)


def test_architecture_anchors_cited_exist() -> None:
    anchors = {github_anchor(m) for m in re.findall(r"^#+ (.+)$", ARCH.read_text(), re.MULTILINE)}
    assert "6-workers-and-gpus" in anchors and "an-endpoint" in anchors  # the slug rule itself
    cited = []
    for name in tracked_text_files():
        for anchor in re.findall(r"docs/architecture\.md#([A-Za-z0-9_-]+)", (ROOT / name).read_text()):
            if anchor not in anchors:
                cited.append(f"{name}: #{anchor}")
    assert cited == [], f"anchors that docs/architecture.md does not have: {cited}"
