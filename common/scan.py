"""The one dataset scanner: which files are the classes, splits and samples of a folder,
and which files are left out, each with its reason.

The upload (app/datasets.py, after extracting the zip as it is) and the engine
(models/data/loader.py `scan_dataset`) both call `scan_tree`, so one tree gives the same classes, counts
and rejected list whether it arrives as a zip or as `dataset.path`. Torch-free: the API imports it.

The rules (docs/datasets.md states them for users):

1. Ignored silently: names starting with `.` (`.DS_Store`, `.git/`, AppleDouble `._x`),
   `__MACOSX/`, `Thumbs.db`, `desktop.ini`.
2. Symlinks (files and folders) are followed only when they resolve inside the dataset folder;
   otherwise the link is rejected "symlink leads outside the dataset" ("broken symlink" when the
   target is missing; a folder link back into its own ancestors is a "symlink loop").
3. Wrapping folders: while the folder holds exactly one subfolder, that subfolder is not a train
   split (`train/`, `training/`) and holds subfolders itself, the dataset is inside it (up to 4
   levels: `hymenoptera/train/...`).
   Files beside a wrapping folder (README.md, SOURCE.md) are rejected, never fatal.
4. The tree is split-structured when ALL its top folders are split names (train: `train`,
   `training`; val: `val`, `valid`, `validation`; test: `test`, `testing`; any case), one of them
   is a train split, AND that train folder holds subfolders (the classes). So classes named
   `bus`, `car`, `train` stay classes, and so do two classes `train` and `test` holding images.
   Otherwise every top folder is a class.
5. A class is a folder directly in the dataset (flat) or in the train split; every file below it,
   in nested subfolders too, belongs to it. Class names are NFC-normalised (a macOS name in NFD
   and the same name in NFC are one class). Files of a val/test class with no train folder are
   rejected "class 'x' has no folder in train/". Files not inside a class folder are rejected.
6. Whether a file is an image is decided by its content (common/decode.py, Pillow), never by its
   extension: `.jfif`, `.jpe` or no extension work; a text file named `.jpg` is "not an image".

7. Label files instead of class folders: a `labels.csv` in the dataset folder (columns `path`,
   `label`, optional `split`; paths relative to it), or the Hugging Face imagefolder convention:
   a `metadata.csv` / `metadata.jsonl` (`file_name`, `label`) in the dataset folder or in each
   split folder (paths relative to that file). A row's split: the file's split folder, else its
   `split` column, else the path's first folder when it is a split name, else train. Files no
   row names are rejected "not listed in <file>"; rows naming no file "listed in <file> but
   missing".

Errors (`ScanError`, a `SpkdError` carrying the rejected list): `dataset_not_found`,
`too_few_classes` (under 2 classes with a usable training image), `empty_class` (a class folder
whose files are all rejected), `empty_split` (a val/test folder without one usable image),
`bad_label_file` (a label file without its columns, or not UTF-8 text / JSON lines).
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import random
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from spkd.common import decode
from spkd.common.errors import SpkdError

SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
_SPLIT_OF = {name: split for split, names in SPLIT_FOLDERS.items() for name in names}
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
MAX_WRAPPERS = 4
MAX_DEPTH = 32  # folders below a class folder: deeper trees are a mistake or an attack
CHECK_DRAFT = (64, 64)  # JPEG validation decodes at reduced scale: every block is still read

NOT_IN_CLASS = "not inside a class folder"
# Written by the upload into the dataset folder: zip members that were never extracted (a symlink
# leading outside, an unreadable member) with their reasons, so a job lists them like the upload.
UNEXTRACTED_FILE = ".spkd-unextracted.json"
OUTSIDE = "symlink leads outside the dataset"


@dataclass(frozen=True)
class Sample:
    """One usable image: its path (absolute, as found under the dataset folder) and class index."""

    path: str
    label: int


@dataclass
class Scan:
    """What `scan_tree` found. `layout` "split" (train/ + optional val/, test/) or "flat" (class
    folders: every image is in `train`, the engine splits off val by seed). `folders` names the
    folder(s) each split came from, e.g. {"train": ["train"], "val": ["valid"]}; `base` is the
    dataset folder relative to the given root ("" when not wrapped). Paths in `rejected` are
    relative to the given root, `/`-separated."""

    layout: str
    classes: list[str]
    train: list[Sample]
    val: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    folders: dict[str, list[str]] = field(default_factory=dict)
    base: str = ""

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: images}}: "all" for a flat tree; "train" plus "val"/"test" for each
        split folder the tree has."""
        splits = [("all", self.train)] if self.layout == "flat" else [("train", self.train)]
        splits += [(s, getattr(self, s)) for s in ("val", "test") if s in self.folders]
        return {name: count_per_class(samples, self.classes) for name, samples in splits}


