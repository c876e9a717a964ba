"""`spkd predict JOB IMAGE...`: classify images with a finished job's shipped student on the server
(POST /v1/jobs/{id}/predict: onnxruntime inside the API, the evaluation's preprocessing).

Server and key from --url/--key or SPKD_URL / SPKD_API_KEY, like the other client commands. Never
imports torch.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from spkd.cli.client import ClientError, KeyOpt, UrlOpt, _check, _fail, make_client


def predict(
    job_id: str = typer.Argument(..., metavar="JOB", help="a succeeded job's id"),
    images: list[Path] = typer.Argument(
        ...,
        exists=True,
        dir_okay=False,
        readable=True,
        metavar="IMAGE...",
        help="image files (up to SPKD_PREDICT_MAX_IMAGES)",
    ),
    top_k: int = typer.Option(3, "--top-k", min=1, max=100, help="classes shown per image"),
    as_json: bool = typer.Option(False, "--json", help="print the raw JSON"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Classify images with a finished job's shipped student (its student.onnx, run by the server)."""
    with make_client(url, key, timeout=120.0) as client, ExitStack() as files:
        parts = [
            ("images", (p.name, files.enter_context(p.open("rb")), "application/octet-stream"))
            for p in images
        ]
        try:
            body = _check(client.post(f"/v1/jobs/{job_id}/predict", params={"top_k": top_k}, files=parts))
        except ClientError as e:
            _fail(e)
    if as_json:
        print(json.dumps(body, indent=2))
        return
    model = body["model"]
    table = Table(
        "image",
        "label",
        "probability",
        title=f"{job_id}: {model['architecture']} ({model['trained']} student)",
    )
    for p in body["predictions"]:
        for rank, t in enumerate(p["top"]):
            table.add_row(p["file"] if rank == 0 else "", t["label"], f"{t['probability']:.3f}")
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add `spkd predict` to the `spkd` app."""
    app.command("predict")(predict)
