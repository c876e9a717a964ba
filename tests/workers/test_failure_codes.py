"""The code and message a job fails with, for each kind of exception (workers.failures.failure_error),
in-process on real exceptions: raised by the OS where one can be provoked here (a missing file, a
refused connection), constructed with their errno otherwise. The worker-side path (a real worker
process, every stage boundary) is tests/workers/test_job_failures.py."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
import torch

from spkd.cli import procs
from spkd.common.errors import SpkdError
from spkd.workers.failures import failure_error


def raised(make) -> BaseException:
    """The exception `make()` raises, with its traceback and chain as Python builds them."""
    try:
        make()
    except BaseException as e:  # noqa: BLE001 - that is the point
        return e
    raise AssertionError("nothing was raised")


def _open(path: Path) -> None:
    path.open()


def _connect() -> None:
    with socket.create_connection(("127.0.0.1", procs.free_port()), timeout=2):
        pass


def _while_handling(first: BaseException, then: BaseException):
    def make() -> None:
        try:
            raise first
        except BaseException:  # noqa: BLE001
            raise then  # noqa: B904 - a second failure while handling the first, as cleanup code does

    return make


def _from(cause: BaseException, outer: BaseException):
    def make() -> None:
        raise outer from cause

    return make


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise ValueError("__str__ itself fails")


class Interrupted(BaseException):
    """A BaseException of a library (like asyncio.CancelledError): not an Exception."""


def _raise(exc: BaseException):
    def make() -> None:
        raise exc

    return make


def test_a_missing_file_names_the_file_not_its_folder(tmp_path: Path) -> None:
    exc = raised(lambda: _open(tmp_path / "gone" / "weights.safetensors"))
    err = failure_error(exc, "distill", "job_x")
    assert err["code"] == "file_not_found" and err["stage"] == "distill" and err["field"] is None
    assert "weights.safetensors" in err["message"] and "in the distill stage" in err["message"]
    assert str(tmp_path) not in err["message"] and "/gone/" not in err["message"], err
    assert "POST /v1/jobs/job_x/resume" in err["message"]


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (_connect, "network_error"),
        (_raise(OSError(errno.EIO, "Input/output error", "/srv/vol/a.bin")), "storage_unavailable"),
        (_raise(OSError(errno.ESTALE, "Stale file handle", "/nfs/x")), "storage_unavailable"),
        (_raise(OSError(errno.EROFS, "Read-only file system", "/srv/ro")), "storage_unavailable"),
        (_raise(PermissionError(errno.EACCES, "Permission denied", "/srv/data/x.jpg")), "permission_denied"),
        (_raise(OSError(errno.EBADF, "Bad file descriptor")), "io_error"),
        (_raise(OSError("no errno at all")), "io_error"),
        (_raise(OSError(errno.ENOSPC, "No space left on device", "/srv/art/x.pt")), "storage_full"),
        # torch.save reports a full disk as a RuntimeError raised from the OSError
        (_from(OSError(errno.ENOSPC, "No space left"), RuntimeError("file write failed")), "storage_full"),
        (_raise(MemoryError()), "host_out_of_memory"),
        (
            _raise(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")),
            "host_out_of_memory",
        ),
        (
            _raise(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")),
            "gpu_out_of_memory",
        ),
        (_raise(RuntimeError("CUDA error: out of memory")), "gpu_out_of_memory"),
        (_raise(RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed")), "host_out_of_memory"),
        (_raise(RuntimeError("boom")), "internal"),
        (_raise(KeyError("stage")), "internal"),
        (_raise(Interrupted("cancelled")), "internal"),
        (_raise(GeneratorExit()), "internal"),
        (_raise(BrokenStr()), "internal"),
        # a second failure while handling the first: memory exhaustion is the cause that matters
        (_while_handling(MemoryError(), RuntimeError("cleanup failed")), "host_out_of_memory"),
        # ...but a bug in an except clause that handled a missing optional file is a bug
        (_while_handling(FileNotFoundError(errno.ENOENT, "gone", "opt.json"), KeyError("x")), "internal"),
        # an explicit cause is the reason
        (
            _from(FileNotFoundError(errno.ENOENT, "gone", "/srv/d/a.json"), ValueError("load failed")),
            "file_not_found",
        ),
        (_raise(SpkdError("class_mismatch", "other classes", "teacher.weights")), "class_mismatch"),
    ],
)
def test_each_kind_gets_its_code(make, code: str) -> None:
    err = failure_error(raised(make), "baseline", "job_y")
    assert err["code"] == code, err
    assert set(err) == {"code", "message", "field", "stage"} and err["stage"] == "baseline"
    assert err["message"] and "/srv/" not in err["message"] and "/nfs/" not in err["message"], err
    if code != "class_mismatch":  # an SpkdError keeps its own message
        assert "in the baseline stage" in err["message"], err


def test_internal_errors_say_what_and_where_to_look() -> None:
    err = failure_error(
        raised(_raise(ValueError("bad value in /srv/secret/cfg/file.txt"))), "export", "job_z"
    )
    assert err["code"] == "internal"
    assert "ValueError: bad value in file.txt" in err["message"], err
    assert "/srv/secret" not in err["message"] and "job_z" in err["message"]
    broken = failure_error(raised(_raise(BrokenStr())), "export", "job_z")
    assert "BrokenStr" in broken["message"], broken
    assert (
        failure_error(SpkdError("x", "see https://host/a/b", None), "v", "j")["message"]
        == "see https://host/a/b"
    )
