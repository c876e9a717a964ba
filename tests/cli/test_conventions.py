"""The command line's conventions, on real `spkd` processes against a real API and Redis: -h and
--version everywhere, --json on the commands that read, exit codes that tell a usage error, a
missing resource, a refused key, a refused state and a server in trouble apart (cli.client.ExitCode,
README: the command line), and `spkd download JOB student` for a whole model folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spkd.cli.client import ExitCode
from spkd.cli.main import app
from spkd.common.files import manifest
from spkd.core import store
from tests.helpers import KEY_A, ROOT, PrivateRedis, Stack, make_stack, running, tiny_spec

SPKD = [sys.executable, "-m", "spkd.cli.main"]
# Every command and group, for the help checks.
COMMANDS = [
    [], ["run"], ["serve"], ["worker"], ["submit"], ["status"], ["events"], ["cancel"], ["pause"],
    ["resume"], ["delete"], ["download"], ["demo"], ["datasets"], ["datasets", "upload"],
    ["datasets", "list"], ["datasets", "delete"], ["predict"],
]  # fmt: skip


class Ran:
    """A command's outcome: exit status and its two streams."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def __repr__(self) -> str:
        return f"exit {self.returncode}\n{self.stdout}\n{self.stderr}"


def spkd(*args: str, url: str = "http://127.0.0.1:1", key: str = KEY_A, process: bool = False) -> Ran:
    """Run `spkd args` against `url`: in-process through click's runner (a process per call cost
    3 s of imports), or, with `process`, as a real process whose exit status the OS reports."""
    env = {"SPKD_URL": url, "SPKD_API_KEY": key, "COLUMNS": "100"}
    if process:
        res = subprocess.run(
            [*SPKD, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
        )
        return Ran(res.returncode, res.stdout, res.stderr)
    out = CliRunner().invoke(app, list(args), env=env, prog_name="spkd")
    return Ran(out.exit_code, out.stdout, out.stderr)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    st = make_stack(tmp_path_factory.mktemp("conventions"), redis_url)
    with running(st):
        st.start_api()
        st.wait_api()
        yield st


@pytest.fixture(scope="module")
def finished_job(api: Stack) -> str:
    """A succeeded job whose artifacts are real files (a student folder and a metrics file), made
    through the store as a worker would register them (no training needed for the CLI's side)."""
    s = api.settings
    r, keys = store.connect(s.redis_url), store.Keys(s.redis_prefix)
    job_id = store.create_job(r, keys, store.owner_of(KEY_A), tiny_spec({"path": "x"}))["id"]
    store.transition(r, keys, job_id, store.RUNNING, [store.QUEUED])
    out = s.artifact_root / job_id
    (out / "student").mkdir(parents=True)
    (out / "student" / "config.json").write_text('{"num_classes": 2}')
    (out / "student" / "model.safetensors").write_bytes(os.urandom(4096))
    (out / "student" / "README.md").write_text("# a student\n")
    (out / "metrics.json").write_text('{"gain": 0.01}')
    store.transition(r, keys, job_id, store.SUCCEEDED, [store.RUNNING], artifacts=manifest(out))
    return job_id


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "spkd")
def test_dash_h_is_help_without_rendering_artefacts(args: list[str]) -> None:
    # In-process (click's runner): a process per command cost 3 s each for the same text.
    runner = CliRunner()
    res, long = runner.invoke(app, [*args, "-h"], prog_name="spkd"), runner.invoke(app, [*args, "--help"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("Usage: spkd"), res.stdout
    assert "<bool>" not in res.stdout, res.stdout  # a flag takes no value
    # Arguments by what they are (typer writes a required one as {SPEC}), not by Python names.
    assert not re.search(r"[{\[][a-z_]+[}\]]", res.stdout.splitlines()[0]), res.stdout
    assert "│" not in res.stdout, "rich boxes: help must read as plain text"
    assert long.exit_code == 0 and long.stdout.split("\n", 1)[1] == res.stdout.split("\n", 1)[1]


def test_version_is_the_installed_packages() -> None:
    for flag in ("--version", "-V"):
        res = spkd(flag, process=flag == "-V")
        assert res.returncode == 0 and res.stdout.strip() == f"spkd {version('spkd')}", res


def test_exit_codes_tell_the_kinds_of_failure_apart(api: Stack, finished_job: str) -> None:
    url = api.url
    assert spkd("status", finished_job, url=url).returncode == ExitCode.OK
    assert spkd("status", "--limit", "many", url=url).returncode == ExitCode.USAGE  # click's own
    assert spkd("frobnicate", url=url).returncode == ExitCode.USAGE
    missing = spkd("status", "job_nope", url=url, process=True)
    assert missing.returncode == ExitCode.NOT_FOUND and "404 job_not_found" in missing.stderr, missing.stderr
    assert spkd("datasets", "delete", "ds_nope", url=url).returncode == ExitCode.NOT_FOUND
    wrong = spkd("status", url=url, key="w" * 40)
    assert wrong.returncode == ExitCode.AUTH and "401" in wrong.stderr, wrong.stderr
    assert spkd("status", url=url, key="").returncode == ExitCode.AUTH
    bad_spec = api.log_dir / "bad.yaml"
    bad_spec.write_text(
        "teacher: {model: test_resnet}\nstudent: {model: test_resnet}\n"
        "dataset: {path: x}\ntrain: {epochs: -1}\n"
    )
    refused = spkd("submit", str(bad_spec), url=url)
    assert refused.returncode == ExitCode.USAGE and "train.epochs" in refused.stderr, refused.stderr
    done = spkd("cancel", finished_job, url=url)
    assert done.returncode == ExitCode.NOT_DONE and "409 job_finished" in done.stderr, done.stderr
    gone = spkd("status", url="http://127.0.0.1:1", process=True)
    assert gone.returncode == ExitCode.SERVER and "cannot reach the spkd API" in gone.stderr, gone.stderr


def test_an_api_without_its_store_exits_server(private_redis: PrivateRedis, stack_factory) -> None:
    st: Stack = stack_factory(private_redis.url)
    st.start_api()
    st.wait_api()
    private_redis.kill()
    res = spkd("status", url=st.url)
    assert res.returncode == ExitCode.SERVER and "503" in res.stderr, res.stderr


def test_json_on_the_commands_that_read(api: Stack, finished_job: str, tmp_path: Path) -> None:
    one = spkd("status", finished_job, "--json", url=api.url)
    assert json.loads(one.stdout)["id"] == finished_job, one
    listed = spkd("status", "--json", url=api.url)
    assert finished_job in [j["id"] for j in json.loads(listed.stdout)["data"]], listed
    datasets = spkd("datasets", "list", "--json", url=api.url)
    assert json.loads(datasets.stdout)["data"] == [], datasets
    events = spkd("events", finished_job, url=api.url)
    assert [json.loads(line)["kind"] for line in events.stdout.splitlines()][:1] == ["status"], events
    dl = spkd("download", finished_job, "metrics.json", "--json", "-o", str(tmp_path), url=api.url)
    written = json.loads(dl.stdout)
    assert [w["name"] for w in written] == ["metrics.json"], written
    assert Path(written[0]["path"]).read_text() == '{"gain": 0.01}'


def test_download_a_model_folder_by_its_name(api: Stack, finished_job: str, tmp_path: Path) -> None:
    res = spkd("download", finished_job, "student", "-o", str(tmp_path), url=api.url)
    assert res.returncode == 0, res.stderr
    got = sorted(
        p.relative_to(tmp_path / finished_job).as_posix()
        for p in (tmp_path / finished_job).rglob("*")
        if p.is_file()
    )
    assert got == ["student/README.md", "student/config.json", "student/model.safetensors"], got
    src = api.settings.artifact_root / finished_job / "student" / "model.safetensors"
    assert (tmp_path / finished_job / "student" / "model.safetensors").read_bytes() == src.read_bytes()
    nope = spkd("download", finished_job, "studnet", "-o", str(tmp_path / "x"), url=api.url)
    assert nope.returncode == ExitCode.NOT_FOUND, nope.stderr
    assert "no artifact or folder named studnet" in nope.stderr and "folders: student" in nope.stderr, (
        nope.stderr
    )
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").rglob("*")), (
        "a refused download wrote files"
    )


def test_download_a_model_of_a_job_in_the_old_layout(api: Stack, tmp_path: Path) -> None:
    """A job exported before the model folders were the one format has only flat copies:
    `spkd download JOB student` fetches `student.safetensors` and `student.json` (common/artifacts.py)."""
    s = api.settings
    r, keys = store.connect(s.redis_url), store.Keys(s.redis_prefix)
    job_id = store.create_job(r, keys, store.owner_of(KEY_A), tiny_spec({"path": "x"}))["id"]
    store.transition(r, keys, job_id, store.RUNNING, [store.QUEUED])
    out = s.artifact_root / job_id
    out.mkdir(parents=True)
    (out / "student.safetensors").write_bytes(os.urandom(2048))
    (out / "student.json").write_text('{"class_names": ["a", "b"]}')
    (out / "teacher.safetensors").write_bytes(os.urandom(1024))
    store.transition(r, keys, job_id, store.SUCCEEDED, [store.RUNNING], artifacts=manifest(out))
    res = spkd("download", job_id, "student", "-o", str(tmp_path), url=api.url)
    assert res.returncode == 0, res.stderr
    got = sorted(p.name for p in (tmp_path / job_id).rglob("*") if p.is_file())
    assert got == ["student.json", "student.safetensors"], got
    want = (out / "student.safetensors").read_bytes()
    assert (tmp_path / job_id / "student.safetensors").read_bytes() == want
