"""`weights: job:<id>` from an earlier job in either artifact layout (common/artifacts.py): the hub
folders every job writes now, and the flat `teacher.safetensors` + `teacher.json` of jobs exported
before. The earlier job's files are written here from a real tiny model, as each export wrote
them; the resolver (core/references.py) picks the file and the engine validates the job on it."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from spkd.common.errors import SpkdError
from spkd.core import references, store
from spkd.core.settings import Settings
from spkd.models.networks import factory, weights
from spkd.models.pipeline import validate_job
from spkd.models.results import export
from tests.helpers import tiny_job_spec


def _earlier_job(r, keys, settings: Settings, classes: list[str], layout: str) -> tuple[str, torch.nn.Module]:
    """A succeeded job of owner "o" whose fine-tuned teacher (test_resnet) was exported in `layout`:
    "hub" (`teacher/` in timm's hub layout) or "flat" (the old `teacher.safetensors` with its
    model card `teacher.json` beside it)."""
    job_id = store.create_job(r, keys, "o", tiny_job_spec().model_dump(mode="json"))["id"]
    store.transition(r, keys, job_id, store.SUCCEEDED, [store.QUEUED])
    out = references.artifact_dir(settings) / job_id
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(classes))
    cfg = factory.data_config(model, 32)
    if layout == "hub":
        export.save_hub_folder(model, out / "teacher", classes, cfg)
    else:
        out.mkdir(parents=True)
        export.save_weights(model, out / "teacher.safetensors")
        card = {"model": "test_resnet", "num_classes": len(classes), "class_names": classes, **cfg.as_dict()}
        (out / "teacher.json").write_text(json.dumps(card))
    return job_id, model


@pytest.mark.parametrize("layout", ["hub", "flat"])
def test_an_earlier_jobs_teacher_serves_in_either_layout(r, keys, settings, color_dataset, layout) -> None:
    """Same classes: the head is reused as it is (the model's outputs are the earlier job's)."""
    job_id, model = _earlier_job(r, keys, settings, ["blue", "red"], layout)
    spec = tiny_job_spec(teacher={"weights": f"job:{job_id}", "finetune": None})
    resolved = references.resolve_weights(r, keys, settings, spec, "o")
    want = "teacher/model.safetensors" if layout == "hub" else "teacher.safetensors"
    assert resolved.teacher.weights == str(references.artifact_dir(settings) / job_id / want)
    assert not [w for w in validate_job(resolved, color_dataset).warnings if "class" in w]
    built, head = weights.build("test_resnet", resolved.teacher.weights, 2, "teacher", 32, ["blue", "red"])
    assert head is True
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(built.eval()(x), model.eval()(x))


@pytest.mark.parametrize("layout", ["hub", "flat"])
def test_an_earlier_jobs_head_on_other_classes_is_refused_in_either_layout(
    r, keys, settings, color_dataset, layout
) -> None:
    job_id, _ = _earlier_job(r, keys, settings, ["cat", "dog"], layout)
    spec = tiny_job_spec(teacher={"weights": f"job:{job_id}", "finetune": None})
    resolved = references.resolve_weights(r, keys, settings, spec, "o")
    with pytest.raises(SpkdError) as err:
        validate_job(resolved, color_dataset)
    assert err.value.code == "class_mismatch" and "['cat', 'dog']" in err.value.message
    assert f"{job_id}/teacher" in err.value.message  # names the earlier job's file
