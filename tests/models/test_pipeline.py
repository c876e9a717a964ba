"""The engine end to end on tiny models: stages, events, metrics.json, artifacts that load back,
the ONNX export under onnxruntime, the README's loading snippets (timm and ONNX), validation errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from spkd.common.errors import SpkdError
from spkd.common.reporter import RecordingReporter
from spkd.models.networks import factory
from spkd.models.pipeline import run_job, run_valid, validate_job
from tests.helpers import HYMENOPTERA, make_folder, tiny_job_spec

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [
    {"teacher": "auto", "student": "auto"},
    {"teacher": "layer3", "student": "blocks.1", "weight": 0.5},
]


@pytest.fixture(scope="module")
def vit_run(color_dataset, tmp_path_factory):
    """A CNN teacher -> ViT student job with named layer pairs and KD."""
    out = tmp_path_factory.mktemp("vit_run")
    spec = tiny_job_spec(student={"model": "test_vit"}, distill={"layers": PAIRS, "kd_weight": 1.0})
    reporter = RecordingReporter()
    metrics = run_job(spec, color_dataset, out, reporter)
    return out, metrics, reporter, spec


def test_stages_and_events(vit_run):
    _, _, reporter, _ = vit_run
    kinds = [kind for kind, _, _ in reporter.events]
    started = [d["stage"] for kind, _, d in reporter.events if kind == "stage_started"]
    assert started == ["teacher_finetune", "baseline", "distill", "evaluate", "export"]
    assert kinds[0] in ("warning", "dataset") and "dataset" in kinds
    ends = [d for kind, _, d in reporter.events if kind == "epoch_end"]
    assert [(d["stage"], d["epoch"]) for d in ends] == [
        ("teacher_finetune", 1),
        ("baseline", 1),
        ("baseline", 2),
        ("distill", 1),
        ("distill", 2),
    ]
    for d in ends:
        keys = {
            "stage",
            "epoch",
            "epochs",
            "train_loss",
            "train_acc",
            "selection_loss",
            "selection_acc",
            "ce",
            "images_per_sec",
            "seconds",
        }
        assert keys <= d.keys()
        assert not {"val_acc", "val_loss"} & d.keys()  # every number names its split
        assert d["eval_split"] == "selection"
    lines = [m for kind, m, _ in reporter.events if kind == "epoch_end"]  # what the CLI prints
    assert all(", selection acc 0." in m or ", selection acc 1." in m for m in lines), lines
    distill = [d for d in ends if d["stage"] == "distill"]
    assert all(d["sp"] > 0 and d["kd"] > 0 for d in distill)
    # a fine-tuning stage has no distillation term at all (not a term stuck at 0)
    assert all("sp" not in d and "kd" not in d for d in ends if d["stage"] != "distill")
    assert sum(kind == "checkpoint" for kind in kinds) == 5
    # progress every step, with a rate and an ETA once a step has been timed
    # 48 train images, 4 carved out for selection (10 %, stratified): 44 / batch 16 = 2 steps
    assert len(reporter.progresses) == 5 * 2
    assert all(p.images_per_sec > 0 for p in reporter.progresses)
    assert reporter.progresses[-1].eta_s == pytest.approx(0.0, abs=1e-6)


def test_metrics_json_contract(vit_run):
    out, metrics, _, spec = vit_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    for key in ("teacher", "baseline", "distilled", "gain", "curves", "dataset", "timing", "spec", "device"):
        assert key in metrics
    for block in ("teacher", "baseline", "distilled"):
        assert 0.0 <= metrics[block]["report_acc"] <= 1.0
    assert metrics["gain"] == pytest.approx(
        metrics["distilled"]["report_acc"] - metrics["baseline"]["report_acc"]
    )
    assert set(metrics["curves"]) == {"teacher_finetune", "baseline", "distill"}
    assert metrics["dataset"]["classes"] == ["blue", "red"]
    assert set(metrics["timing"]) == {"teacher_finetune", "baseline", "distill", "evaluate", "export"}
    assert metrics["spec"] == spec.model_dump(mode="json")
    assert metrics["device"] == "cpu"
    job = metrics["job"]  # the report's header: no service job id in process, the spec's name, a UTC time
    assert job["id"] is None and job["name"] == spec.name and job["exported_at"].endswith("+00:00")
    # export.measure: false (the tiny spec's): no deploy block, no int8 model, no measuring leftovers
    assert spec.export.measure is False and metrics["deploy"] is None
    assert not (out / "student.int8.onnx").exists() and not list(out.glob(".deploy-*"))
    assert (out / "student.onnx").is_file()  # the fp32 model ships regardless


def test_artifacts_load_back(vit_run, color_dataset):
    """Each model once, as its hub folder: no flat weight copies or JSON cards beside them; the
    folder's config.json rebuilds the architecture (a ViT at the job's size too) for its weights."""
    out, _, _, spec = vit_run
    assert not list(out.glob("*.safetensors")) and not (out / "student.json").exists()
    for name, model_name in (("student", spec.student.model), ("teacher", spec.teacher.model)):
        cfg = json.loads((out / name / "config.json").read_text())
        assert cfg["architecture"] == model_name and cfg["label_names"] == ["blue", "red"]
        pre = cfg["pretrained_cfg"]
        for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"):
            assert key in pre
        assert pre["input_size"][-1] == spec.train.image_size
        model = timm.create_model(model_name, **cfg["model_args"])
        model.load_state_dict(load_file(str(out / name / "model.safetensors")))
    assert (out / "report.html").is_file() and (out / "curves.png").is_file()


def test_onnx_matches_torch(vit_run):
    import onnxruntime as ort

    out, _, _, _ = vit_run
    model = timm.create_model(f"local-dir:{out / 'student'}", pretrained=True).eval()  # the shipped one
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    size = model.pretrained_cfg["input_size"][-1]
    for batch in (1, 5):  # dynamic batch axis
        x = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)
        (got,) = session.run(None, {session.get_inputs()[0].name: x})
        with torch.inference_mode():
            want = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def readme_snippet(marker: str = "load-student") -> str:
    """The python block right after the `<!-- load-student -->` (or another) marker in README.md."""
    readme = (ROOT / "README.md").read_text()
    assert f"<!-- {marker} -->" in readme, f"README.md lost its {marker} marker"
    text = readme.split(f"<!-- {marker} -->", 1)[1]
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, f"README.md: no python block after the {marker} marker"
    return match.group(1)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _stage_files(snippet: str, cwd: Path, out: Path, photo: Path) -> None:
    """Put the artifacts and a photo wherever the snippet's string literals point (and in cwd)."""
    literals = re.findall(r"[\"']([^\"'\n]+)[\"']", snippet)
    folders = [cwd] + [cwd / lit for lit in literals if "/" in lit and not Path(lit).suffix]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "student.onnx", folder / "student.onnx")
    shutil.copytree(out / "student", cwd / "student", dirs_exist_ok=True)  # timm's hub layout
    for lit in literals:
        if lit.lower().endswith(IMAGE_SUFFIXES):
            (cwd / lit).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, cwd / lit)


