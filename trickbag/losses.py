"""Classification losses: cross-entropy variants and ``ClassifierLoss``, the training loss with exact sums.

Every loss is a plain function holding the math, plus a thin ``nn.Module`` that stores the arguments.
Logits of any float dtype are accepted; the math runs in float32 (float64 stays float64), so float16 and
bfloat16 logits of +-1e4, also under autocast, give finite losses. Losses come back in that compute dtype.

Mean-reduction conventions (they decide what "mean" means once class weights appear):
- index targets (N,): sum of per-sample losses / sum of the weights of the non-ignored targets, exactly
  as ``F.cross_entropy(weight=...)`` (also with label smoothing);
- soft targets (N, C): unweighted, sum / N (as ``F.cross_entropy`` with probability targets); weighted,
  sum / sum_i sum_c w_c q_ic, so that one-hot rows give the same number as index targets.

The other losses live in their own modules and are importable from here too: focal loss
(``trickbag.focal``), label smoothing and input checks (``trickbag.loss_inputs``), class weights
(``trickbag.class_weights``) and distillation (``trickbag.distillation``).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trickbag.class_weights import WEIGHT_METHODS, class_weights
from trickbag.distillation import DistillationLoss, distillation_loss
from trickbag.focal import FocalLoss, _focal_soft, focal_loss
from trickbag.loss_inputs import (
    REDUCTIONS,
    SMOOTHING_STYLES,
    _check_choice,
    _check_smoothing,
    _class_vector,
    _compute_dtype,
    _flatten_classes,
    _reduce,
    smooth_labels,
)

__all__ = [
    "LOSS_KINDS",
    "REDUCTIONS",
    "SMOOTHING_STYLES",
    "WEIGHT_METHODS",
    "ClassifierLoss",
    "DistillationLoss",
    "FocalLoss",
    "LabelSmoothingCrossEntropy",
    "SoftTargetCrossEntropy",
    "class_weights",
    "distillation_loss",
    "focal_loss",
    "label_smoothing_cross_entropy",
    "smooth_labels",
    "soft_target_cross_entropy",
]


# ---------------------------------------------------------------- cross-entropy variants


def soft_target_cross_entropy(
    logits: Tensor,
    target_probs: Tensor,
    *,
    weight: Tensor | Sequence[float] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy against class probabilities (MixUp/CutMix/smoothed targets).

    loss_i = -sum_c w_c q_ic log p_ic (w = 1 without ``weight``). "mean" is sum / N without weight
    (equal to ``F.cross_entropy`` with probability targets) and sum / sum_i sum_c w_c q_ic with weight,
    so one-hot rows give exactly ``F.cross_entropy(weight=w)`` on the indices (which divides by the
    summed target weights), not PyTorch's probability-target convention of dividing by N.

    Args:
        logits: (N, C) or (N, C, d1, ...) float, any float dtype.
        target_probs: float probabilities, the shape of logits.
        weight: optional (C,) class weights >= 0.
        reduction: "none" ((N,) / (N, d1, ...)), "mean" or "sum".
    Returns:
        Scalar or per-sample losses, float32 (float64 for float64 logits).
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    if not target_probs.is_floating_point():
        raise TypeError(f"target_probs must be float class probabilities, got dtype {target_probs.dtype}")
    flat_logits, probs, sample_shape = _flatten_classes(logits, target_probs)
    dtype = _compute_dtype(flat_logits)
    class_weight = None
    if weight is not None:
        class_weight = _class_vector("weight", weight, flat_logits.shape[1], flat_logits.device, dtype)
    loss = _focal_soft(flat_logits, probs, class_weight, gamma=0.0)
    if reduction == "none":
        return loss.reshape(sample_shape)
    denominator = loss.shape[0] if class_weight is None else (probs.to(dtype) * class_weight).sum()
    return _reduce(loss, denominator, reduction)


class SoftTargetCrossEntropy(nn.Module):
    """``nn.Module`` wrapper of :func:`soft_target_cross_entropy`."""

    def __init__(self, *, weight: Tensor | Sequence[float] | None = None, reduction: str = "mean"):
        super().__init__()
        _check_choice("reduction", reduction, REDUCTIONS)
        self.reduction = reduction
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight).float())

    def forward(self, logits: Tensor, target_probs: Tensor) -> Tensor:
        return soft_target_cross_entropy(logits, target_probs, weight=self.weight, reduction=self.reduction)


def label_smoothing_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    smoothing: float = 0.1,
    style: str = "uniform",
    weight: Tensor | Sequence[float] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy with label smoothing (see :func:`smooth_labels` for the two styles).

    Index targets go through ``F.cross_entropy(label_smoothing=...)``: "uniform" equals it exactly, also
    with ``weight``; "off_target" with eps is "uniform" with eps' = eps K / (K - 1), which must stay <= 1
    (eps <= (K-1)/K; beyond that wrong classes would outweigh the target). Soft targets (N, C) are
    smoothed and passed to :func:`soft_target_cross_entropy` (its weighted-mean convention).

    Args:
        logits: (N, C) or (N, C, d1, ...) float.
        target: (N,) / (N, d1, ...) int64 indices, or float probabilities of logits' shape.
        smoothing: eps in [0, 1).
        style: "uniform" or "off_target".
        weight: optional (C,) class weights >= 0.
        reduction: "none", "mean" or "sum".
    Returns:
        Scalar or per-sample losses.
    """
    _check_smoothing("smoothing", smoothing)
    _check_choice("style", style, SMOOTHING_STYLES)
    _check_choice("reduction", reduction, REDUCTIONS)
    flat_logits, flat_target, _ = _flatten_classes(logits, target)
    num_classes = flat_logits.shape[1]
    if flat_target.is_floating_point():
        probs = smooth_labels(flat_target, num_classes, smoothing, style=style)
        loss = soft_target_cross_entropy(flat_logits, probs, weight=weight, reduction=reduction)
        return loss.reshape(logits.shape[0], *logits.shape[2:]) if reduction == "none" else loss
    equivalent = float(smoothing)
    if style == "off_target":
        if num_classes < 2:
            raise ValueError(f"style='off_target' needs at least 2 classes, logits have C={num_classes}")
        equivalent = smoothing * num_classes / (num_classes - 1)
        if equivalent > 1.0:
            raise ValueError(
                f"smoothing={smoothing!r} with style='off_target' and C={num_classes} gives each wrong class "
                f"more mass than the target; use smoothing <= {(num_classes - 1) / num_classes:.4g}"
            )
    class_weight = None
    if weight is not None:
        class_weight = _class_vector("weight", weight, num_classes, logits.device, _compute_dtype(logits))
    x = logits.to(_compute_dtype(logits))
    return F.cross_entropy(
        x, target.long(), weight=class_weight, label_smoothing=equivalent, reduction=reduction
    )


