"""Exact evaluation over several devices: sum or concatenate sufficient statistics, then compute once.

Averaging per-device accuracies or F1 scores is wrong when devices see different numbers of samples (and F1,
AUROC are not averages at all). Each device keeps ``ClassificationMetrics.state_tensors()``; the confusion
matrix and top-k hit counts are summed across devices, the score rows are concatenated, and the loss is
carried as (weighted sum, weight sum). ``all_gather`` is Lightning's ``LightningModule.all_gather``: on one
device it returns its input unchanged, on W devices a tensor with a leading (W, ...) axis.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trickbag.metrics import ClassificationMetrics

AllGather = Callable[[torch.Tensor], torch.Tensor]


def loss_sums(criterion, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss sum, weight sum) of one batch, so a dataset mean is sum / sum over all batches.

    Uses ``criterion.sums`` when it has one (trickbag.losses.ClassifierLoss); otherwise the mean is scaled back
    by the weight the mean divided by (the sum of the targets' class weights, else N), which is exact for
    index targets (trickbag's and ``F.cross_entropy``'s weighted-mean convention).
    """
    if hasattr(criterion, "sums"):
        total, weight = criterion.sums(logits, target)
        return total.double(), torch.as_tensor(weight, dtype=torch.float64, device=logits.device)
    mean = criterion(logits, target).double()
    class_weight = getattr(criterion, "weight", None)
    if class_weight is not None and not target.is_floating_point():
        weight = class_weight.to(logits.device, torch.float64)[target].sum()
    else:
        weight = torch.tensor(float(len(target)), dtype=torch.float64, device=logits.device)
    return mean * weight, weight


def gather_sum(tensor: torch.Tensor, all_gather: AllGather, world_size: int) -> torch.Tensor:
    """Sum of ``tensor`` over all devices (same shape on each)."""
    if world_size == 1:
        return tensor
    return all_gather(tensor).sum(0)


def gather_cat(tensor: torch.Tensor, all_gather: AllGather, world_size: int) -> torch.Tensor:
    """Concatenation along dim 0 of each device's ``tensor``, whose first dimension may differ by device.

    all_gather needs equal shapes, so each device pads to the longest and the padding is cut off again.
    """
    if world_size == 1:
        return tensor
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = all_gather(length).reshape(world_size).tolist()
    longest = max(lengths)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather(padded)
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(lengths)])


def merge_metric_state(
    metrics: ClassificationMetrics, state: dict[str, torch.Tensor]
) -> ClassificationMetrics:
    """A fresh ClassificationMetrics like ``metrics`` holding the (already merged) sufficient statistics."""
    merged = ClassificationMetrics(
        metrics.num_classes,
        class_names=metrics.class_names,
        top_k=(1, *metrics.top_k),
        with_auc=metrics.with_auc,
        from_logits=False,  # the kept scores were softmaxed on update already if from_logits was set
        zero_division=metrics.zero_division,
    )
    merged.load_state_tensors(
        state, kind="scores" if "scores" in state or metrics._kind == "scores" else "labels"
    )
    return merged


def synced_metrics(
    metrics: ClassificationMetrics, loss_totals: torch.Tensor, all_gather: AllGather, world_size: int
) -> tuple[torch.Tensor, ClassificationMetrics | None]:
    """Merge one evaluation's state over all devices.

    Args:
        metrics: this device's metrics.
        loss_totals: (2,) float64, this device's (weighted loss sum, weight sum).
    Returns:
        ((2,) summed loss totals, merged metrics), or merged None when no device saw a sample.
    """
    device = loss_totals.device
    state = {key: value.to(device) for key, value in metrics.state_tensors().items()}
    totals = gather_sum(loss_totals, all_gather, world_size)
    confusion = gather_sum(state["confusion"], all_gather, world_size)
    if int(confusion.sum()) == 0:
        return totals, None
    merged = {
        "confusion": confusion,
        "topk_correct": gather_sum(state["topk_correct"], all_gather, world_size),
    }
    if metrics.with_auc:
        num_classes = metrics.num_classes
        # A device without samples has no score rows yet; it contributes an empty (0, C) block.
        scores = state.get("scores", torch.zeros(0, num_classes, device=device))
        targets = state.get("targets", torch.zeros(0, dtype=torch.long, device=device))
        merged["scores"] = gather_cat(scores, all_gather, world_size)
        merged["targets"] = gather_cat(targets, all_gather, world_size)
    return totals, merge_metric_state(metrics, merged)
