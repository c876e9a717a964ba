"""Hostile and broken dataset uploads beyond tests/app/test_datasets.py:
each is a clear 4xx or a per-file rejection, odd-but-valid images are accepted and decode to RGB,
and a good dataset uploaded first is untouched by all of it."""

from __future__ import annotations

import contextlib
import hashlib
import io
import select
import socket
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spkd.core.settings import Settings
from tests.helpers import KEY_A, Stack


def img_bytes(mode: str, fmt: str, size: tuple[int, int] = (24, 24)) -> bytes:
    buf = io.BytesIO()
    if mode == "I;16":
        ramp = np.linspace(0, 65535, size[0] * size[1]).reshape(size[::-1]).astype(np.uint16)
        Image.fromarray(ramp).save(buf, fmt)
    elif mode == "P":
        Image.new("RGB", size, (200, 30, 30)).quantize(16).save(buf, fmt)
    else:
        Image.new(mode, size, "red" if mode in ("RGB", "CMYK", "RGBA") else 128).save(buf, fmt)
    return buf.getvalue()


def jpeg() -> bytes:
    return img_bytes("RGB", "JPEG")


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def png_header_bomb(w: int, h: int) -> bytes:
    """A valid PNG signature + IHDR claiming w x h pixels, with a tiny IDAT: kilobytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def upload(client, data: bytes):
    return client.post("/v1/datasets", content=data, headers={"Content-Type": "application/zip"})


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def good_dataset(client, settings: Settings) -> tuple[dict, dict[str, str]]:
    resp = upload(client, make_zip({"a/1.jpg": jpeg(), "a/2.jpg": jpeg(), "b/3.jpg": jpeg()}))
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    return ds, tree_digest(Path(settings.data_root) / "datasets" / ds["id"])


def _lying_header_bomb() -> bytes:
    """10 MB of zeros whose headers claim 100 bytes: the cap must count real bytes, not headers."""
    raw = bytearray(make_zip({"a/x.jpg": jpeg(), "b/bomb.jpg": b"\0" * 10_000_000}))
    zf = zipfile.ZipFile(io.BytesIO(bytes(raw)))
    info = zf.getinfo("b/bomb.jpg")
    real = struct.pack("<I", info.file_size)
    n = raw.count(real)
    assert n == 2  # local header and central directory
    return bytes(raw.replace(real, struct.pack("<I", 100)))


def _bad_utf8_name() -> bytes:
    """An entry flagged UTF-8 (bit 11) whose name bytes are not UTF-8."""
    raw = make_zip({"a/\u00e9.jpg": jpeg(), "b/x.jpg": jpeg()})
    assert raw.count("\u00e9".encode()) == 2
    return raw.replace("\u00e9".encode(), b"\xff\xfe")


def _encrypted_and_corrupt_members() -> bytes:
    """First entry flagged encrypted (bit 0), second with a damaged deflate stream, then good files."""
    corrupt_src = jpeg() * 20
    raw = bytearray(
        make_zip({"a/enc.jpg": jpeg(), "a/corrupt.jpg": corrupt_src, "a/ok.jpg": jpeg(), "b/ok.jpg": jpeg()})
    )
    raw[6] |= 1  # local header of the first entry
    central = raw.index(b"PK\x01\x02")
    raw[central + 8] |= 1
    info = zipfile.ZipFile(io.BytesIO(bytes(raw))).getinfo("a/corrupt.jpg")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for k in range(start + 20, start + info.compress_size // 2):
        raw[k] ^= 0x5A
    return bytes(raw)


REFUSED = {
    "backslash zip-slip": (make_zip({"..\\..\\evil.jpg": jpeg(), "b/x.jpg": jpeg()}), "unsafe_archive"),
    "windows drive path": (make_zip({"C:\\evil\\a.jpg": jpeg(), "b/x.jpg": jpeg()}), "unsafe_archive"),
    "unc path": (make_zip({"\\\\server\\share\\a.jpg": jpeg(), "b/x.jpg": jpeg()}), "unsafe_archive"),
    "nested dot-dot": (make_zip({"a/./../../b/x.jpg": jpeg(), "c/y.jpg": jpeg()}), "unsafe_archive"),
    # zipfile itself cuts names at a NUL when writing: put the NUL into the bytes afterwards.
    "NUL in name": (make_zip({"a/x_.jpg": jpeg(), "b/y.jpg": jpeg()}).replace(b"a/x_", b"a/x\x00"), None),
    "empty zip": (make_zip({}), "too_few_classes"),
    "only junk": (
        make_zip({"__MACOSX/a/._x.jpg": b"j", ".DS_Store": b"j", "a/.DS_Store": b"j"}),
        "too_few_classes",
    ),
    "one class in split layout": (
        make_zip({"train/a/x.jpg": jpeg(), "val/a/y.jpg": jpeg()}),
        "too_few_classes",
    ),
    "no val images": (
        make_zip({"train/a/x.jpg": jpeg(), "train/b/y.jpg": jpeg(), "val/a/z.txt": b"x"}),
        "empty_split",
    ),
    "gzip not zip": (zlib.compress(b"x" * 1000), "invalid_archive"),
    "truncated zip": (make_zip({"a/1.jpg": jpeg(), "b/2.jpg": jpeg()})[:-30], "invalid_archive"),
    "html": (b"<html><body>not a zip</body></html>", "invalid_archive"),
    "bomb with lying headers": (_lying_header_bomb(), None),
    "flagged-utf8 name that is not utf8": (_bad_utf8_name(), None),
}


def test_refused_uploads_leave_everything_else_alone(client, settings: Settings, good_dataset) -> None:
    client.app.state.settings = settings.model_copy(update={"max_uncompressed_bytes": 1_000_000})
    ds, digest = good_dataset
    outcomes = {}
    for label, (data, code) in REFUSED.items():
        resp = upload(client, data)
        outcomes[label] = (
            resp.status_code,
            resp.json()["error"]["code"] if resp.status_code >= 400 else None,
        )
        assert 400 <= resp.status_code < 500, (label, resp.status_code, resp.text)
        body = resp.json()["error"]
        assert body["message"] and (code is None or body["code"] == code), (label, body)
    print(outcomes)
    root = Path(settings.data_root)
    assert not (root.parent / "evil.jpg").exists() and not (root / "evil.jpg").exists()
    # Nothing half-extracted, no temp folders left, the good dataset byte-for-byte the same.
    assert [p.name for p in (root / "datasets").iterdir()] == [ds["id"]]
    assert tree_digest(root / "datasets" / ds["id"]) == digest
    assert client.get("/v1/datasets").json()["data"] == [ds]


def test_odd_images_accepted_and_decode_to_rgb(client, settings: Settings) -> None:
    from spkd.models.data.loader import load_rgb

    entries = {
        "a/cmyk.jpg": img_bytes("CMYK", "JPEG"),
        "a/gray.png": img_bytes("L", "PNG"),
        "a/gray16.png": img_bytes("I;16", "PNG"),
        "a/palette.png": img_bytes("P", "PNG"),
        "a/palette.gif": img_bytes("P", "GIF"),
        "a/rgba.png": img_bytes("RGBA", "PNG"),
        "a/la.png": img_bytes("LA", "PNG"),
        "a/bw.bmp": img_bytes("1", "BMP"),
        "a/tiff16.tif": img_bytes("I;16", "TIFF"),
        "b/ok.jpg": jpeg(),
        "b/webp.webp": img_bytes("RGB", "WEBP"),
        "b/truncated.png": img_bytes("RGB", "PNG", (64, 64))[:-40],
        "b/corrupt.jpg": jpeg()[:200] + b"\x00" * 50,
        "b/huge-dims.png": png_header_bomb(60_000, 60_000),
        "b/zero.jpg": b"",
        "b/\u00fcber caf\u00e9 \u65e5\u672c.jpg": jpeg(),  # non-ASCII (valid UTF-8) name
        "b/__MACOSX/x.jpg": b"junk",
        "b/.DS_Store": b"junk",
    }
    resp = upload(client, make_zip(entries))
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    rejected = {r["path"]: r["reason"] for r in ds["rejected"]}
    assert set(rejected) == {"b/truncated.png", "b/corrupt.jpg", "b/huge-dims.png", "b/zero.jpg"}, rejected
    assert "decompression bomb" in rejected["b/huge-dims.png"] or "too large" in rejected["b/huge-dims.png"]
    assert ds["counts"] == {"all": {"a": 9, "b": 3}}, ds
    folder = Path(settings.data_root) / "datasets" / ds["id"]
    for p in sorted(folder.rglob("*.*")):
        if p.relative_to(folder).as_posix() in rejected:
            continue  # kept as uploaded: a job's scan rejects the same files
        rgb = np.asarray(load_rgb(str(p)))
        assert rgb.shape == (24, 24, 3) or p.parent.name == "b", (p.name, rgb.shape)
        # 16-bit ramps must keep their range, not saturate to white.
        if "16" in p.name:
            assert 90 < rgb.mean() < 165 and rgb.min() < 20 and rgb.max() > 235, (p.name, rgb.mean())


def test_broken_members_rejected_one_by_one(client) -> None:
    resp = upload(client, _encrypted_and_corrupt_members())
    assert resp.status_code == 201, resp.text
    reasons = {r["path"]: r["reason"] for r in resp.json()["rejected"]}
    assert set(reasons) == {"a/enc.jpg", "a/corrupt.jpg"} and "encrypted" in reasons["a/enc.jpg"], reasons
    assert resp.json()["counts"] == {"all": {"a": 1, "b": 1}}


def test_non_utf8_cp437_names_accepted(client) -> None:
    # No UTF-8 flag: the names are cp437 by the zip spec; any bytes decode.
    raw = make_zip({"ab/x.jpg": jpeg(), "cd/y.jpg": jpeg()}).replace(b"ab/", b"\xe9\x81/")
    resp = upload(client, raw)
    assert resp.status_code == 201, resp.text
    assert len(resp.json()["classes"]) == 2


def test_oversize_upload_is_cut_off_early(stack_factory, redis_url: str) -> None:
    """A chunked body (no Content-Length) far over the cap: the server answers 413 and closes
    after about the cap, long before the client would have finished."""
    st: Stack = stack_factory(redis_url, max_upload_bytes=1_000_000)
    st.start_api()
    st.wait_api()
    frame = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
    with socket.create_connection(("127.0.0.1", st.port), timeout=10) as s:
        head = (
            "POST /v1/datasets HTTP/1.1\r\nHost: x\r\nContent-Type: application/zip\r\n"
            f"Authorization: Bearer {KEY_A}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        s.sendall(head.encode())
        sent, answer = _send_until_answered(s, frame, limit=200_000_000, seconds=60)
    print(f"server answered after {sent / 1e6:.1f} MB of a 200 MB body")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"upload_too_large" in answer
    assert sent < 20_000_000
    leftovers = list((Path(st.settings.data_root) / "datasets").iterdir())
    assert leftovers == [], leftovers


def _send_until_answered(s: socket.socket, frame: bytes, limit: int, seconds: float) -> tuple[int, bytes]:
    """Stream `frame` repeatedly until the server answers or closes, `limit` bytes are sent, or
    `seconds` pass. Partial sends are resumed where they stopped (a retried `sendall` on a
    non-blocking socket would resend a half-sent frame and break the chunked framing, leaving the
    server waiting for bytes that never come). Every wait is bounded: this never hangs."""
    sent, answer, pending = 0, b"", memoryview(b"")
    deadline = time.monotonic() + seconds
    while sent < limit and time.monotonic() < deadline:
        readable, writable, _ = select.select([s], [s], [], 1.0)
        if readable:
            with contextlib.suppress(ConnectionResetError):
                answer = s.recv(65536)
            break  # an answer, or the server closed the connection
        if writable:
            if not pending:
                pending = memoryview(frame)
            try:
                n = s.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                break
            pending, sent = pending[n:], sent + n
    s.settimeout(10)  # the rest of the answer, if any; bounded like everything else here
    with contextlib.suppress(OSError):
        while len(answer) < 65536 and (more := s.recv(65536)):
            answer += more
    return sent, answer
