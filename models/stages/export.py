"""export: the artifacts of a job (each model once, as a folder in timm's hub layout with its model
card; the shipped student's ONNX; metrics.json; the report) staged in the attempt's folder and moved
into out_dir together (models/results/export.py writes each file; models/results/report.py renders
the report from metrics.json; common/artifacts.py names them)."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from spkd.common import files
from spkd.models.data import evidence
from spkd.models.results import card as hub_card
from spkd.models.results import deploy, export
from spkd.models.results.deploy_report import deploy_card_lines
from spkd.models.results.report import write_report
from spkd.models.stages.common import finished_student, finished_teacher
from spkd.models.training import guards
from spkd.models.training.engine import Runtime
from spkd.models.training.run import Run


def run_stage(run: Run) -> None:
    """Write every artifact into the attempt's staging folder, note their manifest in the run's
    state (`RunState.artifacts`), then publish them into out_dir.

    Raises SpkdError `non_finite_weights` (a NaN model is never exported) and whatever the fencing
    check raises (nothing is published then)."""
    start = time.perf_counter()
    out, spec, results = run.staging_dir, run.spec, run.state.results
    if out.exists():  # a half-written export of this attempt (an earlier try was stopped)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shipped = results["shipped"]["student"]
    for which in ("distilled", "baseline", "soup"):
        if which not in results or (which == "soup" and shipped != "soup"):  # the soup: only when it ships
            continue
        student = finished_student(run, which)
        guards.require_finite_weights(student, f"{which} student")  # never export NaN weights
        if which == shipped:
            exporter = export.export_onnx(student, run.data.image_size, out / "student.onnx")
            run.reporter.event("info", f"exported student.onnx ({exporter} exporter, the {which} student)")
    teacher, _ = finished_teacher(run)
    guards.require_finite_weights(teacher, "teacher")  # never export NaN weights
    folders = _hub_folders(run, out, shipped, teacher)
    measured = {"teacher": teacher, "student": finished_student(run, shipped)}
    if shipped != "baseline" and "baseline" in results:
        measured["baseline"] = finished_student(run, "baseline")
    # Costs side by side and student.int8.onnx; `export.measure: false` skips both.
    deployed = deploy.measure_job(run, out, measured) if spec.export.measure else None
    run.state.timing["export"] = round(time.perf_counter() - start, 3)
    metrics = {**build_metrics(run), "deploy": deployed}
    export.write_json(out / "metrics.json", metrics)
    for folder, (title, role) in folders.items():
        lines = _card_lines(run, role, metrics) + deploy_card_lines(metrics, role)
        name, weights = _model_of(run, role)
        lines += ["", *hub_card.usage_lines(), "", *hub_card.license_lines(name, weights)]
        lines += ["", *hub_card.citation_lines(), "", *_spec_lines(run)]
        front = hub_card.front_matter(
            model_name=name,
            weights=weights,
            role=role,
            spec=metrics["spec"],
            accuracy=(run.state.results.get(role) or {}).get("report_acc"),
        )
        export.write_model_card(folder, hub_card.render(front, title, lines))
    write_report(out)  # report.html + curves.png from metrics.json
    # The manifest the service registers: hashed here, where the files were written (checkpointed
    # with the stage, so a resumed run that skips export still has it).
    run.state.artifacts = files.manifest(out)
    _publish(run, out)


def _hub_folders(run: Run, out: Path, shipped: str, teacher: torch.nn.Module) -> dict[Path, tuple[str, str]]:
    """Each model in timm's hub layout: `student/` (the one that ships), the other student under its
    own name (`baseline/` or `distilled/`), `teacher/`. Returns {folder: (card title, role)}."""
    spec, results = run.spec, run.state.results
    folders: dict[Path, tuple[str, str]] = {}
    for which in ("distilled", "baseline", "soup"):
        if which in results and (which != "soup" or shipped == "soup"):
            folder = out / ("student" if which == shipped else which)
            export.save_hub_folder(
                finished_student(run, which), folder, run.scan.classes, run.data.student_cfg
            )
            folders[folder] = (f"{spec.student.model} ({which} student, spkd)", which)
    export.save_hub_folder(teacher, out / "teacher", run.scan.classes, run.data.teacher_cfg)
    folders[out / "teacher"] = (f"{spec.teacher.model} (fine-tuned teacher, spkd)", "teacher")
    return folders


def _card_lines(run: Run, role: str, metrics: dict[str, Any]) -> list[str]:
    """The model card's body: what it is, on what data, its accuracy (with the gain's interval)."""
    spec, results = run.spec, run.state.results
    how = {
        "distilled": f"fine-tuned with cross-entropy plus Similarity-Preserving KD (Tung & Mori, ICCV 2019) "
        f"from the fine-tuned teacher `{spec.teacher.model}`",
        "baseline": "fine-tuned alone (cross-entropy), the comparison run of a distillation job",
        "soup": "the weight average of the distilled student and the student fine-tuned alone "
        "(a uniform model soup, Wortsman et al., ICML 2022)",
        "teacher": "the teacher, fine-tuned on this data",
    }[role]
    sizes = metrics["protocol"]["sizes"]
    acc = (results.get(role) or {}).get("report_acc")
    lines = [
        f"`{spec.teacher.model if role == 'teacher' else spec.student.model}`, {how}.",
        "",
        f"- Started from: {hub_card.origin(*_model_of(run, role))}",
        f"- Classes ({len(run.scan.classes)}): {', '.join(run.scan.classes)}",
        f"- Data: {sizes['train']} training, {sizes['selection']} selection and {sizes['report']} report "
        f"images (report split: {metrics['protocol']['report']})",
        f"- Accuracy on the report split: {'n/a' if acc is None else f'{100 * acc:.2f} %'}",
    ]
    cmp = metrics.get("comparison")
    if cmp and role != "teacher":
        low, high = cmp["ci95_points"]
        lines.append(
            f"- Distilled minus fine-tuned alone: {cmp['gain_points']:+.2f} points "
            f"(95 % CI {low:+.2f} to {high:+.2f}; McNemar p = {cmp['mcnemar']['p_value']:.3g}): "
            f"{cmp['verdict']}"
        )
    lines.append(f"- Shipped student: {metrics['shipped']} ({metrics['shipped_reason']})")
    return lines


def _model_of(run: Run, role: str) -> tuple[str, str]:
    """(timm model name, the spec's `weights`) of the teacher or of a student."""
    side = run.spec.teacher if role == "teacher" else run.spec.student
    return side.model, side.weights


def _spec_lines(run: Run) -> list[str]:
    """The job spec, as JSON, at the end of the card."""
    return ["## The job spec", "", "```json", json.dumps(run.spec.model_dump(mode="json"), indent=2), "```"]


def _publish(run: Run, staged: Path) -> None:
    """Move every staged artifact into out_dir, right after the fencing check.

    A rename cannot be made conditional on the job store atomically: a run frozen between the
    check and these renames would still rename its files on thaw. A service job's out_dir is its
    attempt's own folder (core/attempts.py), so such a late rename lands where no other attempt
    reads, and the stale run is refused at its next store write: it never names its folder as
    the job's output."""
    entries = sorted(p for p in staged.iterdir() if not p.name.startswith("."))
    run.guard()
    for p in entries:
        dest = run.out_dir / p.name
        if p.is_dir() and dest.is_dir():  # an earlier export of this job (a resumed run)
            shutil.rmtree(dest)
        os.replace(p, dest)


def build_metrics(run: Run) -> dict[str, Any]:
    """metrics.json: report-split accuracies, selection choices, the gain with its statistics."""
    results = run.state.results
    baseline = results.get("baseline")
    distilled = results["distilled"]
    gain = distilled["report_acc"] - baseline["report_acc"] if baseline else None
    return {
        "job": {
            "id": run.job_id,
            "name": run.spec.name,
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "teacher": results.get("teacher", {"report_acc": None}),
        "baseline": baseline,
        "distilled": distilled,
        "soup": results.get("soup"),
        "gain": gain,
        "comparison": results.get("comparison"),
        "shipped": results["shipped"]["student"],
        "shipped_reason": results["shipped"]["reason"],
        "ship_evidence": results["shipped"].get("evidence"),
        "ship_rule": results["shipped"].get("rule"),
        "old_rule_shipped": results["shipped"].get("old_rule"),
        "distill_weights": results.get("distill_weights"),
        "protocol": {
            "train": run.scan.roles["train"],
            "selection": run.scan.roles["selection"],
            "report": run.scan.roles["report"],
            "sizes": run.scan.sizes(),
            "selection_note": evidence.thin_selection(run.scan, run.spec.dataset.selection_fraction),
        },
        "curves": run.state.curves,
        "dataset": run.scan.summary(),
        "timing": run.state.timing,
        "spec": run.spec.model_dump(mode="json"),
        "device": _device_name(run.runtime),
        "gpu_memory_peak_bytes": _gpu_memory_peak(run.runtime),
        "image_size": run.data.image_size,
        "teacher_image_size": run.data.teacher_image_size,
    }


def _gpu_memory_peak(runtime: Runtime) -> int | None:
    """Most bytes the job's tensors held on its GPU at once (torch's allocator), None on a CPU. The
    job process runs one job and exits, so the process-wide peak is this job's."""
    return int(torch.cuda.max_memory_allocated(runtime.device)) if runtime.is_cuda else None


def _device_name(runtime: Runtime) -> str:
    if runtime.is_cuda:
        return f"{runtime.device} ({torch.cuda.get_device_name(runtime.device)})"
    return str(runtime.device)
