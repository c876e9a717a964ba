"""Attempt folders (core/attempts.py) on real files: what a new attempt takes from the one before,
that no late write of a stale attempt reaches a file another attempt reads, and the layout written
before attempt folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from spkd.core import attempts


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _replace(path: Path, data: bytes) -> None:
    """How every checkpoint and result is written: a new file renamed over the name."""
    tmp = path.with_name(f".{path.name}.tmp-x")
    tmp.write_bytes(data)
    tmp.replace(path)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_new_attempt_starts_from_the_newest_checkpoint_and_shares_nothing_writable(tmp_path: Path) -> None:
    job = tmp_path / "job"
    one = job / attempts.name(1)
    _write(one / "checkpoints" / "last.pt", b"state-1")
    _write(one / "checkpoints" / "teacher.safetensors", b"teacher-1")
    _write(one / "checkpoints" / ".last.pt.abc", b"half-written")
    _write(one / "teacher" / "model.safetensors", b"published teacher")
    _write(one / "student.onnx.tmp", b"export in flight")
    _write(one / "tensorboard" / "distill" / "events.out.tfevents.1", b"tb-1")
    _write(job / attempts.name(5) / "tensorboard" / "x", b"no checkpoint: not a source")

    own, adopted = attempts.open_attempt(job, 7)
    assert (own, adopted) == (job / "attempt-00000007", 1)
    assert _tree(own) == {
        "checkpoints/last.pt": b"state-1",
        "checkpoints/teacher.safetensors": b"teacher-1",
        "teacher/model.safetensors": b"published teacher",
        "tensorboard/distill/events.out.tfevents.1": b"tb-1",
    }
    mine = _tree(own)

    # Attempt 1 thaws and writes late, the ways it writes: renames over its names, appends to its
    # TensorBoard file. None of it reaches attempt 7's files.
    _replace(one / "checkpoints" / "last.pt", b"stale state")
    _replace(one / "teacher" / "model.safetensors", b"stale teacher")
    with (one / "tensorboard" / "distill" / "events.out.tfevents.1").open("ab") as f:
        f.write(b"stale scalars")
    _write(one / "student" / "model.safetensors", b"stale student")
    assert _tree(own) == mine

    # Opening an attempt that has its own checkpoint changes nothing; a later one starts from 7.
    assert attempts.open_attempt(job, 7) == (own, None)
    _replace(own / "checkpoints" / "last.pt", b"state-7")
    later, adopted = attempts.open_attempt(job, 9)
    assert adopted == 7 and (later / "checkpoints" / "last.pt").read_bytes() == b"state-7"


def test_the_layout_before_attempt_folders_still_resumes(tmp_path: Path) -> None:
    job = tmp_path / "job"
    _write(job / "checkpoints" / "attempt-00000003" / "last.pt", b"old state")
    _write(job / "checkpoints" / "attempt-00000003" / "baseline.safetensors", b"old baseline")
    _write(job / "tensorboard" / "baseline" / "events", b"old tb")
    _write(job / "student.safetensors", b"old published student")
    assert [e.number for e in attempts.earlier_checkpoints(job, 10)] == [3]
    own, adopted = attempts.open_attempt(job, 4)
    assert adopted == 3
    assert _tree(own) == {
        "checkpoints/last.pt": b"old state",
        "checkpoints/baseline.safetensors": b"old baseline",
        "tensorboard/baseline/events": b"old tb",
        "student.safetensors": b"old published student",
    }
    assert attempts.earlier_checkpoints(job, 3) == []  # only attempts below the one asking


def test_after_success_only_the_current_folder_is_left(tmp_path: Path) -> None:
    job = tmp_path / "job"
    _write(job / "checkpoints" / "attempt-00000001" / "last.pt", b"old layout")
    _write(job / "metrics.json", b"old layout result")
    _write(job / attempts.name(2) / "student.onnx", b"stale")
    _write(job / attempts.name(3) / "student.onnx", b"current")
    _write(job / attempts.name(3) / "checkpoints" / "last.pt", b"resume state")
    attempts.remove_others(job, keep=attempts.name(3))
    assert _tree(job) == {"attempt-00000003/student.onnx": b"current"}


def test_output_dir_is_the_recorded_attempt_or_the_old_job_folder(tmp_path: Path) -> None:
    assert attempts.output_dir(tmp_path, None) == tmp_path
    assert attempts.output_dir(tmp_path, "attempt-00000012") == tmp_path / "attempt-00000012"
    for bad in ("../other", "attempt-1/../../x", "checkpoints", "/etc"):
        with pytest.raises(ValueError):
            attempts.output_dir(tmp_path, bad)