class ScanError(SpkdError):
    """The tree cannot be a dataset; `rejected` lists the files left out (with reasons) so far."""

    def __init__(self, code: str, message: str, rejected: list[dict[str, str]]) -> None:
        super().__init__(code, message, "dataset")
        self.rejected = rejected


def count_per_class(samples: Iterable[Sample], classes: list[str]) -> dict[str, int]:
    """{class name: number of samples}, every class listed."""
    per = Counter(s.label for s in samples)
    return {name: per.get(i, 0) for i, name in enumerate(classes)}


def split_of(name: str) -> str | None:
    """ "train" / "val" / "test" for a split folder name (any case), else None."""
    return _SPLIT_OF.get(name.lower())


def _printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (surrogate-escaped by Python) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def class_name(folder_name: str) -> str:
    """The class a folder names: NFC-normalised; bytes that are not UTF-8 shown as U+FFFD."""
    return unicodedata.normalize("NFC", _printable(folder_name))


# ------------------------------------------------------------------------------ checking a file
def check_image(path: str | Path, max_pixels: int | None = None) -> str | None:
    """None when the file decodes through common.decode, else the reason it does not.

    `max_pixels` (default: Pillow's `Image.MAX_IMAGE_PIXELS`) bounds width x height; larger images
    are refused before decoding (decompression-bomb guard). The reason never names server folders.
    """
    limit = max_pixels or Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
            if limit and width * height > limit:
                return f"image too large ({width}x{height} pixels, limit {limit})"
            decode.load_rgb(path, draft=CHECK_DRAFT)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "image too large (decompression-bomb guard)"
    except UnidentifiedImageError:
        return "not an image"
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "not a usable image"
        text = f"corrupt image ({type(exc).__name__}: {exc})"
        return text.replace(str(path), Path(path).name)[:300]
    return None


# ------------------------------------------------------------------------------ walking the tree
class _Walker:
    """Lists folders under `root` by the ignore and symlink rules, recording rejections."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.rejected: list[dict[str, str]] = []
        self._listed: dict[Path, tuple[list[Path], list[Path]]] = {}

    def rel(self, path: Path) -> str:
        """`path` relative to the root, `/`-separated; bytes that are not UTF-8 shown as U+FFFD
        (the text goes into JSON)."""
        return _printable(path.relative_to(self.root).as_posix())

    def reject(self, path: Path, reason: str) -> None:
        self.rejected.append({"path": self.rel(path), "reason": reason})

    def listing(self, folder: Path) -> tuple[list[Path], list[Path]]:
        """(subfolders, files) of `folder`, sorted by name, after the ignore and symlink rules.
        Listed once: a second call returns the same lists without rejecting anything twice."""
        if folder not in self._listed:
            self._listed[folder] = self._list(folder)
        dirs, files = self._listed[folder]
        return list(dirs), list(files)

    def _list(self, folder: Path) -> tuple[list[Path], list[Path]]:
        dirs: list[Path] = []
        files: list[Path] = []
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            self.reject(folder, f"unreadable folder ({exc.strerror or type(exc).__name__})")
            return dirs, files
        for entry in entries:
            if entry.name.startswith(".") or entry.name in IGNORED_NAMES:
                continue
            path = Path(entry.path)
            kind = self._kind(entry)
            if kind == "dir":
                dirs.append(path)
            elif kind == "file":
                files.append(path)
            else:
                self.reject(path, kind)
        return dirs, files

    def _kind(self, entry: os.DirEntry) -> str:
        """ "dir", "file", or the reason the entry is rejected."""
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if os.path.commonpath([target, self.real_root]) != self.real_root:
                return OUTSIDE
            if not os.path.exists(target):
                return "broken symlink"
            return "dir" if os.path.isdir(target) else "file" if os.path.isfile(target) else "not a file"
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        return "file" if entry.is_file(follow_symlinks=False) else "not a file"

    def files_under(self, folder: Path, ancestors: frozenset[str] = frozenset()) -> list[Path]:
        """Every file below `folder`, nested folders included (MAX_DEPTH levels); a folder link
        into its own ancestors is rejected as a loop instead of being walked forever."""
        real = os.path.realpath(folder)
        inside_parent = os.path.realpath(folder.parent)
        if real in ancestors or os.path.commonpath([real, inside_parent]) == real:
            self.reject(folder, "symlink loop")
            return []
        if len(ancestors) >= MAX_DEPTH:
            self.reject(folder, f"nested more than {MAX_DEPTH} folders deep (not read)")
            return []
        dirs, files = self.listing(folder)
        for sub in dirs:
            files += self.files_under(sub, ancestors | {real})
        return files


def _unextracted(root: Path) -> list[dict[str, str]]:
    """The upload's list of members it could not extract (UNEXTRACTED_FILE), if any."""
    try:
        entries = json.loads((root / UNEXTRACTED_FILE).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(entries, list):
        return []
    return [
        {"path": e["path"], "reason": e["reason"]}
        for e in entries
        if isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("reason"), str)
    ]


