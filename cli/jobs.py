"""`spkd submit/status/events/cancel/pause/resume/delete`: a job's commands, over HTTP (cli/client.py).

Server and key from --url/--key or SPKD_URL / SPKD_API_KEY. Never imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml
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
    follow,
    iter_sse,
    make_client,
    print_json,
)
from spkd.common.metric_names import report_acc

FINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "validating", "running", "paused", *FINAL)


def submit(
    spec_file: Path = typer.Argument(
        ..., exists=True, dir_okay=False, metavar="SPEC", help="job spec (YAML or JSON)"
    ),
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
    raise typer.Exit(ExitCode.OK if status == "succeeded" else ExitCode.NOT_DONE)


def _print_outcome(job: dict) -> None:
    if job.get("error"):
        err = job["error"]
        console.print(
            f"[red]{job['status']}[/red]: {err['code']} ({err.get('field') or '-'}): {err['message']}"
        )
    elif job.get("metrics"):
        m = job["metrics"]
        distilled, baseline = report_acc(m.get("distilled")), report_acc(m.get("baseline"))
        console.print(
            f"[green]{job['status']}[/green]: report-split accuracy: distilled {distilled}, "
            f"baseline {baseline}, gain {m.get('gain')}"
        )
    elif job["status"] == "paused":
        console.print(f"paused: `spkd resume {job['id']}` continues it from its last checkpoint")
    else:
        console.print(job["status"])


def status(
    job_id: str | None = typer.Argument(None, metavar="[JOB]", help="a job id; omit to list recent jobs"),
    filter_status: str | None = typer.Option(
        None, "--status", help=f"list only jobs with this status ({', '.join(STATUSES)})"
    ),
    limit: int = typer.Option(20, help="jobs to list"),
    as_json: bool = JsonOpt,
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Show one job, or list recent jobs."""
    with make_client(url, key) as client:
        try:
            if job_id:
                job = _check(client.get(f"/v1/jobs/{job_id}"))
                if as_json:
                    print_json(job)
                    return
                _show_job(job)
                return
            params = {"limit": limit, **({"status": filter_status} if filter_status else {})}
            page = _check(client.get("/v1/jobs", params=params))
        except ClientError as e:
            _fail(e)
    if as_json:
        print_json(page)
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
    job_id: str = JobArg,
    follow_stream: bool = typer.Option(False, "--follow", "-f", help="stream new events until the job ends"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Print a job's event log, one JSON object a line (so no --json: it is JSON already)."""
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


def _post_action(job_id: str, action: str, url: str | None, key: str | None) -> dict:
    """POST /v1/jobs/{job_id}/{action} (cancel, pause, resume): the job record the API answers.
    Exits with the refusal's code (cli/client.py `_fail`) when the API or the connection refuses."""
    with make_client(url, key) as client:
        try:
            return _check(client.post(f"/v1/jobs/{job_id}/{action}"))
        except ClientError as e:
            _fail(e)


def cancel(job_id: str = JobArg, url: str | None = UrlOpt, key: str | None = KeyOpt) -> None:
    """Cancel a job (queued: never starts; running: stops within a training step)."""
    job = _post_action(job_id, "cancel", url, key)
    console.print(f"{job['id']}: {job['status']}{_requests(job)}")


def pause(job_id: str = JobArg, url: str | None = UrlOpt, key: str | None = KeyOpt) -> None:
    """Pause a job (queued: does not start; running: stops at its next training step and frees its
    worker); `spkd resume` continues it from its last checkpoint."""
    job = _post_action(job_id, "pause", url, key)
    console.print(f"{job['id']}: {job['status']}{_requests(job)}")


def delete(job_id: str = JobArg, url: str | None = UrlOpt, key: str | None = KeyOpt) -> None:
    """Delete a finished or paused job: its record, events and artifacts (a queued or running one:
    cancel first)."""
    with make_client(url, key) as client:
        try:
            _check(client.delete(f"/v1/jobs/{job_id}"))
        except ClientError as e:
            _fail(e)
    console.print(f"{job_id}: deleted")


def resume(job_id: str = JobArg, url: str | None = UrlOpt, key: str | None = KeyOpt) -> None:
    """Resume a paused, failed or cancelled job from its last checkpoint (a new attempt)."""
    job = _post_action(job_id, "resume", url, key)
    console.print(f"{job['id']}: {job['status']} (resumes from its last checkpoint)")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `spkd` app."""
    for fn in (submit, status, events, cancel, pause, resume, delete):
        app.command(fn.__name__)(fn)
