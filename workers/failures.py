"""What a failed job says: the `error` ({code, message, field, stage}) that an exception ends a job
with, a stable code a person can act on and a message that says what to do (`failure_error`).

Used by the runner (workers/runner.py) for a failure inside a job and by the Celery task
(workers/tasks.py) for one around it. Torch-free: torch's and requests' exception types are looked
up only when those modules are already imported.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import sys
import urllib.error
from pathlib import Path
from typing import Any

from spkd.common.errors import SpkdError
from spkd.core import storage

log = logging.getLogger("spkd.worker")


# OSErrors of the volume (or network file system) under the data and artifact roots, not of the job.
STORAGE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EIO", "ESTALE", "ENOTCONN", "EROFS", "ENODEV", "ENXIO", "EREMOTEIO", "ENOLINK", "ENOMEDIUM")
    if hasattr(errno, name)
)
# OSErrors of a connection (a hub download, an MLflow server).
NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH")
    + ("ENETDOWN", "EHOSTDOWN")
    if hasattr(errno, name)
)
# A path in an exception's text: shown by its last part only (server folders stay private).
_ABS_PATH = re.compile(r"(?<![\w.~/:])/(?:[^\s/'\"`:,;()\[\]]+/)+([^\s/'\"`:,;()\[\]]*)")
_MEMORY_HINT = (
    "lower train.batch_size, train.image_size or train.num_workers (or ask the operator for "
    "SPKD_DATA_PATH=loader, which streams the images instead of holding them in memory, or, in a "
    "container, for more shared memory: docker --shm-size)"
)


def failure_error(exc: BaseException, stage: str, job_id: str) -> dict[str, Any]:
    """The `error` of a job that `exc` ended in `stage`: {code, message, field, stage}, a stable
    code and a message that says what to do. Never raises, whatever `exc` is.

    Codes: the SpkdError's own; `storage_full` (ENOSPC/EDQUOT anywhere in the exception's chain);
    `host_out_of_memory` (MemoryError, torch's CPU allocator) and `gpu_out_of_memory` (CUDA/MPS,
    once the engine's batch halving gave up), also when the failure that ended the job was
    raised while handling one; for an OSError itself or its explicit cause: `file_not_found`,
    `permission_denied`, `storage_unavailable` (EIO, ESTALE, a read-only or unmounted volume...),
    `network_error` (a connection or download that failed), `io_error` (any other); `internal`
    for everything else (a bug: the worker's log has the traceback). Server paths in messages
    that an exception's text holds are cut to their last part."""
    try:
        code, message, field = _classify(exc, stage, job_id)
    except BaseException as e:  # noqa: BLE001 - describing the failure must not be a second one
        log.error("job %s: could not describe %s: %r", job_id, type(exc).__name__, e)
        code, field = "internal", None
        message = f"internal error in the {stage} stage; the worker's log has the details (job {job_id})"
    return {"code": code, "message": message[:2000], "field": field, "stage": stage}


def _classify(exc: BaseException, stage: str, job_id: str) -> tuple[str, str, str | None]:
    where = f"in the {stage} stage"
    resume = (
        f"then resume the job (POST /v1/jobs/{job_id}/resume continues from its last checkpoint) "
        "or submit it again"
    )
    full = storage.storage_full(exc)
    if full is not None:
        return (
            "storage_full",
            f"the artifact storage is full ({full.strerror or 'no space left'}) while writing "
            f"{_file_name(full)} {where}; free space under SPKD_ARTIFACT_ROOT, {resume}",
            None,
        )
    if isinstance(exc, SpkdError):
        return exc.code, exc.message, exc.field
    chain = _chain(exc)
    memory = next((e for e in chain if _memory_kind(e)), None)
    if memory is not None:
        seen = f" ({_describe(memory)})" if _describe(memory) != "MemoryError" else ""
        if _memory_kind(memory) == "gpu":
            return (
                "gpu_out_of_memory",
                f"the GPU ran out of memory {where}{seen} where the engine could not shrink the "
                f"batch further: lower train.batch_size or train.image_size, or pick a smaller "
                f"model, {resume}",
                None,
            )
        return (
            "host_out_of_memory",
            f"the worker ran out of host memory (RAM) {where}{seen}: {_MEMORY_HINT}; {resume}",
            None,
        )
    os_error = next((e for e in (exc, exc.__cause__) if isinstance(e, OSError)), None)
    if os_error is not None:
        return _os_error(os_error, where, resume)
    return (
        "internal",
        f"internal error {where} ({_describe(exc)}): a bug in spkd or a library it uses, not in the "
        f"job's spec; the worker's log has the traceback (search for {job_id}). Resume the job to "
        f"retry from its last checkpoint, or report the bug",
        None,
    )


def _os_error(e: OSError, where: str, resume: str) -> tuple[str, str, str | None]:
    what = f"{_errno_name(e)}{e.strerror or _describe(e)} on {_file_name(e)}"
    if _is_network(e):
        return (
            "network_error",
            f"a connection failed {where} ({_describe(e)}): check that the worker reaches the "
            f"server (a dataset or weights download, an MLflow server), {resume}",
            None,
        )
    if isinstance(e, FileNotFoundError):
        return (
            "file_not_found",
            f"a file the job needs is gone {where} ({what}): the dataset or weights the spec names "
            f"changed after the job was submitted, or a folder of the server was removed; check them, "
            f"{resume}",
            None,
        )
    if isinstance(e, PermissionError):
        return (
            "permission_denied",
            f"the worker may not read or write a file {where} ({what}): the operator must give the "
            f"worker's user access to SPKD_DATA_ROOT, SPKD_ARTIFACT_ROOT and the weight folders, {resume}",
            None,
        )
    if e.errno in STORAGE_ERRNOS:
        return (
            "storage_unavailable",
            f"the storage failed {where} ({what}): check the volume or network file system behind "
            f"SPKD_DATA_ROOT and SPKD_ARTIFACT_ROOT (mounted, writable, healthy), {resume}",
            None,
        )
    return (
        "io_error",
        f"an I/O error {where} ({what}); the worker's log has the traceback; once its cause is "
        f"fixed, {resume}",
        None,
    )


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or while handling, outermost first."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not e for e in out) and len(out) < 32:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _memory_kind(exc: BaseException) -> str | None:
    """ "host" or "gpu" for an out-of-memory error, else None."""
    if isinstance(exc, MemoryError):
        return "host"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return "gpu"
    if isinstance(exc, RuntimeError):
        text = _describe(exc).lower()
        if "defaultcpuallocator" in text or "can't allocate memory" in text:
            return "host"  # torch's CPU allocator: host RAM
        if "dataloader worker" in text and ("signal: killed" in text or "shared memory" in text):
            return "host"  # a loader process killed by the kernel's OOM killer, or out of /dev/shm
        if "out of memory" in text:
            return "gpu"  # CUDA (cuDNN/cuBLAS workspaces) and MPS say so in a plain RuntimeError
    return None


def _is_network(e: OSError) -> bool:
    if isinstance(e, ConnectionError | TimeoutError | socket.gaierror | urllib.error.URLError):
        return True
    requests = sys.modules.get("requests")
    if requests is not None and isinstance(e, requests.RequestException):
        return True
    return e.errno in NETWORK_ERRNOS


def _errno_name(e: OSError) -> str:
    return f"{errno.errorcode[e.errno]}: " if isinstance(e.errno, int) and e.errno in errno.errorcode else ""


def _file_name(e: OSError) -> str:
    """The file an OSError names, by its last part only; "a file" when it names none."""
    name = Path(str(e.filename)).name if e.filename else ""
    return name or "a file"


def _describe(exc: BaseException) -> str:
    """`Type: message` (the type alone without a message), even for an exception whose str()
    raises."""
    try:
        text = str(exc).strip()
    except Exception:  # noqa: BLE001 - an exception's own __str__ may be broken
        text = ""
    text = _ABS_PATH.sub(r"\1", text.splitlines()[0]) if text else ""
    return f"{type(exc).__name__}: {text[:500]}" if text else type(exc).__name__
