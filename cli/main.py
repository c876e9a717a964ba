"""`spkd`: serve, worker, run (local, in-process), submit/status/events/cancel/pause/resume/delete/
download/datasets (a server over HTTP), predict, demo.

Each command group lives in its own module and imports its heavy dependencies (torch, celery,
uvicorn) inside the command, so `spkd submit` starts fast and never loads torch.
"""

from __future__ import annotations

import typer

from spkd.cli import demo, files, jobs, local, predict, server

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    # Click's plain help: no metavar for flags, paragraphs re-wrapped to the terminal.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="spkd: distil a big pretrained image model into a small one for your own data (SP-KD). "
    "Exit status: 0 done, 1 a job or request that did not go through, 2 a usage error or refused "
    "input, 3 not found, 4 a key refused, 5 the server unreachable or failing.",
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"spkd {version('spkd')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            print("spkd (not installed: run from a checkout)")
        raise typer.Exit()


@app.callback()
def _root(
    _version: bool = typer.Option(
        False, "--version", "-V", callback=_print_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """spkd: distil a big pretrained image model into a small one for your own data (SP-KD)."""


for module in (local, server, jobs, files, demo, predict):
    module.register(app)

if __name__ == "__main__":
    app()
