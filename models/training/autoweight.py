"""`distill.sp_weight: auto` (and `kd_weight: auto`): a weight that fits the run.

The raw SP term's scale depends on the pair, the tapped layer and the batch (3000 x SP measured
3.5x to 100x the cross-entropy at the start on real hymenoptera images), so no fixed gamma serves.
`auto` measures, on the first batches of the distill stage with the real teacher (live or cached),
the mean cross-entropy and the mean raw (unweighted) SP and KD terms of the starting student, and
sets gamma = SP_SHARE * CE / SP_raw: SP then starts as SP_SHARE of the cross-entropy. The weight
applies at the measured batch size and follows the batch size from there (SP ~ 1/b; see
models.methods.sp.SP.weight_at). The measurement does not train: the student's BN running
statistics are restored afterwards, and the engine re-seeds every epoch, so the run is unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from contextlib import closing, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from spkd.models.methods import Distiller, Method

# SP starts at this share of the cross-entropy. Measured start ratios (lite2 -> lite0, package
# weights) place the known outcomes: SP at 2-5x CE tied or beat fine-tuning alone on 3-epoch CPU
# runs (gamma 300 on digits and hymenoptera), 20-50x cost 2-5 points or collapsed the student
# (gamma 3000 there), and on the 15-epoch 224 px flower runs ~1.3x (gamma 1000) gained 0.8 points and
# ~4x (3000) 1.4. 2 sits in the helpful range with a 10x margin below the harmful one.
# KD starts equal to CE.
SP_SHARE = 2.0
KD_SHARE = 1.0
# A teacher no better than the student alone on the selection split: its structure is worth less.
WEAK_TEACHER_FACTOR = 0.25
CALIBRATION_BATCHES = 4


@dataclass(frozen=True)
class Measured:
    """Means over the first `batches` batches (each of `batch_size` images) at the start.

    raw: per method with an auto weight (Method.raw), its unweighted term (SP: SPLoss with the layer
    weights, before gamma; KD: before kd_weight), None when the teacher lacks what it needs (no
    logits). Read as `<name>_raw` (m.sp_raw) and written so by as_dict().
    """

    ce: float
    raw: dict[str, float | None]
    batches: int
    batch_size: int

    def __getattr__(self, attr: str) -> float | None:
        raw = self.__dict__.get("raw", {})
        if attr.endswith("_raw") and attr[: -len("_raw")] in raw:
            return raw[attr[: -len("_raw")]]
        raise AttributeError(attr)

    def as_dict(self) -> dict:
        d = asdict(self)
        raw = d.pop("raw")
        return {"ce": d.pop("ce"), **{f"{k}_raw": v for k, v in raw.items()}, **d}


def measure(
    distiller: Distiller,
    student_norm,
    batches: Iterable,
    runtime,
    n_batches: int = CALIBRATION_BATCHES,
) -> Measured:
    """Mean CE and each method's raw term (Method.raw: SP, KD) of the current student on the first
    `n_batches` training batches.

    `batches` yields (uint8 images, labels, indices) like the engine's sources; the student runs in
    train mode (as in its first steps) without gradients, and its BN buffers are restored after.
    Raises ValueError when the source yields no batch.
    """
    model = distiller.student_tap.model
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.train()
    ce = 0.0
    sums: dict[str, float] = {}
    seen: dict[str, int] = {}
    n = size = 0
    dev = runtime.device
    guard = closing(batches) if hasattr(batches, "close") else nullcontext()
    try:
        with guard, torch.no_grad():
            for batch in itertools.islice(iter(batches), n_batches):
                images, labels, indices = batch
                images, labels = images.to(dev), labels.to(dev)
                with runtime.autocast():
                    out = distiller.student_tap(student_norm(images))
                    t_logits, t_feats = distiller.teacher(images, indices)
                ce += float(F.cross_entropy(out.logits.float(), labels))
                for i, m in enumerate(distiller.methods):
                    if type(m).raw is Method.raw:
                        continue  # no auto weight
                    s, t = (
                        distiller.outputs(out.logits, out.features, i),
                        distiller.outputs(t_logits, t_feats, i),
                    )
                    value = m.raw(s, t)
                    sums.setdefault(m.name, 0.0)
                    seen.setdefault(m.name, 0)
                    if value is not None:
                        sums[m.name] += float(value)
                        seen[m.name] += 1
                size = size or int(labels.shape[0])
                n += 1
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
    if n == 0:
        raise ValueError("no training batch to measure the SP/KD weights on")
    raw = {name: (sums[name] / seen[name]) if seen[name] else None for name in sums}
    return Measured(ce / n, raw, n, size)


def auto_weight(share: float, ce: float, raw: float | None) -> float:
    """share * CE / raw, the weight that makes the term `share` of CE; 0 when raw is 0 or unknown."""
    if raw is None or not raw > 0:
        return 0.0
    return share * ce / raw
