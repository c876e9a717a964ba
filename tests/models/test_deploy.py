"""What a job ships for deployment, from real engine runs on hymenoptera photos (tiny models): the
`deploy` block of metrics.json (counts that agree with the models, sizes that are the files', ratios
that follow from the rows, timings that are positive: no speed is asserted), student.int8.onnx with
an accuracy that its file reproduces, the report and model cards, `export.int8: false`, and the
predict route's answers agreeing with the ONNX model run directly and with the timm model loaded
from its hub folder as the README does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from spkd.common.decode import load_rgb
from spkd.common.preprocess import EvalConfig, eval_batch
from spkd.common.reporter import RecordingReporter
from spkd.common.spec import JobSpec
from spkd.models.data.loader import make_transform
from spkd.models.networks.factory import DataConfig
from spkd.models.pipeline import run_job
from spkd.models.results import deploy, deploy_report, latency, report
from spkd.models.training.engine import Normalizer, Runtime
from tests.helpers import HYMENOPTERA, finished_job, small_imagefolder

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)


def _job(data: Path, **over: object) -> JobSpec:
    spec = {
        # the teacher at the train size (auto: 2x, slower for nothing here)
        "teacher": {"model": "test_resnet", "weights": "none", "finetune": {"epochs": 1}, "image_size": 48},
        "student": {"model": "test_efficientnet", "weights": "none"},
        "dataset": {"path": str(data)},
        "train": {"epochs": 1, "batch_size": 4, "image_size": 48, "num_workers": 0, "lr": 0.02},
        "baseline": True,
    }
    spec.update(over)
    return JobSpec.model_validate(spec)


@pytest.fixture(scope="module")
def hym_run(tmp_path_factory: pytest.TempPathFactory):
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} not found")
    root = tmp_path_factory.mktemp("deploy")
    data = small_imagefolder(root / "data", per_class=8)
    spec = _job(data)
    reporter = RecordingReporter()
    metrics = run_job(spec, data, root / "out", reporter, device="cpu")
    return root / "out", metrics, reporter, spec, data


def _report_images(data: Path) -> tuple[list[Path], list[int]]:
    """The report split of a train/ + val/ folder: val/, classes in sorted order."""
    paths, labels = [], []
    for label, cls in enumerate(sorted(p.name for p in (data / "val").iterdir())):
        files = sorted((data / "val" / cls).iterdir())
        paths += files
        labels += [label] * len(files)
    return paths, labels


def test_the_deploy_block_is_measured_and_consistent(hym_run) -> None:
    out, metrics, reporter, spec, _ = hym_run
    d = metrics["deploy"]
    assert d["image_size"] == 48 and d["gpu"] is None  # a CPU run: no throughput
    assert d["cpu"]["threads"] == deploy.LATENCY_THREADS and d["cpu"]["batch"] == 1
    rows, shipped = d["models"], metrics["shipped"]
    assert rows["student"]["trained"] == shipped
    if shipped == "baseline":
        assert rows["baseline"] == {"same_as": "student"}
        measured = {"teacher": "teacher", "student": "student"}
    else:
        measured = {"teacher": "teacher", "student": "student", "baseline": "baseline"}
    accuracy = {"teacher": metrics["teacher"]["report_acc"], "student": metrics[shipped]["report_acc"]}
    accuracy["baseline"] = metrics["baseline"]["report_acc"]
    for role, folder in measured.items():
        row = rows[role]
        model = timm.create_model(f"local-dir:{out / folder}", pretrained=True).eval()
        assert row["params"] == sum(p.numel() for p in model.parameters()) > 0, role
        assert row["image_size"] == 48, role
        assert row["flops"] == deploy.count_flops(model, 48) > 0, role  # the same counter, recounted
        assert row["macs"] == row["flops"] // 2
        assert row["weights_file"] == f"{folder}/model.safetensors"
        assert row["weights_bytes"] == (out / folder / "model.safetensors").stat().st_size
        assert row["onnx_bytes"] > 0 and row["accuracy"] == accuracy[role]
        lat = row["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] and lat["runs"] >= latency.MIN_RUNS, (role, lat)
        assert row["model"] == (spec.teacher.model if role == "teacher" else spec.student.model)
    assert rows["student"]["onnx_file"] == "student.onnx"
    assert rows["student"]["onnx_bytes"] == (out / "student.onnx").stat().st_size
    assert rows["teacher"]["onnx_file"] is None  # measured, not shipped
    assert not list(out.glob(".deploy-*")) and not (out / "teacher.onnx").exists()

    t, s, vs = rows["teacher"], rows["student"], d["student_vs_teacher"]
    assert vs["speedup"] == round(t["latency_ms"]["p50"] / s["latency_ms"]["p50"], 4)
    assert vs["size_ratio"] == round(t["params"] / s["params"], 4)
    assert vs["flops_ratio"] == round(t["flops"] / s["flops"], 4)
    assert vs["points"] == round(100 * (s["accuracy"] - t["accuracy"]), 4)
    assert vs["headline"] == (
        f"student {report_ratio(vs['speedup'], 'faster', 'slower')} and "
        f"{report_ratio(vs['size_ratio'], 'smaller', 'larger')} than the teacher, {vs['points']:+.1f} points"
    )
    assert ("info", vs["headline"], vs) in reporter.events
    json.dumps(metrics, allow_nan=False)  # strict JSON


def report_ratio(ratio: float, more: str, less: str) -> str:
    return f"{ratio:.1f}x {more}" if ratio >= 1 else f"{1 / ratio:.1f}x {less}"


def test_the_int8_student_and_its_price(hym_run) -> None:
    import onnxruntime as ort

    out, metrics, reporter, spec, data = hym_run
    block = metrics["deploy"]["int8"]
    path = out / "student.int8.onnx"
    assert block["file"] == path.name and block["onnx_bytes"] == path.stat().st_size > 0
    types = {i.op_type for i in __import__("onnx").load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= types  # QDQ format
    # The accuracy is what the file gives on the report split, recomputed here from the photos.
    paths, labels = _report_images(data)
    cfg = EvalConfig.from_hub_config(json.loads((out / "student" / "config.json").read_text()))
    x = eval_batch([load_rgb(p) for p in paths], cfg)
    preds = {}
    for name in ("student.onnx", "student.int8.onnx"):
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        preds[name] = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1)
    n = len(labels)
    assert block["comparison"]["n"] == n
    assert block["accuracy"] == pytest.approx(float(np.mean(preds["student.int8.onnx"] == labels)))
    assert block["fp32_accuracy"] == pytest.approx(float(np.mean(preds["student.onnx"] == labels)))
    assert abs(block["fp32_accuracy"] - metrics[metrics["shipped"]]["report_acc"]) <= 1 / n + 1e-9  # torch
    agree = float(np.mean(preds["student.onnx"] == preds["student.int8.onnx"]))
    assert block["agreement"] == pytest.approx(agree, abs=1e-6)
    assert block["drop_points"] == round(100 * (block["fp32_accuracy"] - block["accuracy"]), 4)
    assert block["comparison"]["gain_points"] == pytest.approx(-block["drop_points"], abs=1e-3)
    assert block["max_drop_points"] == spec.export.int8_max_drop == 1.0
    assert block["usable"] == (block["drop_points"] <= 1.0)
    low, high = block["comparison"]["ci95_points"]
    assert low <= block["comparison"]["gain_points"] <= high
    assert 0 <= block["comparison"]["mcnemar"]["p_value"] <= 1
    assert block["calibration"]["images"] == min(
        deploy.CALIBRATION_IMAGES, metrics["protocol"]["sizes"]["train"]
    )
    assert block["calibration"]["format"] == "QDQ" and block["calibration"]["seed"] == spec.train.seed
    student_p50 = metrics["deploy"]["models"]["student"]["latency_ms"]["p50"]
    assert block["latency_ms"]["p50"] > 0
    assert block["speedup_vs_fp32"] == round(student_p50 / block["latency_ms"]["p50"], 4)
    warned = [e for e in reporter.events if e[0] == "warning" and "student.int8.onnx" in e[1]]
    assert bool(warned) == (not block["usable"])


def test_an_int8_model_past_its_allowance_is_marked_do_not_use(hym_run) -> None:
    out, metrics, _, _, _ = hym_run
    drop, usable = deploy.int8_verdict(0.9, 0.85, 1.0)
    assert (drop, usable) == (5.0, False) and deploy.int8_verdict(0.9, 0.895, 1.0) == (0.5, True)
    bad = {**metrics["deploy"]["int8"], "drop_points": drop, "usable": usable, "max_drop_points": 1.0}
    bad["headline"] = "int8 student: 85.0% (-5.0 points vs fp32); " + deploy_report.int8_warning(bad)
    block = {**metrics["deploy"], "int8": bad}
    warnings = [e for e in deploy.events(block) if e[0] == "warning"]
    assert warnings == [
        ("warning", deploy_report.int8_warning(bad), {"file": "student.int8.onnx", "drop_points": 5.0})
    ]
    assert "do not use student.int8.onnx" in warnings[0][1] and "5.0 points" in warnings[0][1]
    page = report.render_html({**metrics, "deploy": block}, b"")
    assert "Do not use the int8 model:" in page and "student int8 (DO NOT USE)" in page
    card = "\n".join(deploy_report.deploy_card_lines({**metrics, "deploy": block}, metrics["shipped"]))
    assert "do not use student.int8.onnx" in card


def test_a_teacher_the_exporters_cannot_translate_is_shown_without_onnx(hym_run) -> None:
    """measure_job leaves a model it could not export with `onnx_bytes: None` and no latency (an
    `info` event, the job goes on): the headline is dropped, and the report, the text table and
    that model's card say n/a instead of failing the export stage."""
    _, metrics, _, _, _ = hym_run
    d = metrics["deploy"]
    teacher = {k: v for k, v in d["models"]["teacher"].items() if k != "latency_ms"}
    rows = {**d["models"], "teacher": {**teacher, "onnx_bytes": None}}
    assert deploy.summarise(rows) is None
    block = {**d, "models": rows, "student_vs_teacher": deploy.summarise(rows)}
    assert not [e for e in deploy.events(block) if e[0] == "info"]  # no headline without a teacher latency
    card = "\n".join(deploy_report.deploy_card_lines({**metrics, "deploy": block}, "teacher"))
    assert "ONNX n/a MB; CPU latency p50 n/a ms" in card
    assert "teacher" in deploy_report.deploy_text(block) and "n/a" in deploy_report.deploy_text(block)
    assert "<h2>Deploy: what each model costs</h2>" in report.render_html({**metrics, "deploy": block}, b"")


