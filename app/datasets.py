"""Dataset uploads: stream to disk with a size cap, check the zip, extract it as it is (atomically),
then scan it with common/scan.py, the engine's own scanner: the layouts, classes and rejected files
a job on the dataset will use (docs/datasets.md).

The archive is refused as a whole when it is unsafe (absolute paths, `..`, too many files, too
large once uncompressed); single bad files are skipped and listed with a reason. Symlink members
are recreated only when they point inside the archive. Torch-free.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import shutil
import stat
import struct
import tempfile
import time
import zipfile
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from spkd.app.errors import ApiError
from spkd.common import scan
from spkd.common.spec import text_problem
from spkd.core import bucket
from spkd.core.settings import Settings

SKIP_NAMES = scan.IGNORED_NAMES
CHUNK = 1 << 20
# Reading one member can fail on its own: bad CRC or deflate stream, truncated data, encryption
# (RuntimeError), a compression method zipfile lacks (NotImplementedError).
MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError)


# ---------------------------------------------------------------- streaming the body to disk


class _MultipartFile:
    """Feeds a multipart body through python-multipart and writes the first file part to `out`."""

    def __init__(self, boundary: bytes, out: BinaryIO) -> None:
        self.out, self.found, self._in_file, self._done = out, False, False, False
        self._headers: dict[bytes, bytes] = {}
        self._hfield = b""
        self.fields: dict[str, str] = {}
        self._value = bytearray()
        self._name = ""
        callbacks = {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: setattr(self, "_hfield", self._hfield + d[s:e]),
            "on_header_value": self._header_value,
            "on_header_end": lambda: setattr(self, "_hfield", b""),
            "on_headers_finished": self._headers_done,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def _begin(self) -> None:
        self._headers, self._in_file, self._value = {}, False, bytearray()

    def _header_value(self, d: bytes, s: int, e: int) -> None:
        key = self._hfield.lower()
        self._headers[key] = self._headers.get(key, b"") + d[s:e]

    def _headers_done(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = opts.get(b"name", b"").decode(errors="replace")
        self._in_file = b"filename" in opts and not self.found and not self._done

    def _data(self, d: bytes, s: int, e: int) -> None:
        if self._in_file:
            self.out.write(d[s:e])
            self.found = True
        elif len(self._value) < 4096:
            self._value += d[s:e]

    def _end(self) -> None:
        if self._in_file:
            self._done, self._in_file = True, False
        elif self._name:
            self.fields[self._name] = self._value.decode(errors="replace")

    def write(self, chunk: bytes) -> None:
        self.parser.write(chunk)


async def receive_upload(
    stream: AsyncIterator[bytes], content_type: str, content_length: str | None, dest: Path, cap: int
) -> dict[str, str]:
    """Write the uploaded file (multipart `file` part, or a raw application/zip body) to `dest`.
    413 as soon as the body exceeds `cap` bytes (app.middleware refuses it earlier still); 422
    `invalid_request` for a `name` field with control or bidi characters. Returns the multipart
    text fields (e.g. `name`)."""
    if content_length and content_length.isdigit() and int(content_length) > cap:
        raise ApiError(413, "upload_too_large", f"upload is larger than the {cap} byte limit")
    ctype, opts = parse_options_header(content_type or "")
    received = 0
    with dest.open("wb") as out:
        sink: Any
        if ctype == b"multipart/form-data":
            if b"boundary" not in opts:
                raise ApiError(400, "bad_multipart", "multipart body without a boundary")
            sink = _MultipartFile(opts[b"boundary"], out)
        else:
            sink = out
        try:
            async for chunk in stream:
                received += len(chunk)
                if received > cap:
                    raise ApiError(413, "upload_too_large", f"upload is larger than the {cap} byte limit")
                sink.write(chunk)
            if isinstance(sink, _MultipartFile):
                sink.parser.finalize()
        except MultipartParseError as e:
            raise ApiError(400, "bad_multipart", f"malformed multipart body: {e}") from e
    if isinstance(sink, _MultipartFile):
        if not sink.found:
            raise ApiError(
                422, "missing_file", "the multipart body has no file part (send it as 'file')", "file"
            )
        problem = text_problem(sink.fields.get("name", ""))  # the dataset's name, shown to others
        if problem:
            raise ApiError(422, "invalid_request", f"name: {problem}", "name")
        return sink.fields
    if received == 0:
        raise ApiError(422, "missing_file", "empty upload: send a zip of an ImageFolder", "file")
    return {}


# ---------------------------------------------------------------- checking and extracting the zip


@dataclass
class Member:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]  # the member's path parts, names decoded (see `member_name`)


@dataclass
class Extracted:
    layout: str  # common.scan: "split" (train/ + val/ or test/) or "flat" (class folders)
    classes: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> images
    rejected: list[dict[str, str]] = field(default_factory=list)
    size_bytes: int = 0


def member_name(info: zipfile.ZipInfo) -> str:
    """The member's name: UTF-8 when flagged so, or when its bytes are valid UTF-8 without the flag
    (macOS Finder and Info-ZIP write UTF-8 names unflagged), else cp437 as the zip spec says."""
    if info.flag_bits & 0x800:
        return info.filename
    raw = info.filename.encode("cp437")  # zipfile decoded the raw bytes as cp437: reversible
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return info.filename


def _unsafe(name: str) -> str | None:
    if "\x00" in name:
        return "NUL byte in a file name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return f"absolute path {name!r}"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return f"path escapes the archive: {name!r}"
    return None


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def _skipped(parts: tuple[str, ...]) -> bool:
    # What common.scan ignores anyway (names starting with "."; __MACOSX...): not worth extracting.
    return any(p in SKIP_NAMES or p.startswith(".") for p in parts)


def _cut_at_nul(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    """zipfile cuts a name at its first NUL ("a/x\\0.jpg" reads as "a/x"): the local header's
    name length tells. A problem text when cut, else None."""
    raw = info.filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    assert zf.fp is not None
    zf.fp.seek(info.header_offset)
    header = zf.fp.read(30)
    if len(header) == 30 and header[:4] == b"PK\x03\x04" and struct.unpack("<H", header[26:28])[0] > len(raw):
        return f"NUL byte in a file name ({info.filename!r}...)"
    return None


def plan_members(zf: zipfile.ZipFile, settings: Settings) -> list[Member]:
    """Refuse an unsafe archive as a whole; return the members to extract, names decoded."""
    infos = zf.infolist()
    if len(infos) > settings.max_files:
        raise ApiError(
            422, "too_many_files", f"the archive has {len(infos)} entries (limit {settings.max_files})"
        )
    total = 0
    members: list[Member] = []
    for info in infos:
        name = member_name(info)
        problem = _unsafe(name) or _cut_at_nul(zf, info)
        if problem:
            raise ApiError(422, "unsafe_archive", f"refused: {problem}")
        if info.is_dir():
            continue
        total += info.file_size
        if total > settings.max_uncompressed_bytes:
            raise ApiError(
                422,
                "archive_too_large",
                f"the archive expands to more than {settings.max_uncompressed_bytes} bytes",
            )
        parts = tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))
        if parts and not _skipped(parts):
            members.append(Member(info, parts))
    return members


def _copy_capped(src: BinaryIO, dst: Path, budget: int) -> int:
    """Copy at most `budget` bytes; the zip header's sizes are not trusted."""
    n = 0
    with dst.open("wb") as out:
        while chunk := src.read(CHUNK):
            n += len(chunk)
            if n > budget:
                raise ApiError(422, "archive_too_large", "the archive expands beyond the size limit")
            out.write(chunk)
    return n


