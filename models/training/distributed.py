"""One training stage spread over several ranks with torch.distributed (data parallel).

Every rank runs the same seeded data order and cuts its equal share out of each global batch
(`shard`), so `train.batch_size` stays the global batch and N ranks train as one device would:
the student is wrapped in DistributedDataParallel (gradients averaged over the ranks after each
step), the frozen teacher runs on every rank without gradients and without DDP, and SP sees the
global batch (`gather_batch`: features all-gathered, gradients back to each rank's share). Every
collective of a training step sits at a point all ranks reach even when one runs out of memory
(`check_peers`). The process group is this module's state (`active()`); with none, every helper
is the identity and the engine runs as before.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from spkd.common.reporter import Reporter
from spkd.models.networks.features import FeatureTap, Tapped


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    sync_batchnorm: bool = True

    @property
    def leader(self) -> bool:
        """Rank 0: the one rank that reports, checkpoints and writes artifacts."""
        return self.rank == 0


_GROUP: Group | None = None


def active() -> Group | None:
    """The process group this process trains in, or None (one device)."""
    return _GROUP


def init(rank: int, world: int, port: int, backend: str, timeout_s: float, sync_batchnorm: bool) -> Group:
    """Join the job's process group at 127.0.0.1:`port` (gloo on the CPU, nccl on GPUs).

    `timeout_s` bounds every collective: a rank that stops answering fails the others after it.
    """
    global _GROUP
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    _GROUP = Group(rank, world, sync_batchnorm)
    return _GROUP


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    global _GROUP
    if _GROUP is not None and dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = None


# ----------------------------------------------------------------------------------- data
def shard(t: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's contiguous share of a global batch (dim 0); global batches split evenly
    (the spec checks batch_size % devices), a short one gives the last ranks one image less."""
    return torch.tensor_split(t, group.world)[group.rank]


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any (a stop asked of rank 0 stops them all)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over the ranks (in place, returned)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """The global batch of a per-rank tensor (ranks concatenated on dim 0, in rank order, which is
    the global batch's own order); gradients flow back to this rank's share only. Identity without
    a group.

    Every rank first passes an out-of-memory check point (`check_peers`: raises PeerOutOfMemory
    when another rank ran out in this step), so a rank that failed before its gather never leaves
    the others waiting in it. The backward holds no collective (an OOM there cannot hang a rank):
    each rank computes the same global loss, and its share's gradient is scaled by the world size,
    which times the ranks' gradient average gives exactly the one-device gradient."""
    if _GROUP is None:
        return x
    check_peers()
    parts = [torch.empty_like(x) for _ in range(_GROUP.world)]
    dist.all_gather(parts, x.detach().contiguous())
    if x.requires_grad:
        parts[_GROUP.rank] = _ScaleGrad.apply(x, float(_GROUP.world))
    return torch.cat(parts, 0)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


# ------------------------------------------------------------------------------ out of memory
class PeerOutOfMemory(torch.cuda.OutOfMemoryError):
    """Another rank ran out of memory in this step: every rank halves and redoes it together."""

    def __init__(self, rank: int) -> None:
        super().__init__(f"rank {rank} ran out of GPU memory")
        self.rank = rank


def _flag_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange(flag: int) -> int:
    """All-reduce(MAX) of one rank's flag (0: fine, rank+1: ran out); the largest over the ranks."""
    t = torch.tensor([float(flag)], device=_flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def check_peers() -> None:
    """A step's check point: raises PeerOutOfMemory when a rank said it ran out (`tell_peers`).

    Every rank passes the same check points in the same order (before each gather, after the
    backward), and a rank that runs out answers the next one in its handler instead, so the
    ranks' collectives stay matched. No-op without a group."""
    if _GROUP is None:
        return
    failed = _exchange(0)
    if failed:
        raise PeerOutOfMemory(failed - 1)


def tell_peers() -> None:
    """This rank ran out of memory in the step: answer the others' next check point with it."""
    if _GROUP is not None:
        _exchange(_GROUP.rank + 1)


def average_grads(params: Iterable[nn.Parameter], world: int) -> None:
    """Average the parameters' gradients over the ranks, in one flat all-reduce (every rank has
    gradients for the same parameters: the same graph ran on each)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sync_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, after a step: every rank
    then scores and stops on the same numbers."""
    for b in module.buffers():
        dist.broadcast(b, 0)


# ---------------------------------------------------------------------------------- student
class _TapModule(nn.Module):
    """The student's feature tap as one module, so DDP sees one forward per step (timm's
    forward_intermediates / forward_head are not `model(x)`)."""

    def __init__(self, tap: FeatureTap) -> None:
        super().__init__()
        self.model = tap.model
        self._tap = [tap]  # a list: not a submodule (its model already is)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self._tap[0](x)
        return out.logits, out.features


class DDPTap:
    """Answers like a FeatureTap; the forward goes through DistributedDataParallel."""

    def __init__(self, tap: FeatureTap, device: torch.device) -> None:
        self.tap = tap
        self.model = tap.model
        ids = [device] if device.type == "cuda" else None
        # No collective in the forward (sync_buffers broadcasts the buffers after a step) and none
        # in the backward: the engine runs every step under `no_sync` and averages the gradients
        # itself once every rank has said it did not run out of memory (a rank that did must not
        # leave the others waiting in a collective).
        self.ddp = nn.parallel.DistributedDataParallel(
            _TapModule(tap), device_ids=ids, forward_sync_buffers=False
        )

    def __call__(self, x: torch.Tensor) -> Tapped:
        logits, features = self.ddp(x)
        return Tapped(logits=logits, features=list(features))


def wrap_for_stage(distiller: nn.Module, device: torch.device, reporter: Reporter) -> None:
    """The distiller's student behind DDP for a training stage when this process is one rank of
    several (`wrap_student`, a warning reported); nothing on one device. `unwrap_student` undoes
    it after the stage (a stage that raises ends the job, distiller and all)."""
    if _GROUP is not None and (note := wrap_student(distiller, device, _GROUP)):
        reporter.event("warning", note)


def wrap_student(distiller: nn.Module, device: torch.device, group: Group) -> str | None:
    """Put the distiller's student behind DDP (SyncBatchNorm first when asked and on CUDA).

    Returns a warning to report, or None. Mutates `distiller.student_tap` (its model's BatchNorm
    layers too, with SyncBatchNorm)."""
    tap = distiller.student_tap
    warning = None
    if group.sync_batchnorm and _has_batchnorm(tap.model):
        if device.type == "cuda":
            _convert_sync_bn(tap.model)
        else:
            warning = "train.sync_batchnorm needs CUDA: the CPU ranks keep plain BatchNorm over their share"
    distiller.student_tap = DDPTap(tap, device)
    return warning


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _convert_sync_bn(model: nn.Module) -> None:
    """SyncBatchNorm in place of every BatchNorm layer (timm's BatchNormAct too; the same
    parameters and buffers). The model itself is not a BatchNorm, so it is changed in place."""
    from timm.layers import convert_sync_batchnorm

    convert_sync_batchnorm(model)


def unwrap_student(distiller: nn.Module) -> None:
    """Give the distiller back its plain tap (after the stage)."""
    if isinstance(distiller.student_tap, DDPTap):
        distiller.student_tap = distiller.student_tap.tap
