"""Attempt folders: every attempt at a job writes only under its own folder, and the job's record
decides which folder is current.

    <artifact root>/<job id>/attempt-<fence>/               everything attempt <fence> writes:
        checkpoints/last.pt, checkpoints/<stage weights>     resume state (models/training/checkpoint.py)
        tensorboard/<stage>/...                              event files (models/results/tracking.py)
        student/, teacher/, *.onnx, metrics.json, ...        results (the export stage)

`<fence>` is the attempt's fencing token (store.Lease.fence), which only grows. A worker that was
frozen past its lease and thaws after another took the job over can still finish a rename or flush
a file that it began before its fencing check, but only inside its own folder: no attempt ever
writes a name another attempt reads. The job record's `output` field (the folder's name, written
with the final status in one fenced transaction, core/store/jobs.py) is what says which files are the
job's artifacts; a stale attempt cannot write that record, so its folder is never current.

A new attempt starts from the newest earlier attempt that has a checkpoint (`open_attempt`): its
checkpoint files and published results are hard-linked (each is replaced by rename, never
rewritten in place, so a late write of the old attempt cannot change a linked file) and its
TensorBoard files copied (event files are appended to, so they must not be shared).

Jobs written before attempt folders keep their files at the top of the job folder (record without
`output`) and their checkpoints in `checkpoints/attempt-<n>/` or `checkpoints/`: they still
download, and still resume.

Torch-free; the worker (workers/runner.py), the API's downloads and the sweep use it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple

PREFIX = "attempt-"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
LAST = "last.pt"
NAME = re.compile(r"^attempt-(\d{8,})$")


def name(fence: int) -> str:
    """The folder name of attempt `fence` (zero-padded so names sort by attempt)."""
    return f"{PREFIX}{fence:08d}"


def number(folder_name: str) -> int | None:
    """The attempt number of an attempt folder's name, else None."""
    m = NAME.match(folder_name)
    return int(m.group(1)) if m else None


def output_dir(job_root: Path, output: str | None) -> Path:
    """Where a job's registered artifacts are: the attempt folder its record names (`output`), or
    the job folder itself for a job stored before attempt folders. Raises ValueError for an
    `output` that is not an attempt folder's name (the record is ours; this guards the path)."""
    if not output:
        return Path(job_root)
    if number(output) is None:
        raise ValueError(f"not an attempt folder: {output!r}")
    return Path(job_root) / output


class Earlier(NamedTuple):
    """An earlier attempt that left a checkpoint: where its files are."""

    number: int
    checkpoints: Path  # holds last.pt and the stages' weight files
    tensorboard: Path
    results: Path  # its published results are the files in here (outside the other two)


def earlier_checkpoints(job_root: Path, before: int) -> list[Earlier]:
    """Every attempt numbered below `before` whose checkpoint folder holds a last.pt, oldest first.
    Includes the layout written before attempt folders: `checkpoints/attempt-<n>/` and
    `checkpoints/` (attempt 0), with `tensorboard/` and the results at the top of the job folder."""
    root = Path(job_root)
    found: list[Earlier] = []
    old = root / CHECKPOINTS
    if (old / LAST).is_file():
        found.append(Earlier(0, old, root / TENSORBOARD, root))
    if old.is_dir():
        for d in old.iterdir():
            n = number(d.name)
            if n is not None and (d / LAST).is_file():
                found.append(Earlier(n, d, root / TENSORBOARD, root))
    if root.is_dir():
        for d in root.iterdir():
            n = number(d.name)
            if n is not None and (d / CHECKPOINTS / LAST).is_file():
                found.append(Earlier(n, d / CHECKPOINTS, d / TENSORBOARD, d))
    return sorted(e for e in found if e.number < before)


def open_attempt(job_root: Path, fence: int) -> tuple[Path, int | None]:
    """Create attempt `fence`'s folder and, unless it has a checkpoint of its own already, give it
    what the newest earlier attempt with a checkpoint left: its checkpoint and its published
    results as hard links (copies where links are impossible), its TensorBoard files as copies.
    last.pt is linked first: a stage's weights and results are published before the last.pt that
    counts the stage as done, so whatever the linked last.pt relies on is there to be linked
    after it. Returns (the folder, the attempt adopted or None)."""
    own = Path(job_root) / name(fence)
    own.mkdir(parents=True, exist_ok=True)
    if (own / CHECKPOINTS / LAST).is_file():
        return own, None
    earlier = earlier_checkpoints(job_root, fence)
    if not earlier:
        return own, None
    source = earlier[-1]
    (own / CHECKPOINTS).mkdir(exist_ok=True)
    _link(source.checkpoints / LAST, own / CHECKPOINTS / LAST)
    _link_tree(source.checkpoints, own / CHECKPOINTS)
    skip = {CHECKPOINTS, TENSORBOARD, own.name}
    for entry in source.results.iterdir():
        if entry.name in skip or number(entry.name) is not None:
            continue
        if entry.is_dir() and not entry.is_symlink():
            _link_tree(entry, own / entry.name)
        elif entry.is_file() and not _temporary(entry.name):
            _link(entry, own / entry.name)
    if source.tensorboard.is_dir() and not (own / TENSORBOARD).exists():
        shutil.copytree(source.tensorboard, own / TENSORBOARD, ignore=shutil.ignore_patterns(".*"))
    return own, source.number


def _temporary(file_name: str) -> bool:
    # atomic_write's ".<name>.<random>", a link in flight, the ONNX export's "<name>.onnx.tmp".
    return file_name.startswith(".") or ".tmp" in file_name


def _link_tree(src: Path, dst: Path) -> None:
    for root, _dirs, files in os.walk(src):
        for file_name in files:
            if not _temporary(file_name):
                path = Path(root) / file_name
                target = dst / path.relative_to(src)
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _link(path, target)


def _link(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except FileNotFoundError:
        return  # removed meanwhile: the stage that wrote it is redone
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def remove_others(job_root: Path, keep: str) -> list[Path]:
    """After the job ended with `keep` as its output: remove everything else in the job folder
    (earlier attempts' folders, a stale attempt's, files of the layout before attempt folders),
    and `keep`'s own checkpoints (resume state of a finished job). Call it only after the fenced
    final transition named `keep`. Returns what was removed."""
    root = Path(job_root)
    removed = []
    for entry in sorted(root.iterdir()):
        if entry.name == keep:
            continue
        _remove(entry)
        removed.append(entry)
    ckpt = root / keep / CHECKPOINTS
    if ckpt.exists():
        _remove(ckpt)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