def _unwrap(walker: _Walker, root: Path) -> tuple[Path, list[Path], list[Path]]:
    """The dataset folder inside up to MAX_WRAPPERS single wrapping folders, with its listing.
    Files beside a wrapping folder are rejected."""
    base = root
    dirs, files = walker.listing(base)
    for _ in range(MAX_WRAPPERS):
        if len(dirs) != 1 or split_of(dirs[0].name) == "train" or any(_label_kind(f) for f in files):
            break  # a label file here makes this the dataset folder
        inner_dirs, inner_files = walker.listing(dirs[0])
        if not inner_dirs and not any(_label_kind(f) for f in inner_files):
            break
        for f in files:
            walker.reject(f, NOT_IN_CLASS)
        base = dirs[0]
        dirs, files = walker.listing(base)
    return base, dirs, files


def _is_split_tree(walker: _Walker, dirs: list[Path]) -> bool:
    """Rule 4 of the module docstring: all top folders split names, a train split among them,
    and that train folder holds subfolders."""
    if not dirs or any(split_of(d.name) is None for d in dirs):
        return False
    trains = [d for d in dirs if split_of(d.name) == "train"]
    return any(walker.listing(d)[0] for d in trains)


# ------------------------------------------------------------------------------ label files
LABELS_CSV = "labels.csv"
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
MAX_LABEL_FILE_BYTES = 64 << 20


def _label_kind(path: Path) -> str | None:
    """ "labels" for labels.csv, "metadata" for a Hugging Face imagefolder metadata file, else None."""
    name = path.name.lower()
    return "labels" if name == LABELS_CSV else "metadata" if name in METADATA_NAMES else None


def _labelled(
    walker: _Walker, base: Path, dirs: list[Path], files: list[Path]
) -> tuple[str, dict[str, list[str]], list[tuple[str, str, Path]]] | None:
    """Rule 7: classes from label files instead of folder names. None when the dataset folder
    has no label file (in itself, or in a split folder for the imagefolder convention)."""
    units: list[tuple[Path, Path, str | None]] = []  # (label file, its folder, the folder's split)
    top = [f for f in files if _label_kind(f)]
    if top:
        units.append((top[0], base, None))
    else:
        for d in dirs:
            meta = [f for f in walker.listing(d)[1] if _label_kind(f) == "metadata"]
            if split_of(d.name) and meta:
                units.append((meta[0], d, split_of(d.name)))
    if not units:
        return None
    covered = {folder for _, folder, _ in units}
    for f in files:
        if base not in covered and f.parent == base:
            walker.reject(f, "not listed in a label file")
    for d in dirs:
        if base not in covered and d not in covered:
            for f in walker.files_under(d):
                walker.reject(f, "not listed in a label file")
    candidates: list[tuple[str, str, Path]] = []
    folders: dict[str, list[str]] = {}
    for label_file, folder, split in units:
        shown = walker.rel(label_file)
        for row_split, cls, path in _rows(walker, label_file, folder, split):
            candidates.append((row_split, cls, path))
            folders.setdefault(row_split, [])
            if shown not in folders[row_split]:
                folders[row_split].append(shown)
    split_tree = any(split is not None for _, _, split in units) or set(folders) - {"train"}
    return ("split" if split_tree else "flat"), folders, candidates