def extract_dataset(zip_path: Path, dest: Path, settings: Settings) -> Extracted:
    """Extract the zip as it is into `dest` (a temp dir + rename: all or nothing), then let
    common.scan decide classes, splits and rejected files: the same verdict a job on `dest` gets.
    Raises ApiError 422 (`invalid_archive`, `unsafe_archive`, the scan's codes) otherwise."""
    if not zipfile.is_zipfile(zip_path):
        raise ApiError(
            422, "invalid_archive", "the upload is not a zip archive (send a .zip of an ImageFolder)", "file"
        )
    tmp = Path(os.path.realpath(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent)))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            res = _extract_into(zf, plan_members(zf, settings), tmp, settings)
        if res.rejected:  # members not on disk: a job's scan lists them from this file
            (tmp / scan.UNEXTRACTED_FILE).write_text(json.dumps(res.rejected))
        _scan_into(res, tmp, settings)
        tmp.rename(dest)
        bucket.keep_upload(settings, dest)  # with SPKD_STORAGE_URL: into the bucket, not kept here
        return res
    except zipfile.BadZipFile as e:
        raise ApiError(422, "invalid_archive", f"corrupt zip archive: {e}", "file") from e
    except UnicodeDecodeError as e:  # zipfile decodes names flagged UTF-8 strictly, at open
        raise ApiError(
            422, "invalid_archive", "a file name is marked UTF-8 in the zip but is not valid UTF-8", "file"
        ) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _scan_into(res: Extracted, root: Path, settings: Settings) -> None:
    """common.scan on the extracted tree (it reads the extraction's own rejections back)."""
    try:
        found = scan.scan_tree(root, max_pixels=settings.max_image_pixels)
    except scan.ScanError as e:
        raise ApiError(422, e.code, e.message, "file", rejected=e.rejected[:50]) from e
    res.layout, res.classes, res.counts = found.layout, found.classes, found.counts()
    res.rejected = found.rejected


