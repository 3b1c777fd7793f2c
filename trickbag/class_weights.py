"""Per-class weights from class counts (effective number of samples, or inverse frequency)."""

from collections.abc import Sequence

import torch
from torch import Tensor

from trickbag.loss_inputs import _check_choice

WEIGHT_METHODS = ("effective_number", "inverse_frequency")


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
