"""Misfits found before any training: `validate_job`, and the checks it is made of.

- `validate_job`: everything a person must fix before any training (names, data, weights, sizes,
  layers); the models it builds are the job's own (models/networks/bank.py), reused by the stages.

- `probe_model`: one tiny forward (batch 2, no grad) of a built model at the job's image size,
  through the same feature taps SP uses: a ViT whose patch size does not divide the image size,
  or a CNN whose pooling leaves nothing at a tiny size, fails here with `model_input_mismatch`
  instead of after a whole training stage with a raw AssertionError.
- `check_reused_heads`: a head loaded from weights is used by class index, so the names it was
  trained on (the JSON beside the weight file, e.g. an earlier job's `teacher/config.json`) must be the
  dataset's classes, in the same order.
- `precision_note`: says when the requested precision is not what runs (fp16 on a CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from spkd.common import artifacts
from spkd.common.errors import SpkdError
from spkd.common.spec import JobSpec
from spkd.models.data import loader
from spkd.models.networks import factory, weights
from spkd.models.networks.bank import ModelBank, ModelKey
from spkd.models.networks.features import FeatureTap, check_layers, layer_pairs
from spkd.models.training import guards


@dataclass(frozen=True)
class ValidJob:
    """A job that passed `validate_job`, with what validation read: the engine runs only these
    (models/pipeline.py `run_valid`), so a job is validated and its dataset scanned once."""

    spec: JobSpec
    data_dir: Path
    scan: loader.DatasetScan  # the dataset as scanned (before the selection and ship splits)
    warnings: list[str]  # what a person should know but need not fix
    models: ModelBank  # the job's teacher and student as validation built them, for the stages


def validate_job(spec: JobSpec, data_dir: Path) -> ValidJob:
    """Check a job before any training: raises SpkdError for what a person must fix, returns the
    job with its dataset scan and its warnings.

    Both models are built at the job's image size (once: into the job's own ModelBank, where the
    stages find them again) and run once on it.
    """
    models = ModelBank()
    factory.check_model_name(spec.teacher.model, "teacher.model")
    factory.check_model_name(spec.student.model, "student.model")
    scan = loader.scan_dataset(Path(data_dir), spec.dataset.val_fraction, spec.train.seed)
    guards.check_batch_size(spec.train.batch_size, len(scan.train))
    finetuned = spec.teacher.finetune is not None
    found = check_reused_heads(spec.teacher.weights, spec.student.weights, finetuned, scan.classes)
    size, t_size = factory.job_image_size(spec), factory.teacher_image_size(spec)
    teacher, teacher_head = _built(models, "teacher", spec, scan.classes, t_size)
    student, _ = _built(models, "student", spec, scan.classes, size)
    t_layers, s_layers, _ = layer_pairs(spec)
    check_layers(teacher, t_layers, "distill.layers.teacher")
    check_layers(student, s_layers, "distill.layers.student")
    t_field = "train.image_size" if t_size == size else "teacher.image_size"
    probe_model("teacher", spec.teacher.model, teacher, t_layers, t_size, len(scan.classes), t_field)
    probe_model("student", spec.student.model, student, s_layers, size, len(scan.classes))
    if note := unnamed_head_warning(spec.teacher.weights, teacher_head, finetuned):
        found.append(note)
    if spec.teacher.finetune is None and not teacher_head:
        if spec.distill.kd_on:
            raise SpkdError(
                "teacher_not_finetuned",
                "KD needs a teacher whose head knows the target classes: "
                "set teacher.finetune or load fine-tuned teacher weights",
                "distill.kd_weight",
            )
        found.append(
            "the teacher is not fine-tuned and its weights have no head for these classes: "
            "SP uses its ImageNet features and no teacher accuracy is reported"
        )
    if factory.param_count(student) > factory.param_count(teacher):
        found.append(f"the student ({spec.student.model}) is larger than the teacher ({spec.teacher.model})")
    for role, name, w in (
        ("teacher", spec.teacher.model, spec.teacher.weights),
        ("student", spec.student.model, spec.student.weights),
    ):
        if w == "package" and not name.startswith("tf_"):
            found.append(f"{role}: the package weights fit tf_{name} best (TF 'same' padding)")
    if len(scan.rejected):
        found.append(f"{len(scan.rejected)} file(s) in the dataset were skipped: see the dataset report")
    return ValidJob(spec, Path(data_dir), scan, found, models)


def _built(
    models: ModelBank, role: str, spec: JobSpec, classes: list[str], size: int
) -> tuple[torch.nn.Module, bool]:
    """The job's `role` model with its file/package weights (hub weights: not downloaded here)."""
    name, w = getattr(spec, role).model, getattr(spec, role).weights
    if w == "hub" and not weights.has_hub_weights(name):
        raise SpkdError(
            "no_pretrained_weights", f"timm has no pretrained weights for {name!r}", f"{role}.weights"
        )
    return models.probe(ModelKey.of(spec, role, classes, size))


