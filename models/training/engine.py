"""Training and evaluation loops for one stage (teacher fine-tune, baseline, distill).

bf16 autocast on GPUs that support it, fp32 on the CPU; channels_last for CNNs on CUDA; the teacher
frozen, in eval and inference mode. The loop only syncs with the device where progress needs a
number (every step on the CPU, every `sync_every` steps on a GPU).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from spkd.common.metric_names import row_acc, split_key
from spkd.common.reporter import Progress, Reporter, StopRequested
from spkd.models.data.loader import Batch, normalize_batch
from spkd.models.methods import Distiller
from spkd.models.networks.factory import DataConfig, is_cnn
from spkd.models.networks.features import FeatureTap
from spkd.models.training import checkpoint, distributed, guards
from spkd.models.training.oom import BatchSizeController


# ------------------------------------------------------------------------------------ runtime
@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def amp_dtype_for(precision: str, device_type: str, bf16_supported: bool) -> torch.dtype | None:
    """The autocast dtype `train.precision` runs with (None: fp32).

    `auto`: bf16 on GPUs that support it, fp16 on other GPUs, fp32 elsewhere. Explicit values are
    honoured where they can run: bf16 on a GPU without bf16 runs fp32 (autocast would switch
    itself off), fp16 off CUDA runs fp32. validation.precision_note says so to the user."""
    if precision == "bf16":
        return torch.bfloat16 if device_type != "cuda" or bf16_supported else None
    if device_type == "cuda" and precision in ("auto", "fp16"):
        return torch.bfloat16 if precision == "auto" and bf16_supported else torch.float16
    return None


def pick_runtime(precision: str, device: str | None) -> Runtime:
    """The device (`device`, else CUDA when present) and autocast dtype (amp_dtype_for) of a run."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    amp = amp_dtype_for(precision, dev.type, bf16)
    return Runtime(device=dev, amp_dtype=amp, channels_last=dev.type == "cuda")


class Normalizer:
    """uint8 batch on the device -> one model's normalised float input."""

    def __init__(
        self, cfg: DataConfig, runtime: Runtime, model: torch.nn.Module, size: int | None = None
    ) -> None:
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(cfg.mean, device=runtime.device).view(shape)
        self.std = torch.tensor(cfg.std, device=runtime.device).view(shape)
        self.channels_last = runtime.channels_last and is_cnn(model)
        self.size = size  # the model's input size: a batch of another size is resized to it

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, S, S) float, S = `size` (H when None). A view of another
        size (the distill stage's shared view, made at the larger of the two models' sizes) is
        resized with antialiasing, so both models see the same crop and flip."""
        x = normalize_batch(images, self.mean, self.std)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def prepare(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    model.to(runtime.device)
    if runtime.channels_last and is_cnn(model):
        model.to(memory_format=torch.channels_last)
    return model


class LiveTeacher:
    """The frozen teacher as a function of (uint8 batch, indices) -> (logits, features).

    A teacher-feature cache can replace it: it only has to answer the same call.
    """

    def __init__(self, tap: FeatureTap, norm: Normalizer, runtime: Runtime) -> None:
        self.tap, self.norm, self.runtime = tap, norm, runtime
        freeze(tap.model)

    def __call__(
        self, images: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.inference_mode(), self.runtime.autocast():
            out = self.tap(self.norm(images))
        # clones leave inference mode so autograd may use them next to the student's tensors
        return out.logits.clone(), [f.clone() for f in out.features]


def freeze(model: torch.nn.Module) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


# -------------------------------------------------------------------------------- optimisation
def make_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    runtime: Runtime,
    extra: Iterable[torch.nn.Parameter] = (),
    body_lr_scale: float = 1.0,
):
    """Nesterov SGD over the model's trainable parameters, plus `extra` ones (the distillation
    methods' learnable parts) as another group, with the same lr schedule and weight decay.

    `body_lr_scale` < 1: every trainable parameter outside the timm classifier
    (`model.get_classifier()`) trains at `lr * body_lr_scale`, the classifier head at `lr` (the
    discriminative fine-tuning of Howard & Ruder, ACL 2018, reduced to body and head). The schedule's
    factor multiplies each group's own rate. 1.0 keeps one group, as before the option existed.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": trainable}]
    if body_lr_scale != 1.0:
        head_ids = {id(p) for p in _classifier_params(model)}
        body = [p for p in trainable if id(p) not in head_ids]
        head = [p for p in trainable if id(p) in head_ids]
        groups = [{"params": body, "lr": lr * body_lr_scale}, {"params": head}]
    more = [p for p in extra if p.requires_grad]
    if more:
        groups.append({"params": more})
    kwargs: dict[str, Any] = {"lr": lr, "momentum": 0.9, "nesterov": True, "weight_decay": weight_decay}
    if runtime.is_cuda:
        kwargs["fused"] = True
    return torch.optim.SGD(groups, **kwargs)