def _rows(walker: _Walker, label_file: Path, folder: Path, split: str | None) -> list[tuple[str, str, Path]]:
    """(split, class, file) for each usable row of one label file; every file under `folder`
    that no row names, and every row that names no usable file, is rejected with a reason."""
    shown = walker.rel(label_file)
    present = {str(f): f for f in walker.files_under(folder) if f != label_file and not _label_kind(f)}
    out: list[tuple[str, str, Path]] = []
    seen: set[str] = set()
    for line, raw_path, raw_label, raw_split in _read_label_file(walker, label_file):
        rel = posixpath.normpath(raw_path.replace("\\", "/"))
        where = f"{shown} line {line}"
        if rel.startswith(("/", "../")) or rel == ".." or not raw_path:
            walker.rejected.append({"path": f"{shown}:{line}", "reason": f"{where}: path leaves its folder"})
            continue
        path = folder / rel
        key = str(path)
        if key in seen:
            walker.reject(path, f"listed twice in {shown}")
            continue
        seen.add(key)
        if key not in present:
            if not os.path.lexists(path):
                walker.reject(path, f"listed in {shown} but missing")
            continue  # present but ignored or refused (hidden, a link leading outside): said already
        del present[key]
        first = rel.split("/")[0]
        row_split = split or split_of(raw_split or "") or (split_of(first) if "/" in rel else None) or "train"
        if not raw_label:
            walker.reject(path, f"no label in {shown}")
            continue
        out.append((row_split, class_name(raw_label), path))
    for path in present.values():
        walker.reject(path, f"not listed in {shown}")
    return out


def _read_label_file(walker: _Walker, path: Path) -> list[tuple[int, str, str, str]]:
    """(line, path, label, split) rows of labels.csv (`path,label[,split]`) or of a metadata.csv /
    metadata.jsonl (`file_name`, `label`). Raises ScanError("bad_label_file") when unreadable."""
    shown = walker.rel(path)

    def bad(why: str) -> ScanError:
        rejected = sorted(walker.rejected, key=lambda r: r["path"])
        return ScanError("bad_label_file", f"{shown}: {why}", rejected)

    try:
        if path.stat().st_size > MAX_LABEL_FILE_BYTES:
            raise bad(f"larger than {MAX_LABEL_FILE_BYTES >> 20} MiB")
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise bad(f"unreadable ({type(exc).__name__})") from exc
    if path.suffix.lower() == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise bad(f"line {n} is not JSON") from exc
                if not isinstance(obj, dict):
                    raise bad(f"line {n} is not a JSON object")
                records.append((n, obj))
    else:
        reader = csv.DictReader(io.StringIO(text))
        records = [(n + 2, row) for n, row in enumerate(reader)]
    rows = []
    for n, rec in records:
        fields = {str(k).strip().lower(): v for k, v in rec.items() if k is not None}
        file = fields.get("file_name", fields.get("path"))
        if file is None or "label" not in fields:
            raise bad("needs the columns path (or file_name) and label")
        label = "" if fields["label"] is None else str(fields["label"]).strip()
        rows.append((n, str(file).strip(), label, str(fields.get("split") or "").strip()))
    return rows


