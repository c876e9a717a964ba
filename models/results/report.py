"""A per-job report that opens without the server: report.html (self-contained) and curves.png.

Reads only out_dir/metrics.json (the engine's contract), so it can be rerun on any finished job.
Imports only the torch-free common/ and keeps matplotlib inside the function: `models` stays cheap
to import.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from spkd.common import spec as common_spec
from spkd.common.files import atomic_write
from spkd.common.metric_names import OLD_ACC, OLD_LOSS, report_acc, row_acc, row_loss, split_key
from spkd.models.results.deploy_report import deploy_section
from spkd.models.results.fmt import esc as _e
from spkd.models.results.fmt import is_number as _is_number
from spkd.models.results.fmt import pct as _pct
from spkd.models.results.fmt import short as _fmt
from spkd.models.results.fmt import signed as _num
from spkd.models.results.report_tables import confusion_table, counts_table, header_section, report_title

REPORT_NAME = "report.html"
CURVES_NAME = "curves.png"
CURVES_ALT = "Cross-entropy, distillation terms and accuracy per epoch for each stage"

# Colour-blind friendly (Okabe-Ito), given to the stages by their place in common.spec.STAGES.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
FALLBACK_COLOUR = "#555555"  # a stage name outside common.spec.STAGES (metrics.json of another version)


def stage_colour(stage: str) -> str:
    """The line colour of a stage: PALETTE by the stage's place in common.spec.STAGES (distinct
    while there are no more stages than colours), FALLBACK_COLOUR for a name not in the list."""
    stages = common_spec.STAGES
    return PALETTE[stages.index(stage) % len(PALETTE)] if stage in stages else FALLBACK_COLOUR


def write_report(out_dir: Path) -> list[Path]:
    """Write report.html and curves.png next to metrics.json; return their paths."""
    out_dir = Path(out_dir)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    png = render_curves_png(metrics.get("curves") or {})
    curves_path = out_dir / CURVES_NAME
    atomic_write(curves_path, lambda tmp: Path(tmp).write_bytes(png))
    report_path = out_dir / REPORT_NAME
    page = render_html(metrics, png).encode("utf-8")
    atomic_write(report_path, lambda tmp: Path(tmp).write_bytes(page))
    return [report_path, curves_path]


def render_curves_png(curves: dict[str, list[dict[str, Any]]]) -> bytes:
    """Three panels per epoch, one line colour per stage: the cross-entropy (dashed: training, solid:
    the eval split's), the distillation terms as weighted into the training loss (one line style per
    term), and the accuracy. CE sits apart from the distillation terms, so a distilled student's
    total loss is never read against a CE-only one."""
    # The OO API (no pyplot): no global state, safe in a worker thread, always the Agg backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_ce, ax_kd, ax_acc = fig.subplots(1, 3)
    styles = ("-", "--", ":", "-.")
    for stage, rows in curves.items():
        colour = stage_colour(stage)
        epochs = [r.get("epoch") for r in rows]
        terms = loss_columns(rows)
        ce_key = "ce" if "ce" in terms else "train_loss"  # older metrics.json: only the total
        split = _eval_split(rows)
        series = [
            (ax_ce, lambda r, k=ce_key: r.get(k), "--", f"{stage} train"),
            (ax_ce, row_loss, "-", f"{stage} {split}"),
            (ax_acc, lambda r: r.get("train_acc"), "--", f"{stage} train"),
            (ax_acc, row_acc, "-", f"{stage} {split}"),
        ]
        distill_terms = [t for t in terms if t != "ce"]
        series += [
            (ax_kd, lambda r, t=t: r.get(t), styles[i % len(styles)], f"{stage} {t}")
            for i, t in enumerate(distill_terms)
        ]
        for ax, value, style, label in series:
            xs, ys = _points(epochs, [value(r) for r in rows])
            if xs:
                ax.plot(xs, ys, style, color=colour, marker="o", ms=3, label=label)
    ax_ce.set(title="Cross-entropy", xlabel="epoch", ylabel="CE loss")
    ax_kd.set(title="Distillation terms (weighted, training)", xlabel="epoch", ylabel="loss term")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    # SP terms can span orders of magnitude over a search's candidates: log scale then.
    lo, hi = ax_kd.dataLim.y0, ax_kd.dataLim.y1
    if ax_kd.lines and lo > 0 and hi / lo > 100:
        ax_kd.set_yscale("log")
        ax_kd.set_ylabel("loss term (log scale)")
    for ax in (ax_ce, ax_kd, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            empty = "no distillation terms" if ax is ax_kd and curves else "no epochs recorded"
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _eval_split(rows: list[dict[str, Any]]) -> str:
    """The split a stage's epochs were scored on (`selection`, or `report` without one)."""
    return next((r["eval_split"] for r in rows if isinstance(r.get("eval_split"), str)), "selection")


