"""`spkd submit/status/events/cancel/pause/resume/download/datasets`: talk to a spkd server over HTTP.

Server and key from --url/--key or SPKD_URL / SPKD_API_KEY. Never imports torch.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

console = Console(stderr=True)
FINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "validating", "running", "paused", *FINAL)

UrlOpt = typer.Option(None, "--url", help="server URL (default: $SPKD_URL or http://127.0.0.1:8000)")
KeyOpt = typer.Option(None, "--key", help="API key (default: $SPKD_API_KEY)")


class ClientError(Exception):
    pass


class Unreachable(ClientError, httpx.TransportError):
    """The API did not answer (refused, timed out, name unknown). A ClientError, so every command
    prints it as one line; a TransportError too, so the event stream still reconnects on it."""


class _Client(httpx.Client):
    """httpx's client, with connection failures explained (where, and which setting moves it)."""

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        try:
            return super().send(request, **kwargs)
        except httpx.TransportError as e:
            raise Unreachable(
                f"cannot reach the spkd API at {self.base_url} ({type(e).__name__}: {e}); is `spkd "
                "serve` running there? SPKD_URL or --url sets the address"
            ) from e


# The server sends a keep-alive comment every 15 s on a quiet stream: a minute of silence means a
# dead connection (a half-open socket never errors by itself), so reconnect instead of hanging.
SSE_TIMEOUT = httpx.Timeout(10.0, read=60.0)


def make_client(url: str | None, key: str | None, timeout: float = 30.0) -> httpx.Client:
    base = url or os.environ.get("SPKD_URL") or "http://127.0.0.1:8000"
    key = key or os.environ.get("SPKD_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return _Client(base_url=base.rstrip("/"), headers=headers, timeout=timeout)


def _check(resp: httpx.Response) -> Any:
    if resp.status_code < 400:
        return resp.json() if "json" in resp.headers.get("content-type", "") else resp
    try:
        err = resp.json()["error"]
        where = f" ({err['field']})" if err.get("field") else ""
        raise ClientError(f"{resp.status_code} {err['code']}{where}: {err['message']}")
    except (ValueError, KeyError, TypeError):
        raise ClientError(f"{resp.status_code}: {resp.text[:500]}") from None


def _id_column() -> Column:
    """Ids are what a user copies into the next command: never cut, whatever the terminal width."""
    return Column("id", no_wrap=True, min_width=24)


def _fail(e: Exception) -> None:
    console.print(f"[red]error:[/red] {e}")
    raise typer.Exit(1)


# ---------------------------------------------------------------- SSE


def iter_sse(
    client: httpx.Client,
    job_id: str,
    last_id: str | None = None,
    *,
    max_reconnects: int = 5,
    backoff_s: float = 1.0,
) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs from the job's server-sent-event stream, reconnecting with Last-Event-ID
    until the server sends `end`. A drop, a close without `end`, an `error` event (the server's
    "cannot continue here, reconnect": not yielded) and a 429/503 answer (too many open streams,
    store unavailable) all reconnect, after the server's `retry:` or `Retry-After` when it sent
    one; after `max_reconnects` in a row without an event, ClientError. Other errors: ClientError."""
    failures = 0
    while True:
        headers = {"Accept": "text/event-stream"}
        if last_id:
            headers["Last-Event-ID"] = last_id
        wait_s: float | None = None
        try:
            url = f"/v1/jobs/{job_id}/events"
            with client.stream("GET", url, headers=headers, timeout=SSE_TIMEOUT) as resp:
                if resp.status_code in (429, 503):
                    resp.read()
                    wait_s = _retry_after(resp.headers.get("retry-after"))
                    raise _Transient(_error_text(resp))
                if resp.status_code >= 400:
                    resp.read()
                    _check(resp)
                event, data, retry_ms = "message", [], None
                reason = "closed before the job ended"
                for line in resp.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif line.startswith("id:"):
                        last_id = line[3:].strip()
                    elif line.startswith("retry:"):
                        retry_ms = _int_or_none(line[6:].strip())
                    elif line == "" and data:
                        body = json.loads("\n".join(data))
                        if event == "error":  # the server ends this stream: reconnect and resume
                            wait_s = retry_ms / 1000 if retry_ms is not None else None
                            reason = _error_message(body)
                            break
                        failures = 0
                        yield event, body
                        if event == "end":
                            return
                        event, data = "message", []
        except _Transient as e:
            reason = str(e)
        except httpx.TransportError as e:
            reason = str(e)
        # A drop or a close without `end` counts alike, so a stream that keeps breaking ends in
        # an error instead of reconnecting forever; any event received resets the count.
        failures += 1
        if failures > max_reconnects:
            raise ClientError(f"event stream failed {failures} times in a row: {reason}")
        console.print(f"[yellow]event stream interrupted ({reason}); reconnecting[/yellow]")
        backoff = min(backoff_s * 2.0 ** (failures - 1), 10.0)
        time.sleep(min(wait_s, 30.0) if wait_s is not None else backoff)


class _Transient(Exception):
    """The server asked to come back later (429, 503)."""


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the API sends seconds; an HTTP date counts as absent)."""
    seconds = _int_or_none(value)
    return float(max(seconds, 0)) if seconds is not None else None


def _error_message(body: Any) -> str:
    try:
        err = body["error"]
        return f"{err['code']}: {err['message']}"
    except (KeyError, TypeError):
        return str(body)[:300]


def _error_text(resp: httpx.Response) -> str:
    try:
        return f"{resp.status_code} {_error_message(resp.json())}"
    except ValueError:
        return f"{resp.status_code}: {resp.text[:300]}"


def follow(client: httpx.Client, job_id: str, quiet: bool = False) -> str:
    """A rich progress bar fed by the event stream; returns the final status, or `paused` (the
    stream of a paused job stays open for its resume; following stops there)."""
    status = "queued"
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=quiet,
    ) as bar:
        task = bar.add_task(status, total=None, info="")
        for event, data in iter_sse(client, job_id):
            if event == "progress":
                info = f"epoch {data['epoch']}/{data['epochs']} step {data['step']}/{data['steps']}"
                if data.get("images_per_sec"):
                    info += f"  {data['images_per_sec']:.0f} img/s"
                bar.update(
                    task, description=data["stage"], total=data["steps"], completed=data["step"], info=info
                )
            elif event == "end":
                status = data["status"]
            else:
                if event == "status":
                    status = data["data"]["status"]
                    bar.update(task, description=status)
                bar.console.print(f"[dim]{event:>15}[/dim] {data['message']}")
                if status == "paused":
                    break
    return status