def test_report_and_model_cards_show_the_costs(hym_run) -> None:
    out, metrics, _, _, _ = hym_run
    d = metrics["deploy"]
    page = (out / "report.html").read_text()
    assert "<h2>Deploy: what each model costs</h2>" in page
    assert d["student_vs_teacher"]["headline"] in page
    for row in deploy_report.deploy_rows(d):
        assert f"<td>{row['p50']:.2f}</td>" in page and f"<td>{row['onnx_bytes'] / 1e6:.2f}</td>" in page
    assert page.count("data:image/png;base64,") == 2  # the curves and accuracy against latency
    card = (out / "student" / "README.md").read_text()
    assert "## Deployment" in card and d["student_vs_teacher"]["headline"] in card
    assert "student.int8.onnx" in card and d["int8"]["headline"] in card
    teacher_card = (out / "teacher" / "README.md").read_text()
    assert f"CPU latency p50 {d['models']['teacher']['latency_ms']['p50']:.2f} ms" in teacher_card
    table = deploy_report.deploy_text(d)
    assert table.splitlines()[0].split()[:3] == ["model", "acc", "params"] and "student int8" in table


def test_int8_off_and_no_baseline(hym_run, tmp_path: Path) -> None:
    _, _, _, _, data = hym_run
    spec = _job(data, baseline=False, export={"int8": False})
    metrics = run_job(spec, data, tmp_path / "out", RecordingReporter(), device="cpu")
    d = metrics["deploy"]
    assert d["int8"] is None and not (tmp_path / "out" / "student.int8.onnx").exists()
    assert set(d["models"]) == {"teacher", "student"} and d["models"]["student"]["trained"] == "distilled"
    assert "student int8" not in deploy_report.deploy_text(d)
    assert "export.int8: false" in (tmp_path / "out" / "report.html").read_text()


def test_predict_agrees_with_the_onnx_model_and_the_timm_model(hym_run, client, r, keys, settings) -> None:
    """The API's answer for each report photo is the ONNX model's on the engine's own eval input, and
    the timm model's from the hub folder loaded and fed as the README's snippet does."""
    out, metrics, _, _, data = hym_run
    job = finished_job(r, keys, settings, out, metrics=metrics)
    paths, _ = _report_images(data)
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    res = client.post(f"/v1/jobs/{job['id']}/predict", params={"top_k": 2}, files=files)
    assert res.status_code == 200, res.text
    api = np.array(
        [
            [t["probability"] for t in sorted(p["top"], key=lambda t: t["index"])]
            for p in res.json()["predictions"]
        ]
    )
    assert [p["file"] for p in res.json()["predictions"]] == [p.name for p in paths]

    import onnxruntime as ort

    cfg = json.loads((out / "student" / "config.json").read_text())["pretrained_cfg"]
    dc = DataConfig(
        tuple(cfg["input_size"]),
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        cfg["interpolation"],
        cfg["crop_pct"],
        cfg["crop_mode"],
    )
    transform = make_transform(dc.input_size[-1], dc, training=False)
    x = Normalizer(dc, CPU, torch.nn.Identity())(torch.stack([transform(load_rgb(p)) for p in paths]))
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    direct = torch.from_numpy(session.run(None, {"input": x.numpy()})[0]).double().softmax(1).numpy()

    model = timm.create_model(f"local-dir:{out / 'student'}", pretrained=True).eval()  # README snippet
    readme_transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    with torch.inference_mode():
        hub = model(torch.stack([readme_transform(load_rgb(p)) for p in paths])).double().softmax(1).numpy()

    np.testing.assert_allclose(api, direct, atol=1e-6)
    np.testing.assert_allclose(api, hub, atol=1e-4)
    margin = np.abs(api[:, 0] - api[:, 1])
    decided = margin > 1e-3  # a near tie may flip between runtimes; none of these is one
    assert decided.sum() >= len(paths) - 1, margin
    assert (api.argmax(1) == direct.argmax(1))[decided].all() and (api.argmax(1) == hub.argmax(1))[
        decided
    ].all()
