"""Argument checks shared by the metric modules, kept apart from the math (torchmetrics' layout).

Every check raises ValueError/TypeError naming the argument, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class UndefinedMetricWarning(UserWarning):
    """A metric is 0/0 for some class and was replaced by ``zero_division`` (sklearn's warning of that name)."""


# ----------------------------------------------------------------------------------------------------------
# validation (kept apart from the math)


def _as_labels(preds: torch.Tensor, name: str = "preds") -> torch.Tensor:
    """(N,) int labels, or (N, C) scores reduced by argmax (the first maximum wins, as numpy's argmax)."""
    if not isinstance(preds, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(preds).__name__}")
    if preds.ndim == 2:
        if not preds.is_floating_point():
            raise TypeError(f"{name} of shape {tuple(preds.shape)} must be float scores, got {preds.dtype}")
        if preds.shape[1] == 0:
            raise ValueError(f"{name} has shape {tuple(preds.shape)}: need at least one class column")
        return preds.argmax(dim=1) if preds.shape[0] else preds.new_zeros(0, dtype=torch.long)
    if preds.ndim != 1:
        raise ValueError(f"{name} must be (N,) labels or (N, C) scores, got shape {tuple(preds.shape)}")
    if preds.is_floating_point() or preds.is_complex():
        raise TypeError(f"{name} of shape (N,) must hold integer labels, got {preds.dtype}")
    return preds.long()


def _check_target(target: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.ndim != 1 or target.is_floating_point() or target.is_complex():
        raise ValueError(
            f"target must be (N,) integer labels, got shape {tuple(target.shape)} {target.dtype}"
        )
    if target.shape[0] != n:
        raise ValueError(f"preds has {n} samples but target has {target.shape[0]}")
    return target.long()


def _check_range(labels: torch.Tensor, num_classes: int, name: str) -> None:
    if not labels.numel():
        return
    low, high = (int(v) for v in torch.aminmax(labels))  # one pass, one device sync
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{name} holds labels in [{low}, {high}], allowed are 0..{num_classes - 1} (num_classes={num_classes})"
        )


def _check_choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} not in {tuple(allowed)}")


def _check_zero_division(zero_division) -> float:
    if zero_division == "warn":
        return 0.0
    if isinstance(zero_division, (int, float)) and not isinstance(zero_division, bool):
        if zero_division in (0, 1) or math.isnan(zero_division):
            return float(zero_division)
    raise ValueError(f"zero_division={zero_division!r} not allowed: use 0, 1, float('nan') or 'warn'")


def _prepare(
    preds, target, num_classes, labels
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """Labels, target, the confusion-matrix size and the explicit label list (None = sklearn default)."""
    pred_labels = _as_labels(preds)
    target = _check_target(target, pred_labels.shape[0])
    if num_classes is None:
        if preds.ndim == 2:
            num_classes = preds.shape[1]
        else:
            num_classes = 1 + max(
                int(target.max()) if target.numel() else -1, int(pred_labels.max()) if target.numel() else -1
            )
            num_classes = max(num_classes, 1 + max(labels) if labels is not None and len(labels) else 0)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive int")
    _check_range(target, num_classes, "target")
    _check_range(pred_labels, num_classes, "preds")
    label_tensor = None
    if labels is not None:
        label_tensor = torch.as_tensor(list(labels), dtype=torch.long)
        if label_tensor.numel() == 0:
            raise ValueError("labels=[] is empty: pass at least one class index, or labels=None")
        _check_range(label_tensor, num_classes, "labels")
    return pred_labels, target, num_classes, label_tensor


def _nanaverage(values: torch.Tensor, weights: torch.Tensor | None) -> float:
    """sklearn's ``_nanaverage``: drop nan entries; all-zero weights fall back to the plain mean."""
    keep = ~torch.isnan(values)
    if values.numel() == 0 or not bool(keep.any()):
        return float("nan")
    values = values[keep]
    if weights is not None:
        weights = weights[keep]
        if float(weights.sum()) != 0.0:
            return float((values * weights).sum() / weights.sum())
    return float(values.mean())