# ---------------------------------------------------------------- commands


def submit(
    spec_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="job spec (YAML or JSON)"),
    wait: bool = typer.Option(False, "--wait", help="follow the job to the end with a progress bar"),
    idempotency_key: str | None = typer.Option(None, help="makes a retried submit create one job"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Create a job from a spec file; print its id (and, with --wait, follow it)."""
    body = yaml.safe_load(spec_file.read_text())
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    with make_client(url, key) as client:
        try:
            job = _check(client.post("/v1/jobs", json=body, headers=headers))
            console.print(f"created [bold]{job['id']}[/bold] ({job['status']})")
            print(job["id"])
            if not wait:
                return
            status = follow(client, job["id"])
            job = _check(client.get(f"/v1/jobs/{job['id']}"))
        except ClientError as e:
            _fail(e)
    _print_outcome(job)
    raise typer.Exit(0 if status == "succeeded" else 2)


def _print_outcome(job: dict) -> None:
    if job.get("error"):
        err = job["error"]
        console.print(
            f"[red]{job['status']}[/red]: {err['code']} ({err.get('field') or '-'}): {err['message']}"
        )
    elif job.get("metrics"):
        m = job["metrics"]
        console.print(
            f"[green]{job['status']}[/green]: distilled val_acc {m.get('distilled', {}).get('val_acc')}, "
            f"baseline {(m.get('baseline') or {}).get('val_acc')}, gain {m.get('gain')}"
        )
    elif job["status"] == "paused":
        console.print(f"paused: `spkd resume {job['id']}` continues it from its last checkpoint")
    else:
        console.print(job["status"])


def status(
    job_id: str | None = typer.Argument(None, help="a job id; omit to list recent jobs"),
    filter_status: str | None = typer.Option(
        None, "--status", help=f"list only jobs with this status ({', '.join(STATUSES)})"
    ),
    limit: int = typer.Option(20, help="jobs to list"),
    as_json: bool = typer.Option(False, "--json", help="print the raw JSON"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Show one job, or list recent jobs."""
    with make_client(url, key) as client:
        try:
            if job_id:
                job = _check(client.get(f"/v1/jobs/{job_id}"))
                if as_json:
                    print(json.dumps(job, indent=2))
                    return
                _show_job(job)
                return
            params = {"limit": limit, **({"status": filter_status} if filter_status else {})}
            page = _check(client.get("/v1/jobs", params=params))
        except ClientError as e:
            _fail(e)
    if as_json:
        print(json.dumps(page, indent=2))
        return
    table = Table(_id_column(), "status", "stage", "teacher -> student", "created")
    for j in page["data"]:
        s = j["spec"]
        table.add_row(
            j["id"],
            j["status"],
            j.get("stage") or "",
            f"{s['teacher']['model']} -> {s['student']['model']}",
            j["created_at"],
        )
    Console().print(table)


def _requests(job: dict) -> str:
    """' (cancel requested)' / ' (pause requested)' while the worker has yet to act on one."""
    if job.get("cancel_requested") and job["status"] not in FINAL:
        return " (cancel requested)"
    return " (pause requested)" if job.get("pause_requested") else ""


def _show_job(job: dict) -> None:
    out = Console()
    out.print(f"[bold]{job['id']}[/bold]  {job['status']}{_requests(job)}  stage={job.get('stage') or '-'}")
    p = job.get("progress")
    if p and job["status"] == "running":
        out.print(
            f"  epoch {p['epoch']}/{p['epochs']} step {p['step']}/{p['steps']} "
            f"{p.get('images_per_sec') or 0:.0f} img/s  eta {job.get('eta') or '-'}"
        )
    _print_outcome(job)


def events(
    job_id: str = typer.Argument(...),
    follow_stream: bool = typer.Option(False, "--follow", "-f", help="stream new events until the job ends"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Print a job's event log (JSON lines)."""
    with make_client(url, key) as client:
        try:
            if follow_stream:
                for event, data in iter_sse(client, job_id):
                    if event != "progress":
                        print(json.dumps(data), flush=True)
                return
            after = None
            while True:
                params = {"limit": 1000, **({"after": after} if after else {})}
                page = _check(client.get(f"/v1/jobs/{job_id}/events", params=params))
                for e in page["data"]:
                    print(json.dumps(e))
                if len(page["data"]) < 1000:
                    return
                after = page["next_cursor"]
        except ClientError as e:
            _fail(e)


def cancel(job_id: str = typer.Argument(...), url: str | None = UrlOpt, key: str | None = KeyOpt) -> None:
    """Cancel a job (queued: never starts; running: stops within a training step)."""
    with make_client(url, key) as client:
        try:
            job = _check(client.post(f"/v1/jobs/{job_id}/cancel"))
        except ClientError as e:
            _fail(e)
    console.print(f"{job['id']}: {job['status']}{_requests(job)}")


def pause(job_id: str = typer.Argument(...), url: str | None = UrlOpt, key: str | None = KeyOpt) -> None:
    """Pause a job (queued: does not start; running: stops at its next training step and frees its
    worker); `spkd resume` continues it from its last checkpoint."""
    with make_client(url, key) as client:
        try:
            job = _check(client.post(f"/v1/jobs/{job_id}/pause"))
        except ClientError as e:
            _fail(e)
    console.print(f"{job['id']}: {job['status']}{_requests(job)}")


def delete(job_id: str = typer.Argument(...), url: str | None = UrlOpt, key: str | None = KeyOpt) -> None:
    """Delete a finished or paused job: its record, events and artifacts (a queued or running one:
    cancel first)."""
    with make_client(url, key) as client:
        try:
            _check(client.delete(f"/v1/jobs/{job_id}"))
        except ClientError as e:
            _fail(e)
    console.print(f"{job_id}: deleted")


def resume(job_id: str = typer.Argument(...), url: str | None = UrlOpt, key: str | None = KeyOpt) -> None:
    """Resume a paused, failed or cancelled job from its last checkpoint (a new attempt)."""
    with make_client(url, key) as client:
        try:
            job = _check(client.post(f"/v1/jobs/{job_id}/resume"))
        except ClientError as e:
            _fail(e)
    console.print(f"{job['id']}: {job['status']} (resumes from its last checkpoint)")


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
    for fn in (submit, status, events, cancel, pause, resume, delete, download):
        app.command(fn.__name__)(fn)
    app.add_typer(datasets_app, name="datasets")
