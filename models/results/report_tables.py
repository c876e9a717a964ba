"""The report's tables that read best as tables: the header (which job, on what, when), the
confusion matrices as heatmaps labelled with the class names on both axes, and the images per
class and split. Plain data in, HTML strings out (models/results/report.py places them).
"""

from __future__ import annotations

from typing import Any

from spkd.models.results.fmt import esc as _e
from spkd.models.results.fmt import is_number as _is_number


def _dataset_label(dataset: Any) -> str:
    """The job spec's data source in a few words: `hf beans`, `path colors`, `torchvision CIFAR10`."""
    if not isinstance(dataset, dict):
        return "n/a"
    for key in ("hf", "torchvision", "path", "id"):
        if dataset.get(key):
            split = f", split {dataset['split']}" if dataset.get("split") else ""
            return f"{key} {dataset[key]}{split}"
    return "n/a"


def header_section(metrics: dict[str, Any]) -> str:
    """Title (teacher -> student) and a table of what identifies the job: its id when the service
    ran it, its name when the spec has one, the dataset, the export time (UTC), the device."""
    spec = metrics.get("spec") if isinstance(metrics.get("spec"), dict) else {}
    job = metrics.get("job") if isinstance(metrics.get("job"), dict) else {}
    teacher = (spec.get("teacher") or {}).get("model")
    student = (spec.get("student") or {}).get("model")
    title = f"spkd: {teacher} \u2192 {student}" if teacher and student else "spkd report"
    rows = [
        ("Job", job.get("id")),
        ("Name", job.get("name") or spec.get("name")),
        ("Teacher \u2192 student", f"{teacher} \u2192 {student}" if teacher and student else None),
        ("Dataset", _dataset_label(spec.get("dataset"))),
        ("Exported (UTC)", job.get("exported_at")),
        ("Device", metrics.get("device", "unknown")),
    ]
    cells = [f"<tr><th scope='row'>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in rows if v]
    body = "".join(cells)
    return f"<h1>{_e(title)}</h1><table class='header'><tbody>{body}</tbody></table>"


def report_title(metrics: dict[str, Any]) -> str:
    """The page's <title>: teacher -> student, and the job id when there is one."""
    spec = metrics.get("spec") if isinstance(metrics.get("spec"), dict) else {}
    job = metrics.get("job") if isinstance(metrics.get("job"), dict) else {}
    teacher, student = (spec.get("teacher") or {}).get("model"), (spec.get("student") or {}).get("model")
    title = f"spkd: {teacher} \u2192 {student}" if teacher and student else "spkd report"
    return f"{title} ({job['id']})" if job.get("id") else title


def confusion_table(who: str, matrix: list[list[Any]], classes: list[str]) -> str:
    """One confusion matrix as a heatmap table: true class down the rows, predicted across, each cell
    shaded by its share of the row (its true class), the diagonal outlined. Index labels when the
    class list does not match the matrix (metrics.json from another version)."""
    n = len(matrix)
    names = [str(c) for c in classes] if len(classes) == n else [str(i) for i in range(n)]
    head = "".join(f"<th scope='col'>{_e(c)}</th>" for c in names)
    rows = []
    for i, row in enumerate(matrix):
        total = sum(v for v in row if _is_number(v)) or 1
        cells = []
        for j, v in enumerate(row):
            share = v / total if _is_number(v) else 0.0
            ink = "#fff" if share > 0.55 else "#1a1a1a"
            diag = " class='diag'" if i == j else ""
            cells.append(
                f"<td{diag} style='background:rgba(0,114,178,{share:.2f});color:{ink}' "
                f"title='true {_e(names[i])}, predicted {_e(names[j] if j < n else j)}: {_e(v)}'>{_e(v)}</td>"
            )
        rows.append(f"<tr><th scope='row'>{_e(names[i])}</th>{''.join(cells)}</tr>")
    return (
        f"<h3>Confusion matrix, {_e(who)} (report split)</h3>"
        "<table class='confusion'><thead><tr><th scope='col'>true \u2193 / predicted \u2192</th>"
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def counts_table(counts: dict[str, Any], classes: list[str]) -> str:
    """Images per class (rows) and folder or split (columns, as metrics.json names them), with totals."""
    splits = [s for s, v in counts.items() if isinstance(v, dict)]
    if not splits:
        return ""
    names = [str(c) for c in classes] or sorted({str(c) for s in splits for c in counts[s]})
    head = "".join(f"<th scope='col'>{_e(s)}</th>" for s in splits)
    body = ""
    for name in names:
        cells = "".join(f"<td>{_e(counts[s].get(name, 0))}</td>" for s in splits)
        body += f"<tr><th scope='row'>{_e(name)}</th>{cells}</tr>"
    totals = "".join(
        f"<td><strong>{sum(v for v in counts[s].values() if _is_number(v))}</strong></td>" for s in splits
    )
    body += f"<tr><th scope='row'>total</th>{totals}</tr>"
    return (
        f"<h3>Images per class</h3><table class='counts'><thead><tr><th scope='col'>Class</th>{head}</tr>"
        f"</thead><tbody>{body}</tbody></table>"
    )