def _points(xs: list[Any], ys: list[Any]) -> tuple[list[float], list[float]]:
    """Keep only pairs where both are numbers (a stage may lack val metrics)."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=False) if _is_number(x) and _is_number(y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def render_html(metrics: dict[str, Any], curves_png: bytes) -> str:
    """The whole report as one HTML string: no external CSS, JS, fonts or images."""
    spec = metrics.get("spec") or {}
    title = report_title(metrics)
    img = base64.b64encode(curves_png).decode("ascii")
    classes = (metrics.get("dataset") or {}).get("classes") or []
    sections = [
        header_section(metrics),
        _accuracy_section(metrics),
        _protocol_section(metrics),
        _gain_section(metrics.get("comparison"), classes),
        deploy_section(metrics.get("deploy")),
        _weights_section(metrics.get("distill_weights"), _spec_methods(spec)),
        "<section><h2>Curves</h2>"
        f'<img src="data:image/png;base64,{img}" alt="{CURVES_ALT}" '
        'style="max-width:100%;height:auto"></section>',
        _epochs_section(metrics.get("curves") or {}),
        _timing_section(metrics.get("timing") or {}),
        _dataset_section(metrics.get("dataset") or {}),
        f"<section><h2>Job spec</h2><pre>{_e(json.dumps(spec, indent=2, sort_keys=True))}</pre></section>",
    ]
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        + "\n".join(sections)
        + "</main></body></html>\n"
    )


def _accuracy_section(metrics: dict[str, Any]) -> str:
    names = {
        "teacher": "Teacher",
        "baseline": "Baseline student (no SP)",
        "distilled": "Distilled student (SP)",
    }
    body = ""
    for key, name in names.items():
        block = metrics.get(key) if isinstance(metrics.get(key), dict) else {}
        epoch = block.get("best_epoch")
        chosen = f"epoch {epoch} of {block.get('epochs')}" if epoch is not None else "n/a"
        body += (
            f"<tr><th scope='row'>{_e(name)}</th><td>{_pct(report_acc(block))}</td>"
            f"<td>{_pct(block.get('select_acc'))}</td><td>{_e(chosen)}</td></tr>"
        )
    gain = metrics.get("gain")
    gain_txt = f"{100 * gain:+.1f} points" if _is_number(gain) else "n/a"
    body += f"<tr><th scope='row'>Gain from distillation</th><td>{gain_txt}</td><td></td><td></td></tr>"
    shipped = metrics.get("shipped")
    ship = ""
    if shipped:
        ship = (
            f"<p><strong>Shipped as student.*: the {_e(shipped)} student.</strong> "
            f"{_e(metrics.get('shipped_reason', ''))}. Both students are downloadable as "
            "<code>distilled.*</code> and <code>baseline.*</code>.</p>"
        )
    return (
        "<section><h2>Accuracy</h2><table><thead><tr><th scope='col'>Model</th>"
        "<th scope='col'>Top-1, report split</th><th scope='col'>Top-1, selection split</th>"
        f"<th scope='col'>Kept</th></tr></thead><tbody>{body}</tbody></table>{ship}"
        f"{_sizes_line(metrics)}</section>"
    )


def _sizes_line(metrics: dict[str, Any]) -> str:
    """Which input size each model trained and was scored at ('' for metrics without them)."""
    student, teacher = metrics.get("image_size"), metrics.get("teacher_image_size")
    if student is None:
        return ""
    teacher = teacher if teacher is not None else student
    return f"<p>Image size: student {_e(student)} px, teacher {_e(teacher)} px.</p>"


def _protocol_section(metrics: dict[str, Any]) -> str:
    p = metrics.get("protocol")
    if not isinstance(p, dict):
        return ""
    sizes = p.get("sizes") or {}
    note = p.get("selection_note")  # few selection images (models/data/evidence.py)
    warn = f"<p class='warn'><strong>Warning:</strong> {_e(note)}</p>" if note else ""
    return (
        "<section><h2>Protocol</h2><ul>"
        f"<li>Trained on <code>{_e(p.get('train'))}</code> ({_e(sizes.get('train'))} images).</li>"
        f"<li>Chosen on the selection split <code>{_e(p.get('selection'))}</code> "
        f"({_e(sizes.get('selection'))} images): best epochs, the SP/KD weights, the shipped student.</li>"
        f"<li>Reported on <code>{_e(p.get('report'))}</code> ({_e(sizes.get('report'))} images): "
        f"no choice is made on it.</li></ul>{warn}</section>"
    )


def _gain_section(cmp: Any, classes: list[str]) -> str:
    if not isinstance(cmp, dict):
        return ""
    low, high = cmp.get("ci95_points") or [None, None]
    mc = cmp.get("mcnemar") or {}
    verdict = cmp.get("verdict", "n/a")
    parts = [
        "<section><h2>Is the gain real?</h2>",
        f"<p><strong>Distilled vs baseline: {_e(verdict)}.</strong> Gain {_num(cmp.get('gain_points'))} "
        f"points on {_e(cmp.get('n'))} report images, 95 % paired bootstrap interval "
        f"[{_num(low)}, {_num(high)}], McNemar exact p = {_fmt(mc.get('p_value'))} "
        f"({_e(mc.get('distilled_only_right'))} images only the distilled student gets right, "
        f"{_e(mc.get('baseline_only_right'))} only the baseline).</p>",
    ]
    per_class = cmp.get("per_class") or {}
    if per_class:
        rows = "".join(
            f"<tr><th scope='row'>{_e(name)}</th><td>{_e(c.get('n'))}</td><td>{_pct(c.get('baseline'))}</td>"
            f"<td>{_pct(c.get('distilled'))}</td><td>{_num(c.get('gain'))}</td></tr>"
            for name, c in per_class.items()
        )
        parts.append(
            "<h3>Per class</h3><table><thead><tr><th scope='col'>Class</th><th scope='col'>Images</th>"
            "<th scope='col'>Baseline</th><th scope='col'>Distilled</th><th scope='col'>Gain (points)</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>"
        )
    for who, matrix in (cmp.get("confusion") or {}).items():
        if isinstance(matrix, list) and all(isinstance(row, list) for row in matrix):
            parts.append(confusion_table(who, matrix, classes))
    return "".join(parts) + "</section>"


def _spec_methods(spec: Any) -> dict[str, Any]:
    """The job spec's `distill.methods` ({name: options}), {} when absent or malformed."""
    distill = spec.get("distill") if isinstance(spec, dict) else None
    found = distill.get("methods") if isinstance(distill, dict) else None
    return found if isinstance(found, dict) else {}


