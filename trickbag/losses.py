"""Classification losses: focal, label smoothing, soft-target cross-entropy, distillation.

Every loss is a plain function holding the math, plus a thin ``nn.Module`` that stores the arguments.
Logits of any float dtype are accepted; the math runs in float32 (float64 stays float64), so float16 and
bfloat16 logits of +-1e4, also under autocast, give finite losses. Losses come back in that compute dtype.

Mean-reduction conventions (they decide what "mean" means once class weights appear):
- index targets (N,): sum of per-sample losses / sum of the weights of the non-ignored targets, exactly
  as ``F.cross_entropy(weight=...)`` (also with label smoothing);
- soft targets (N, C): unweighted, sum / N (as ``F.cross_entropy`` with probability targets); weighted,
  sum / sum_i sum_c w_c q_ic, so that one-hot rows give the same number as index targets.

Value checks (index range, weights >= 0) run on CPU tensors only: on an accelerator they would force a
host sync every step, and a bad index there is a device-side assert, as with ``F.cross_entropy``.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REDUCTIONS = ("none", "mean", "sum")
SMOOTHING_STYLES = ("uniform", "off_target")
WEIGHT_METHODS = ("effective_number", "inverse_frequency")


# ---------------------------------------------------------------- validation


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def _check_smoothing(name: str, value: float) -> None:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}={value!r} must be in [0, 1)")


def _compute_dtype(logits: Tensor) -> torch.dtype:
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor, got dtype {logits.dtype}")
    # float32 for half types (exp/log lose too much there); float64 stays float64 for gradcheck.
    return torch.promote_types(logits.dtype, torch.float32)


def _flatten_classes(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """(N, C, d1...) logits -> (N*d1*..., C) like F.cross_entropy; returns the per-sample output shape."""
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (N, C) or (N, C, d1, ...), got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    soft = target.is_floating_point()
    expected = tuple(logits.shape) if soft else (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        kind = "class probabilities" if soft else "class indices"
        raise ValueError(
            f"target with {kind} must have shape {expected} for logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)} (dtype {target.dtype}; indices are integer, probabilities float)"
        )
    if not soft and (target.dtype == torch.bool or target.is_complex()):
        raise TypeError(f"target must be int64 class indices or float probabilities, got {target.dtype}")
    sample_shape = expected if not soft else (logits.shape[0], *logits.shape[2:])
    if logits.dim() > 2:
        logits = logits.movedim(1, -1).reshape(-1, num_classes)
        target = target.movedim(1, -1).reshape(-1, num_classes) if soft else target.reshape(-1)
    return logits, (target if soft else target.long()), sample_shape


def _on_host(tensor: Tensor) -> bool:
    # Value checks on an accelerator tensor would force a device->host sync every step; shapes are still checked.
    return tensor.device.type == "cpu"


def _class_vector(name: str, value, num_classes: int, device, dtype) -> Tensor:
    vector = torch.as_tensor(value, dtype=dtype, device=device)
    if vector.shape != (num_classes,):
        raise ValueError(
            f"{name} must have shape ({num_classes},) (one per class), got {tuple(vector.shape)}"
        )
    if _on_host(vector) and (not bool(torch.isfinite(vector).all()) or bool((vector < 0).any())):
        raise ValueError(f"{name} must be finite and >= 0, got {vector.tolist()}")
    return vector


def _check_indices(target: Tensor, num_classes: int, ignore_index: int) -> Tensor | None:
    """Mask of non-ignored targets, or None when all are valid; raises on an index outside [0, C)."""
    if not _on_host(target):
        return target != ignore_index  # as F.cross_entropy: a bad index is a device-side assert there
    if target.numel() == 0:
        return None
    low, high = torch.aminmax(target)
    low, high = int(low), int(high)
    if 0 <= low and high < num_classes and not low <= ignore_index <= high:
        return None  # common case, one reduction instead of building masks
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(
            f"target contains class index {value}, outside [0, {num_classes}) for C={num_classes}"
        )
    return valid


def _reduce(loss: Tensor, denominator: Tensor | float, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denominator  # 0/0 = nan for an empty or all-ignored batch, as F.cross_entropy


# ---------------------------------------------------------------- label smoothing


def smooth_labels(target: Tensor, num_classes: int, smoothing: float, *, style: str = "uniform") -> Tensor:
    """Turn class indices (or soft rows) into smoothed class probabilities.

    - ``"uniform"`` (PyTorch's ``label_smoothing``): q' = (1 - eps) q + eps / K, so the target class gets
      1 - eps + eps/K. 5 classes, eps=0.1, target 1 -> [0.02, 0.92, 0.02, 0.02, 0.02].
    - ``"off_target"``: eps is spread over the K-1 wrong classes, q' = (1 - eps) q + eps (1 - q) / (K - 1).
      5 classes, eps=0.1, target 1 -> [0.025, 0.9, 0.025, 0.025, 0.025]. It equals "uniform" with
      eps' = eps K / (K - 1). Needs K >= 2.

    Args:
        target: (N,) int64 class indices, or (N, C) float probabilities (already soft, e.g. from MixUp).
        num_classes: K, the number of classes (must equal C for soft rows).
        smoothing: eps in [0, 1).
        style: "uniform" or "off_target".
    Returns:
        (N, K) float probabilities (float32 for index targets, the input dtype for soft rows).
    Paper: Szegedy et al. 2016, "Rethinking the Inception Architecture", https://arxiv.org/abs/1512.00567
    """
    _check_smoothing("smoothing", smoothing)
    _check_choice("style", style, SMOOTHING_STYLES)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be an int >= 1")
    if style == "off_target" and num_classes < 2:
        raise ValueError(
            f"style='off_target' needs num_classes >= 2 (a wrong class to move mass to), got {num_classes}"
        )
    if target.is_floating_point():
        if target.dim() != 2 or target.shape[1] != num_classes:
            raise ValueError(f"soft target must have shape (N, {num_classes}), got {tuple(target.shape)}")
        probs = target
    else:
        if target.dim() != 1 or target.dtype == torch.bool:
            raise ValueError(
                f"index target must be a 1-D integer tensor (N,), got {tuple(target.shape)} {target.dtype}"
            )
        _check_indices(target, num_classes, ignore_index=-(2**62))
        probs = F.one_hot(target.long(), num_classes).float()
    return _smooth(probs, smoothing, style)


def _smooth(probs: Tensor, smoothing: float, style: str) -> Tensor:
    num_classes = probs.shape[1]
    if style == "uniform":
        return probs * (1.0 - smoothing) + smoothing / num_classes
    return probs * (1.0 - smoothing) + (1.0 - probs) * (smoothing / (num_classes - 1))


# ---------------------------------------------------------------- focal loss


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


# ---------------------------------------------------------------- class weights


def class_weights(
    class_counts: Sequence[int] | Tensor, *, method: str = "effective_number", beta: float = 0.9999
) -> Tensor:
    """Per-class weights from training-set class counts, normalised to sum to C.

    - "effective_number" (Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples",
      https://arxiv.org/abs/1901.05555): w_c proportional to (1 - beta) / (1 - beta^n_c). beta=0 gives equal
      weights; beta -> 1 approaches inverse frequency.
    - "inverse_frequency": w_c proportional to 1 / n_c.

    Use the result as ``focal_loss(alpha=...)`` or ``F.cross_entropy(weight=...)``. On long-tailed
    CIFAR-10 it is this re-weighting, not focusing alone, that lifts the rare classes: Cui et al. report
    plain focal loss about level with cross-entropy there and the class-balanced versions ahead.

    Args:
        class_counts: (C,) non-negative counts; a zero count raises (no weight is defined for it).
        method: "effective_number" or "inverse_frequency".
        beta: in [0, 1), only used by "effective_number".
    Returns:
        (C,) float32 weights summing to C.
    """
    _check_choice("method", method, WEIGHT_METHODS)
    if not 0.0 <= float(beta) < 1.0:
        raise ValueError(f"beta={beta!r} must be in [0, 1)")
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if counts.numel() == 0:
        raise ValueError("class_counts is empty; give one count per class")
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError(f"class_counts must be finite and >= 0, got {counts.tolist()}")
    zeros = (counts == 0).nonzero().flatten().tolist()
    if zeros:
        raise ValueError(
            f"class_counts has zero count for class index {zeros} (no weight is defined); drop those classes"
        )
    if method == "inverse_frequency":
        raw = 1.0 / counts
    else:
        raw = (1.0 - beta) / -torch.expm1(counts * torch.log(torch.tensor(beta, dtype=torch.float64)))
    return (raw * (counts.numel() / raw.sum())).float()


# ---------------------------------------------------------------- knowledge distillation


def _check_distillation_args(temperature: float, alpha: float) -> None:
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha!r} must be in [0, 1] (the weight of the distillation term)")


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> Tensor:
    """Knowledge distillation: alpha T^2 KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) CE(s, target).

    The KL term is averaged over the batch (sum / N, "batchmean"); T^2 keeps its gradient scale
    independent of T. Teacher logits are detached.

    Args:
        student_logits: (N, C) float.
        teacher_logits: (N, C) float, same shape.
        target: None, (N,) int64 indices or (N, C) float probabilities; None needs alpha=1.
        temperature: T > 0.
        alpha: weight of the distillation term in [0, 1].
    Returns:
        Scalar, float32 (float64 for float64 logits).
    Paper: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", https://arxiv.org/abs/1503.02531
    """
    _check_distillation_args(temperature, alpha)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must both be (N, C), got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if target is None and alpha != 1.0:
        raise ValueError(f"target=None needs alpha=1 (no hard-label term), got alpha={alpha!r}")
    dtype = _compute_dtype(student_logits)
    student_log_p = torch.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    teacher_log_p = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
    kl = (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum() / max(student_logits.shape[0], 1)
    loss = alpha * temperature**2 * kl
    if alpha < 1.0:
        if target.is_floating_point():
            hard = soft_target_cross_entropy(student_logits, target)
        else:
            _flatten_classes(student_logits, target)  # shape check with a clear message
            hard = F.cross_entropy(student_logits.to(dtype), target.long())
        loss = loss + (1.0 - alpha) * hard
    return loss


class DistillationLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`distillation_loss`."""

    def __init__(self, *, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__()
        _check_distillation_args(temperature, alpha)
        self.temperature, self.alpha = float(temperature), float(alpha)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        return distillation_loss(
            student_logits, teacher_logits, target, temperature=self.temperature, alpha=self.alpha
        )
