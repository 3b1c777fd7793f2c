"""Knowledge distillation (Hinton et al. 2015): KL to the teacher's softened outputs plus hard-label CE."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trickbag.loss_inputs import _compute_dtype, _flatten_classes


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
        _flatten_classes(student_logits, target)  # shape check with a clear message
        # Probability rows: F.cross_entropy's own convention, sum / N (soft_target_cross_entropy unweighted).
        hard_target = target.to(dtype) if target.is_floating_point() else target.long()
        hard = F.cross_entropy(student_logits.to(dtype), hard_target)
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
