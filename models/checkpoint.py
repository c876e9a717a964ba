"""Epoch-end checkpoints: everything needed to resume a run and finish with identical weights.

One file, last.pt, written atomically (temp file + os.replace) so a kill at any moment leaves
either the previous or the new checkpoint. It holds only tensors and plain Python values, so it
loads back with torch.load(weights_only=True).

Where: out_dir/checkpoints/ for a run without an attempt number (the local CLI), and
out_dir/checkpoints/attempt-<n>/ for attempt n of a service job (n: its fencing token, which only
grows). An attempt writes only into its own folder, so a stale attempt that was frozen past its
lease and resumes can never overwrite the checkpoint of the attempt that took over; a new attempt
starts from the newest earlier folder (`adopt`).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"


ATTEMPT_PREFIX = "attempt-"


def checkpoint_dir(out_dir: Path, attempt: int | None = None) -> Path:
    """The checkpoint folder of `attempt` (None: the shared folder of an un-numbered run)."""
    base = Path(out_dir) / CHECKPOINT_DIR
    return base if attempt is None else base / f"{ATTEMPT_PREFIX}{attempt:08d}"


def _attempt_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """(attempt, folder) for every folder holding a last.pt, the un-numbered one as attempt 0."""
    base = checkpoint_dir(out_dir)
    found = [(0, base)] if (base / LAST).is_file() else []
    if base.is_dir():
        for d in base.iterdir():
            number = d.name.removeprefix(ATTEMPT_PREFIX)
            if d.name.startswith(ATTEMPT_PREFIX) and number.isdigit() and (d / LAST).is_file():
                found.append((int(number), d))
    return sorted(found)


def latest(out_dir: Path) -> Path | None:
    """The newest attempt's last.pt in out_dir (the one a new attempt starts from), or None."""
    found = _attempt_dirs(out_dir)
    return found[-1][1] / LAST if found else None


def adopt(out_dir: Path, attempt: int | None) -> Path | None:
    """Give `attempt` the newest checkpoint of an earlier attempt: hard links (a copy where links
    are not possible) of that folder's files into this attempt's folder. Returns the source folder,
    or None when there is nothing to adopt (or this attempt has its own checkpoint already).

    last.pt is linked first: writers publish stage weights before the last.pt that counts them as
    done, so every weight file a linked last.pt relies on is there when the others are linked.
    """
    own = checkpoint_dir(out_dir, attempt)
    if attempt is None or (own / LAST).is_file():
        return None
    earlier = [d for n, d in _attempt_dirs(out_dir) if n < attempt]
    if not earlier:
        return None
    source = earlier[-1]
    own.mkdir(parents=True, exist_ok=True)
    names = [LAST] + sorted(p.name for p in source.iterdir() if p.is_file() and p.name != LAST)
    for name in names:
        if not name.startswith("."):  # temp files of an unfinished write
            _link(source / name, own / name)
    return source


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


def remove_earlier_attempts(out_dir: Path, attempt: int | None) -> None:
    """Drop the folders of earlier attempts (never later ones: they belong to a run that took over)."""
    base = checkpoint_dir(out_dir)
    if attempt is None or not base.is_dir():
        return
    for d in base.iterdir():
        number = d.name.removeprefix(ATTEMPT_PREFIX)
        if d.name.startswith(ATTEMPT_PREFIX) and number.isdigit() and int(number) < attempt:
            shutil.rmtree(d, ignore_errors=True)


def atomic_write(path: Path, write, guard: Callable[[], None] | None = None) -> None:
    """Call write(tmp_path), then move it over `path` in one step. Nothing is left behind when it
    fails; a full disk raises OSError(ENOSPC) whatever the writer raised (torch.save says
    RuntimeError "unexpected pos", safetensors SafetensorError), so callers can name it.

    `guard` runs between the write and the rename (it raises to keep the file unpublished): the
    fencing check of a service job, as close to the rename as it can be.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
        except Exception as exc:
            if not isinstance(exc, OSError) and _no_space_left(path.parent, exc):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
            raise
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results should be readable like any file
        if guard is not None:
            guard()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _no_space_left(folder: Path, exc: BaseException) -> bool:
    """After a failed write: did it fail because the file system is full? (Checked before the
    partial temporary is removed, so a write that ran out of space leaves ~0 bytes free.)"""
    if "os error 28" in str(exc) or "No space left" in str(exc):
        return True
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(
    out_dir: Path,
    payload: dict[str, Any],
    attempt: int | None = None,
    guard: Callable[[], None] | None = None,
) -> Path:
    """Write last.pt of `attempt` atomically; `guard` may veto it right before the rename."""
    path = checkpoint_dir(out_dir, attempt) / LAST
    atomic_write(path, lambda tmp: torch.save(payload, tmp), guard)
    return path


def load(out_dir: Path, attempt: int | None = None) -> dict[str, Any] | None:
    path = checkpoint_dir(out_dir, attempt) / LAST
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    """random.setstate needs tuples; a serialised state may come back with lists."""
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


def seed_everything(*parts: Any) -> None:
    """Seed every RNG from (seed, stage, epoch...): each epoch's randomness depends on nothing else."""
    seed = _stable_seed(parts)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _stable_seed(parts) -> int:
    import hashlib

    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)
