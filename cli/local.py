"""`spkd run JOB.yaml --out DIR`: run a job in this process, with a progress bar.

Torch and the engine are imported inside the command, so other `spkd` commands start fast.
Ctrl-C stops at the next training step; running the same command again resumes from the last
epoch-end checkpoint in DIR.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import typer

from spkd.common.metric_names import report_acc


def register(app: typer.Typer) -> None:
    """Add `spkd run` to the `spkd` app."""
    app.command("run")(run)


def run(
    job: Path = typer.Argument(
        ...,
        exists=True,
        dir_okay=False,
        metavar="SPEC",
        help="job spec YAML (docs/job-spec.md; e.g. examples/hymenoptera.yaml)",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (artifacts, checkpoints)"),
    data: Path | None = typer.Option(
        None, "--data", help="dataset folder; default: dataset.path, relative to the YAML file or here"
    ),
    device: str | None = typer.Option(
        None, help="torch device, e.g. cuda:1 or cpu; default: cuda if present"
    ),
) -> None:
    """Run a distillation job locally, in-process, with a progress bar."""
    from pydantic import ValidationError
    from rich.console import Console

    from spkd.common.spec import JobSpec

    console = Console()
    try:
        spec = JobSpec.from_yaml(job)
    except ValidationError as exc:
        console.print(f"[red]{job}: invalid job spec[/red]")
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            console.print(f"  [bold]{where}[/bold]: {err['msg']}")
        raise typer.Exit(2) from None
    except (ValueError, OSError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    data_dir = resolve_dataset(spec, job, data, console)
    raise typer.Exit(_run_engine(spec, data_dir, out, device, console))


def resolve_dataset(spec, job: Path, data: Path | None, console) -> Path:
    """--data wins; else dataset.path as given, then relative to the YAML file's folder. A spec
    naming another source (dataset.id, hf, torchvision: a server resolves those) exits 2, saying so."""
    if data is not None:
        return data
    if spec.dataset.path is None:
        ds = spec.dataset
        if ds.id is not None:
            what = "dataset.id names an uploaded dataset on a server"
        elif ds.hf is not None:
            what = "dataset.hf is loaded by a server's workers"
        else:
            what = "dataset.torchvision is downloaded by a server's workers"
        console.print(f"[red]{what}; locally use dataset.path or --data[/]")
        raise typer.Exit(2)
    given = Path(spec.dataset.path).expanduser()
    for candidate in (given, job.parent / given):
        if candidate.is_dir():
            return candidate
    console.print(
        f"[red]dataset.path {spec.dataset.path!r} is not a folder (tried here and next to {job})[/]"
    )
    raise typer.Exit(2)


def _run_engine(spec, data_dir: Path, out: Path, device: str | None, console) -> int:
    from spkd.common.errors import SpkdError
    from spkd.common.reporter import StopRequested
    from spkd.core.settings import Settings
    from spkd.models.pipeline import validate_job
    from spkd.models.results.tracking import run_tracked

    reporter = BarReporter(console)
    previous = signal.signal(signal.SIGINT, reporter.request_stop)
    try:
        with reporter:
            settings = Settings()
            valid = validate_job(spec, data_dir)
            metrics = run_tracked(
                valid, out, reporter, out.name, settings, device=device, data_path=settings.data_path
            ).metrics
    except SpkdError as exc:
        console.print(
            f"[red]error[/red] {exc.code}" + (f" ({exc.field})" if exc.field else "") + f": {exc.message}"
        )
        return 2
    except StopRequested:
        console.print(
            f"[yellow]stopped[/yellow]; run the same command again to resume from {out}/checkpoints"
        )
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    _summary(metrics, out, console)
    return 0


def gain_lines(metrics: dict[str, Any]) -> list[str]:
    """The gain with its error bars and which student shipped, from metrics.json."""
    from spkd.models.results.stats import summary_line

    lines = []
    if isinstance(metrics.get("comparison"), dict):
        lines.append(summary_line(metrics["comparison"]))
    if metrics.get("shipped"):
        shipped, reason = metrics["shipped"], metrics.get("shipped_reason")
        lines.append(f"shipped as student/ and student.onnx: the {shipped} student ({reason})")
    return lines


def _summary(metrics: dict[str, Any], out: Path, console) -> None:
    def pct(block) -> str:
        acc = report_acc(block)
        return "-" if acc is None else f"{100 * acc:.2f}%"

    console.print(
        f"report-split accuracy: teacher {pct(metrics['teacher'])}  baseline {pct(metrics['baseline'])}  "
        f"distilled {pct(metrics['distilled'])}"
    )
    for line in gain_lines(metrics):
        console.print(line, markup=False)
    if isinstance(metrics.get("deploy"), dict):  # what each model costs (models/results/deploy.py)
        from spkd.models.results.deploy_report import deploy_text

        console.print(deploy_text(metrics["deploy"]), markup=False, soft_wrap=True)
    names = [f"{p.name}/" if p.is_dir() else p.name for p in out.iterdir() if p.name != "checkpoints"]
    console.print(f"artifacts in {out}: " + ", ".join(sorted(n for n in names if not n.startswith("."))))


class BarReporter:
    """A Reporter that draws one rich progress bar per stage and prints events as lines."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task = None
        self._key: tuple[str, int] | None = None
        self._stop = False

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def request_stop(self, *_: Any) -> None:
        if self._stop:  # a second Ctrl-C: leave now
            raise KeyboardInterrupt
        self._stop = True
        self.console.print("[yellow]stopping after this step (Ctrl-C again to abort)[/yellow]")

    def event(self, kind: str, message: str, **data: Any) -> None:
        style = {"warning": "yellow", "stage_started": "bold cyan", "stage_finished": "green"}.get(kind, "")
        if kind in ("checkpoint",):
            return
        self.console.print(f"[{style}]{message}[/{style}]" if style else message)

    def progress(self, p) -> None:
        key = (p.stage, p.epoch)
        if key != self._key:
            if self._task is not None:
                self.bar.remove_task(self._task)
            self._task = self.bar.add_task(f"{p.stage} {p.epoch}/{p.epochs}", total=p.steps, info="")
            self._key = key
        eta = "" if p.eta_s is None else f"ETA {_clock(p.eta_s)}"
        loss = "" if p.loss is None else f"loss {p.loss:.4f} "
        self.bar.update(self._task, completed=p.step, info=f"{loss}{p.images_per_sec:.1f} img/s {eta}")

    def should_stop(self) -> bool:
        return self._stop


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(max(0, seconds)))