# ------------------------------------------------------------------------------ the scan
def scan_tree(root: str | Path, *, max_pixels: int | None = None, workers: int | None = None) -> Scan:
    """Scan the dataset folder `root` by the module's rules; every image file is decoded once
    (threads: `workers`, default min(8, CPUs)). Raises `ScanError` when the tree is unusable."""
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise ScanError("dataset_not_found", f"dataset folder {root.name!r} does not exist", [])
    walker = _Walker(root)
    walker.rejected += _unextracted(root)
    base, dirs, files = _unwrap(walker, root)
    labelled = _labelled(walker, base, dirs, files)
    if labelled is not None:
        layout, folders, candidates = labelled
        return _decide(walker, layout, folders, candidates, base, max_pixels, workers)
    for f in files:
        walker.reject(f, NOT_IN_CLASS)
    layout = "split" if _is_split_tree(walker, dirs) else "flat"
    groups = {d: split_of(d.name) for d in dirs} if layout == "split" else {base: "train"}
    folders: dict[str, list[str]] = {}
    candidates: list[tuple[str, str, Path]] = []  # (split, class, file)
    for folder, split in sorted(groups.items()):
        assert split is not None
        if folder != base:
            folders.setdefault(split, []).append(folder.name + "/")
        class_dirs, loose = (dirs, []) if folder == base else walker.listing(folder)
        for f in loose:
            walker.reject(f, NOT_IN_CLASS)
        for class_dir in class_dirs:
            candidates += [(split, class_name(class_dir.name), f) for f in walker.files_under(class_dir)]
    if layout == "flat":
        folders = {"train": [walker.rel(base) + "/"] if base != root else []}
    return _decide(walker, layout, folders, candidates, base, max_pixels, workers)


def _decide(
    walker: _Walker,
    layout: str,
    folders: dict[str, list[str]],
    candidates: list[tuple[str, str, Path]],
    base: Path,
    max_pixels: int | None,
    workers: int | None,
) -> Scan:
    """Decode the candidates, build the samples per split and apply the usability checks."""
    train_classes = {cls for split, cls, _ in candidates if split == "train"}
    checkable = []
    for split, cls, path in candidates:
        if cls in train_classes:
            checkable.append((split, cls, path))
        else:
            walker.reject(path, f"class {cls!r} has no folder in train/")
    n_threads = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        reasons = list(pool.map(lambda c: check_image(c[2], max_pixels), checkable))
    good: dict[str, list[tuple[str, Path]]] = {"train": [], "val": [], "test": []}
    for (split, cls, path), reason in zip(checkable, reasons, strict=True):
        if reason is None:
            good[split].append((cls, path))
        else:
            walker.reject(path, reason)
    rejected = sorted(walker.rejected, key=lambda r: r["path"])
    classes = sorted({cls for cls, _ in good["train"]})
    empty = sorted(train_classes - set(classes))
    if empty:
        raise ScanError(
            "empty_class",
            f"no usable training image in class folder(s): {', '.join(empty)} (see the rejected files)",
            rejected,
        )
    if len(classes) < 2:
        raise ScanError(
            "too_few_classes",
            "a dataset needs at least 2 class folders with usable images; found: "
            f"{', '.join(classes) or 'none'} (layouts: <class>/<image>, or train/<class>/<image> "
            "with val/ and test/ beside it)",
            rejected,
        )
    index = {cls: i for i, cls in enumerate(classes)}
    samples = {
        split: [Sample(str(p), index[c]) for c, p in sorted(items, key=lambda x: (index[x[0]], str(x[1])))]
        for split, items in good.items()
    }
    for split in ("val", "test"):
        if split in folders and not samples[split]:
            names = ", ".join(folders[split])
            raise ScanError("empty_split", f"{names} has no usable image of a train/ class", rejected)
    return Scan(
        layout=layout,
        classes=classes,
        train=samples["train"],
        val=samples["val"],
        test=samples["test"],
        rejected=rejected,
        folders=folders,
        base="" if base == walker.root else walker.rel(base),
    )


def seeded_split(
    samples: list[Sample], classes: list[str], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """(train, val): a per-class, seeded shuffle holds out `val_fraction` of each class (at least
    one image of a class that has two or more). The same seed and files give the same split."""
    train: list[Sample] = []
    val: list[Sample] = []
    for label, cls in enumerate(classes):
        order = sorted((s for s in samples if s.label == label), key=lambda s: s.path)
        random.Random(f"{seed}:{cls}").shuffle(order)
        n_val = 0
        if len(order) > 1:
            n_val = min(max(int(round(len(order) * val_fraction)), 1), len(order) - 1)
        val += sorted(order[:n_val], key=lambda s: s.path)
        train += sorted(order[n_val:], key=lambda s: s.path)
    return train, val
