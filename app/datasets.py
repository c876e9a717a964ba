"""Dataset uploads: stream to disk with a size cap, check the zip, extract atomically, verify images.

Accepted layouts (after stripping one common top folder): `class/x.jpg`, or `train/class/x.jpg`
plus `val/class/x.jpg`. The archive is refused as a whole when it is unsafe (absolute paths, `..`,
symlinks, too many files, too large once uncompressed); single bad files are skipped and listed
with a reason. Images are opened with Pillow under a decompression-bomb guard. Torch-free.
"""

from __future__ import annotations

import shutil
import stat
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from PIL import Image
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app import references
from app.errors import ApiError
from app.settings import Settings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
SKIP_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val"}
CHUNK = 1 << 20
# Reading one member can fail on its own: bad CRC or deflate stream, truncated data, encryption
# (RuntimeError), a compression method zipfile lacks (NotImplementedError).
MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError)


# ---------------------------------------------------------------- streaming the body to disk


class _TooLarge(Exception):
    pass


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
    413 as soon as the body exceeds `cap` bytes. Returns the multipart text fields (e.g. `name`)."""
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
        return sink.fields
    if received == 0:
        raise ApiError(422, "missing_file", "empty upload: send a zip of an ImageFolder", "file")
    return {}


# ---------------------------------------------------------------- checking and extracting the zip


@dataclass
class Member:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]  # path parts after dropping the common top folder


@dataclass
class Extracted:
    layout: str  # "split" (train/ + val/) or "flat" (class folders)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> images
    rejected: list[dict[str, str]] = field(default_factory=list)
    size_bytes: int = 0


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
    return "__MACOSX" in parts or parts[-1] in SKIP_NAMES or any(p.startswith("._") for p in parts)


def plan_members(zf: zipfile.ZipFile, settings: Settings) -> tuple[list[Member], list[dict[str, str]]]:
    """Refuse an unsafe archive as a whole; return the files to extract and those skipped."""
    infos = zf.infolist()
    if len(infos) > settings.max_files:
        raise ApiError(
            422, "too_many_files", f"the archive has {len(infos)} entries (limit {settings.max_files})"
        )
    total = 0
    files: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
    for info in infos:
        problem = _unsafe(info.filename)
        if problem:
            raise ApiError(422, "unsafe_archive", f"refused: {problem}")
        if _is_symlink(info):
            raise ApiError(422, "unsafe_archive", f"refused: symbolic link {info.filename!r}")
        if info.is_dir():
            continue
        total += info.file_size
        if total > settings.max_uncompressed_bytes:
            raise ApiError(
                422,
                "archive_too_large",
                f"the archive expands to more than {settings.max_uncompressed_bytes} bytes",
            )
        parts = tuple(p for p in info.filename.replace("\\", "/").split("/") if p not in ("", "."))
        if parts and not _skipped(parts):
            files.append((info, parts))
    # Drop one common top folder ("hymenoptera/train/ants/x.jpg" -> "train/ants/x.jpg").
    tops = {p[0] for _, p in files}
    strip = 1 if len(tops) == 1 and all(len(p) > 2 for _, p in files) else 0
    return [Member(i, p[strip:]) for i, p in files], []


def _layout(members: list[Member]) -> str:
    firsts = {m.parts[0].lower() for m in members if len(m.parts) >= 2}
    return "split" if "train" in firsts and firsts & {"val", "valid", "validation"} else "flat"


def _target(m: Member, layout: str) -> tuple[str, str] | str:
    """(split, class) for a member, or the reason it is skipped."""
    parts = m.parts
    if layout == "split":
        if len(parts) != 3:
            return "not inside split/class/ (expected train/<class>/<image> or val/<class>/<image>)"
        split = SPLIT_NAMES.get(parts[0].lower())
        if split is None:
            return f"unknown split folder {parts[0]!r} (expected train/ and val/)"
        return split, parts[1]
    if len(parts) != 2:
        return "not inside a class folder (expected <class>/<image>)"
    return "all", parts[0]


def verify_image(path: Path, max_pixels: int) -> str | None:
    """None when Pillow can fully decode it within the pixel budget, else the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    return f"image too large ({w}x{h} pixels, limit {max_pixels})"
                im.verify()
            with Image.open(path) as im:
                im.draft("RGB", (512, 512))  # JPEG: decode at reduced size, still checks the stream
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"decompression bomb refused: {e}"
    except Exception as e:  # noqa: BLE001 - any decoder failure means "not a usable image"
        # Pillow names the file by its server path: keep the reason free of server folders.
        return f"not a readable image ({type(e).__name__}: {e})".replace(str(path), path.name)[:300]
    return None


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
    """Validate and extract into `dest` (created here via a temp dir + rename: all or nothing)."""
    if not zipfile.is_zipfile(zip_path):
        raise ApiError(
            422, "invalid_archive", "the upload is not a zip archive (send a .zip of an ImageFolder)", "file"
        )
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members, _ = plan_members(zf, settings)
            result = _extract_into(zf, members, tmp, settings)
        _check_classes(result)
        tmp.rename(dest)
        return result
    except zipfile.BadZipFile as e:
        raise ApiError(422, "invalid_archive", f"corrupt zip archive: {e}", "file") from e
    except UnicodeDecodeError as e:  # zipfile decodes names flagged UTF-8 strictly, at open
        raise ApiError(
            422, "invalid_archive", "a file name is marked UTF-8 in the zip but is not valid UTF-8", "file"
        ) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _extract_into(zf: zipfile.ZipFile, members: list[Member], root: Path, settings: Settings) -> Extracted:
    layout = _layout(members)
    res = Extracted(layout=layout)
    budget = settings.max_uncompressed_bytes
    used_names: set[Path] = set()
    for m in members:
        shown = "/".join(m.parts)
        target = _target(m, layout)
        if isinstance(target, str):
            res.rejected.append({"path": shown, "reason": target})
            continue
        split, cls = target
        if Path(m.parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
            res.rejected.append({"path": shown, "reason": "not an image file (by extension)"})
            continue
        rel = Path(split if layout == "split" else ".", cls, m.parts[-1])
        if rel in used_names:
            res.rejected.append({"path": shown, "reason": "duplicate file name"})
            continue
        out = root / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with zf.open(m.info) as src:
                n = _copy_capped(src, out, budget - res.size_bytes)
        except MEMBER_ERRORS as e:  # one broken or encrypted member: skip it, keep the rest
            out.unlink(missing_ok=True)
            res.rejected.append(
                {"path": shown, "reason": f"unreadable in the zip ({type(e).__name__}: {e})"[:300]}
            )
            continue
        res.size_bytes += n
        reason = verify_image(out, settings.max_image_pixels)
        if reason:
            out.unlink()
            res.rejected.append({"path": shown, "reason": reason})
            continue
        used_names.add(rel)
        res.counts.setdefault(split, {}).setdefault(cls, 0)
        res.counts[split][cls] += 1
    _drop_empty_dirs(root)
    return res


def _drop_empty_dirs(root: Path) -> None:
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()


def _check_classes(res: Extracted) -> None:
    train = res.counts.get("train" if res.layout == "split" else "all", {})
    if len(train) < 2:
        found = ", ".join(sorted(train)) or "none"
        raise ApiError(
            422,
            "too_few_classes",
            f"a dataset needs at least 2 class folders with readable images; found: {found}",
            "file",
            rejected=res.rejected[:50],
        )
    if res.layout == "split" and not res.counts.get("val"):
        raise ApiError(422, "empty_split", "val/ has no readable images", "file", rejected=res.rejected[:50])


def dataset_record(ds_id: str, owner: str, name: str, res: Extracted, settings: Settings) -> dict[str, Any]:
    classes = sorted({c for per in res.counts.values() for c in per})
    return {
        "id": ds_id,
        "owner": owner,
        "name": name,
        "created_at": time.time(),
        "layout": res.layout,
        "classes": classes,
        "counts": res.counts,
        "num_images": sum(sum(per.values()) for per in res.counts.values()),
        "size_bytes": res.size_bytes,
        "rejected": res.rejected[: settings.max_rejected_listed],
        "rejected_total": len(res.rejected),
    }


def datasets_dir(settings: Settings) -> Path:
    """The uploads area (created on first use); app.references keeps raw paths out of it."""
    d = references.uploads_dir(settings)
    d.mkdir(parents=True, exist_ok=True)
    return d
