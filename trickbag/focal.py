"""Focal loss (Lin et al. 2017, https://arxiv.org/abs/1708.02002): cross-entropy scaled down on easy samples.

Index targets skip the (N, C) one-hot; below 16 classes a hand-written autograd Function is faster on CPU
than log_softmax (see ``_SMALL_C``), exact in logits and alpha to the second derivative.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trickbag.loss_inputs import (
    REDUCTIONS,
    _check_choice,
    _check_indices,
    _check_smoothing,
    _class_vector,
    _compute_dtype,
    _flatten_classes,
    _reduce,
    _smooth,
    smooth_labels,
)


def _focal_term(log_p: Tensor, gamma: float) -> Tensor:
    """-(1 - p)^gamma log p elementwise, through autograd."""
    if gamma == 0.0:
        return -log_p
    # expm1 keeps 1 - p exact for p near 1. The clamp keeps the gradient finite for gamma < 1 at p = 1
    # (0 * inf in d(1-p)^gamma/dp); the true gradient there is 0, which is what the clamp gives.
    one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)
    return -one_minus_p.pow(gamma) * log_p


# On CPU, log_softmax/softmax kernels are vectorised along C and are slow below ~16 classes, where
# logsumexp is fast; CE itself pays that (a 65536 x 10 CE is ~3x slower than our small-C path).
_SMALL_C = 16


def _small_class_terms(x: Tensor, target: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Unweighted per-sample loss -(1 - p_t)^gamma log p_t and its derivative dL/dlog p_t, both (M,).

    Plain differentiable ops, so a backward that recomputes them from the logits can be differentiated again.
    """
    log_p = x.gather(1, target.unsqueeze(1)).squeeze(1) - torch.logsumexp(x, dim=1)
    if gamma == 0.0:
        return -log_p, torch.full_like(log_p, -1.0)
    one_minus_p = -torch.expm1(log_p)
    modulator = one_minus_p.pow(gamma)
    # dL/dlog_p = -u^g (1 - g p log_p / u) with u = 1 - p. Where u = 0 the factor u^g is 0, so the clamp
    # only has to keep log_p / u finite.
    ratio = log_p / one_minus_p.clamp_min(torch.finfo(log_p.dtype).tiny)
    return -modulator * log_p, modulator * (gamma * torch.exp(log_p) * ratio - 1.0)


