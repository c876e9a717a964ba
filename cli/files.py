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

from cli.client import ClientError, KeyOpt, UrlOpt, _check, _fail, _id_column, console, make_client


def download(
    job_id: str = typer.Argument(...),
    names: list[str] = typer.Argument(None, help="artifact names (default: all)"),
    out: Path = typer.Option(Path("."), "--out", "-o", help="folder to write into"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Download a job's artifacts (checked against their sha256)."""
    import hashlib

    with make_client(url, key, timeout=300) as client:
        try:
            arts = _check(client.get(f"/v1/jobs/{job_id}/artifacts"))["data"]
            wanted = [a for a in arts if not names or a["name"] in names]
            missing = set(names or []) - {a["name"] for a in wanted}
            if missing:
                raise ClientError(f"no artifact named {', '.join(sorted(missing))}")
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
                    raise ClientError(f"{a['name']}: sha256 mismatch after download")
                console.print(f"{dest}  {a['size']} bytes  sha256 ok")
        except ClientError as e:
            _fail(e)


datasets_app = typer.Typer(help="Upload, list and delete datasets.", no_args_is_help=True)


@datasets_app.command("upload")
def datasets_upload(
    source: Path = typer.Argument(..., exists=True, help="an ImageFolder directory or a .zip of one"),
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
            raise ClientError(f"dataset {ds['id']} still validating after {timeout_s:.0f} s")
        time.sleep(poll_s)
        ds = _check(client.get(f"/v1/datasets/{ds['id']}"))
    if ds.get("status") == "failed":
        err = ds.get("error") or {}
        raise ClientError(f"dataset {ds['id']} failed validation: {err.get('code')}: {err.get('message')}")
    return ds


@datasets_app.command("list")
def datasets_list(url: str | None = UrlOpt, key: str | None = KeyOpt) -> None:
    """List your datasets."""
    with make_client(url, key) as client:
        try:
            page = _check(client.get("/v1/datasets"))
        except ClientError as e:
            _fail(e)
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
    ds_id: str = typer.Argument(...), url: str | None = UrlOpt, key: str | None = KeyOpt
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
