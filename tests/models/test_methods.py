"""Distillation methods behind one base (models/methods/): RKD against a float64 re-derivation, the
registry, a method's learnable parts optimised and checkpointed, and an RKD job end to end."""

from __future__ import annotations

import copy

import pydantic
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from spkd.common.errors import SpkdError
from spkd.common.reporter import RecordingReporter
from spkd.common.spec import METHOD_OPTIONS, JobSpec
from spkd.models import methods
from spkd.models.methods.rkd import RKD, rkd_angle_loss, rkd_distance_loss
from spkd.models.networks import factory
from spkd.models.networks.features import FeatureTap
from spkd.models.pipeline import run_job
from spkd.models.training import checkpoint, engine
from tests.helpers import tiny_job_spec
from tests.models.helpers import eval_source, train_source


# ------------------------------------------------------------------- RKD, written out in float64
def _huber(x: torch.Tensor) -> torch.Tensor:
    """l_delta of Park et al. Eq. (6), delta = 1."""
    a = x.abs()
    return torch.where(a < 1, 0.5 * x * x, a - 0.5)


def rkd_distance_reference(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. (3)-(5) with explicit loops over pairs: psi_D = ||e_i - e_j|| / mu, mu over i != j."""
    b = s.shape[0]

    def psi(e):
        d = [
            [(e[i] - e[j]).pow(2).sum().sqrt() if i != j else e.new_zeros(()) for j in range(b)]
            for i in range(b)
        ]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[d[i][j] / mu for j in range(b)] for i in range(b)]

    ps, pt = psi(s), psi(t)
    return sum(_huber(ps[i][j] - pt[i][j]) for i in range(b) for j in range(b)) / b**2


def rkd_angle_reference(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. (7)-(8) with explicit loops over triplets: cos of the angle at vertex j, 0 if degenerate."""
    b = s.shape[0]

    def psi(e, i, j, k):
        if i == j or k == j:
            return e.new_zeros(())
        u, v = e[i] - e[j], e[k] - e[j]
        return (u * v).sum() / (u.pow(2).sum().sqrt() * v.pow(2).sum().sqrt())

    idx = [(i, j, k) for i in range(b) for j in range(b) for k in range(b)]
    return sum(_huber(psi(s, *x) - psi(t, *x)) for x in idx) / b**3


def _flat64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double().reshape(x.shape[0], -1)


def _check_rkd(f_s: torch.Tensor, f_t: torch.Tensor, rel: float = 1e-4) -> None:
    """Value and d loss / d f_s of both RKD terms (fp32, the shipped code) against the float64 loops."""
    for got_fn, ref_fn in (
        (rkd_distance_loss, rkd_distance_reference),
        (rkd_angle_loss, rkd_angle_reference),
    ):
        ref_s = _flat64(f_s).requires_grad_(True)
        want = ref_fn(ref_s, _flat64(f_t))
        want.backward()
        s = f_s.detach().clone().requires_grad_(True)
        got = got_fn(s, f_t)
        got.backward()
        assert got.dim() == 0 and got.dtype == torch.float32
        assert got.item() == pytest.approx(want.item(), rel=rel, abs=1e-9)
        g, w = s.grad.reshape(s.shape[0], -1).double(), ref_s.grad
        assert (g - w).abs().max().item() <= rel * w.abs().max().item() + 1e-12
        # float64 through the shipped code: near-exact
        assert got_fn(_flat64(f_s), _flat64(f_t)).item() == pytest.approx(want.item(), rel=1e-10)


@pytest.mark.parametrize(
    ("shape_s", "shape_t"),
    [((6, 16), (6, 40)), ((5, 8, 2, 2), (5, 64)), ((7, 3), (7, 3))],
)
def test_rkd_matches_float64_reference_on_random_features(shape_s, shape_t):
    gen = torch.Generator().manual_seed(0)
    f_s = torch.randn(shape_s, generator=gen)
    f_t = torch.randn(shape_t, generator=gen).relu()
    _check_rkd(f_s, f_t)


def test_rkd_matches_float64_reference_on_real_pooled_embeddings(lite_features):
    """lite0 / lite2 pooled embeddings (1280-d) of 8 hymenoptera images, and a student near its teacher."""
    f_s = lite_features["student"]["auto"].mean((2, 3))
    f_t = lite_features["teacher"]["auto"].mean((2, 3))
    _check_rkd(f_s, f_t)
    near = f_t + 0.05 * torch.randn(f_t.shape, generator=torch.Generator().manual_seed(0))
    _check_rkd(near, f_t, rel=1e-3)


def test_rkd_gradcheck_and_invariances():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda x: rkd_distance_loss(x, t), (s,))
    assert torch.autograd.gradcheck(lambda x: rkd_angle_loss(x, t), (s,))
    # the potentials ignore scale (distances / their mean; angles) and translation
    for fn in (rkd_distance_loss, rkd_angle_loss):
        base = fn(s, t).item()
        assert fn(3.0 * s + 1.0, t).item() == pytest.approx(base, rel=1e-9)
        assert fn(s, 0.01 * t).item() == pytest.approx(base, rel=1e-9)
        assert fn(s, s.detach()).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="batch sizes"):
        rkd_distance_loss(torch.randn(4, 3), torch.randn(5, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rkd_is_fp32_under_autocast(dtype):
    gen = torch.Generator().manual_seed(2)
    f_s, f_t = torch.randn(8, 32, generator=gen) * 30, torch.randn(8, 64, generator=gen) * 30
    for fn in (rkd_distance_loss, rkd_angle_loss):
        with torch.autocast("cpu", dtype=dtype):
            got = fn(f_s, f_t)
        assert got.dtype == torch.float32 and got.item() == fn(f_s, f_t).item()


def test_rkd_method_weights_its_named_losses():
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 10, generator=gen), torch.randn(6, 12, generator=gen)
    out = RKD()(methods.Outputs(None, [s]), methods.Outputs(None, [t]), 6)
    assert set(out) == {"rkd_distance", "rkd_angle"}  # the paper's weights by default: 25 and 50
    assert out["rkd_distance"].item() == pytest.approx(25 * rkd_distance_loss(s, t).item(), rel=1e-6)
    assert out["rkd_angle"].item() == pytest.approx(50 * rkd_angle_loss(s, t).item(), rel=1e-6)
    only = RKD(distance_weight=0.0, angle_weight=2.0)(
        methods.Outputs(None, [s]), methods.Outputs(None, [t]), 6
    )
    assert set(only) == {"rkd_angle"} and not RKD(0.0, 0.0).active


# ------------------------------------------------------------------------------------ registry
def test_registry_finds_methods_by_name_and_names_the_known_ones():
    assert {"sp", "kd", "rkd"} <= set(methods.known())
    assert methods.get("rkd") is RKD
    with pytest.raises(SpkdError) as err:
        methods.get("fitnets")
    assert err.value.code == "unknown_method" and err.value.field == "distill.methods"
    assert "'fitnets'" in err.value.message and "kd, rkd, sp" in err.value.message
    # every method the job spec accepts under distill.methods is a registered one
    assert set(METHOD_OPTIONS) <= set(methods.known())


def test_spec_validates_method_names_and_options():
    spec = tiny_job_spec(distill={"methods": {"rkd": None}})
    assert spec.distill.methods["rkd"].distance_weight == 25.0 and spec.distill.uses_teacher
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec  # round-trips (stored specs)
    both = tiny_job_spec(distill={"methods": {"rkd": None, "dist": {"tau": 2}}})
    assert JobSpec.model_validate_json(both.model_dump_json()) == both
    assert both.distill.methods["dist"].tau == 2.0 and both.distill.methods["rkd"].angle_weight == 50.0
    for bad, words in (
        ({"fitnets": {}}, ["unknown distillation method 'fitnets'", "known methods: dist, rkd", "sp", "kd"]),
        ({"sp": {}}, ["distill.sp_weight"]),
        ({"rkd": {"angle_weight": -1}}, ["rkd.angle_weight"]),
        ({"rkd": {"typo": 1}}, ["rkd.typo"]),
    ):
        with pytest.raises(pydantic.ValidationError) as err:
            tiny_job_spec(distill={"methods": bad})
        (problem,) = err.value.errors()
        assert problem["loc"] == ("distill", "methods")
        assert all(w in problem["msg"] for w in words), problem["msg"]


@pytest.mark.parametrize(
    ("distill", "teacher_taps", "needs"),
    [
        ({"sp_weight": 0, "methods": {"rkd": {}}}, ["pooled"], (True, False)),
        ({"sp_weight": 0, "kd_weight": 1.0}, [], (False, True)),
        ({"methods": {"rkd": {}}}, ["auto", "pooled"], (True, False)),
        ({"sp_weight": [1, 10], "kd_weight": "auto"}, ["auto"], (True, True)),
    ],
)
def test_spec_methods_tap_only_what_they_read(distill, teacher_taps, needs):
    """What the teacher computes (and its cache keeps) follows the methods the spec turns on."""
    spec = tiny_job_spec(distill=distill)
    ms = methods.from_spec(spec.distill, ["auto"], ["auto"], [1.0])
    assert [m.name for m in ms][:2] == ["sp", "kd"]  # always there: their columns stay in the rows
    assert methods.tap_names(ms)[0] == teacher_taps
    assert methods.spec_needs(spec.distill) == needs


class Projected(methods.Method):
    """A throw-away method with a learnable part: a linear head maps the student's pooled embedding
    onto the teacher's (FitNets-like), MSE between them."""

    loss_names = ("proj",)

    def __init__(self, dim_s: int, dim_t: int, weight: float = 1.0) -> None:
        super().__init__()
        self.pairs = [(methods.POOLED, methods.POOLED)]
        self.head = nn.Linear(dim_s, dim_t)
        self.weight = weight

    def forward(self, student, teacher, batch):
        (s,), (t,) = student.features, teacher.features
        return {"proj": self.weight * F.mse_loss(self.head(s.float()), t.float())}


@pytest.fixture
def projected():
    methods.register("test_projected")(Projected)
    yield Projected
    methods.unregister("test_projected")


@pytest.fixture(scope="module")
def sources(color_dataset):
    paths = sorted(str(p) for p in (color_dataset / "train").rglob("*.jpg"))
    labels = [0 if "/blue/" in p else 1 for p in paths]
    device = torch.device("cpu")
    train, _ = train_source(paths, labels, 32, 8, device, workers=1)
    val, _ = eval_source(paths[:8], labels[:8], 32, 8, device, workers=1)
    return train, val


def _stage(sources, name: str, extra_name: str | None):
    """A distill StagePlan: test_efficientnet student, frozen test_resnet teacher, SP + `extra_name`."""
    torch.manual_seed(0)
    runtime = engine.pick_runtime("fp32", "cpu")
    student = engine.prepare(timm.create_model("test_efficientnet", pretrained=False, num_classes=2), runtime)
    teacher = engine.prepare(timm.create_model("test_resnet", pretrained=False, num_classes=2), runtime)
    ms = [methods.get("sp")([("auto", "auto")], [1.0], weight=10.0)]
    if extra_name is not None:
        cls = methods.get(extra_name)
        ms.append(cls(student.num_features, teacher.num_features) if cls is Projected else cls())
    t_names, s_names = methods.tap_names(ms)
    cfg = factory.data_config(student, 32)
    live = engine.LiveTeacher(FeatureTap(teacher, t_names), engine.Normalizer(cfg, runtime, teacher), runtime)
    train, val = sources
    plan = engine.StagePlan(
        name=name,
        model=student,
        distiller=methods.Distiller(FeatureTap(student, s_names), live, ms),
        student_norm=engine.Normalizer(cfg, runtime, student),
        epochs=2,
        lr=0.05,
        weight_decay=1e-4,
        seed=0,
        train_batches=train.epoch,
        val_batches=val.epoch,
        steps_per_epoch=6,
    )
    return plan, runtime


def _run(plan, runtime, resume=None):
    saved: list[dict] = []
    reporter = RecordingReporter()
    curve, _ = engine.train_stage(
        plan,
        runtime,
        reporter,
        engine.Clock(total_steps=12),
        lambda p: saved.append(copy.deepcopy(p)),
        resume,
    )
    return curve, saved, reporter


def _resume_from(payload: dict, with_methods: bool = True) -> engine.StageResume:
    return engine.StageResume(
        epoch=payload["epoch"],
        model=payload["model"],
        optimizer=payload["optimizer"],
        scheduler=payload["scheduler"],
        rng=payload["rng"],
        curve=payload["curve"],
        seconds=payload["seconds"],
        methods=payload["methods"] if with_methods else None,
    )


def test_learnable_method_is_optimised_and_survives_checkpoint_resume(projected, sources, tmp_path):
    plan, runtime = _stage(sources, "distill", "test_projected")
    head = plan.distiller.methods[1].head
    start = head.weight.detach().clone()
    curve, saved, reporter = _run(plan, runtime)
    assert not torch.equal(head.weight, start)  # the optimizer got the method's parameters
    assert all(r["proj"] > 0 and r["sp"] > 0 for r in curve)
    assert [e["proj"] for k, _, e in reporter.events if k == "epoch_end"] == [r["proj"] for r in curve]
    assert torch.equal(saved[-1]["methods"]["methods.1.head.weight"], head.weight.detach())
    final = head.weight.detach().clone()

    # the epoch-1 checkpoint goes through the real file (torch.save, weights_only load) and a fresh
    # process resumes from it: same head (and student) as the uninterrupted run
    checkpoint.save(tmp_path, {"current": saved[0]})
    loaded = checkpoint.load(tmp_path)["current"]
    assert set(loaded["methods"]) == {"methods.1.head.weight", "methods.1.head.bias"}
    again, runtime = _stage(sources, "distill", "test_projected")
    _run(again, runtime, _resume_from(loaded))
    assert torch.allclose(again.distiller.methods[1].head.weight, final, rtol=0, atol=1e-6)
    student_final = {k: v for k, v in saved[-1]["model"].items()}
    got = again.model.state_dict()
    assert all(torch.allclose(got[k].float(), v.float(), atol=1e-5) for k, v in student_final.items())
    # ...which needs the method's state: without it the head restarts from scratch and ends elsewhere
    lost, runtime = _stage(sources, "distill", "test_projected")
    lost.distiller.methods[1].head.reset_parameters()
    _run(lost, runtime, _resume_from(saved[0], with_methods=False))
    assert not torch.allclose(lost.distiller.methods[1].head.weight, final, atol=1e-4)


def test_rkd_stage_reports_its_named_losses(sources):
    plan, runtime = _stage(sources, "distill", "rkd")
    curve, _, reporter = _run(plan, runtime)
    for row in curve:
        assert row["rkd_distance"] > 0 and row["rkd_angle"] > 0 and row["sp"] > 0
        assert "kd" not in row  # only the distiller's own methods' names
        total = row["ce"] + row["sp"] + row["rkd_distance"] + row["rkd_angle"]
        assert row["train_loss"] == pytest.approx(total, rel=1e-5)
    assert not list(plan.distiller.parameters())  # RKD has no learnable part


# ---------------------------------------------------------------------------------- a whole job
@pytest.mark.parametrize("teacher_cache", ["off", "on"])
def test_job_with_rkd_trains_and_reports_rkd(color_dataset, tmp_path, teacher_cache):
    """RKD from the job spec, through run_job: named losses in events, metrics.json and the report.

    With the cache on and SP off, the teacher cache must hold the pooled embeddings RKD reads.
    """
    distill = {
        "methods": {"rkd": {"distance_weight": 25, "angle_weight": 50}},
        "teacher_cache": teacher_cache,
    }
    if teacher_cache == "on":
        distill.update(sp_weight=0, teacher_views=2)
    spec = tiny_job_spec(
        teacher={"model": "test_resnet", "weights": "none", "finetune": None}, distill=distill
    )
    reporter = RecordingReporter()
    metrics = run_job(spec, color_dataset, tmp_path / "out", reporter)
    rows = [d for k, _, d in reporter.events if k == "epoch_end" and d["stage"] == "distill"]
    assert len(rows) == 2
    for row in rows:
        assert row["rkd_distance"] > 0 and row["rkd_angle"] > 0
        assert (row["sp"] > 0) == (teacher_cache == "off")
    assert metrics["curves"]["distill"][-1]["rkd_angle"] == rows[-1]["rkd_angle"]
    assert all("rkd_distance" not in r for r in metrics["curves"]["baseline"])
    if teacher_cache == "on":
        assert any(d.get("teacher_cache") for k, _, d in reporter.events if k == "info")
    report = (tmp_path / "out" / "report.html").read_text()
    for term in ("rkd_distance", "rkd_angle"):  # each term its own column, named and weighted
        assert f"<th scope='col' title='{term}'>{term} (train, weighted)</th>" in report, term
    assert "Method <code>rkd</code>: distance_weight 25, angle_weight 50 (given)." in report