def probe_model(
    role: str,
    name: str,
    model: torch.nn.Module,
    layers: Sequence[str],
    size: int,
    num_classes: int,
    field: str = "train.image_size",
) -> None:
    """Run `model` once on 2 random `size` x `size` images, in eval mode, without gradients.
    `field`: the spec field that set `size` (named by the errors).

    Raises SpkdError: `non_finite_weights` (its weights or its outputs hold NaN/inf),
    `model_input_mismatch` (the forward fails at this size, or gives other shapes than
    (2, num_classes) logits and one feature map per requested layer).
    """
    guards.require_finite_weights(
        model, f"{role} {name}", f"{role}.weights", "use weights saved before training diverged"
    )
    tap = FeatureTap(model, layers, f"distill.layers.{role}")
    was_training = model.training
    model.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = tap(x)
    except SpkdError:
        raise
    except Exception as exc:  # an assert or shape error deep in timm: name the model and size
        raise SpkdError(
            "model_input_mismatch",
            f"the {role} {name} cannot take {size}x{size} images ({type(exc).__name__}: {exc})"
            f"{_size_hint(model, size, field)}",
            field,
        ) from exc
    finally:
        tap.close()
        model.train(was_training)
    if tuple(out.logits.shape) != (2, num_classes) or any(f.shape[0] != 2 for f in out.features):
        raise SpkdError(
            "model_input_mismatch",
            f"the {role} {name} at {size}x{size} gives logits of shape {tuple(out.logits.shape)}, "
            f"expected (2, {num_classes})",
            field,
        )
    if not all(bool(torch.isfinite(t).all()) for t in [out.logits, *out.features]):
        raise SpkdError(
            "non_finite_weights",
            f"the {role} {name} gives NaN or infinite outputs at {size}x{size} with these weights",
            f"{role}.weights",
        )


def _size_hint(model: torch.nn.Module, size: int, field: str = "train.image_size") -> str:
    """'; use a multiple of 16, e.g. 32 or 48' for a patch model, else a generic hint."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(patch, tuple | list) and patch and int(patch[0]) > 1:
        p = int(patch[0])
        lower, upper = (size // p) * p, (size // p + 1) * p
        options = " or ".join(str(v) for v in (lower, upper) if v >= p)
        return f"; its patch size is {p}: set {field} to a multiple of {p}, e.g. {options}"
    return f"; set {field} to a size this model accepts (e.g. its pretrained size)"


def check_reused_heads(
    teacher_weights: str, student_weights: str, teacher_finetuned: bool, classes: Sequence[str]
) -> list[str]:
    """Compare the class names of weight files (from their sidecar JSON) with the dataset's.

    The teacher without fine-tuning uses its loaded head as-is (for KD and its accuracy), so
    other names, another count or another order is `class_mismatch` (naming both lists). A
    teacher that is fine-tuned and the student start from the body only (models/networks/weights.py drops
    such a head): that is worth a warning, returned here. Weights without a sidecar are not checked.
    """
    found: list[str] = []
    for role, w in (("teacher", teacher_weights), ("student", student_weights)):
        names = weights.sidecar_class_names(w)
        if names is None or names == list(classes):
            continue
        source = _describe(w)
        if role == "teacher" and not teacher_finetuned:
            raise SpkdError(
                "class_mismatch",
                f"the teacher weights {source} were trained on {len(names)} classes {names}, "
                f"this dataset has {len(classes)} classes {list(classes)}: a head is used by class "
                "index, so they must be the same names in the same order; set teacher.finetune to "
                "train a new head for these classes, or use weights trained on them",
                "teacher.weights",
            )
        found.append(
            f"{role}.weights {source} were trained on classes {names}, this dataset has "
            f"{list(classes)}: only the body is reused, the {role} gets a new head"
        )
    return found


def unnamed_head_warning(teacher_weights: str, head_loaded: bool, teacher_finetuned: bool) -> str | None:
    """A warning when a file's head is reused without any record of the classes it was trained on."""
    if not head_loaded or teacher_finetuned or weights.sidecar_class_names(teacher_weights) is not None:
        return None
    if teacher_weights in ("hub", "none", "package"):
        return None
    return (
        f"the teacher weights {_describe(teacher_weights)} have no JSON with class_names beside them: "
        "their head is used as-is, by class index (the dataset's classes in sorted order)"
    )


def _describe(w: str) -> str:
    """A weight file as a person knows it: its folder (a job id or attempt folder for job: weights)
    and name; for a hub folder's `model.safetensors`, the folder above it too."""
    path = Path(w)
    names = [path.parent.parent.name] if path.name == artifacts.WEIGHTS_FILE else []
    return "/".join(n for n in [*names, path.parent.name, path.name] if n)


def precision_note(requested: str, amp_dtype: torch.dtype | None, device: torch.device) -> str | None:
    """None when `requested` is what runs; else a sentence saying what runs instead and why."""
    runs = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, str(amp_dtype))
    if requested in ("auto", runs):
        return None
    why = ""
    if requested == "fp16" and device.type != "cuda":
        why = " (fp16 autocast needs a CUDA GPU)"
    elif requested == "bf16" and device.type == "cuda":
        why = " (this GPU has no bf16; fp32 is the safe fallback, fp16 can overflow)"
    return f"train.precision {requested} was requested, but this run uses {runs} on {device}{why}"
