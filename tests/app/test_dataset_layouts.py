"""One tree, two ways in: uploaded as a zip, or named as `dataset.path`, it must give the
same classes, counts and rejected files, and a job on the uploaded copy must see exactly what the
upload record says. Many small trees: the layouts people have, odd names, junk, symlinks."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import unicodedata
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from spkd.cli.files import zip_folder
from spkd.common.errors import SpkdError
from spkd.core.settings import Settings
from spkd.models.data import loader
from tests.helpers import HYMENOPTERA


def img(path: Path, color: str = "red", fmt: str = "JPEG", mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (24, 24), color).save(path, fmt)


def classes(root: Path, names: dict[str, int], start: int = 0) -> None:
    colors = ["red", "blue", "green", "yellow", "black", "white"]
    for k, (name, n) in enumerate(names.items()):
        for i in range(n):
            img(root / name / f"{name}_{start + i}.jpg", colors[k % len(colors)])


def write(path: Path, text: str = "hello") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def flat(r: Path) -> None:
    classes(r, {"cats": 3, "dogs": 3})


def train_val(r: Path) -> None:
    classes(r / "train", {"cats": 3, "dogs": 3})
    classes(r / "val", {"cats": 2, "dogs": 2}, 10)


def train_val_test(r: Path) -> None:
    train_val(r)
    classes(r / "test", {"cats": 2, "dogs": 1}, 20)


def training_validation(r: Path) -> None:
    classes(r / "training", {"cats": 3, "dogs": 3})
    classes(r / "Validation", {"cats": 2, "dogs": 2}, 10)


def train_valid_test(r: Path) -> None:
    classes(r / "train", {"cats": 3, "dogs": 3})
    classes(r / "valid", {"cats": 2, "dogs": 2}, 10)
    classes(r / "test", {"cats": 1, "dogs": 2}, 20)


def train_test(r: Path) -> None:
    classes(r / "train", {"cats": 4, "dogs": 4})
    classes(r / "test", {"cats": 2, "dogs": 2}, 10)


def wrapped_readme(r: Path) -> None:
    train_val(r / "pets")
    write(r / "pets" / "README.md")
    write(r / "SOURCE.md")


def wrapped_twice(r: Path) -> None:
    classes(r / "outer" / "inner", {"cats": 3, "dogs": 3})


def nested(r: Path) -> None:
    classes(r / "cats" / "indoor", {"a": 2})
    classes(r / "cats" / "outdoor" / "deep", {"b": 1})
    classes(r, {"dogs": 2})


def class_named_train(r: Path) -> None:
    classes(r, {"bus": 2, "car": 2, "train": 2})


def classes_train_and_test(r: Path) -> None:
    classes(r, {"train": 3, "test": 3})


def class_only_in_val(r: Path) -> None:
    train_val(r)
    classes(r / "val", {"birds": 2}, 30)


def junk(r: Path) -> None:
    flat(r)
    write(r / "cats" / ".DS_Store")
    write(r / "__MACOSX" / "cats" / "._cats_0.jpg")
    write(r / "cats" / "._cats_1.jpg")
    write(r / "dogs" / "Thumbs.db")
    write(r / "dogs" / "notes.jpg", "not a picture")
    write(r / "dogs" / "README.md")
    (r / "dogs" / "empty.png").write_bytes(b"")
    write(r / ".git" / "config")
    write(r / "stray.txt")


def odd_names(r: Path) -> None:
    img(r / "cats" / "a.jfif")
    img(r / "cats" / "b.jpe")
    img(r / "cats" / "noext")
    img(r / "cats" / "C.JPG")
    img(r / "dogs" / "png-named.jpg", "blue", "PNG")
    img(r / "dogs" / "x.webp", "blue", "WEBP")
    img(r / "dogs" / "y.tif", "blue", "TIFF")


def unicode_names(r: Path) -> None:
    classes(r, {unicodedata.normalize("NFD", "café"): 2, "日本": 2, "naïve €": 1})
    img(r / "日本" / "über straße.jpg", "blue")


def one_class(r: Path) -> None:
    classes(r / "only", {"a": 2, "b": 2})  # a wrapper around 2 classes is fine...
    classes(r / "only" / "a", {"x": 1})  # ...and nested images stay in class a
    shutil.rmtree(r / "only" / "b")


def empty_class(r: Path) -> None:
    flat(r)
    write(r / "birds" / "x.jpg", "garbage")


def empty_val(r: Path) -> None:
    classes(r / "train", {"cats": 2, "dogs": 2})
    write(r / "val" / "cats" / "x.jpg", "garbage")


def loose_in_split(r: Path) -> None:
    train_val_test(r)
    img(r / "train" / "loose.jpg")
    write(r / "test" / "notes.md")


def link_inside(r: Path) -> None:
    flat(r)
    (r / "cats" / "link.jpg").symlink_to(Path("..") / "dogs" / "dogs_0.jpg")
    (r / "more").symlink_to("cats", target_is_directory=True)


def link_outside(r: Path) -> None:
    flat(r)
    outside = r.parent / f"{r.name}-outside"
    classes(outside, {"birds": 2})
    (r / "cats" / "out.jpg").symlink_to(outside / "birds" / "birds_0.jpg")
    (r / "birds").symlink_to(outside / "birds", target_is_directory=True)
    (r / "dogs" / "broken.jpg").symlink_to("nowhere.jpg")


def link_loop(r: Path) -> None:
    flat(r)
    (r / "cats" / "again").symlink_to("..", target_is_directory=True)


def labels_csv_flat(r: Path) -> None:
    for i, color in enumerate(["red", "blue"] * 3):
        img(r / "images" / f"{i}.jpg", color)
    img(r / "images" / "unlisted.jpg")
    rows = [f"images/{i}.jpg,{cls}" for i, cls in enumerate(["cat", "dog"] * 3)]
    write(r / "labels.csv", "path,label\n" + "\n".join(rows + ["images/gone.jpg,cat", "../x.jpg,cat"]) + "\n")


def labels_csv_beside_one_folder(r: Path) -> None:
    """labels.csv next to a single folder with subfolders: not a wrapper, the label file rules."""
    rows = ["path,label"]
    for i in range(4):
        for sub in ("a", "b"):
            img(r / "photos" / sub / f"{i}.jpg", "red" if i % 2 else "blue")
            rows.append(f"photos/{sub}/{i}.jpg,{'red' if i % 2 else 'blue'}")
    write(r / "labels.csv", "\n".join(rows) + "\n")


def labels_csv_split(r: Path) -> None:
    rows = ["path,label,split"]
    for i in range(8):
        split = "val" if i >= 6 else "train"
        img(r / "all" / f"{i}.png", "red" if i % 2 else "blue", "PNG")
        rows.append(f"all/{i}.png,{'red' if i % 2 else 'blue'},{split}")
    rows.append("all/0.png,blue,train")  # listed twice
    write(r / "labels.csv", "\n".join(rows) + "\n")


def hf_imagefolder_splits(r: Path) -> None:
    for split, n in (("train", 6), ("test", 2)):
        lines = ["file_name,label"]
        for i in range(n):
            img(r / split / "imgs" / f"{i}.jpg", "red" if i % 2 else "blue")
            lines.append(f"imgs/{i}.jpg,{'red' if i % 2 else 'blue'}")
        write(r / split / "metadata.csv", "\n".join(lines) + "\n")
    write(r / "README.md")


def hf_imagefolder_jsonl_wrapped(r: Path) -> None:
    lines = []
    for i in range(6):
        img(r / "ds" / f"{i}.jpg", "red" if i % 2 else "blue")
        lines.append(json.dumps({"file_name": f"{i}.jpg", "label": i % 2, "text": "x"}))
    write(r / "ds" / "metadata.jsonl", "\n".join(lines) + "\n")


def bad_label_file(r: Path) -> None:
    flat(r)
    write(r / "labels.csv", "filename,class\ncats/cats_0.jpg,cats\n")


CASES: dict[str, Callable[[Path], None]] = {
    f.__name__: f
    for f in (
        flat,
        train_val,
        train_val_test,
        training_validation,
        train_valid_test,
        train_test,
        wrapped_readme,
        wrapped_twice,
        nested,
        class_named_train,
        classes_train_and_test,
        class_only_in_val,
        junk,
        odd_names,
        unicode_names,
        one_class,
        empty_class,
        empty_val,
        loose_in_split,
        link_inside,
        link_outside,
        link_loop,
        labels_csv_flat,
        labels_csv_beside_one_folder,
        labels_csv_split,
        hf_imagefolder_splits,
        hf_imagefolder_jsonl_wrapped,
        bad_label_file,
    )
}


def zip_tree(root: Path, utf8_flag: bool = True) -> bytes:
    """Every file, folder and symlink under `root` (links stored as links, like `zip -y`)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in sorted(dirnames + filenames):
                path = Path(dirpath) / name
                arc = path.relative_to(root).as_posix()
                if path.is_symlink():
                    info = zipfile.ZipInfo(arc)
                    info.create_system = 3
                    info.external_attr = 0o120777 << 16
                    zf.writestr(info, os.readlink(path))
                elif path.is_dir():
                    zf.writestr(arc + "/", b"")
                else:
                    zf.write(path, arc)
            dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    raw = buf.getvalue()
    return raw if utf8_flag else clear_utf8_flags(raw)


def clear_utf8_flags(raw: bytes) -> bytes:
    """What macOS Finder writes: UTF-8 names without the zip UTF-8 flag (bit 11)."""
    out = bytearray(raw)
    eocd = raw.rindex(b"PK\x05\x06")
    count, _, offset = struct.unpack("<HII", raw[eocd + 10 : eocd + 20])
    for _ in range(count):
        assert out[offset : offset + 4] == b"PK\x01\x02"
        out[offset + 9] &= ~0x08  # general purpose flag (offset 8, little-endian): bit 11
        local = struct.unpack("<I", raw[offset + 42 : offset + 46])[0]
        out[local + 7] &= ~0x08
        n, m, k = struct.unpack("<HHH", raw[offset + 28 : offset + 34])
        offset += 46 + n + m + k
    return bytes(out)


def engine_view(root: Path) -> dict:
    """What a job on `root` uses, in the upload record's shape: roles mapped back to folders
    (test/ is the report split and val/ the selection split), a seeded val split put back
    together (the upload cannot know the job's seed)."""
    try:
        scan = loader.scan_dataset(root)
    except SpkdError as e:
        return {"error": e.code}
    counts = scan.counts()
    if scan.roles["report"] == "test/":  # the job reports on test/ and selects on val/
        counts["test"] = counts.pop("val")
        if "selection" in counts:
            counts["val"] = counts.pop("selection")
    if scan.report_from == "seeded":
        counts["train"] = {c: counts["train"][c] + counts["val"][c] for c in scan.classes}
        del counts["val"]
    if scan.layout == "flat":
        counts = {"all": counts["train"]}
    return {"classes": scan.classes, "counts": counts, "rejected": scan.rejected}


