"""Dataset upload: layouts, rejected files, and archives that try to hurt the server."""

from __future__ import annotations

import io
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from spkd.core.settings import Settings
from tests.helpers import HYMENOPTERA, KEY_B, small_imagefolder, zip_dir


def jpeg(color: str = "red", size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def upload(client, data: bytes, name: str = "ds"):
    return client.post(
        "/v1/datasets", files={"file": ("d.zip", data, "application/zip")}, data={"name": name}
    )


def test_split_layout_with_bad_files(client, settings: Settings, tmp_path: Path) -> None:
    folder = small_imagefolder(tmp_path / "hym", per_class=3)
    shutil.copy(HYMENOPTERA / "train" / "ants" / "imageNotFound.gif", folder / "train" / "ants")
    (folder / "train" / "bees" / "notes.txt").write_text("hi")
    (folder / "val" / "bees" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "train" / ".DS_Store").write_bytes(b"junk")
    resp = upload(client, zip_dir(folder, tmp_path / "d.zip", prefix="top/").read_bytes(), "hym")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["name"] == "hym" and ds["layout"] == "split" and ds["classes"] == ["ants", "bees"]
    assert ds["counts"]["val"] == {"ants": 3, "bees": 3}
    # Paths are those in the zip (the wrapping folder "top/" included), as in the folder itself.
    reasons = {r["path"]: r["reason"] for r in ds["rejected"]}
    assert reasons["top/train/bees/notes.txt"] == "not an image"
    assert reasons["top/val/bees/broken.jpg"].startswith("corrupt image")
    assert not any(".DS_Store" in p for p in reasons)
    # The zip is kept as it is: a job on the dataset scans the same tree and rejects the same files.
    on_disk = Path(settings.data_root) / "datasets" / ds["id"] / "top"
    assert sorted(p.name for p in (on_disk / "val" / "bees").iterdir()) == sorted(
        p.name for p in (folder / "val" / "bees").iterdir()
    )
    assert client.get(f"/v1/datasets/{ds['id']}").json() == ds
    assert client.get("/v1/datasets").json()["data"] == [ds]
    bob = {"Authorization": f"Bearer {KEY_B}"}
    assert client.get(f"/v1/datasets/{ds['id']}", headers=bob).status_code == 404


def test_flat_layout_raw_zip_body_and_macosx(client) -> None:
    data = make_zip(
        {
            "cats/a.jpg": jpeg(),
            "cats/b.jpg": jpeg(),
            "dogs/c.jpg": jpeg("blue"),
            "__MACOSX/cats/._a.jpg": b"junk",
            "readme.md": b"x",
        }
    )
    resp = client.post(
        "/v1/datasets", params={"name": "pets"}, content=data, headers={"Content-Type": "application/zip"}
    )
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["layout"] == "flat" and ds["counts"] == {"all": {"cats": 2, "dogs": 1}} and ds["name"] == "pets"
    assert [r["path"] for r in ds["rejected"]] == ["readme.md"]


@pytest.mark.parametrize(
    ("entries", "code"),
    [
        ({"../evil/a.jpg": b"x", "b/c.jpg": b"x"}, "unsafe_archive"),
        ({"/abs/a.jpg": b"x", "b/c.jpg": b"x"}, "unsafe_archive"),
        ({"a/../../x.jpg": b"x"}, "unsafe_archive"),
        ({"only/a.jpg": None}, "too_few_classes"),
    ],
)
def test_refused_archives(client, settings: Settings, entries: dict, code: str) -> None:
    data = make_zip({k: (v if v is not None else jpeg()) for k, v in entries.items()})
    resp = upload(client, data)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == code, resp.text
    root = Path(settings.data_root)
    assert not (root.parent / "evil").exists()
    assert [p.name for p in (root / "datasets").iterdir()] == []  # nothing left behind


def test_symlink_member_leading_outside_is_rejected_with_its_reason(client) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("a/link.jpg")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
        zf.writestr("b/x.jpg", jpeg())
    resp = upload(client, buf.getvalue())
    error = resp.json()["error"]
    assert resp.status_code == 422 and error["code"] == "too_few_classes", error  # only class b is left
    assert {"path": "a/link.jpg", "reason": "symlink leads outside the dataset"} in error["rejected"]


def test_not_a_zip_and_empty(client) -> None:
    resp = upload(client, b"this is not a zip")
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_archive"
    resp = client.post("/v1/datasets", files={"name": (None, "x")})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "missing_file"


def test_size_caps(client, settings: Settings) -> None:
    big = make_zip({"a/x.jpg": jpeg(), "b/y.jpg": jpeg(), "c/z.bin": b"\0" * 4096})
    client.app.state.settings = settings.model_copy(update={"max_upload_bytes": 1000})
    resp = upload(client, big)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "upload_too_large"
    client.app.state.settings = settings.model_copy(update={"max_uncompressed_bytes": 2000})
    bomb = make_zip({"a/x.jpg": jpeg(), "b/y.jpg": b"\0" * 10_000_000})  # deflates to ~10 kB
    resp = upload(client, bomb)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "archive_too_large"
    client.app.state.settings = settings.model_copy(update={"max_files": 2})
    resp = upload(client, make_zip({"a/1.jpg": jpeg(), "a/2.jpg": jpeg(), "b/3.jpg": jpeg()}))
    assert resp.json()["error"]["code"] == "too_many_files"


def test_decompression_bomb_image_rejected(client, settings: Settings) -> None:
    client.app.state.settings = settings.model_copy(update={"max_image_pixels": 100 * 100})
    huge = io.BytesIO()
    Image.new("L", (400, 400)).save(huge, "PNG")
    resp = upload(
        client,
        make_zip(
            {"a/ok.jpg": jpeg(size=(50, 50)), "a/huge.png": huge.getvalue(), "b/ok.jpg": jpeg(size=(50, 50))}
        ),
    )
    assert resp.status_code == 201, resp.text
    rejected = resp.json()["rejected"]
    assert rejected[0]["path"] == "a/huge.png" and "too large" in rejected[0]["reason"]


def test_malformed_multipart_is_400(client) -> None:
    boundary = "d179e1be866c7109f564f879b78645d0"
    body = f"--{boundary}\r\n0.0--{boundary}--\r\n".encode()  # found by schemathesis: a 500 before
    resp = client.post(
        "/v1/datasets", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_multipart"
