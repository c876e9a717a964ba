"""`distill.sp_weight: auto` (and `kd_weight: auto`): a weight that fits the run.

The raw SP term's scale depends on the pair, the tapped layer and the batch (3000 x SP measured
3.5x to 100x the cross-entropy at the start on real hymenoptera images), so no fixed gamma serves.
`auto` measures, on the first batches of the distill stage with the real teacher (live or cached),
the mean cross-entropy and the mean raw (unweighted) SP and KD terms of the starting student, and
sets gamma = SP_SHARE * CE / SP_raw: SP then starts as SP_SHARE of the cross-entropy. The weight
applies at the measured batch size and follows the batch size from there (SP ~ 1/b; see
models.losses.Distiller.sp_weight_at). The measurement does not train: the student's BN running
statistics are restored afterwards, and the engine re-seeds every epoch, so the run is unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from contextlib import closing, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from models.losses import Distiller, kd_loss

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
    """Means over the first `batches` batches (each of `batch_size` images) at the start."""

    ce: float
    sp_raw: float  # SPLoss with the layer weights, before gamma
    kd_raw: float | None  # before kd_weight; None when the teacher gives no logits
    batches: int
    batch_size: int

    def as_dict(self) -> dict:
        return asdict(self)


def measure(
    distiller: Distiller,
    student_norm,
    batches: Iterable,
    runtime,
    n_batches: int = CALIBRATION_BATCHES,
) -> Measured:
    """Mean CE, raw SP and raw KD of the current student on the first `n_batches` training batches.

    `batches` yields (uint8 images, labels, indices) like the engine's sources; the student runs in
    train mode (as in its first steps) without gradients, and its BN buffers are restored after.
    Raises ValueError when the source yields no batch.
    """
    model = distiller.student_tap.model
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.train()
    ce = sp = kd = 0.0
    kd_seen = 0
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
                sp += float(distiller.sp(out.features, t_feats))
                if t_logits is not None:
                    kd += float(kd_loss(out.logits, t_logits, distiller.temperature))
                    kd_seen += 1
                size = size or int(labels.shape[0])
                n += 1
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
    if n == 0:
        raise ValueError("no training batch to measure the SP/KD weights on")
    return Measured(ce / n, sp / n, (kd / kd_seen) if kd_seen else None, n, size)


def auto_weight(share: float, ce: float, raw: float | None) -> float:
    """share * CE / raw, the weight that makes the term `share` of CE; 0 when raw is 0 or unknown."""
    if raw is None or not raw > 0:
        return 0.0
    return share * ce / raw
