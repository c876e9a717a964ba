"""How the `deploy` block of metrics.json (models/results/deploy.py) reads: the table rows, the
plain-text table (bench/deploy.py, `spkd run`), the model cards' lines, the report's section with
its accuracy-against-latency plot, and the sentence that says not to use an int8 model.

Reads only the block (plain data); keeps matplotlib inside the function, like the report.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from spkd.models.results.fmt import esc as _e
from spkd.models.results.fmt import is_number as _is_number
from spkd.models.results.fmt import pct as _pct
from spkd.models.results.fmt import short as _fmt
from spkd.models.results.fmt import signed as _num


def int8_warning(block: dict[str, Any]) -> str:
    """The plain sentence the report, the model card and the `warning` event use for an int8 model
    that lost more than allowed."""
    return (
        f"do not use {block['file']}: it loses {block['drop_points']:.1f} points against the fp32 model on "
        f"the report split (allowed: {block['max_drop_points']:g}, export.int8_max_drop); ship student.onnx"
    )


def fmt_count(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23 M' (k, M, G); 'n/a' for None."""
    if not _is_number(n):
        return "n/a"
    for div, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {prefix}{unit}"
    return f"{n:g} {unit}".strip()


def deploy_rows(deploy: dict[str, Any]) -> list[dict[str, Any]]:
    """The deploy table as rows (teacher, baseline when it is its own model, student, student int8),
    each {name, accuracy, params, flops, macs, weights_bytes, onnx_bytes, p50, p95, gpu}: what the
    report, the model card and bench/deploy.py print."""
    models = deploy.get("models") or {}
    out = []
    for role in ("teacher", "baseline", "student"):
        row = models.get(role)
        if not isinstance(row, dict) or "same_as" in row:
            continue
        name = role if role != "student" else f"student ({row.get('trained', '?')}, shipped)"
        lat = row.get("latency_ms") or {}
        out.append(
            {
                "name": name,
                "model": row.get("model"),
                "accuracy": row.get("accuracy"),
                "params": row.get("params"),
                "flops": row.get("flops"),
                "macs": row.get("macs"),
                "weights_bytes": row.get("weights_bytes"),
                "onnx_bytes": row.get("onnx_bytes"),
                "p50": lat.get("p50"),
                "p95": lat.get("p95"),
                "gpu": row.get("gpu_images_per_s"),
            }
        )
    int8 = deploy.get("int8")
    student = models.get("student") or {}
    if isinstance(int8, dict) and "error" not in int8:
        lat = int8.get("latency_ms") or {}
        out.append(
            {
                "name": "student int8" + ("" if int8.get("usable") else " (DO NOT USE)"),
                "model": student.get("model"),
                "accuracy": int8.get("accuracy"),
                "params": student.get("params"),
                "flops": None,
                "macs": None,
                "weights_bytes": None,
                "onnx_bytes": int8.get("onnx_bytes"),
                "p50": lat.get("p50"),
                "p95": lat.get("p95"),
                "gpu": None,
            }
        )
    return out


def deploy_text(deploy: dict[str, Any]) -> str:
    """The deploy table as plain text (bench/deploy.py, logs)."""
    head = [
        "model",
        "acc",
        "params",
        "GFLOPs",
        "GMACs",
        "weights MB",
        "ONNX MB",
        "p50 ms",
        "p95 ms",
        "GPU img/s",
    ]
    lines = []
    for r in deploy_rows(deploy):
        lines.append(
            [
                r["name"],
                "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%",
                fmt_count(r["params"]),
                _g(r["flops"]),
                _g(r["macs"]),
                _bytes_mb(r["weights_bytes"]),
                _bytes_mb(r["onnx_bytes"]),
                _ms(r["p50"]),
                _ms(r["p95"]),
                "n/a" if r["gpu"] is None else f"{r['gpu']:.0f}",
            ]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    text = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in lines]
    cpu = deploy.get("cpu") or {}
    text.append(
        f"CPU: {cpu.get('processor', '?')}, {cpu.get('runtime', 'onnxruntime')}, "
        f"batch {cpu.get('batch', 1)}, {cpu.get('threads', '?')} thread(s); "
        f"image size {deploy.get('image_size')} px{_teacher_px(deploy)}"
    )
    if deploy.get("gpu"):
        g = deploy["gpu"]
        text.append(f"GPU: {g['device']}, batch {g['batch']}, {g['precision']}")
    if deploy.get("student_vs_teacher"):
        text.append(deploy["student_vs_teacher"]["headline"])
    int8 = deploy.get("int8")
    if isinstance(int8, dict):
        text.append(int8.get("headline") or int8.get("error", ""))
        if "agreement" in int8:
            text.append(f"int8 agrees with fp32 on {100 * int8['agreement']:.1f}% of the report images")
    return "\n".join(text)


