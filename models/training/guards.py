"""Guards that make a broken run fail, clearly, instead of ending `succeeded` with garbage.

- `FiniteGuard` watches every training step's loss terms and gradients for NaN/inf. It records
  the first bad step on the device (no host sync per step, so GPU throughput is unchanged) and
  raises `non_finite_loss` when the engine checks it, at the step syncs it already does.
- `check_value` is the same for one host number (a validation loss).
- `require_finite_weights` keeps non-finite weights from being exported (or loaded).
- `check_batch_size` / `check_steps_ran` refuse a stage that would run zero optimizer steps or
  SP batches of one image (G is then 1x1 and the SP loss is identically 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from spkd.common.errors import SpkdError

MIN_BATCH = 2  # SP compares the images of a batch (b x b similarities); BatchNorm needs 2 too
GRADIENT = "gradient"


def lr_field(stage: str) -> str:
    """The spec field holding the learning rate of `stage`."""
    return "teacher.finetune.lr" if stage == "teacher_finetune" else "train.lr"


# loss term -> (spec field, weight now): the distillation methods' weights (Distiller.knobs()).
Knobs = Mapping[str, tuple[str, float]]


def hint(term: str, stage: str, lr: float | None, knobs: Knobs | None, fp16: bool) -> tuple[str, str]:
    """(advice, field) for a non-finite `term`: the knobs that scale the updates, the term's own first.

    A NaN in one term often comes from weights an earlier step's huge update already ruined, so
    every active knob is named; the error's field is the likeliest one.
    """
    found = [(lr_field(stage), f"{lr:g}" if lr is not None else None)]
    for name, (own, weight) in (knobs or {}).items():
        if weight and all(own != f for f, _ in found):
            found.insert(0 if term == name else len(found), (own, f"{weight:g}"))
    advice = "lower " + " or ".join(f"{f} (now {v})" if v else f for f, v in found)
    if fp16:
        advice += "; or use train.precision bf16 or fp32 (fp16 overflows above 65504)"
    return advice, found[0][0]


def non_finite_error(
    stage: str,
    epoch: int | None,
    step: int | None,
    term: str,
    value: float,
    *,
    lr: float | None = None,
    knobs: Knobs | None = None,
    fp16: bool = False,
    values: Mapping[str, float] | None = None,
) -> SpkdError:
    """The `non_finite_loss` error: where (stage, 1-based epoch and step), which term, what to do."""
    advice, field = hint(term, stage, lr, knobs, fp16)
    where = stage + (f" epoch {epoch}" if epoch else "") + (f" step {step}" if step else "")
    seen = f" (that step: {', '.join(f'{k} {v:.4g}' for k, v in values.items())})" if values else ""
    return SpkdError(
        "non_finite_loss",
        f"{TERM_NAMES.get(term, f'the {term} loss term')} became {_describe(value)} in {where}{seen}; "
        f"training stopped and nothing was exported: {advice}",
        field,
    )


TERM_NAMES = {
    GRADIENT: "the gradient norm",
    "selection_loss": "the selection-split loss",
    "report_loss": "the report-split loss",
    "teacher_report_loss": "the teacher's report-split loss",
}


def _describe(value: float) -> str:
    return "NaN" if math.isnan(value) else "infinite"


class FiniteGuard:
    """First training step of an epoch whose loss terms or gradient were NaN/inf, kept on the device.

    Call `at(step)` before a step, `observe(losses, params)` after its backward (device ops only),
    `check()` where the loop syncs anyway (raises `non_finite_loss`). With fp16 and a GradScaler,
    inf/NaN gradients are the scaler's normal signal (it skips that step), so `check_grads=False`.
    """

    def __init__(
        self,
        stage: str,
        epoch: int,
        device: torch.device,
        *,
        lr: float | None = None,
        knobs: Knobs | None = None,
        check_grads: bool = True,
    ) -> None:
        self.stage, self.epoch, self.device = stage, epoch, device
        self.lr, self.knobs = lr, knobs
        self.check_grads = check_grads
        self.terms: list[str] | None = None
        self.step = 0
        self._first = torch.zeros((), dtype=torch.long, device=device)  # 0: no bad step yet
        self._values: torch.Tensor | None = None  # the loss terms (+ gradient norm) of that step

    def at(self, step: int) -> None:
        """The 1-based step within the epoch that the next `observe` calls belong to."""
        self.step = step

    def observe(self, losses: Mapping[str, torch.Tensor], params: Iterable[torch.nn.Parameter]) -> None:
        """Record this step if its losses or gradients are not finite and no earlier one was."""
        if self.terms is None:
            self.terms = list(losses) + ([GRADIENT] if self.check_grads else [])
            self._values = torch.zeros(len(self.terms), device=self.device)
        values = [losses[k].detach().float().reshape(()) for k in self.terms if k != GRADIENT]
        if self.check_grads:
            grads = [p.grad for p in params if p.grad is not None]
            # the 2-norm: NaN/inf in any gradient makes it non-finite; one fused kernel on CUDA and
            # ~1% of a CPU step (max |g| costs 8x more on the CPU). It also overflows above 1.8e19,
            # a gradient that would wreck the weights anyway.
            values.append(
                torch.nn.utils.get_total_norm(grads, 2.0).float().to(self.device)
                if grads
                else torch.zeros((), device=self.device)
            )
        now = torch.stack(values)
        first = (self._first == 0) & ~torch.isfinite(now).all()
        self._first = torch.where(first, torch.full_like(self._first, self.step), self._first)
        self._values = torch.where(first, now, self._values)

    def check(self) -> None:
        """Raise `non_finite_loss` naming the first bad step and term (one host sync)."""
        step = int(self._first)
        if step == 0 or self.terms is None or self._values is None:
            return
        values = self._values.tolist()
        bad = [(t, v) for t, v in zip(self.terms, values, strict=True) if not math.isfinite(v)]
        # a bad loss term explains a bad gradient; name the term, the gradient only when alone
        term, value = next(((t, v) for t, v in bad if t != GRADIENT), bad[0])
        raise non_finite_error(
            self.stage,
            self.epoch,
            step,
            term,
            value,
            lr=self.lr,
            knobs=self.knobs,
            fp16=not self.check_grads,
            values={
                ("gradient norm" if t == GRADIENT else t): v for t, v in zip(self.terms, values, strict=True)
            },
        )


def check_value(value: float, stage: str, epoch: int | None, term: str, lr: float | None = None) -> None:
    """Raise `non_finite_loss` when a host number (e.g. a validation loss) is NaN or infinite."""
    if not math.isfinite(value):
        raise non_finite_error(stage, epoch, None, term, value, lr=lr)


def require_finite_weights(
    model: torch.nn.Module, what: str, field: str | None = None, consequence: str = "not exported"
) -> None:
    """Raise `non_finite_weights` when any parameter or buffer of `model` holds NaN or inf."""
    bad = [
        name
        for name, t in model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise SpkdError(
            "non_finite_weights",
            f"the {what} holds NaN or infinite values ({len(bad)} tensor(s): {shown}); {consequence}",
            field,
        )


def check_batch_size(batch_size: int, n_train: int) -> None:
    """Refuse a plan with zero optimizer steps per epoch or batches of fewer than 2 images.

    The loaders drop a last partial batch when the train split holds at least one full batch,
    else they serve the whole split as one batch (models/data/loader.py, models/data/inmemory.py).
    """
    if batch_size < MIN_BATCH:
        raise SpkdError(
            "batch_too_small",
            f"train.batch_size is {batch_size}: at least {MIN_BATCH} images per batch are needed "
            "(SP compares the images of a batch with each other, BatchNorm needs 2 as well)",
            "train.batch_size",
        )
    smallest = batch_size if n_train >= batch_size else n_train
    if smallest < MIN_BATCH:
        raise SpkdError(
            "batch_too_small",
            f"the training split has {n_train} image(s): one batch of fewer than {MIN_BATCH} images "
            "would give no optimizer step; add training images",
            "train.batch_size",
        )


def check_steps_ran(steps: int, stage: str, epoch: int) -> None:
    """Raise `no_training_steps` when an epoch ran no optimizer step (nothing was trained)."""
    if steps == 0:
        raise SpkdError(
            "no_training_steps",
            f"{stage} epoch {epoch} ran no optimizer step: no training batch had {MIN_BATCH} or more "
            "images; use a larger train.batch_size or more training images",
            "train.batch_size",
        )