def upload_view(client, raw: bytes, settings: Settings) -> tuple[dict, Path | None]:
    resp = client.post("/v1/datasets", content=raw, headers={"Content-Type": "application/zip"})
    body = resp.json()
    if resp.status_code != 201:
        assert resp.status_code == 422, resp.text
        return {"error": body["error"]["code"]}, None
    folder = Path(settings.data_root) / "datasets" / body["id"]
    return {k: body[k] for k in ("classes", "counts", "rejected")}, folder


def short(view: dict) -> str:
    if "error" in view:
        return f"error {view['error']}"
    counts = "; ".join(f"{s}: {sum(c.values())}" for s, c in view["counts"].items())
    return f"{','.join(view['classes'])} | {counts} | {len(view['rejected'])} rejected"


@pytest.mark.parametrize("flag", [True, False], ids=["utf8-flag", "finder-no-flag"])
def test_zip_and_path_agree_on_every_layout(client, settings: Settings, tmp_path: Path, flag: bool) -> None:
    rows, disagree = [], []
    for name, build in CASES.items():
        tree = tmp_path / name / "tree"
        build(tree)
        by_path = engine_view(tree)
        by_zip, folder = upload_view(client, zip_tree(tree, utf8_flag=flag), settings)
        # The job on the uploaded copy sees what the record says, to the file.
        by_job = engine_view(folder) if folder else by_zip
        # `spkd datasets upload FOLDER` zips with cli.files.zip_folder.
        by_cli, _ = upload_view(client, zip_folder(tree, tmp_path / name / "cli.zip").read_bytes(), settings)
        ok = by_path == by_zip == by_job == by_cli
        rows.append(f"| {name} | {short(by_zip)} | {short(by_path)} | {'yes' if ok else 'NO'} |")
        if not ok:
            disagree.append((name, by_zip, by_path, by_job, by_cli))
    print("\n| layout | zip | path | agree |\n|---|---|---|---|\n" + "\n".join(rows))
    assert not disagree, disagree


def test_layouts_decide_what_people_mean(tmp_path: Path) -> None:
    """The verdicts themselves, for the layouts of the issue."""
    views = {}
    for name, build in CASES.items():
        build(tmp_path / name)
        views[name] = engine_view(tmp_path / name)
    assert views["train_val_test"]["counts"]["test"] == {"cats": 2, "dogs": 1}
    assert views["train_valid_test"]["counts"] == {
        "train": {"cats": 3, "dogs": 3},
        "val": {"cats": 2, "dogs": 2},
        "test": {"cats": 1, "dogs": 2},
    }
    assert views["train_test"]["counts"] == {"train": {"cats": 4, "dogs": 4}, "test": {"cats": 2, "dogs": 2}}
    assert views["training_validation"]["counts"]["val"] == {"cats": 2, "dogs": 2}
    assert views["wrapped_readme"]["rejected"] == [
        {"path": "SOURCE.md", "reason": "not inside a class folder"},
        {"path": "pets/README.md", "reason": "not inside a class folder"},
    ]
    assert views["wrapped_twice"]["classes"] == ["cats", "dogs"]
    assert views["nested"]["counts"] == {"all": {"cats": 3, "dogs": 2}}
    assert views["class_named_train"]["classes"] == ["bus", "car", "train"]
    assert views["classes_train_and_test"]["classes"] == ["test", "train"]
    assert views["class_only_in_val"]["classes"] == ["cats", "dogs"]
    assert {r["reason"] for r in views["class_only_in_val"]["rejected"]} == {
        "class 'birds' has no folder in train/"
    }
    assert {r["path"]: r["reason"] for r in views["junk"]["rejected"]} == {
        "dogs/README.md": "not an image",
        "dogs/empty.png": "not an image",
        "dogs/notes.jpg": "not an image",
        "stray.txt": "not inside a class folder",
    }
    assert views["odd_names"]["counts"] == {"all": {"cats": 4, "dogs": 3}}
    assert views["unicode_names"]["classes"] == sorted(["café", "naïve €", "日本"])
    assert views["one_class"] == {"error": "too_few_classes"}
    assert views["empty_class"] == {"error": "empty_class"}
    assert views["empty_val"] == {"error": "empty_split"}
    assert {r["path"] for r in views["loose_in_split"]["rejected"]} == {"test/notes.md", "train/loose.jpg"}
    assert views["link_inside"]["counts"] == {"all": {"cats": 4, "dogs": 3, "more": 4}}
    assert {r["path"]: r["reason"] for r in views["link_outside"]["rejected"]} == {
        "birds": "symlink leads outside the dataset",
        "cats/out.jpg": "symlink leads outside the dataset",
        "dogs/broken.jpg": "broken symlink",
    }
    assert views["link_loop"]["rejected"] == [{"path": "cats/again", "reason": "symlink loop"}]
    assert views["labels_csv_flat"]["counts"] == {"all": {"cat": 3, "dog": 3}}
    assert {r["path"]: r["reason"] for r in views["labels_csv_flat"]["rejected"]} == {
        "images/gone.jpg": "listed in labels.csv but missing",
        "images/unlisted.jpg": "not listed in labels.csv",
        "labels.csv:9": "labels.csv line 9: path leaves its folder",
    }
    assert views["labels_csv_beside_one_folder"]["counts"] == {"all": {"blue": 4, "red": 4}}
    split = views["labels_csv_split"]
    assert split["counts"] == {"train": {"blue": 3, "red": 3}, "val": {"blue": 1, "red": 1}}
    assert split["rejected"] == [{"path": "all/0.png", "reason": "listed twice in labels.csv"}]
    assert views["hf_imagefolder_splits"]["counts"] == {
        "train": {"blue": 3, "red": 3},
        "test": {"blue": 1, "red": 1},
    }
    assert views["hf_imagefolder_splits"]["rejected"] == [
        {"path": "README.md", "reason": "not listed in a label file"}
    ]
    assert views["hf_imagefolder_jsonl_wrapped"]["counts"] == {"all": {"0": 3, "1": 3}}
    assert views["bad_label_file"] == {"error": "bad_label_file"}


def test_readme_upload_example_works(client, tmp_path: Path) -> None:
    """README and docs/api.md: `(cd ../shared/data && zip -qr /tmp/hymenoptera.zip hymenoptera)`,
    then upload."""
    out = tmp_path / "hymenoptera.zip"
    subprocess.run(["zip", "-qr", str(out), "hymenoptera"], cwd=HYMENOPTERA.parent, check=True)
    resp = client.post("/v1/datasets", files={"file": ("h.zip", out.read_bytes(), "application/zip")})
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["classes"] == ["ants", "bees"] and ds["layout"] == "split"
    assert ds["counts"] == {"train": {"ants": 124, "bees": 121}, "val": {"ants": 70, "bees": 83}}
    assert ds["rejected"] == [{"path": "hymenoptera/SOURCE.md", "reason": "not inside a class folder"}]