class LabelSmoothingCrossEntropy(nn.Module):
    """``nn.Module`` wrapper of :func:`label_smoothing_cross_entropy`."""

    def __init__(
        self,
        *,
        smoothing: float = 0.1,
        style: str = "uniform",
        weight: Tensor | Sequence[float] | None = None,
        reduction: str = "mean",
    ):
        super().__init__()
        _check_smoothing("smoothing", smoothing)
        _check_choice("style", style, SMOOTHING_STYLES)
        _check_choice("reduction", reduction, REDUCTIONS)
        self.smoothing, self.style, self.reduction = float(smoothing), style, reduction
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight).float())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return label_smoothing_cross_entropy(
            logits,
            target,
            smoothing=self.smoothing,
            style=self.style,
            weight=self.weight,
            reduction=self.reduction,
        )


# ---------------------------------------------------------------- the training loss


LOSS_KINDS = ("ce", "focal")
_IGNORE_INDEX = -100  # the default of focal_loss and F.cross_entropy, which both paths below use


class ClassifierLoss(nn.Module):
    """The classifier's training loss from plain arguments, as a mean and as an exact (numerator, denominator).

    Paths (those of ``trickbag.train.make_loss``, which this replaces):
    - index targets with ``label_smoothing`` under "focal" or ``smoothing_style="off_target"`` are smoothed
      into (N, C) rows by :func:`smooth_labels` first;
    - "focal": :func:`focal_loss` with ``alpha=weight``;
    - "ce" with float targets: :func:`soft_target_cross_entropy`;
    - "ce" with index targets otherwise: ``F.cross_entropy(weight=, label_smoothing=)``.
    Float targets (MixUp/CutMix rows) are used as given: the mixer has already smoothed them.

    ``forward`` is the mean sum_i w_i l_i / sum_i w_i; ``sums`` returns its two parts, so a mean over any
    union of batches (accumulated micro-batches, a whole evaluation set) is sum(numerators) /
    sum(denominators), whatever the batching. The per-sample weight w_i (l_i already includes it) is 1
    without ``weight``; with it, w[y_i] for index targets on the ``F.cross_entropy`` path (its own
    weighted-mean denominator, also with label smoothing) and sum_c w_c q_ic for (smoothed or given) rows.
    Index targets equal to -100 are ignored: no loss, no weight.

    Args:
        kind: "ce" or "focal".
        num_classes: C, the width of the logits.
        label_smoothing: eps in [0, 1) for index targets.
        smoothing_style: "uniform" (PyTorch's) or "off_target" (see :func:`smooth_labels`).
        focal_gamma: focusing parameter >= 0 for "focal".
        weight: optional (C,) class weights >= 0; a buffer, moved to the logits' device when called.
    """

    def __init__(
        self,
        kind: str = "ce",
        *,
        num_classes: int,
        label_smoothing: float = 0.0,
        smoothing_style: str = "uniform",
        focal_gamma: float = 2.0,
        weight: Tensor | Sequence[float] | None = None,
    ):
        super().__init__()
        _check_choice("kind", kind, LOSS_KINDS)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} must be an int >= 1")
        _check_smoothing("label_smoothing", label_smoothing)
        _check_choice("smoothing_style", smoothing_style, SMOOTHING_STYLES)
        if label_smoothing and smoothing_style == "off_target" and num_classes < 2:
            raise ValueError("smoothing_style='off_target' needs num_classes >= 2, got 1")
        if not float(focal_gamma) >= 0.0:
            raise ValueError(f"focal_gamma={focal_gamma!r} must be >= 0 (0 gives cross-entropy)")
        self.kind, self.num_classes = kind, num_classes
        self.label_smoothing, self.smoothing_style = float(label_smoothing), smoothing_style
        self.focal_gamma = float(focal_gamma)
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32).detach().clone()
            weight = _class_vector("weight", weight, num_classes, weight.device, torch.float32)
        self.register_buffer("weight", weight)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, num_classes={self.num_classes}, label_smoothing={self.label_smoothing}, "
            f"smoothing_style={self.smoothing_style!r}, focal_gamma={self.focal_gamma}"
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean loss. logits: (N, C) float; target: (N,) int64 or (N, C) float. Returns a 0-d tensor."""
        target, weight = self._prepare(logits, target)
        return self._reduced(logits, target, weight, "mean")

    def sums(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(sum_i w_i l_i, sum_i w_i), two 0-d tensors in the loss's dtype (float32; float64 for float64
        logits). The numerator carries the gradient; an empty batch gives (0, 0)."""
        if (
            self.kind == "ce"
            and self.weight is None
            and not target.is_floating_point()
            and (self.smoothing_style == "uniform" or not self.label_smoothing)
            and logits.dim() == 2
            and logits.shape[1] == self.num_classes
            and logits.dtype in (torch.float32, torch.float64)
        ):
            # The trainer's every step: F.cross_entropy's own sum and the count of non-ignored targets, with
            # none of the general path's checks and casts (3x fewer ops; same values).
            numerator = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing, reduction="sum")
            return numerator, target.ne(_IGNORE_INDEX).sum(dtype=logits.dtype)
        target, weight = self._prepare(logits, target)
        numerator = self._reduced(logits, target, weight, "sum")
        return numerator, _sample_weight_sum(target, weight, numerator.dtype)

    def _prepare(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor | None]:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have shape (N, {self.num_classes}) for num_classes={self.num_classes}, "
                f"got {tuple(logits.shape)}"
            )
        weight = None if self.weight is None else self.weight.to(logits.device)
        smooth_here = self.kind == "focal" or self.smoothing_style != "uniform"
        if not target.is_floating_point() and self.label_smoothing and smooth_here:
            target = smooth_labels(target, self.num_classes, self.label_smoothing, style=self.smoothing_style)
        return target, weight

    def _reduced(self, logits: Tensor, target: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
        if self.kind == "focal":
            return focal_loss(logits, target, gamma=self.focal_gamma, alpha=weight, reduction=reduction)
        if target.is_floating_point():
            return soft_target_cross_entropy(logits, target, weight=weight, reduction=reduction)
        return label_smoothing_cross_entropy(
            logits, target, smoothing=self.label_smoothing, weight=weight, reduction=reduction
        )


def _sample_weight_sum(target: Tensor, weight: Tensor | None, dtype: torch.dtype) -> Tensor:
    """sum_i w_i for (N,) index targets or (N, C) rows: (N,) work, or the (N, C) @ (C,) the mean does too."""
    if target.is_floating_point():
        if weight is None:
            return torch.tensor(float(target.shape[0]), dtype=dtype, device=target.device)
        return (target.to(dtype) @ weight.to(dtype)).sum()
    valid = target != _IGNORE_INDEX
    if weight is None:
        return valid.sum().to(dtype)
    return torch.where(valid, weight.to(dtype)[target.clamp_min(0)], 0.0).sum()