def _classifier_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of the timm classifier head (none for a model without `get_classifier`)."""
    get = getattr(model, "get_classifier", None)
    head = get() if get is not None else None
    return list(head.parameters()) if isinstance(head, torch.nn.Module) else []


def make_scheduler(optimizer, total_steps: int):
    """Linear warm-up over 5% of the steps, then cosine to zero: stepped once per batch."""
    warmup = max(1, int(0.05 * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -------------------------------------------------------------------------------------- stage
@dataclass
class StagePlan:
    """What one training stage needs; `distiller.teacher` is None for plain fine-tuning."""

    name: str
    model: torch.nn.Module
    distiller: Distiller
    student_norm: Normalizer
    epochs: int
    lr: float
    weight_decay: float
    seed: int
    train_batches: Callable[[int], Iterable[Batch]]  # epoch -> batches (any iterable of triples)
    val_batches: Callable[[], Iterable[Batch]]
    steps_per_epoch: int
    eval_split: str = "selection"  # what val_batches is: "selection" or "report" (names every row's keys)
    stop: Callable[[list[dict]], bool] | None = None  # curve -> stop now (early stopping); None: never
    body_lr_scale: float = 1.0  # the body's lr as a fraction of lr; the classifier head trains at lr


@dataclass
class Clock:
    """Whole-run ETA: planned training steps left times the recent seconds per step."""

    total_steps: int
    done_steps: int = 0
    sec_per_step: float | None = None

    def tick(self, seconds: float) -> None:
        self.done_steps += 1
        self.sec_per_step = seconds if self.sec_per_step is None else 0.9 * self.sec_per_step + 0.1 * seconds

    def eta(self) -> float | None:
        if self.sec_per_step is None:
            return None
        return max(0, self.total_steps - self.done_steps) * self.sec_per_step


@dataclass
class StageResume:
    epoch: int = 0  # completed epochs
    model: dict | None = None
    optimizer: dict | None = None
    scheduler: dict | None = None
    rng: dict | None = None
    curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    methods: dict | None = None  # the distiller's state_dict: its methods' learnable parts


def train_stage(
    plan: StagePlan,
    runtime: Runtime,
    reporter: Reporter,
    clock: Clock,
    on_epoch_end: Callable[[dict[str, Any]], None],
    resume: StageResume | None = None,
    sync_every: int = 25,
) -> tuple[list[dict], float]:
    """Train plan.model for plan.epochs; returns (curve of epoch_end dicts, stage seconds)."""
    resume = resume or StageResume()
    model, distiller = plan.model, plan.distiller
    distiller.to(runtime.device)  # the methods' learnable parts, if any
    optimizer = make_optimizer(
        model, plan.lr, plan.weight_decay, runtime, distiller.parameters(), plan.body_lr_scale
    )
    scheduler = make_scheduler(optimizer, plan.epochs * plan.steps_per_epoch)
    if resume.model is not None:
        model.load_state_dict(resume.model)
        if resume.methods:
            distiller.load_state_dict(resume.methods)
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
    curve = list(resume.curve)
    seconds = resume.seconds
    # Halves the batch on CUDA out-of-memory (models/training/oom.py); a halving before a restart is kept:
    # the resumed scheduler's base lr carries the scale.
    oom = batch_size_controller(reporter, plan.name)
    if resume.model is not None and plan.lr > 0:
        oom.lr_scale = scheduler.base_lrs[0] / plan.lr
    clock.done_steps += resume.epoch * plan.steps_per_epoch
    if plan.stop is not None and curve and plan.stop(curve):  # stopped, then interrupted before the end
        return curve, seconds
    distributed.wrap_for_stage(distiller, runtime.device, reporter)  # several ranks: DDP; one: nothing
    for epoch in range(resume.epoch, plan.epochs):
        checkpoint.seed_everything(plan.seed, plan.name, epoch)
        start = time.perf_counter()
        train = _train_epoch(plan, optimizer, scheduler, runtime, reporter, clock, epoch, sync_every, oom)
        val = evaluate(model, plan.student_norm, plan.val_batches(), runtime)
        eval_loss = split_key(plan.eval_split, "loss")
        guards.check_value(val["loss"], plan.name, epoch + 1, eval_loss, plan.lr)  # NaN weights
        elapsed = time.perf_counter() - start
        seconds += elapsed
        row = {
            "stage": plan.name,
            "epoch": epoch + 1,
            "epochs": plan.epochs,
            **train,
            split_key(plan.eval_split, "loss"): val["loss"],
            split_key(plan.eval_split, "acc"): val["acc"],
            "eval_split": plan.eval_split,
            "seconds": round(elapsed, 3),
        }
        curve.append(row)
        reporter.event("epoch_end", _epoch_message(row), **row)
        on_epoch_end(
            {
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "methods": distiller.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": checkpoint.rng_state(),
                "curve": curve,
                "seconds": seconds,
            }
        )
        if plan.stop is not None and plan.stop(curve):
            break
    distributed.unwrap_student(distiller)
    return curve, seconds


def batch_size_controller(reporter: Reporter, stage: str) -> BatchSizeController:
    """The stage's OOM handler; on several ranks it sizes the global batch in equal shares of at
    least two images per rank."""
    controller = BatchSizeController(None, reporter, stage)
    if (group := distributed.active()) is not None:
        controller.multiple, controller.min_batch_size = group.world, 2 * group.world
    return controller


def _no_sync(distiller: Any):
    """DDP's `no_sync` for a student behind DDP (several ranks), else nothing."""
    tap = distiller.student_tap
    return tap.ddp.no_sync() if isinstance(tap, distributed.DDPTap) else nullcontext()


def _epoch_message(row: dict) -> str:
    return (
        f"{row['stage']} epoch {row['epoch']}/{row['epochs']}: train loss {row['train_loss']:.4f}, "
        f"{row['eval_split']} acc {row_acc(row):.4f}, {row['images_per_sec']:.1f} img/s"
    )


def _train_epoch(
    plan: StagePlan,
    optimizer,
    scheduler,
    runtime: Runtime,
    reporter: Reporter,
    clock: Clock,
    epoch: int,
    sync_every: int,
    oom: BatchSizeController | None = None,
) -> dict[str, float]:
    model, distiller = plan.model, plan.distiller
    model.train()
    dev = runtime.device
    # the total and every named loss the distiller may return (0 for a term a step did not compute)
    sums = {key: torch.zeros((), device=dev) for key in ["loss", *distiller.loss_names]}
    correct = torch.zeros((), device=dev, dtype=torch.long)
    seen = 0
    epoch_start = last = time.perf_counter()
    loss_value: float | None = None
    scaler = torch.amp.GradScaler("cuda") if runtime.amp_dtype == torch.float16 else None
    oom = oom or batch_size_controller(reporter, plan.name)
    guard = guards.FiniteGuard(  # NaN/inf loss or gradient: fail the stage, never train on
        plan.name,
        epoch + 1,
        dev,
        lr=plan.lr,
        knobs=distiller.knobs() if distiller.needs_teacher else None,
        check_grads=scaler is None,
    )

    def params() -> Iterable[torch.nn.Parameter]:
        return itertools.chain(model.parameters(), distiller.parameters())

    group = distributed.active()

    def one_step(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        if group is not None:  # this rank's share of the (chunk of the) global batch
            batch = tuple(distributed.shard(t, group) for t in batch)  # type: ignore[assignment]
        images, labels, indices = batch
        # Several ranks: no collective in the backward (DDP's sync is off) until every rank said at
        # check_peers that it did not run out of memory (models/training/oom.py).
        with _no_sync(distiller):
            with runtime.autocast():
                logits, losses = distiller(plan.student_norm(images), images, labels, indices)
                loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if group is not None:
            distributed.check_peers()
            distributed.average_grads(params(), group.world)
        guard.observe(losses, params())
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if group is not None:
            distributed.sync_buffers(model)
        n = labels.shape[0]
        with torch.no_grad():
            sums["loss"] += loss.detach() * n
            for key, value in losses.items():
                if key not in sums:  # a name the method did not declare in loss_names
                    sums[key] = torch.zeros((), device=dev)
                sums[key] += value.detach() * n
            correct.add_((logits.argmax(1) == labels).sum())
        return loss.detach(), n

    step = 0
    for step, (images, labels, indices) in enumerate(plan.train_batches(epoch), start=1):
        stop = reporter.should_stop()
        if group is not None:  # rank 0 hears the stop; every rank stops at the same step
            stop = distributed.any_true(stop, dev)
        if stop:
            raise StopRequested(f"stopped in {plan.name} epoch {epoch + 1} step {step}")
        images = images.to(dev, non_blocking=True)
        labels = labels.to(dev, non_blocking=True)
        indices = indices.to(dev, non_blocking=True)
        # On CUDA out-of-memory: free, halve the batch, scale lr, warn, redo in chunks (on several
        # ranks: chunks of the global batch, every rank halving together; one_step shards them).
        guard.at(step)
        done = oom.run((images, labels, indices), one_step, optimizer, scheduler)
        scheduler.step()
        loss = done[-1][0]
        seen += sum(n for _, n in done) * (group.world if group is not None else 1)
        if not runtime.is_cuda or step % sync_every == 0 or step == plan.steps_per_epoch:
            guard.check()  # before the loss is reported anywhere
            loss_value = float(loss.detach())  # the one host sync of the step, throttled on GPUs
        now = time.perf_counter()
        clock.tick(now - last)
        last = now
        rate = seen / max(now - epoch_start, 1e-9)
        reporter.progress(
            Progress(
                stage=plan.name,
                epoch=epoch + 1,
                epochs=plan.epochs,
                step=step,
                steps=plan.steps_per_epoch,
                images_per_sec=rate,
                eta_s=clock.eta(),
                loss=loss_value,
                extra={"lr": scheduler.get_last_lr()[0]},
            )
        )
    guard.check()
    guards.check_steps_ran(step if seen else 0, plan.name, epoch + 1)
    if group is not None:  # the epoch's sums over every rank's share: the global batch's numbers
        for value in (*sums.values(), correct):
            distributed.all_sum(value)
    seen = max(seen, 1)
    elapsed = max(time.perf_counter() - epoch_start, 1e-9)
    out = {"train_loss": float(sums.pop("loss")) / seen, "train_acc": float(correct) / seen}
    out.update({name: float(total) / seen for name, total in sums.items()})  # ce and each named loss
    out["images_per_sec"] = seen / elapsed
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    norm: Normalizer,
    batches: Iterable[Batch],
    runtime: Runtime,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Validation loss / accuracy (and per-class accuracy when num_classes is given)."""
    was_training = model.training
    model.eval()
    dev = runtime.device
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.long)
    per_class = torch.zeros((num_classes or 1, 2), device=dev, dtype=torch.long)
    seen = 0
    with torch.inference_mode():
        for images, labels, _ in batches:
            images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
            with runtime.autocast():
                logits = model(norm(images))
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
            hits = logits.argmax(1) == labels
            correct += hits.sum()
            if num_classes:
                per_class[:, 1].index_add_(0, labels, torch.ones_like(labels))
                per_class[:, 0].index_add_(0, labels, hits.long())
            seen += labels.shape[0]
    model.train(was_training)
    seen = max(seen, 1)
    result: dict[str, Any] = {"loss": float(loss_sum) / seen, "acc": float(correct) / seen, "n": seen}
    if num_classes:
        pc = per_class.cpu().tolist()
        result["per_class_acc"] = [c / t if t else None for c, t in pc]
    return result