class _SmallClassFocalFunction(torch.autograd.Function):
    """Per-sample focal loss for index targets and C < 16, with a hand-derived backward.

    Saves the logits, the targets and one (M,) coefficient, about what CE saves (its (M, C) log_softmax
    plus targets), where autograd through logsumexp would also keep the (M,) log-sum-exp. When the
    per-sample weight requires grad (a learned or checked alpha), the unweighted (M,) loss is kept too:
    dL_i/dw_i = unweighted loss_i.

    Double backward: grad mode is on inside ``backward`` exactly when the caller asked for
    ``create_graph=True``. Then the coefficient and loss are recomputed from the saved logits with plain
    ops, so the backward's own graph is exact; otherwise the saved (M,) terms are used (the fast path).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Tensor | None, gamma: float) -> Tensor:
        x = logits.to(_compute_dtype(logits))
        loss, coefficient = _small_class_terms(x, target, gamma)
        keep_loss = weight is not None and ctx.needs_input_grad[2]
        ctx.gamma = gamma
        ctx.save_for_backward(logits, target, weight, coefficient, loss if keep_loss else None)
        return loss if weight is None else loss * weight

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, target, weight, coefficient, loss = ctx.saved_tensors
        x = logits.to(coefficient.dtype)
        if torch.is_grad_enabled():
            loss, coefficient = _small_class_terms(x, target, ctx.gamma)
        weighted = coefficient if weight is None else coefficient * weight
        scale = (grad_loss * weighted).unsqueeze(1)
        # dlog_p_t/dx_j = onehot_j - softmax_j; softmax is recomputed rather than stored.
        softmax = torch.exp(x - torch.logsumexp(x, dim=1, keepdim=True))
        if torch.is_grad_enabled():
            grad = (-scale * softmax).scatter_add(1, target.unsqueeze(1), scale)
        else:  # in place: nothing differentiates through this buffer
            grad = softmax.mul_(-scale).scatter_add_(1, target.unsqueeze(1), scale)
        grad_weight = grad_loss * loss if ctx.needs_input_grad[2] else None
        return grad.to(logits.dtype), None, grad_weight, None


def _focal_index(logits: Tensor, target: Tensor, weight: Tensor | None, gamma: float) -> Tensor:
    """Per-sample -w_t (1 - p_t)^gamma log p_t, (M,), without an (M, C) one-hot."""
    if logits.shape[1] < _SMALL_C:
        return _SmallClassFocalFunction.apply(logits, target, weight, gamma)
    # CE's own graph (log_softmax, gather) plus a few (M,) ops, so time and memory stay at CE's.
    log_p = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=1)
    loss = _focal_term(log_p.gather(1, target.unsqueeze(1)).squeeze(1), gamma)
    return loss if weight is None else loss * weight


def _focal_soft(logits: Tensor, probs: Tensor, weight: Tensor | None, gamma: float) -> Tensor:
    """Per-sample -sum_c w_c q_c (1 - p_c)^gamma log p_c, (M,)."""
    log_p = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=1)
    q = probs.to(log_p.dtype)
    return (_focal_term(log_p, gamma) * (q if weight is None else q * weight)).sum(1)


def _check_focal_args(gamma, alpha, label_smoothing, reduction) -> None:
    if not float(gamma) >= 0.0:
        raise ValueError(f"gamma={gamma!r} must be >= 0 (0 gives cross-entropy)")
    _check_smoothing("label_smoothing", label_smoothing)
    _check_choice("reduction", reduction, REDUCTIONS)
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and not alpha >= 0:
        raise ValueError(f"alpha={alpha!r} must be >= 0")


def focal_loss(
    logits: Tensor,
    target: Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Multi-class focal loss from logits: cross-entropy scaled down on well-classified samples.

    Index targets: loss_i = -a_t (1 - p_t)^gamma log p_t. Soft targets q (N, C):
    loss_i = -sum_c a_c q_ic (1 - p_ic)^gamma log p_ic. ``gamma=0`` is cross-entropy.

    ``alpha`` is a class weight applied OUTSIDE the exponent (fastai puts it inside exp(), which is no
    longer a class weight). A scalar multiplies every loss. A (C,) vector weights classes and "mean"
    divides by the summed weights of the non-ignored targets, so ``gamma=0, alpha=w`` equals
    ``F.cross_entropy(weight=w)``, also with ``label_smoothing`` (see the module docstring for soft rows).

    Args:
        logits: (N, C) or (N, C, d1, ...) float, any float dtype; computed in float32.
        target: (N,) / (N, d1, ...) int64 class indices, or float probabilities of logits' shape.
        gamma: focusing parameter >= 0.
        alpha: None, a scalar >= 0, or (C,) per-class weights >= 0 (e.g. from ``class_weights``).
        label_smoothing: eps in [0, 1), PyTorch's uniform convention (see ``smooth_labels``).
        ignore_index: index target value that contributes neither loss nor weight.
        reduction: "none" (per-sample, (N,) / (N, d1, ...)), "mean" or "sum".
    Returns:
        Scalar, or per-sample losses for reduction="none", in float32 (float64 for float64 logits).
    Paper: Lin et al. 2017, "Focal Loss for Dense Object Detection", https://arxiv.org/abs/1708.02002
    """
    if isinstance(alpha, Tensor) and alpha.dim() == 0:
        alpha = float(alpha)
    _check_focal_args(gamma, alpha, label_smoothing, reduction)
    gamma = float(gamma)
    flat_logits, flat_target, sample_shape = _flatten_classes(logits, target)
    num_classes = flat_logits.shape[1]
    dtype = _compute_dtype(flat_logits)
    scale, class_weight = 1.0, None
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        scale = float(alpha)
    elif alpha is not None:
        class_weight = _class_vector("alpha", alpha, num_classes, flat_logits.device, dtype)

    if flat_target.is_floating_point():
        probs = smooth_labels(flat_target, num_classes, label_smoothing) if label_smoothing else flat_target
        loss = _focal_soft(flat_logits, probs, class_weight, gamma)
        denominator = loss.shape[0] if class_weight is None else (probs.to(dtype) * class_weight).sum()
    else:
        valid = _check_indices(flat_target, num_classes, ignore_index)
        safe_target = flat_target if valid is None else flat_target.masked_fill(~valid, 0)
        sample_weight = None if class_weight is None else class_weight[safe_target]
        if valid is not None:
            sample_weight = valid.to(dtype) if sample_weight is None else sample_weight * valid
        if label_smoothing:
            # Smoothing needs the whole row anyway, so this path builds (M, C) probabilities.
            probs = _smooth(F.one_hot(safe_target, num_classes).to(dtype), label_smoothing, "uniform")
            probs = probs if valid is None else probs * valid.unsqueeze(1)
            loss = _focal_soft(flat_logits, probs, class_weight, gamma)
        else:
            loss = _focal_index(flat_logits, safe_target, sample_weight, gamma)
        denominator = loss.shape[0] if sample_weight is None else sample_weight.sum()
    if scale != 1.0:
        loss = loss * scale
    if reduction == "none":
        return loss.reshape(sample_shape)
    return _reduce(loss, denominator, reduction)


class FocalLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`focal_loss`; a tensor ``alpha`` is a buffer, so ``.to()`` moves it."""

    def __init__(
        self,
        *,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | Tensor | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
    ):
        super().__init__()
        _check_focal_args(gamma, alpha, label_smoothing, reduction)
        self.gamma, self.label_smoothing = float(gamma), float(label_smoothing)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.scalar_alpha = alpha if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None
        vector = None if alpha is None or self.scalar_alpha is not None else torch.as_tensor(alpha).float()
        self.register_buffer("alpha", vector)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        alpha = self.scalar_alpha if self.scalar_alpha is not None else self.alpha
        return focal_loss(
            logits,
            target,
            gamma=self.gamma,
            alpha=alpha,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )
