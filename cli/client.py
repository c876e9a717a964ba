"""The HTTP side of the `spkd` client commands (cli/jobs.py, cli/files.py): the httpx client and its
errors, the one-line error and exit code every command prints, and the server-sent-event follower.

Server and key from --url/--key or SPKD_URL / SPKD_API_KEY. Never imports torch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from enum import IntEnum
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column

console = Console(stderr=True)

UrlOpt = typer.Option(None, "--url", help="server URL (default: $SPKD_URL or http://127.0.0.1:8000)")
KeyOpt = typer.Option(None, "--key", help="API key (default: $SPKD_API_KEY)")


class ExitCode(IntEnum):
    """What a `spkd` command's exit status says (docs/api.md: the command line). A script can tell a
    mistake in its own call from a missing resource, a refused key and a server in trouble."""

    OK = 0
    NOT_DONE = 1  # a followed job ended failed/cancelled; a request its state refuses (409, 429)
    USAGE = 2  # a bad command line, or a spec/file the server refuses (400, 413, 422): fix the input
    NOT_FOUND = 3  # no such job, dataset or artifact for this key (404)
    AUTH = 4  # no key, a wrong key, or not allowed (401, 403)
    SERVER = 5  # the API unreachable, unavailable or failing (5xx): retry later or tell the operator


def exit_code_for(status: int) -> ExitCode:
    """The exit status for an HTTP error answer."""
    if status in (401, 403):
        return ExitCode.AUTH
    if status == 404:
        return ExitCode.NOT_FOUND
    if status >= 500:
        return ExitCode.SERVER
    if status in (409, 429):
        return ExitCode.NOT_DONE
    return ExitCode.USAGE


class ClientError(Exception):
    """A command's failure, printed as one line; `exit_code` is the process's exit status."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.NOT_DONE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Unreachable(ClientError, httpx.TransportError):
    """The API did not answer (refused, timed out, name unknown). A ClientError, so every command
    prints it as one line; a TransportError too, so the event stream still reconnects on it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.SERVER)


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
    code = exit_code_for(resp.status_code)
    try:
        err = resp.json()["error"]
        where = f" ({err['field']})" if err.get("field") else ""
        raise ClientError(f"{resp.status_code} {err['code']}{where}: {err['message']}", code)
    except (ValueError, KeyError, TypeError):
        raise ClientError(f"{resp.status_code}: {resp.text[:500]}", code) from None


def _id_column() -> Column:
    """Ids are what a user copies into the next command: never cut, whatever the terminal width."""
    return Column("id", no_wrap=True, min_width=24)


def _fail(e: Exception) -> None:
    console.print(f"[red]error:[/red] {e}")
    raise typer.Exit(getattr(e, "exit_code", ExitCode.NOT_DONE))


def print_json(value: Any) -> None:
    """`--json`: the API's own JSON on stdout, for scripts (messages go to stderr)."""
    print(json.dumps(value, indent=2))


JobArg = typer.Argument(..., metavar="JOB", help="a job id (job_...)")
JsonOpt = typer.Option(False, "--json", help="print the API's JSON instead of a table")


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
            raise ClientError(f"event stream failed {failures} times in a row: {reason}", ExitCode.SERVER)
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
