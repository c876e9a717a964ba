"""The repository's references lead somewhere: the code and docs cite docs/architecture.md (by an
anchor that exists), never a design file outside the repository or the tracker's issue numbers, and
every relative link of README.md and docs/*.md names a file (and heading) that exists."""

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


def headings(text: str) -> list[str]:
    """The Markdown headings of a page, outside fenced code blocks (where `#` starts a comment)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)$", line)):
            out.append(m.group(1))
    return out


def relative_links(text: str) -> list[str]:
    """The targets of `[text](target)` links outside fenced code, less URLs with a scheme."""
    prose, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            prose.append(line)
    targets = re.findall(r"\]\(([^)\s]+)\)", "\n".join(prose))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_relative_links_in_readme_and_docs_lead_somewhere() -> None:
    """Every relative link of README.md and docs/*.md names a file that exists and, with `#anchor`
    into a Markdown file, a heading it has (GitHub's slug)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5
    broken, checked = [], 0
    for page in pages:
        for target in relative_links(page.read_text()):
            checked += 1
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif (
                anchor
                and dest.suffix == ".md"
                and anchor not in {github_anchor(h) for h in headings(dest.read_text())}
            ):
                broken.append(f"{where} (no such heading)")
    assert checked > 20
    assert broken == [], "broken links:\n" + "\n".join(broken)
