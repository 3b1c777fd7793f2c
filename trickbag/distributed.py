"""Several processes, one run: process group from torchrun's environment, and the few collectives trickbag needs.

Launch with PyTorch's own launcher (``torchrun --nproc-per-node N -m trickbag train CONFIG`` or
``trickbag train CONFIG --nproc N``); it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address, and stops every worker as soon as one exits with an error (its message is printed as the root cause).
``init_from_env`` reads that environment: NCCL on CUDA (device ``cuda:LOCAL_RANK``), gloo on the CPU, with a
collective timeout so a rank that hangs instead of failing cannot block the others forever.

Everything here is a no-op, or the identity, when no process group with more than one process exists, so the
single-process path of the trainer never takes a distributed branch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 600.0  # collectives waiting longer than this fail with an error instead of hanging


@dataclass(frozen=True)
class Context:
    """Where this process sits: rank among ``world_size`` processes, its node-local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (a single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 when not launched by torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"environment WORLD_SIZE={value!r} must be an int >= 1")
    return int(value)


def init_from_env(device: str = "auto", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Context:
    """Join the process group torchrun describes; the single-process Context when WORLD_SIZE is absent or 1.

    Args:
        device: "auto" (CUDA when available, else CPU), "cpu", or "cuda" / "cuda:K" (the index is ignored:
            each process takes ``cuda:LOCAL_RANK``).
        timeout_s: collective timeout in seconds (> 0).
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r} must be > 0")
    world = env_world_size()
    if world == 1:
        return Context(device=_single_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available; use device=cpu or device=auto")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "use --nproc-per-node <= the number of GPUs"
            )
        where, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(where)
    elif kind == "cpu":
        where, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"device={device!r} not supported for several processes (use auto, cpu or cuda)")
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return Context(rank, world, local_rank, where, backend)


def process_device(name: str = "auto") -> torch.device:
    """This process's device under torchrun: ``cuda:LOCAL_RANK`` for "auto" (with CUDA) or "cuda", else CPU."""
    kind = torch.device(name).type if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(kind)


def _single_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def close() -> None:
    """Leave the process group (call once at the end of a distributed run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Where am I


def is_distributed() -> bool:
    """Whether a process group with more than one process is active (the trainer's only DDP switch)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, the only process that writes files (also True without a process group)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Collectives for exact numbers


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (a new tensor; the input itself unchanged)."""
    total = tensor.clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's (N_r, ...) tensor along dim 0, rank 0 first; ranks may hold different N_r.

    Returns:
        (sum_r N_r, ...) tensor, the same on every rank.
    """
    if not is_distributed():
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.int64)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    # all_gather needs equal shapes: pad to the longest, then cut each rank's part back to its size.
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def reduce_metric_state(metrics) -> None:
    """Replace each rank's ``ClassificationMetrics`` state by the union of every rank's, in place.

    Confusion matrices and top-k hit counts are summed; AUROC's score rows and targets are gathered, so
    ``metrics.compute()`` then equals one process that saw every sample (each sample counted once).
    """
    if not is_distributed():
        return
    state = metrics.state_tensors()
    confusion = all_reduce_sum(state["confusion"])
    topk = all_reduce_sum(state["topk_correct"])
    kind_code = torch.tensor([{None: 0, "labels": 1, "scores": 2}[metrics._kind]], device=confusion.device)
    dist.all_reduce(kind_code, op=dist.ReduceOp.MAX)  # a rank with no samples has no kind yet
    scores = targets = None
    if metrics.with_auc and int(kind_code) == 2:
        columns = metrics.num_classes
        local_scores = state.get("scores", torch.zeros(0, columns, device=confusion.device))
        local_targets = state.get("targets", torch.zeros(0, dtype=torch.int64, device=confusion.device))
        scores, targets = all_gather_rows(local_scores), all_gather_rows(local_targets)
    _load_metric_state(
        metrics, confusion, topk, scores, targets, {0: None, 1: "labels", 2: "scores"}[int(kind_code)]
    )


def _load_metric_state(metrics, confusion, topk, scores, targets, kind) -> None:
    state = {"confusion": confusion, "topk_correct": topk}
    if scores is not None and len(scores) > 0:
        state |= {"scores": scores, "targets": targets}
    metrics.load_state_tensors(state, kind=kind)


def reduce_loss_sums(numerator, denominator, seen: int):
    """(sum of numerators, sum of denominators, sum of counts) over ranks; float64 tensors and an int."""
    local = torch.tensor([float(numerator), float(denominator), float(seen)], dtype=torch.float64)
    total = all_reduce_sum(local.to(collective_device()) if is_distributed() else local)
    return total[0], total[1], int(total[2])


def all_finite(value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every rank (one verdict for all, so all skip or step together)."""
    flag = torch.isfinite(value.detach()).all().to(torch.int32).reshape(1)
    if is_distributed():
        flag = flag.to(collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def average_gradients(params) -> None:
    """All-reduce-average the ``.grad`` of ``params`` (when DDP's own reduction was skipped for a step)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` in place."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) into every rank's ``module``."""
    if not is_distributed():
        return
    with torch.no_grad():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def broadcast_object(value, src: int = 0):
    """Rank ``src``'s picklable ``value`` on every rank (e.g. the run folder rank 0 created)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_ranks_agree(value: int) -> bool:
    """Whether every rank passed the same int (checked before training: equal batch counts per rank)."""
    if not is_distributed():
        return True
    pair = torch.tensor([value, -value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(pair, op=dist.ReduceOp.MAX)
    return int(pair[0]) == value and int(-pair[1]) == value


def collective_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# Randomness per rank


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """A seed that depends only on (seed, rank, epoch): each rank's mixing and dropout stream for an epoch.

    Resuming at an epoch boundary, with the same or another number of processes, re-derives it exactly.
    """
    return (
        int(seed) * 0x9E3779B97F4A7C15 + int(rank) * 0xBF58476D1CE4E5B9 + int(epoch) * 0x94D049BB133111EB
    ) % (2**63)


# ---------------------------------------------------------------------------------------------------------------
# Synchronised BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward pass sums every rank's gradient too (each rank's loss used the sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.contiguous())


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the union of every rank's batch, on any device.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this is the same computation with a differentiable
    all-reduce of (sum, sum of squares, count), so it also runs on gloo / CPU. In eval mode, or with one
    process, it is plain BatchNorm. Input: (N, C, ...) float.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (N, C, ...) input, got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and is_distributed()):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        x = input.float()
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_tensor([x.numel() / x.shape[1]])])
        total = _AllReduceSum.apply(local)
        channels = x.shape[1]
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels : 2 * channels] / count - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (count / (count - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm of ``module`` as a synchronised one; parameters and buffers are the same objects.

    CUDA models get ``torch.nn.SyncBatchNorm`` (its fused kernels), others ``trickbag.distributed.SyncBatchNorm``.
    Call before building the optimizer and the EMA. Returns the converted module (the root may be replaced).
    """
    on_cuda = any(p.is_cuda for p in module.parameters())
    if on_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module


def wrap_ddp(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (its parameters on this rank's device); the model itself
    when there is only one process. DDP copies rank 0's weights and buffers to every rank here."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