# A member that cannot be written under its name: a file and a folder of the same name, a name
# the filesystem refuses (too long). Other OSErrors (a full disk) are not the member's fault.
NAME_ERRNOS = {errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL}


def _extract_into(zf: zipfile.ZipFile, members: list[Member], root: Path, settings: Settings) -> Extracted:
    """Regular files first, then symlinks (so no file is ever written through a link)."""
    res = Extracted(layout="flat")
    budget = settings.max_uncompressed_bytes
    links = []
    for m in members:
        shown = "/".join(m.parts)
        if _is_symlink(m.info):
            links.append(m)
            continue
        out = root.joinpath(*m.parts)
        try:
            if out.exists() or out.is_symlink():
                res.rejected.append({"path": shown, "reason": "duplicate name in the zip"})
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m.info) as src:
                res.size_bytes += _copy_capped(src, out, budget - res.size_bytes)
        except MEMBER_ERRORS as e:  # one broken or encrypted member: skip it, keep the rest
            out.unlink(missing_ok=True)
            res.rejected.append(
                {"path": shown, "reason": f"unreadable in the zip ({type(e).__name__}: {e})"[:300]}
            )
        except OSError as e:
            if e.errno not in NAME_ERRNOS:
                raise
            res.rejected.append({"path": shown, "reason": f"cannot be stored under this name ({e.strerror})"})
    for m in links:
        reason = _make_link(zf, m, root)
        if reason:
            res.rejected.append({"path": "/".join(m.parts), "reason": reason})
    return res


def _make_link(zf: zipfile.ZipFile, m: Member, root: Path) -> str | None:
    """Recreate a symlink member when its target stays inside the archive; else the reason.
    common.scan then applies the same symlink rule as to a folder on disk."""
    raw = zf.read(m.info)[:4096]
    target = raw.decode("utf-8", "replace").replace("\\", "/")
    here = posixpath.dirname("/".join(m.parts))
    joined = posixpath.normpath(posixpath.join(here, target))
    if target.startswith("/") or (len(target) > 1 and target[1] == ":") or joined.split("/")[0] == "..":
        return scan.OUTSIDE
    out = root.joinpath(*m.parts)
    if os.path.realpath(out.parent) != str(out.parent):  # a folder on the way is itself a link
        return "symlink inside a linked folder (not recreated)"
    if out.exists() or out.is_symlink():
        return "duplicate name in the zip"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(posixpath.relpath(joined, here or "."), out)
    except OSError as e:
        if e.errno not in NAME_ERRNOS:
            raise
        return f"cannot be stored under this name ({e.strerror})"
    return None


def dataset_record(ds_id: str, owner: str, name: str, res: Extracted, settings: Settings) -> dict[str, Any]:
    classes = res.classes
    return {
        "id": ds_id,
        "owner": owner,
        "name": name,
        "created_at": time.time(),
        "status": "ready",
        "layout": res.layout,
        "classes": classes,
        "counts": res.counts,
        "num_images": sum(sum(per.values()) for per in res.counts.values()),
        "size_bytes": res.size_bytes,
        "rejected": res.rejected[: settings.max_rejected_listed],
        "rejected_total": len(res.rejected),
    }
