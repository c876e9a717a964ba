"""`spkd`: serve, worker, run (local, in-process), submit/status/events/cancel/pause/resume/delete/
download/datasets (a server over HTTP), predict, demo.

Each command group lives in its own module and imports its heavy dependencies (torch, celery,
uvicorn) inside the command, so `spkd submit` starts fast and never loads torch.
"""

from __future__ import annotations

import typer

from cli import demo, files, jobs, local, predict, server

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="spkd: distil a big pretrained image model into a small one for your own data (SP-KD).",
)

for module in (local, server, jobs, files, demo, predict):
    module.register(app)

if __name__ == "__main__":
    app()