def _methods_items(extra: dict[str, Any]) -> list[str]:
    """One line per method the job added under distill.methods, with its options as given."""
    items = []
    for name, options in extra.items():
        opts = options if isinstance(options, dict) else {}
        given = ", ".join(f"{_e(k)} {_fmt(v)}" for k, v in opts.items()) or "default options"
        items.append(f"Method <code>{_e(name)}</code>: {given} (given).")
    return items


def _weights_section(w: Any, extra: dict[str, Any] | None = None) -> str:
    if not isinstance(w, dict):
        return ""
    sp, kd, m = w.get("sp") or {}, w.get("kd") or {}, w.get("measured")
    items = []
    if sp.get("mode") == "auto" and isinstance(m, dict):
        items.append(
            f"SP weight {_fmt(sp.get('weight'))}, set automatically so that SP starts at "
            f"{_e(sp.get('share'))} x the cross-entropy (measured on the first {_e(m.get('batches'))} "
            f"batches of {_e(m.get('batch_size'))}: CE {_fmt(m.get('ce'))}, raw SP {_fmt(m.get('sp_raw'))})."
        )
    elif sp.get("mode") == "search":
        items.append(
            f"SP weight {_fmt(sp.get('weight'))}, chosen among the candidates below on the selection split "
            "(successive halving on epochs, then the full schedule)."
        )
    else:
        items.append(f"SP weight {_fmt(sp.get('weight'))} (given).")
    if kd.get("mode") == "auto":
        items.append(f"KD weight {_fmt(kd.get('weight'))}, set so KD starts at {_e(kd.get('share'))} x CE.")
    elif kd.get("mode") == "given":
        items.append(f"KD weight {_fmt(kd.get('weight'))} (given).")
    elif kd.get("mode") == "search":
        items.append(
            f"KD weight {_fmt(kd.get('weight'))}, chosen among the candidates below on the selection split."
        )
    check = w.get("teacher_check")
    if isinstance(check, dict) and not check.get("teacher_better"):
        items.append(
            f"The fine-tuned teacher ({_pct(check.get('teacher_select_acc'))}) was not better than the "
            f"student fine-tuned alone ({_pct(check.get('baseline_select_acc'))}) on the selection split: "
            f"{_e(check.get('action', ''))}."
        )
    for c in sp.get("candidates") or kd.get("candidates") or []:
        kd_part = f", KD weight {_fmt(c.get('kd_weight'))}" if kd.get("mode") == "search" else ""
        items.append(
            f"Candidate SP weight {_fmt(c.get('sp_weight'))}{kd_part}, rung {_e(c.get('rung', 0) + 1)}: "
            f"selection accuracy {_pct(c.get('select_acc'))} after {_e(c.get('epochs'))} epoch(s)"
            f"{' (chosen)' if c.get('chosen') else ''}."
        )
    items += _methods_items(extra or {})
    body = "".join(f"<li>{i}</li>" for i in items)
    return f"<section><h2>Distillation weights</h2><ul>{body}</ul></section>"