def _teacher_px(deploy: dict[str, Any]) -> str:
    """' (the teacher at 260 px)' when the teacher ran at its own size, else ''."""
    t = deploy.get("teacher_image_size")
    return f" (the teacher at {t} px)" if t is not None and t != deploy.get("image_size") else ""


def deploy_card_lines(metrics: dict[str, Any], role: str) -> list[str]:
    """Model-card lines (hub folder README.md) about deployment: the headline, this model's costs,
    and for the shipped student the int8 file with its accuracy (or the plain warning)."""
    deploy = metrics.get("deploy")
    if not isinstance(deploy, dict):
        return []
    key = "student" if role == metrics.get("shipped") else role
    row = (deploy.get("models") or {}).get(key)
    lines = ["", "## Deployment", ""]
    if isinstance(row, dict) and "params" in row:
        lat = row.get("latency_ms") or {}
        px = row.get("image_size", deploy.get("image_size"))  # the teacher's own size on its card
        lines.append(
            f"- Cost at {px} px: {fmt_count(row['params'])} parameters, "
            f"{_g(row.get('flops'))} GFLOPs ({_g(row.get('macs'))} GMACs) per image, ONNX "
            f"{_bytes_mb(row.get('onnx_bytes'))} MB; CPU latency p50 {_ms(lat.get('p50'))} ms, p95 "
            f"{_ms(lat.get('p95'))} ms (onnxruntime, batch 1, "
            f"{(deploy.get('cpu') or {}).get('threads')} thread)"
        )
    if deploy.get("student_vs_teacher") and key == "student":
        lines.append(f"- {deploy['student_vs_teacher']['headline']} (measured side by side, same host)")
    int8 = deploy.get("int8")
    if key == "student" and isinstance(int8, dict):
        if "error" in int8:
            lines.append(f"- int8: {int8['error']}")
        else:
            lines.append(f"- `{int8['file']}` (in the job's artifacts): {int8['headline']}")
    return lines if len(lines) > 3 else []


def render_deploy_png(rows: list[dict[str, Any]]) -> bytes:
    """Accuracy on the report split against CPU latency (p50, batch 1), one labelled point per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, r in enumerate(rows):
        if _is_number(r.get("p50")) and _is_number(r.get("accuracy")):
            colour = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00")[i % 5]
            ax.scatter([r["p50"]], [100 * r["accuracy"]], color=colour, s=40, zorder=3)
            ax.annotate(
                str(r["name"]),
                (r["p50"], 100 * r["accuracy"]),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
            )
    ax.set(
        title="Accuracy against CPU latency",
        xlabel="latency p50, ms (onnxruntime, batch 1)",
        ylabel="top-1 on the report split, %",
    )
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _bytes_mb(v: Any) -> str:
    return f"{v / 1e6:.2f}" if _is_number(v) else "n/a"


def _g(v: Any) -> str:
    return f"{v / 1e9:.3f}" if _is_number(v) else "n/a"


def _ms(v: Any) -> str:
    return f"{v:.2f}" if _is_number(v) else "n/a"


def deploy_section(deploy: Any) -> str:
    """What each model costs (measured side by side in the export stage), the headline, and the
    int8 student with its price; a plain warning when the int8 model must not be used."""
    if not isinstance(deploy, dict):
        return ""
    rows = deploy_rows(deploy)
    body = "".join(
        f"<tr><th scope='row'>{_e(r['name'])}</th><td><code>{_e(r.get('model'))}</code></td>"
        f"<td>{_pct(r['accuracy'])}</td><td>{_e(fmt_count(r['params']))}</td><td>{_g(r['flops'])}</td>"
        f"<td>{_g(r['macs'])}</td><td>{_bytes_mb(r['weights_bytes'])}</td><td>{_bytes_mb(r['onnx_bytes'])}</td>"
        f"<td>{_ms(r['p50'])}</td><td>{_ms(r['p95'])}</td>"
        f"<td>{_e(r['gpu']) if _is_number(r['gpu']) else 'n/a'}</td></tr>"
        for r in rows
    )
    cols = [
        "Model",
        "timm name",
        "Top-1, report split",
        "Parameters",
        "GFLOPs",
        "GMACs (FLOPs/2)",
        "Weights MB",
        "ONNX MB",
        "CPU p50 ms",
        "CPU p95 ms",
        "GPU images/s",
    ]
    head = "".join(f"<th scope='col'>{c}</th>" for c in cols)
    parts = ["<section><h2>Deploy: what each model costs</h2>"]
    summary = deploy.get("student_vs_teacher")
    if isinstance(summary, dict):
        parts.append(
            f"<p><strong>{_e(summary.get('headline'))}</strong> "
            "(speed: CPU p50 latency; size: parameters).</p>"
        )
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    cpu, gpu = deploy.get("cpu") or {}, deploy.get("gpu")
    note = (
        f"Measured side by side in one run at {_e(deploy.get('image_size'))} px{_e(_teacher_px(deploy))}: "
        "CPU latency with "
        f"{_e(cpu.get('runtime'))} on {_e(cpu.get('processor'))}, batch 1, "
        f"{_e(cpu.get('threads'))} thread(s), "
        f"after {_e(cpu.get('warmup_runs'))} warm-up runs. FLOPs: {_e(deploy.get('flops_counter'))}."
    )
    if isinstance(gpu, dict):
        note += (
            f" GPU throughput: {_e(gpu.get('device'))}, batch {_e(gpu.get('batch'))}, "
            f"{_e(gpu.get('precision'))}."
        )
    else:
        note += " No GPU throughput: the job ran on a CPU."
    parts.append(f"<p>{note}</p>")
    int8 = deploy.get("int8")
    if isinstance(int8, dict) and "error" in int8:
        parts.append(f"<p class='warn'><strong>No int8 model.</strong> {_e(int8['error'])}</p>")
    elif isinstance(int8, dict):
        cmp = int8.get("comparison") or {}
        low, high = cmp.get("ci95_points") or [None, None]
        p = (cmp.get("mcnemar") or {}).get("p_value")
        text = (
            f"<code>{_e(int8.get('file'))}</code>: {_pct(int8.get('accuracy'))} on the report split "
            f"against {_pct(int8.get('fp32_accuracy'))} for the fp32 ONNX model: "
            f"{_num(cmp.get('gain_points'))} points "
            f"(95 % paired bootstrap interval [{_num(low)}, {_num(high)}], McNemar exact p = {_fmt(p)}: "
            f"{_e(cmp.get('verdict'))}); same top-1 as fp32 on {_pct(int8.get('agreement'))} of the images; "
            f"CPU p50 {_ms((int8.get('latency_ms') or {}).get('p50'))} ms"
        )
        if _is_number(int8.get("speedup_vs_fp32")):
            text += f" ({int8['speedup_vs_fp32']:.2f}x the fp32 speed)"
        parts.append(f"<p>{text}.</p>")
        if int8.get("usable") is False:
            parts.append(
                f"<p class='warn'><strong>Do not use the int8 model:</strong> {_e(int8_warning(int8))}.</p>"
            )
    elif int8 is None:
        parts.append("<p>No int8 model (<code>export.int8: false</code>).</p>")
    if rows:
        img = base64.b64encode(render_deploy_png(rows)).decode("ascii")
        parts.append(
            f'<img src="data:image/png;base64,{img}" alt="Accuracy against CPU latency for each model" '
            'style="max-width:100%;height:auto">'
        )
    return "".join(parts) + "</section>"
