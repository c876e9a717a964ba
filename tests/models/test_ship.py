"""Which student ships: the evidence rule on constructed predictions (models/results/ship.py), the
ship part carved out of the selection split, the weight-averaged soup, and the old rule kept
where no ship part is carved (dataset.ship_fraction 0)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from spkd.common.reporter import RecordingReporter
from spkd.models.data import loader
from spkd.models.pipeline import run_job
from spkd.models.results import ship
from spkd.models.stages.common import average_state_dicts
from tests.helpers import tiny_job_spec

LABELS = [0, 1] * 25  # 50 ship-part images


def _cand(correct: list[bool], p_true: list[float]) -> dict:
    """A candidate whose prediction is right where `correct` says, with p(true class) = p_true."""
    preds = [y if ok else 1 - y for y, ok in zip(LABELS, correct, strict=True)]
    return {"labels": LABELS, "preds": preds, "losses": [-math.log(p) for p in p_true]}


def _noisy(seed: int, mean: float, spread: float = 0.1) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(np.clip(rng.normal(mean, spread, len(LABELS)), 0.05, 0.99))


def test_one_lucky_image_is_not_evidence():
    """The user's case: the distilled student is one image better (the old rule ships it) with
    no better probabilities: the baseline ships."""
    right = [True] * 45 + [False] * 5
    base = _cand(right, _noisy(0, 0.7))
    lucky = _cand([True] * 46 + [False] * 4, _noisy(1, 0.7))
    got = ship.decide({"baseline": base, "distilled": lucky})
    assert got["student"] == "baseline"
    e = got["evidence"]["distilled"]
    assert e["acc"] > got["evidence"]["baseline"]["acc"] and not e["passes"]
    assert e["loss_ci95"][0] < 0 < e["loss_ci95"][1]  # the interval straddles 0
    assert "no candidate was both as accurate" in got["reason"] and "50 ship-part images" in got["reason"]


def test_reliably_lower_log_loss_at_equal_accuracy_ships():
    right = [True] * 45 + [False] * 5
    p = _noisy(2, 0.6)
    got = ship.decide(
        {"baseline": _cand(right, p), "distilled": _cand(right, [min(0.99, x + 0.2) for x in p])}
    )
    assert got["student"] == "distilled"
    e = got["evidence"]["distilled"]
    assert e["passes"] and e["loss_ci95"][1] < 0 and e["loss_diff"] < 0
    assert got["reason"].startswith("the distilled student was as accurate and lower in log-loss")


def test_lower_loss_but_fewer_hits_does_not_ship():
    p = _noisy(3, 0.6)
    base = _cand([True] * 45 + [False] * 5, p)
    calibrated = _cand([True] * 44 + [False] * 6, [min(0.99, x + 0.3) for x in p])
    got = ship.decide({"baseline": base, "distilled": calibrated})
    assert got["evidence"]["distilled"]["loss_ci95"][1] < 0  # better in loss ...
    assert got["student"] == "baseline"  # ... but worse in accuracy


def test_of_two_passing_candidates_the_lower_loss_ships_and_the_rule_is_seeded():
    right = [True] * 45 + [False] * 5
    p = _noisy(4, 0.5)
    cands = {
        "baseline": _cand(right, p),
        "distilled": _cand(right, [min(0.99, x + 0.15) for x in p]),
        "soup": _cand(right, [min(0.99, x + 0.25) for x in p]),
    }
    got = ship.decide(cands, seed=7)
    assert got["student"] == "soup" and got["evidence"]["distilled"]["passes"]
    assert ship.decide(cands, seed=7) == got


def test_decide_refuses_candidates_on_other_images():
    base = _cand([True] * 50, _noisy(5, 0.7))
    other = dict(base, labels=[1 - y for y in LABELS])
    with pytest.raises(ValueError, match="not scored on the baseline's images"):
        ship.decide({"baseline": base, "distilled": other})
    with pytest.raises(ValueError, match="needs the baseline"):
        ship.decide({"distilled": base})


def test_loss_interval_matches_a_float64_bootstrap():
    a, b = np.array(_noisy(6, 0.7)), np.array(_noisy(7, 0.6))
    la, lb = -np.log(a), -np.log(b)
    low, high = ship.loss_interval(la, lb, seed=3, samples=4000)
    rng = np.random.default_rng(3)
    diff = lb - la
    means = diff[rng.integers(0, diff.size, size=(4000, diff.size))].mean(axis=1)
    want = np.quantile(means, [0.025, 0.975])
    assert low == pytest.approx(want[0], rel=1e-9) and high == pytest.approx(want[1], rel=1e-9)
    assert low < diff.mean() < high


def test_ship_part_is_stratified_seeded_and_disjoint(color_dataset):
    scan = loader.with_selection(loader.scan_dataset(color_dataset, 0.2, 0), 0.25, 0)
    split = loader.with_ship_part(scan, 0.5, 0)
    parts = {s.path for s in split.selection} | {s.path for s in split.ship}
    assert parts == {s.path for s in scan.selection}
    assert not {s.path for s in split.selection} & {s.path for s in split.ship}
    for label in range(len(scan.classes)):
        n = sum(s.label == label for s in scan.selection)
        assert sum(s.label == label for s in split.ship) == n // 2
    again = loader.with_ship_part(scan, 0.5, 0)
    assert [s.path for s in again.ship] == [s.path for s in split.ship]
    assert [s.path for s in loader.with_ship_part(scan, 0.5, 1).ship] != [s.path for s in split.ship]
    assert loader.with_ship_part(scan, 0, 0) is scan  # 0: the whole selection split does both
    one_each = loader.with_selection(loader.scan_dataset(color_dataset, 0.2, 0), 0.01, 0)
    assert loader.with_ship_part(one_each, 0.5, 0) is one_each  # nothing to carve: as it is


def test_soup_averages_every_tensor_bn_statistics_included():
    torch.manual_seed(0)
    a = timm.create_model("test_efficientnet", num_classes=2)
    b = timm.create_model("test_efficientnet", num_classes=2)
    a.train()(torch.randn(4, 3, 32, 32))  # give the BN running stats different values
    b.train()(torch.randn(4, 3, 32, 32) * 3)
    sa, sb = a.state_dict(), b.state_dict()
    soup = average_state_dicts([sa, sb])
    bn = [k for k in sa if k.endswith("running_var")]
    assert bn and not torch.equal(sa[bn[0]], sb[bn[0]])
    for k in sa:
        if sa[k].is_floating_point():
            want = ((sa[k].double() + sb[k].double()) / 2).to(sa[k].dtype)
            assert torch.equal(soup[k], want), k
        else:
            assert soup[k] == (sa[k] + sb[k]) // 2
    with pytest.raises(ValueError):
        average_state_dicts([sa, {k: v for k, v in sb.items() if k != bn[0]}])


def test_the_default_keeps_the_old_rule(color_dataset, tmp_path):
    """dataset.ship_fraction 0 (the default until a bench favours the new rule, README): the whole
    selection split picks the epochs and decides; the soup is scored but never ships."""
    spec = tiny_job_spec(teacher={"finetune": {"epochs": 1}}, train={"epochs": 1})
    assert spec.dataset.ship_fraction == 0
    metrics = run_job(spec, color_dataset, tmp_path, RecordingReporter())
    assert metrics["protocol"]["sizes"] == {"train": 44, "selection": 4, "report": 20}
    assert metrics["ship_rule"] == "selection" and metrics["ship_evidence"] is None
    d, b = metrics["distilled"], metrics["baseline"]
    assert metrics["shipped"] == ("distilled" if d["select_acc"] > b["select_acc"] else "baseline")
    assert metrics["soup"]["report_acc"] is not None and not (tmp_path / "soup").exists()


def test_ship_part_decides_end_to_end(color_dataset, tmp_path):
    """ship_fraction 0.5: the pick part chose the epochs, the ship part decided, by the evidence
    rule, among three candidates; what ships is exported as student.*."""
    spec = tiny_job_spec(dataset={"selection_fraction": 0.25, "ship_fraction": 0.5})
    reporter = RecordingReporter()
    metrics = run_job(spec, color_dataset, tmp_path, reporter)
    sizes = metrics["protocol"]["sizes"]
    assert sizes["selection"] == sizes["selection_pick"] + sizes["selection_ship"]
    assert (
        sizes["selection_ship"] == 6
        and "0.5 of it decides the shipped student" in metrics["protocol"]["selection"]
    )
    assert metrics["ship_rule"] == "ship_part"
    evidence = metrics["ship_evidence"]
    assert set(evidence) == {"baseline", "distilled", "soup"} and evidence["baseline"]["n"] == 6
    for w in ("distilled", "soup"):
        e = evidence[w]
        assert e["passes"] == (e["acc"] >= evidence["baseline"]["acc"] and e["loss_ci95"][1] < 0)
        assert metrics[w]["ship_acc"] == e["acc"] and metrics[w]["ship_loss"] == pytest.approx(e["loss"])
    passing = [w for w in ("distilled", "soup") if evidence[w]["passes"]]
    want = min(passing, key=lambda w: evidence[w]["loss"]) if passing else "baseline"
    assert metrics["shipped"] == want and metrics["shipped_reason"] in [m for _, m, _ in reporter.events]
    assert metrics["soup"]["of"] == ["baseline", "distilled"] and 0 <= metrics["soup"]["report_acc"] <= 1
    old = metrics["old_rule_shipped"]
    assert old["student"] == (
        "distilled" if old["selection_acc"]["distilled"] > old["selection_acc"]["baseline"] else "baseline"
    )
    assert f"({want} student, spkd)" in (tmp_path / "student" / "README.md").read_text()
    assert not (tmp_path / want).exists()  # each model stored once
    # every epoch was scored on the pick part only: its size is the curves' denominator
    n_pick = sizes["selection_pick"]
    for curve in metrics["curves"].values():
        assert all(
            abs(r["selection_acc"] * n_pick - round(r["selection_acc"] * n_pick)) < 1e-6 for r in curve
        )
