"""Artifacts: each model as a folder in timm's hub layout (`save_hub_folder`: model.safetensors and a
config.json that rebuilds it with timm alone, plus its model card), an ONNX export of the student
(normalised float input N x 3 x S x S, dynamic batch), strict JSON; and the safetensors writer the
checkpoints use (`save_weights`)."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spkd.common.errors import SpkdError
from spkd.common.files import atomic_write, storage_full
from spkd.models.networks.factory import DataConfig

log = logging.getLogger(__name__)


def save_weights(model: torch.nn.Module, path: Path, guard: Callable[[], None] | None = None) -> None:
    """Write the model's state dict as safetensors, atomically (`guard`: see common.files.atomic_write)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}), guard)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write strict JSON (no NaN/Infinity, which JSON does not have); SpkdError if `data` holds one."""
    try:
        text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False)
    except ValueError as exc:  # the engine's finiteness guards should have stopped the run before
        raise SpkdError(
            "non_finite_metrics", f"{path.name} would hold a NaN or infinite number; not written"
        ) from exc
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def export_onnx(model: torch.nn.Module, image_size: int, path: Path) -> str:
    """Export with the dynamo exporter (torch's default); fall back to TorchScript if it fails.

    Returns the exporter used. The model is exported in fp32 on the CPU. Written to a temporary
    name and renamed: a failure (a full disk: OSError ENOSPC) leaves no file behind.
    """
    tmp = path.with_suffix(".onnx.tmp")
    try:
        exporter = _export_onnx(model, image_size, tmp)
        tmp.replace(path)
    finally:
        for leftover in path.parent.glob(tmp.name + "*"):  # the temp file, external-data side files
            leftover.unlink(missing_ok=True)
    return exporter


def _export_onnx(model: torch.nn.Module, image_size: int, tmp: Path) -> str:
    model = model.to("cpu", memory_format=torch.contiguous_format).float().eval()
    example = (torch.randn(2, 3, image_size, image_size),)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(
                model,
                example,
                dynamo=True,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
            program.save(str(tmp))
        exporter = "dynamo"
    except Exception as exc:  # an op the new exporter cannot translate yet
        if storage_full(exc) is not None:  # not the exporter's fault: the other one would fail the same way
            raise
        log.warning("dynamo ONNX export failed (%s); using the TorchScript exporter", exc)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                example,
                str(tmp),
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=18,
            )
        exporter = "torchscript"
    return exporter


# ------------------------------------------------------------------ timm's hub layout
def save_hub_folder(model: torch.nn.Module, folder: Path, class_names: list[str], cfg: DataConfig) -> None:
    """Write `folder/` in timm's own hub layout with timm's `save_for_hf`: `config.json`
    (architecture, num_classes, label_names, and the pretrained_cfg used in training: input size,
    mean, std, interpolation, crop) and `model.safetensors`. `timm.create_model("local-dir:<folder>",
    pretrained=True)` rebuilds the model, and the folder can be pushed to the Hugging Face hub as it is
    (add the README.md model card with `write_model_card`)."""
    from timm.models import save_for_hf

    folder.mkdir(parents=True, exist_ok=True)
    data_config = {
        "input_size": tuple(cfg.input_size),
        "mean": tuple(cfg.mean),
        "std": tuple(cfg.std),
        "interpolation": cfg.interpolation,
        "crop_pct": cfg.crop_pct,
        "crop_mode": cfg.crop_mode,
    }
    model = model.to("cpu", memory_format=torch.contiguous_format).float().eval()
    save_for_hf(
        model,
        str(folder),
        model_config={"label_names": list(class_names)},
        safe_serialization=True,
        data_config=data_config,
    )
    _own_pretrained_cfg(folder / "config.json")


# Keys of timm's pretrained_cfg that describe the checkpoint timm downloaded, not these weights.
_SOURCE_KEYS = ("url", "hf_hub_id", "hf_hub_filename", "file", "source", "paper_ids", "paper_name", "notes")


def _own_pretrained_cfg(path: Path) -> None:
    """config.json's pretrained_cfg describes these weights, not the checkpoint they came from:
    `tag: spkd` (not e.g. in1k), `license: other` as the model card (models/results/card.py), and
    no download address of the original weights. What `timm.create_model("local-dir:...")` reads
    (architecture args, input size, mean, std, crop, num_classes, label names) stays."""
    from spkd.models.results.card import LICENSE

    config = json.loads(path.read_text())
    pre = config.get("pretrained_cfg") or {}
    for key in _SOURCE_KEYS:
        pre.pop(key, None)
    pre["tag"] = "spkd"
    pre["license"] = LICENSE
    config["pretrained_cfg"] = pre
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def write_model_card(folder: Path, text: str) -> None:
    """README.md of a hub folder (the text from `models.results.card.render`), atomically."""
    atomic_write(folder / "README.md", lambda tmp: Path(tmp).write_text(text))
