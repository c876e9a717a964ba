"""Files the service and the engine write and check alike: a whole-file-or-nothing write
(`atomic_write`), a file's sha256 (`sha256_file`), the manifest of a folder of results
(`manifest`), and whether an error means the disk is full (`storage_full`). Torch-free."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
# "No space left on device" and "disk quota exceeded": the operator's to fix, not a bug.
STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
LOW_SPACE_BYTES = 64 * 1024  # after a failed write, less free space than this means it ran out


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of the file at `path`, read in 1 MiB chunks. Raises OSError when unreadable."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest(folder: Path, prefix: str = "") -> list[dict[str, Any]]:
    """{"name", "size" (bytes), "sha256"} of every file under `folder`, in path order; `name` is its
    POSIX path relative to `folder`, after `prefix` (e.g. "tensorboard/"). Hidden files (the
    temporaries of `atomic_write`) and the `checkpoints/` folder (for resuming, not a result) are
    left out. Raises OSError when a file is unreadable."""
    folder = Path(folder)
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] != "checkpoints" and not path.name.startswith("."):
            name = prefix + rel.as_posix()
            found.append({"name": name, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return found


def storage_full(exc: BaseException | None) -> OSError | None:
    """The ENOSPC ("no space left on device") or EDQUOT ("disk quota exceeded") OSError in `exc`
    or the exceptions it was raised from, else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_FULL_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def atomic_write(path: Path, write: Callable[[str], object], guard: Callable[[], None] | None = None) -> None:
    """Call write(tmp_path), then move it over `path` in one step. Nothing is left behind when it
    fails; a full disk raises OSError(ENOSPC) whatever the writer raised (torch.save says
    RuntimeError "unexpected pos", safetensors SafetensorError), so callers can name it.

    The temporary is `.<name>.<random>` beside `path` (a hidden name the storage sweep knows).
    `guard` runs between the write and the rename (it raises to keep the file unpublished): the
    fencing check of a service job, as close to the rename as it can be.
    """
    path = Path(path)
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
    return st.f_bavail * st.f_frsize < LOW_SPACE_BYTES


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