# the eval columns under each split's name, and under the old one (jobs stored before the rename)
EVAL_COLUMNS = [split_key(s, w) for s in ("selection", "report", "val") for w in ("loss", "acc")]
EPOCH_COLUMNS = ["epoch", "train_loss", "train_acc", *EVAL_COLUMNS, "eval_split"]
NOT_A_LOSS = {"stage", "epochs", "seconds", "images_per_sec", "lr"}


def loss_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The named loss terms of a stage's rows (`ce` and every distillation method's), first-seen order.

    Whatever numeric key a row has besides the fixed columns is a loss term the engine averaged
    (models/training/engine.py), so a new method's losses show up without the report knowing its name.
    """
    seen: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key not in EPOCH_COLUMNS and key not in NOT_A_LOSS and _is_number(value):
                seen.setdefault(key)
    return list(seen)


COLUMN_LABELS = {
    "train_acc": "train acc",
    "selection_acc": "selection acc",
    "report_acc": "report acc",
    "val_acc": "eval acc",
    "eval_split": "eval split",
    "train_loss": "train loss, total",
    "selection_loss": "selection loss (CE)",
    "report_loss": "report loss (CE)",
    "val_loss": "eval loss (CE)",
    "ce": "CE (train)",
    "images_per_sec": "images/s",
}


def _column_label(column: str, terms: list[str]) -> str:
    """A column's header: the loss total says it is the sum of the terms beside it, each
    distillation term says it is weighted (the terms add up to the total)."""
    if column == "train_loss" and len(terms) > 1:
        return f"train loss, total ({' + '.join(terms)})"
    if column in terms and column != "ce":
        return f"{column} (train, weighted)"
    return COLUMN_LABELS.get(column, column)


def _epochs_section(curves: dict[str, list[dict[str, Any]]]) -> str:
    parts = [
        "<section><h2>Epochs</h2><p>Losses by term: CE is the cross-entropy on the labels; each "
        "distillation term is the one the training loss adds, after its weight. The eval columns are "
        "on the split named in <em>eval split</em> (the selection split when there is one).</p>"
    ]
    for stage, rows in curves.items():
        terms = loss_columns(rows)
        split = _eval_split(rows)
        acc, loss = (split_key(split, w) for w in ("acc", "loss"))
        if not any(acc in r for r in rows):  # stored before the rename
            acc, loss = OLD_ACC, OLD_LOSS
        cols = ["epoch", "train_acc", acc, "eval_split", "train_loss", *terms, loss]
        cols.append("images_per_sec")
        head = "".join(f"<th scope='col' title='{_e(c)}'>{_e(_column_label(c, terms))}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
        parts.append(
            f"<h3>{_e(stage)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )
    if not curves:
        parts.append("<p>No epochs recorded.</p>")
    return "".join(parts) + "</section>"


def _timing_section(timing: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th scope='row'>{_e(k)}</th><td>{_fmt_s(v)}</td></tr>" for k, v in timing.items())
    total = sum(v for v in timing.values() if _is_number(v))
    rows += f"<tr><th scope='row'>total</th><td>{_fmt_s(total)}</td></tr>"
    return f"<section><h2>Timing</h2><table><tbody>{rows}</tbody></table></section>"


def _fmt_s(v: Any) -> str:
    if not _is_number(v):
        return "n/a"
    minutes, seconds = divmod(float(v), 60)
    return f"{int(minutes)} min {seconds:.1f} s" if minutes else f"{seconds:.1f} s"


def _dataset_section(dataset: dict[str, Any]) -> str:
    classes = dataset.get("classes") or []
    counts = dataset.get("counts") or {}
    rejected = dataset.get("rejected") or []
    parts = [f"<section><h2>Dataset</h2><p>{len(classes)} classes: {_e(', '.join(map(str, classes)))}</p>"]
    if isinstance(counts, dict):
        parts.append(counts_table(counts, classes))
    parts.append(f"<h3>Rejected files ({len(rejected)})</h3>")
    if rejected:
        rows = "".join(
            f"<tr><td><code>{_e(r.get('path', ''))}</code></td><td>{_e(r.get('reason', ''))}</td></tr>"
            if isinstance(r, dict)
            else f"<tr><td colspan='2'>{_e(r)}</td></tr>"
            for r in rejected
        )
        parts.append(
            "<table><thead><tr><th scope='col'>File</th><th scope='col'>Reason</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    else:
        parts.append("<p>None.</p>")
    return "".join(parts) + "</section>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#1a1a1a;background:#fff;line-height:1.45}
main{max-width:60rem;margin:0 auto;padding:1rem}
table{border-collapse:collapse;margin:.5rem 0;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
thead th{background:#f0f0f0}
pre{background:#f6f6f6;padding:.75rem;overflow-x:auto}
h1{font-size:1.5rem}
.warn{background:#fff3cd;border-left:4px solid #D55E00;padding:.5rem}
table.confusion td{text-align:right;min-width:2.5rem}
table.confusion td.diag{outline:2px solid #1a1a1a;outline-offset:-2px}
table.header th{background:#f0f0f0}
"""
