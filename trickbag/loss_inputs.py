"""Checks and preparation shared by the loss modules: shapes, dtypes, class vectors, indices, label smoothing.

Value checks (index range, weights >= 0) run on CPU tensors only: on an accelerator they would force a
host sync every step, and a bad index there is a device-side assert, as with ``F.cross_entropy``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")
SMOOTHING_STYLES = ("uniform", "off_target")


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