def test_readme_snippet_classifies_an_image(vit_run, tmp_path, color_dataset):
    out, _, _, _ = vit_run
    snippet = readme_snippet()
    red = next((color_dataset / "val" / "red").glob("*.jpg"))
    _stage_files(snippet, tmp_path, out, red)
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    label, prob = result.stdout.split()
    assert label in ("blue", "red") and 0.5 <= float(prob) <= 1.0


def test_readme_onnx_snippet_classifies_an_image_as_timm_does(vit_run, tmp_path, color_dataset):
    """The README's onnxruntime snippet, run as it is in a folder laid out like a job's artifacts:
    complete (no names it does not define), torch-free preprocessing (resize, centre crop,
    normalise), and the same label and probability as the timm snippet on the same photo."""
    out, _, _, _ = vit_run
    red = next((color_dataset / "val" / "red").glob("*.jpg"))
    printed = []
    for marker in ("load-onnx", "load-student"):
        snippet = readme_snippet(marker)
        cwd = tmp_path / marker
        _stage_files(snippet, cwd, out, red)
        result = subprocess.run(
            [sys.executable, "-c", snippet], cwd=cwd, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        printed.append(result.stdout.split())
    (onnx_label, onnx_prob), (timm_label, timm_prob) = printed
    onnx_snippet = readme_snippet("load-onnx")
    assert "import torch" not in onnx_snippet and "import timm" not in onnx_snippet
    assert onnx_label == timm_label and onnx_label in ("blue", "red")
    assert float(onnx_prob) == pytest.approx(float(timm_prob), abs=2e-3)


# ----------------------------------------------------------------------------------- validation
def _error(spec, data_dir) -> SpkdError:
    with pytest.raises(SpkdError) as err:
        validate_job(spec, data_dir)
    return err.value


def test_unknown_model_suggests_close_names(color_dataset):
    err = _error(tiny_job_spec(student={"model": "resnet_18"}), color_dataset)
    assert err.code == "unknown_model" and err.field == "student.model" and "resnet18" in err.message


def test_wrong_layer_lists_valid_ones(color_dataset):
    err = _error(tiny_job_spec(distill={"layers": [{"teacher": "layer9", "student": "auto"}]}), color_dataset)
    assert err.code == "unknown_layer" and err.field == "distill.layers.teacher"
    assert "layer4" in err.message


def test_unsafe_weights_file_rejected(color_dataset, tmp_path):
    class Bomb:
        def __reduce__(self):
            return (print, ("never",))

    torch.save({"x": Bomb()}, tmp_path / "evil.pth")
    err = _error(tiny_job_spec(teacher={"weights": str(tmp_path / "evil.pth")}), color_dataset)
    assert err.code == "unsafe_weights" and err.field == "teacher.weights"


def test_one_class_dataset_rejected_before_training(tmp_path):
    make_folder(tmp_path, {"only": 6})
    reporter = RecordingReporter()
    with pytest.raises(SpkdError) as err:
        run_job(tiny_job_spec(), tmp_path, tmp_path / "out", reporter)
    assert err.value.code == "too_few_classes" and not reporter.progresses


def test_kd_needs_a_trained_teacher_head(color_dataset):
    spec = tiny_job_spec(teacher={"finetune": None}, distill={"kd_weight": 1.0})
    assert _error(spec, color_dataset).code == "teacher_not_finetuned"


def test_warnings_for_larger_student_and_unfinetuned_teacher(color_dataset):
    spec = tiny_job_spec(
        teacher={"model": "test_efficientnet", "finetune": None}, student={"model": "test_resnet"}
    )
    found = validate_job(spec, color_dataset).warnings
    assert any("larger than the teacher" in w for w in found)
    assert any("not fine-tuned" in w for w in found)


def test_hymenoptera_validates_with_package_weights():
    spec = tiny_job_spec(
        teacher={"model": "tf_efficientnet_lite2", "weights": "package"},
        student={"model": "tf_efficientnet_lite0", "weights": "package"},
    )
    # SOURCE.md beside train/ and val/ is listed as skipped (common/scan.py), nothing else warns
    skipped = "1 file(s) in the dataset were skipped: see the dataset report"
    assert validate_job(spec, HYMENOPTERA).warnings == [skipped]


def test_every_model_is_a_timm_hub_folder(vit_run):
    """student/ (shipped), the other student, teacher/: timm's own layout, loaded by timm alone
    with identical outputs to the weights rebuilt the engine's way (models/networks/factory.py),
    label names and the training preprocessing (the engine's data config) in it."""
    out, metrics, _, spec = vit_run
    shipped = metrics["shipped"]
    other = "baseline" if shipped == "distilled" else "distilled"
    size = spec.train.image_size
    for folder, role, model_name in (
        ("student", shipped, spec.student.model),
        (other, other, spec.student.model),
        ("teacher", "teacher", spec.teacher.model),
    ):
        root = out / folder
        cfg = json.loads((root / "config.json").read_text())
        assert cfg["architecture"] == model_name and cfg["label_names"] == ["blue", "red"]
        engine = factory.create(model_name, 2, image_size=size)
        engine.load_state_dict(load_file(str(root / "model.safetensors")))
        want, pre = factory.data_config(engine, size), cfg["pretrained_cfg"]
        assert pre["input_size"] == list(want.input_size) and pre["mean"] == list(want.mean)
        assert pre["interpolation"] == want.interpolation and pre["crop_pct"] == want.crop_pct
        readme = (root / "README.md").read_text()
        assert readme.startswith("---\nlibrary_name: timm") and model_name in readme
        _check_hub_card(readme, cfg, metrics[role]["report_acc"])
        hub = timm.create_model(f"local-dir:{root}", pretrained=True).eval()
        x = torch.randn(2, *want.input_size)
        with torch.inference_mode():
            assert torch.equal(hub(x), engine.eval()(x)), folder
    assert "95 % CI" in (out / "student" / "README.md").read_text()  # the gain's interval


def _check_hub_card(readme: str, config: dict, report_acc: float) -> None:
    """The hub's own parser reads the front matter: pipeline tag, library, the report split's
    accuracy in model-index, a licence that agrees with config.json, no claim of a base model or a
    hub dataset (this job starts from no weights, on a local folder), the SP citation."""
    data = ModelCard(readme).data
    assert data.pipeline_tag == "image-classification" and data.library_name == "timm"
    assert data.metrics == ["accuracy"] and data.base_model is None and data.datasets is None
    (result,) = data.eval_results
    assert result.task_type == "image-classification" and result.dataset_split == "report"
    assert result.metric_type == "accuracy" and result.metric_value == report_acc
    pre = config["pretrained_cfg"]
    assert data.license == pre["license"] == "other" and pre["tag"] == "spkd"
    assert "hf_hub_id" not in pre and "url" not in pre  # not the original checkpoint's address
    assert "Similarity-Preserving Knowledge Distillation" in readme and "@inproceedings" in readme


def card_snippet(readme: str) -> str:
    """The python block under the model card's "## Use it"."""
    match = re.search(r"## Use it\n.*?```python\n(.*?)```", readme, re.S)
    assert match, "the model card has no python block under '## Use it'"
    return match.group(1)


def test_model_card_snippet_classifies_an_image(vit_run, tmp_path, color_dataset):
    """The card's snippet, run as written inside a copy of student/ on a real image: a label of the
    job and a probability; the same top-1 as the eval transform of the engine's own data config."""
    out, _, _, _ = vit_run
    folder = tmp_path / "student"
    shutil.copytree(out / "student", folder)
    snippet = card_snippet((folder / "README.md").read_text())
    assert "create_transform" in snippet and "resolve_data_config" in snippet
    red = next((color_dataset / "val" / "red").glob("*.jpg"))
    shutil.copy(red, folder / "image.jpg")
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=folder, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    label, prob = result.stdout.split()
    assert label in ("blue", "red") and 0.5 <= float(prob) <= 1.0


def test_the_run_uses_the_validated_scan(color_dataset, tmp_path):
    """run_valid trains on the dataset as validation scanned it (one scan per job): an image that
    appears after validation is in neither the dataset event nor metrics.json."""
    data = tmp_path / "data"
    shutil.copytree(color_dataset, data)
    spec = tiny_job_spec(train={"epochs": 1})
    valid = validate_job(spec, data)
    first = next(p for p in sorted(data.rglob("*.jpg")))
    shutil.copy(first, first.with_name("late.jpg"))
    reporter = RecordingReporter()
    metrics = run_valid(valid, tmp_path / "out", reporter).metrics
    event = next(d for kind, _, d in reporter.events if kind == "dataset")
    scanned = len(valid.scan.train) + len(valid.scan.report) + len(valid.scan.selection)
    assert sum(event["sizes"][role] for role in ("train", "selection", "report")) == scanned
    assert metrics["dataset"]["sizes"] == event["sizes"]
