"""`spkd download` and `spkd datasets upload/list/delete`: files to and from the server, over HTTP
(cli/client.py); downloads are checked against their sha256, uploads are zipped as they are.

Server and key from --url/--key or SPKD_URL / SPKD_API_KEY. Never imports torch.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from spkd.cli.client import (
    ClientError,
    ExitCode,
    JobArg,
    JsonOpt,
    KeyOpt,
    UrlOpt,
    _check,
    _fail,
    _id_column,
    console,
    make_client,
    print_json,
)
from spkd.common import artifacts


def _selected(arts: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """The artifacts `names` asks for: a file by its name, or a model folder (`student`, `teacher`,
    `baseline`, `distilled`, `tensorboard`...) as every file under it; all of them for no names. A
    job in the old layout without that folder gives its flat copies (`student.safetensors`,
    `student.json`; common/artifacts.py). ClientError (not found) naming what matched nothing,
    with the folders there are."""
    if not names:
        return arts

    def under(name: str, a: dict[str, Any]) -> bool:
        return a["name"] == name or a["name"].startswith(name.rstrip("/") + "/")

    def matches(name: str, a: dict[str, Any]) -> bool:
        if any(under(name, b) for b in arts):
            return under(name, a)
        return a["name"] in artifacts.legacy_files(name.rstrip("/"))

    missing = [n for n in names if not any(matches(n, a) for a in arts)]
    if missing:
        folders = sorted({a["name"].split("/", 1)[0] for a in arts if "/" in a["name"]})
        raise ClientError(
            f"no artifact or folder named {', '.join(missing)}; folders: {', '.join(folders) or '-'} "
            "(`spkd download JOB` with no names fetches all)",
            ExitCode.NOT_FOUND,
        )
    return [a for a in arts if any(matches(n, a) for n in names)]


def download(
    job_id: str = JobArg,
    names: list[str] = typer.Argument(
        None, metavar="[NAME]...", help="artifact files or folders, e.g. student (default: all)"
    ),
    out: Path = typer.Option(Path("."), "--out", "-o", help="folder to write into (OUT/JOB/NAME)"),
    as_json: bool = typer.Option(False, "--json", help="print what was written as JSON"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Download a job's artifacts, or whole folders of them (`spkd download JOB student` for the
    shipped student's folder), each file checked against its sha256."""
    import hashlib

    written: list[dict[str, Any]] = []
    with make_client(url, key, timeout=300) as client:
        try:
            arts = _check(client.get(f"/v1/jobs/{job_id}/artifacts"))["data"]
            wanted = _selected(arts, names or [])
            out.mkdir(parents=True, exist_ok=True)
            for a in wanted:
                dest = out / job_id / a["name"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                # follow_redirects: a server on object storage answers 307 to a presigned URL
                # (httpx drops the API key when the redirect leaves the API's origin).
                path = f"/v1/jobs/{job_id}/artifacts/{a['name']}"
                with client.stream("GET", path, follow_redirects=True) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        _check(resp)
                    with dest.open("wb") as f:
                        for chunk in resp.iter_bytes():
                            f.write(chunk)
                            h.update(chunk)
                if h.hexdigest() != a["sha256"]:
                    raise ClientError(f"{a['name']}: sha256 mismatch after download", ExitCode.SERVER)
                console.print(f"{dest}  {a['size']} bytes  sha256 ok")
                written.append({**{k: a[k] for k in ("name", "size", "sha256")}, "path": str(dest)})
        except ClientError as e:
            _fail(e)
    if as_json:
        print_json(written)


datasets_app = typer.Typer(help="Upload, list and delete datasets.", no_args_is_help=True)


@datasets_app.command("upload")
def datasets_upload(
    source: Path = typer.Argument(
        ..., exists=True, metavar="SOURCE", help="an ImageFolder directory or a .zip of one"
    ),
    name: str | None = typer.Option(None, help="a label (default: the folder name)"),
    wait: float = typer.Option(
        3600.0, help="seconds to wait for a large upload's background validation to end"
    ),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Upload a dataset; waits until it is ready, then prints its id, classes and counts, and any
    rejected files (exit 1 with the reason when its validation failed)."""
    label = name or source.stem
    with tempfile.TemporaryDirectory() as tmp:
        zip_path = source if source.is_file() else zip_folder(source, Path(tmp) / "upload.zip")
        with make_client(url, key, timeout=600) as client, zip_path.open("rb") as f:
            try:
                ds = _check(
                    client.post(
                        "/v1/datasets",
                        files={"file": (zip_path.name, f, "application/zip")},
                        data={"name": label},
                    )
                )
                ds = wait_dataset_ready(client, ds, wait)
            except ClientError as e:
                _fail(e)
    console.print(f"uploaded [bold]{ds['id']}[/bold]: {ds['num_images']} images, classes {ds['classes']}")
    for split, counts in ds["counts"].items():
        console.print(f"  {split}: {counts}")
    for rej in ds["rejected"][:20]:
        console.print(f"  [yellow]rejected[/yellow] {rej['path']}: {rej['reason']}")
    print(ds["id"])


def wait_dataset_ready(
    client: httpx.Client, ds: dict[str, Any], timeout_s: float, poll_s: float = 1.0
) -> dict[str, Any]:
    """Poll a `validating` dataset (a large upload answers 202) until `ready`. Raises ClientError
    with the server's {code, message} when it ends `failed`, or after `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while ds.get("status", "ready") == "validating":
        if time.monotonic() > deadline:
            waited = f"dataset {ds['id']} still validating after {timeout_s:.0f} s"
            raise ClientError(waited, ExitCode.NOT_DONE)
        time.sleep(poll_s)
        ds = _check(client.get(f"/v1/datasets/{ds['id']}"))
    if ds.get("status") == "failed":
        err = ds.get("error") or {}
        raise ClientError(
            f"dataset {ds['id']} failed validation: {err.get('code')}: {err.get('message')}", ExitCode.USAGE
        )
    return ds


@datasets_app.command("list")
def datasets_list(as_json: bool = JsonOpt, url: str | None = UrlOpt, key: str | None = KeyOpt) -> None:
    """List your datasets."""
    with make_client(url, key) as client:
        try:
            page = _check(client.get("/v1/datasets"))
        except ClientError as e:
            _fail(e)
    if as_json:
        print_json(page)
        return
    table = Table(_id_column(), "name", "layout", "classes", "images", "rejected")
    for d in page["data"]:
        table.add_row(
            d["id"],
            d["name"],
            d["layout"] or d.get("status", ""),
            str(len(d["classes"])),
            str(d["num_images"]),
            str(d["rejected_total"]),
        )
    Console().print(table)


@datasets_app.command("delete")
def datasets_delete(
    ds_id: str = typer.Argument(..., metavar="DATASET", help="a dataset id (ds_...)"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Delete a dataset and its files (refused while a queued or running job uses it)."""
    with make_client(url, key) as client:
        try:
            _check(client.delete(f"/v1/datasets/{ds_id}"))
        except ClientError as e:
            _fail(e)
    console.print(f"{ds_id}: deleted")


def zip_folder(folder: Path, dest: Path) -> Path:
    """Zip `folder` as it is; symlinks are stored as links (like `zip -y`), so the server applies
    its one symlink policy (followed only inside the dataset) and names each refused link."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in sorted(dirnames + filenames):
                p = Path(dirpath) / name
                arc = p.relative_to(folder).as_posix()
                if p.is_symlink():
                    info = zipfile.ZipInfo(arc)
                    info.create_system = 3  # Unix: external_attr holds the mode
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                    zf.writestr(info, os.readlink(p))
                elif p.is_file():
                    zf.write(p, arc)
            dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return dest


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `spkd` app."""
    app.command("download")(download)
    app.add_typer(datasets_app, name="datasets")
