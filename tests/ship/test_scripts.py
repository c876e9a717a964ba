"""The README's two commands, the scripts behind them, CI, the README's length, and the reference
pages under docs/ that the README links to (configuration, job spec, API, deploy)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def doc(name: str) -> str:
    return (DOCS / name).read_text()


def readme_commands() -> list[str]:
    """The commands of the README's 'Two commands' block."""
    section = README.split("## Two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_opens_with_what_spkd_does_then_the_two_commands():
    head = README.split("## ", 1)[0]
    assert "Similarity-Preserving" in head and "timm" in head
    first_section = README.split("## ", 2)[1]
    assert first_section.startswith("Two commands")
    assert readme_commands() == ["bash scripts/demo.sh", "bash scripts/test.sh"]


def test_readme_commands_exist_and_parse():
    for cmd in readme_commands():
        script = ROOT / cmd.split()[1]
        assert script.is_file(), cmd
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_ci_runs_exactly_the_readme_test_command():
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines in (["bash scripts/test.sh"], ["exec bash scripts/test.sh"])
    assert "bash scripts/test.sh" in readme_commands()


def test_scripts_set_up_with_the_pinned_torch_and_constraints():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in setup
    assert "requirements/constraints.txt" in setup
    for script in ("demo.sh", "test.sh"):
        assert "scripts/setup.sh" in (ROOT / "scripts" / script).read_text()
    pins = (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==\S+", line) for line in pins), "only exact pins"
    assert not any(line.lower().startswith("spkd==") for line in pins)


def test_test_script_excludes_docker_tests_and_handles_no_tests_collected():
    text = (ROOT / "scripts" / "test.sh").read_text()
    assert '-m "not docker"' in text
    assert 'rc" = 5' in text
    assert "ruff check" in text and "ruff format --check" in text


def test_setup_is_idempotent_and_fast_when_up_to_date():
    """A second run of setup.sh must not touch pip (the stamp matches): well under a few seconds."""
    if not (ROOT / ".venv" / ".spkd-setup").exists():
        subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, check=True, capture_output=True)
    res = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "up to date" in res.stderr


def test_readme_is_short_and_links_every_docs_page():
    """A newcomer reads it in five minutes; the reference lives under docs/, each page linked."""
    assert len(README.splitlines()) <= 300
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert {"api.md", "configuration.md", "deploy.md", "job-spec.md", "protocol.md"} <= set(pages)
    assert [p for p in pages if f"](docs/{p}" not in README] == [], "docs pages the README does not link"


def test_configuration_page_documents_every_setting():
    from spkd.core.settings import Settings

    page = doc("configuration.md")
    table = page.split("<!-- SETTINGS-TABLE -->", 1)[1].split("<!-- /SETTINGS-TABLE -->", 1)[0]
    documented = set(re.findall(r"`(SPKD_[A-Z0-9_]+)`", table))
    expected = {f"SPKD_{name.upper()}" for name in Settings.model_fields}
    assert expected - documented == set(), "settings missing from docs/configuration.md"
    assert documented - expected == set(), "docs/configuration.md documents settings that do not exist"


def test_service_settings_are_read_only_through_the_settings_model():
    """An `SPKD_*` variable read straight from the environment by the service's code would be a
    setting the table (and the settings model's validation) misses. The CLI's client-side
    SPKD_URL / SPKD_API_KEY are the client's, not the server's, and are documented with it."""
    read = re.compile(r"""(?:environ\.get|environ\[|getenv)\(?\s*["'](SPKD_[A-Z0-9_]+)""")
    found = []
    for package in ("app", "core", "workers", "models"):
        for path in sorted((ROOT / package).rglob("*.py")):
            found += [f"{path.relative_to(ROOT)}: {name}" for name in read.findall(path.read_text())]
    assert found == [], f"read through spkd.core.settings.Settings instead: {found}"


def test_job_spec_page_documents_every_job_spec_field():
    from pydantic import BaseModel

    from spkd.common.spec import JobSpec

    def paths(model: type[BaseModel], prefix: str = "") -> set[str]:
        out = set()
        for name, field in model.model_fields.items():
            args = getattr(field.annotation, "__args__", (field.annotation,))
            sub = [a for a in args if isinstance(a, type)]
            nested = [a for a in sub if issubclass(a, BaseModel)]
            if nested and nested[0].__name__ != "LayerPair":
                out |= paths(nested[0], f"{prefix}{name}.")
            else:
                out.add(f"{prefix}{name}")
        return out

    spec_section = doc("job-spec.md")
    missing = [p for p in sorted(paths(JobSpec)) if p.rsplit(".", 1)[-1] + ":" not in spec_section]
    assert not missing, f"job spec fields not documented: {missing}"
    assert "`hub`" in spec_section and "`package`" in spec_section and "`job:<job id>`" in spec_section


def test_docs_cover_the_operator_topics():
    api, deploy = doc("api.md"), doc("deploy.md")
    assert api.startswith("# The REST API")
    for heading in ("### Hub models on a host with internet", "### Scaling out"):
        assert heading in deploy
    assert "nvidia-container-toolkit" in deploy and "device_ids" in deploy
    assert api.count("curl ") >= 8
    assert "<!-- load-student -->\n```python\n" in README
    assert "<!-- load-onnx -->\n```python\n" in README


def test_constraints_agree_with_pyproject_pins():
    """Every exact pin of pyproject.toml is in requirements/constraints.txt at the same version."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        deps += extra
    constraints = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        name, version = line.split("==")
        constraints[canonicalize_name(name)] = version
    mismatched = []
    for dep in map(Requirement, deps):
        pins = [s.version for s in dep.specifier if s.operator == "=="]
        # The name without extras: `celery[redis]==5.7.0` pins the celery distribution.
        if pins and constraints.get(canonicalize_name(dep.name)) != pins[0]:
            mismatched.append(str(dep))
    assert not mismatched, f"regenerate requirements/constraints.txt (docs/development.md): {mismatched}"
