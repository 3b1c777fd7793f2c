"""Long-tailed labels: logit adjustment, balanced softmax, LDAM, deferred re-weighting, class-balanced sampling.

Each trick is a plain function holding the math plus a small class for the trainer:

* :func:`logit_adjusted_loss` (Menon et al. 2021, https://arxiv.org/abs/2007.07314): cross-entropy on
  ``z + tau * log(prior)``; :func:`balanced_softmax_loss` (Ren et al. 2020) is its ``tau = 1`` case.
  :func:`posthoc_adjust_logits` is the same correction after training: ``z - tau * log(prior)``.
* :func:`ldam_loss` (Cao et al. 2019, https://arxiv.org/abs/1906.07413): the target logit lowered by a
  class margin ``m_j`` proportional to ``n_j^(-1/4)`` (:func:`ldam_margins`), times a scale ``s``.
* :class:`DeferredReweighting` (DRW, same paper): class weights switched on from a chosen epoch.
* :class:`ClassBalancedSampler`: each epoch's index order drawn from (seed, epoch) only, so a resumed run
  draws exactly the epochs it would have drawn.

:class:`LongTailLoss` offers ``forward`` (mean) and ``sums`` = (sum_i w_i l_i, sum_i w_i) like
``trickbag.losses.ClassifierLoss``, which it uses on the adjusted logits: label smoothing, soft (mixed)
targets, class weights, ignored targets and exact accumulation behave as they do there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from trickbag.data import epoch_generator
from trickbag.loss_inputs import _check_choice
from trickbag.losses import ClassifierLoss, label_smoothing_cross_entropy, soft_target_cross_entropy

LONGTAIL_KINDS = ("ldam", "logit_adjusted", "balanced_softmax")
SAMPLING_MODES = ("inverse", "sqrt", "repeat_factor")


def _counts(class_counts: Sequence[int] | Tensor) -> Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if counts.numel() == 0 or not bool(torch.isfinite(counts).all()) or bool((counts <= 0).any()):
        raise ValueError(
            f"class_counts={counts.tolist()} must be one finite count > 0 per class (drop empty classes)"
        )
    return counts


def log_prior(class_counts: Sequence[int] | Tensor) -> Tensor:
    """log(n_c / sum n): (C,) float32 log of the training label prior."""
    counts = _counts(class_counts)
    return (counts / counts.sum()).log().float()


# ---------------------------------------------------------------- logit adjustment


def _add_log_prior(logits: Tensor, class_counts, factor: float) -> Tensor:
    prior = log_prior(class_counts).to(logits.device, torch.promote_types(logits.dtype, torch.float32))
    return logits.to(prior.dtype) + factor * prior


def logit_adjusted_logits(logits: Tensor, class_counts: Sequence[int] | Tensor, tau: float = 1.0) -> Tensor:
    """``logits + tau * log(prior)``: what the logit-adjusted loss feeds to cross-entropy. (N, C) -> (N, C)."""
    if not float(tau) >= 0.0:
        raise ValueError(f"tau={tau!r} must be >= 0 (0: plain cross-entropy)")
    return _add_log_prior(logits, class_counts, float(tau))


def posthoc_adjust_logits(logits: Tensor, class_counts: Sequence[int] | Tensor, tau: float = 1.0) -> Tensor:
    """Post-hoc logit adjustment (Menon et al. 2021, eq. 6): ``logits - tau * log(prior)``, (N, C) -> (N, C).

    Applied to a model trained with plain cross-entropy it moves predictions towards the rare classes
    (argmax of the balanced posterior for tau = 1); the training logits are unchanged.
    """
    if not float(tau) >= 0.0:
        raise ValueError(f"tau={tau!r} must be >= 0 (0: no adjustment)")
    return _add_log_prior(logits, class_counts, -float(tau))


def _cross_entropy(logits: Tensor, target: Tensor, weight, reduction: str) -> Tensor:
    if target.is_floating_point():
        return soft_target_cross_entropy(logits, target, weight=weight, reduction=reduction)
    return label_smoothing_cross_entropy(logits, target, smoothing=0.0, weight=weight, reduction=reduction)


def logit_adjusted_loss(
    logits: Tensor,
    target: Tensor,
    class_counts: Sequence[int] | Tensor,
    *,
    tau: float = 1.0,
    weight: Tensor | Sequence[float] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Logit-adjusted cross-entropy (Menon et al. 2021): CE(z + tau log pi, y).

    Args:
        logits: (N, C) float.
        target: (N,) int64 indices or (N, C) float probabilities.
        class_counts: (C,) training counts n_c > 0 (the prior pi = n / sum n).
        tau: temperature >= 0; 1 is Fisher-consistent for the balanced error.
        weight: optional (C,) class weights (see ``trickbag.losses`` for the mean convention).
        reduction: "none", "mean" or "sum".
    Returns:
        Scalar or (N,) losses.
    """
    return _cross_entropy(logit_adjusted_logits(logits, class_counts, tau), target, weight, reduction)


def balanced_softmax_loss(
    logits: Tensor,
    target: Tensor,
    class_counts: Sequence[int] | Tensor,
    *,
    weight: Tensor | Sequence[float] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Balanced softmax (Ren et al. 2020, https://arxiv.org/abs/2007.10740): softmax of n_j exp(z_j), i.e.
    CE(z + log n, y), which is :func:`logit_adjusted_loss` with tau = 1 (log n and log pi differ by a constant
    that softmax ignores). Arguments as there."""
    return logit_adjusted_loss(logits, target, class_counts, tau=1.0, weight=weight, reduction=reduction)


# ---------------------------------------------------------------- LDAM


def ldam_margins(class_counts: Sequence[int] | Tensor, max_margin: float = 0.5) -> Tensor:
    """LDAM margins m_j = max_margin * (n_min / n_j)^(1/4): (C,) float32, the rarest class gets max_margin."""
    if not float(max_margin) > 0.0:
        raise ValueError(f"max_margin={max_margin!r} must be > 0")
    raw = _counts(class_counts).pow(-0.25)
    return (raw * (float(max_margin) / raw.max())).float()


def ldam_logits(logits: Tensor, target: Tensor, margins: Tensor, scale: float = 30.0) -> Tensor:
    """``scale * (z - m_y e_y)``: the target logit lowered by its class margin, all logits scaled.

    Soft targets q (N, C) (mixing, smoothing) lower every logit by ``q_j m_j``, which is LDAM's shift for a
    one-hot row. Index targets of -100 (ignored) are left unshifted. (N, C) -> (N, C) float32.
    """
    if not float(scale) > 0.0:
        raise ValueError(f"scale={scale!r} must be > 0")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    margins = torch.as_tensor(margins, dtype=dtype, device=logits.device)
    if margins.shape != (logits.shape[-1],):
        raise ValueError(f"margins must have shape ({logits.shape[-1]},), got {tuple(margins.shape)}")
    if target.is_floating_point():
        shift = target.to(dtype) * margins
    else:
        valid = (target != -100).to(dtype)
        shift = torch.zeros_like(logits, dtype=dtype)
        shift.scatter_(1, target.clamp_min(0)[:, None], (margins[target.clamp_min(0)] * valid)[:, None])
    return float(scale) * (logits.to(dtype) - shift)


def ldam_loss(
    logits: Tensor,
    target: Tensor,
    margins: Tensor,
    *,
    scale: float = 30.0,
    weight: Tensor | Sequence[float] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """LDAM loss (Cao et al. 2019): CE(s (z - m_y e_y), y), margins from :func:`ldam_margins`.

    Cao et al. use s = 30 on cosine (normalised) logits; with an ordinary linear head the net also learns
    the logit scale, and a smaller s trains more smoothly. Other arguments as :func:`logit_adjusted_loss`.
    """
    return _cross_entropy(ldam_logits(logits, target, margins, scale), target, weight, reduction)


# ---------------------------------------------------------------- deferred re-weighting


def drw_weight(epoch: int, start_epoch: int, weight: Tensor | None) -> Tensor | None:
    """DRW's class weights at 0-based ``epoch``: None (plain loss) before ``start_epoch``, ``weight`` from it."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch={epoch!r} must be an int >= 0")
    return weight if epoch >= start_epoch else None


class DeferredReweighting(nn.Module):
    """Deferred re-weighting (Cao et al. 2019): ``loss`` unweighted before ``start_epoch``, weighted from it.

    ``loss`` is any loss with a ``weight`` attribute (ClassifierLoss, LongTailLoss) and ``forward``/``sums``;
    ``set_epoch(epoch)`` (the trainer calls it at each epoch start, also after a resume) sets its weight.
    ``weight`` here is the deferred weight, so the trainer treats the loss as weighted throughout: its
    accumulation divides by ``sum_i w_i``, which is the sample count while the weights are off.

    Args:
        loss: the loss module whose ``weight`` is switched.
        weight: (C,) class weights (e.g. ``class_weights(counts, beta=0.9999)``, as Cao et al.).
        start_epoch: first 0-based epoch with weights.
    """

    def __init__(self, loss: nn.Module, weight: Tensor | Sequence[float], start_epoch: int):
        super().__init__()
        if not hasattr(loss, "weight") or not hasattr(loss, "sums"):
            raise TypeError(f"loss must have .weight and .sums (ClassifierLoss), got {type(loss).__name__}")
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch={start_epoch!r} must be an int >= 0")
        self.loss, self.start_epoch, self.epoch = loss, start_epoch, 0
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32).detach().clone())
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loss.weight = drw_weight(epoch, self.start_epoch, self.weight)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.loss(logits, target)

    def sums(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return self.loss.sums(logits, target)


# ---------------------------------------------------------------- the training loss


class LongTailLoss(nn.Module):
    """LDAM, logit-adjusted or balanced-softmax loss with ``forward`` (mean) and exact ``sums``.

    The logits are adjusted (:func:`ldam_logits` / :func:`logit_adjusted_logits`) and passed to a
    cross-entropy ``ClassifierLoss``, whose conventions (smoothing, soft targets, weights, -100) apply.

    Args:
        kind: "ldam", "logit_adjusted" or "balanced_softmax".
        class_counts: (C,) training counts n_c > 0.
        tau: logit-adjustment temperature (only "logit_adjusted").
        max_margin, scale: LDAM's largest margin and logit scale (only "ldam").
        label_smoothing, smoothing_style: as ``ClassifierLoss``.
        weight: optional (C,) class weights; wrap in :class:`DeferredReweighting` for DRW.
    """

    def __init__(
        self,
        kind: str,
        *,
        class_counts: Sequence[int] | Tensor,
        tau: float = 1.0,
        max_margin: float = 0.5,
        scale: float = 30.0,
        label_smoothing: float = 0.0,
        smoothing_style: str = "uniform",
        weight: Tensor | Sequence[float] | None = None,
    ):
        super().__init__()
        _check_choice("kind", kind, LONGTAIL_KINDS)
        counts = _counts(class_counts)
        if not float(tau) >= 0.0:
            raise ValueError(f"tau={tau!r} must be >= 0")
        if not float(scale) > 0.0:
            raise ValueError(f"scale={scale!r} must be > 0")
        self.kind, self.scale = kind, float(scale)
        self.tau = 1.0 if kind == "balanced_softmax" else float(tau)
        self.ce = ClassifierLoss(
            "ce",
            num_classes=counts.numel(),
            label_smoothing=label_smoothing,
            smoothing_style=smoothing_style,
            weight=weight,
        )
        self.register_buffer("counts", counts.float())
        self.register_buffer("margins", ldam_margins(counts, max_margin))

    @property
    def weight(self) -> Tensor | None:
        return self.ce.weight

    @weight.setter
    def weight(self, value: Tensor | None) -> None:
        self.ce.weight = value

    def adjusted(self, logits: Tensor, target: Tensor) -> Tensor:
        """The logits the cross-entropy sees: (N, C) float32."""
        if self.kind == "ldam":
            return ldam_logits(logits, target, self.margins, self.scale)
        return logit_adjusted_logits(logits, self.counts, self.tau)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean loss. logits: (N, C) float; target: (N,) int64 or (N, C) float. Returns a 0-d tensor."""
        return self.ce(self.adjusted(logits, target), target)

    def sums(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(sum_i w_i l_i, sum_i w_i), as ``ClassifierLoss.sums``."""
        return self.ce.sums(self.adjusted(logits, target), target)


# ---------------------------------------------------------------- post-hoc adjustment of a model


class PosthocAdjustment:
    """A forward hook subtracting ``tau * log(prior)`` from a model's logits in eval mode only.

    Training (``model.training``) sees the raw logits; evaluation, prediction and ``trickbag eval`` see the
    adjusted ones (probabilities, metrics and the validation loss alike). A hook changes no state_dict key.
    """

    def __init__(self, class_counts: Sequence[int] | Tensor, tau: float = 1.0):
        if not float(tau) > 0.0:
            raise ValueError(f"tau={tau!r} must be > 0 for a post-hoc adjustment")
        self.offset = float(tau) * log_prior(class_counts)

    def __call__(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        if module.training:
            return output
        return output - self.offset.to(output.device, output.dtype)

    def attach(self, model: nn.Module):
        """Register on ``model``; returns the hook handle (``handle.remove()`` detaches it)."""
        return model.register_forward_hook(self)


# ---------------------------------------------------------------- class-balanced sampling


def sampling_weights(labels: Tensor, mode: str, *, threshold: float | None = None) -> Tensor:
    """Per-sample draw weights (N,) float64 for class-balanced sampling (they need not sum to 1).

    - "inverse": 1 / n_c, every class drawn equally often (class mass 1/C);
    - "sqrt": n_c^(-1/2), class mass proportional to sqrt(n_c) (Mahajan et al. 2018);
    - "repeat_factor": r_c = max(1, sqrt(t / f_c)) with f_c = n_c / N (Gupta et al. 2019, LVIS), the class's
      repeat factor as a draw weight; ``threshold`` t defaults to 1 / C, so classes rarer than a balanced
      share are repeated and the others are not.

    Args:
        labels: (N,) int64 class indices >= 0.
    """
    _check_choice("mode", mode, SAMPLING_MODES)
    labels = torch.as_tensor(labels).long().flatten()
    if labels.numel() == 0 or bool((labels < 0).any()):
        raise ValueError("labels must be a non-empty (N,) tensor of class indices >= 0")
    counts = torch.bincount(labels).double()
    per_sample = counts[labels]
    if mode == "inverse":
        return 1.0 / per_sample
    if mode == "sqrt":
        return per_sample.rsqrt()
    present = int((counts > 0).sum())
    t = 1.0 / present if threshold is None else float(threshold)
    if not 0.0 < t <= 1.0:
        raise ValueError(f"threshold={threshold!r} must be in (0, 1]")
    return (t / (per_sample / labels.numel())).sqrt().clamp_min(1.0)


class ClassBalancedSampler:
    """Each epoch's index order for a ``BatchLoader``: ``num_samples`` draws with replacement by
    :func:`sampling_weights`, from ``epoch_generator(seed, epoch)`` only, so any epoch is reproduced exactly
    (resume, another process). Before ``start_epoch`` (deferred, as DRW) it is a plain permutation.

    Args:
        labels: (N,) int64 training labels.
        mode: "inverse", "sqrt" or "repeat_factor".
        seed: base seed (the loader's seed is a good choice).
        start_epoch: first 0-based epoch that samples by class; earlier epochs shuffle.
        num_samples: indices per epoch; default N, so an epoch keeps its number of batches.
        threshold: repeat-factor threshold (see :func:`sampling_weights`).
    """

    def __init__(
        self,
        labels: Tensor,
        mode: str,
        *,
        seed: int = 0,
        start_epoch: int = 0,
        num_samples: int | None = None,
        threshold: float | None = None,
    ):
        self.weights = sampling_weights(labels, mode, threshold=threshold)
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch={start_epoch!r} must be an int >= 0")
        n = self.weights.numel()
        num_samples = n if num_samples is None else num_samples
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r} must be an int >= 1")
        self.mode, self.seed, self.start_epoch, self.num_samples = mode, int(seed), start_epoch, num_samples

    def __len__(self) -> int:
        return self.num_samples

    def indices(self, epoch: int) -> Tensor:
        """(num_samples,) int64 indices of ``epoch`` (0-based), on the CPU."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be an int >= 0")
        # A different stream from the loader's own generator of the same (seed, epoch): its crops and flips.
        generator = epoch_generator(self.seed + 1_000_003, epoch)
        n = self.weights.numel()
        if epoch < self.start_epoch:
            order = torch.randperm(n, generator=generator)
            repeats = math.ceil(self.num_samples / n)
            return torch.cat([order] * repeats)[: self.num_samples]
        return torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)


# ---------------------------------------------------------------- reporting on imbalanced labels

LEAD_METRICS = (
    "macro_f1",
    "balanced_accuracy",
)  # what an imbalanced run shows first (accuracy hides the tail)


def rarest_classes(class_counts: Sequence[int], share: float = 0.2) -> list[int]:
    """Indices of the rarest ``ceil(share * C)`` classes by count (ties: lower index first); [] if all equal."""
    counts = [int(count) for count in class_counts]
    if not counts or min(counts) == max(counts):
        return []
    k = max(1, math.ceil(share * len(counts)))
    return sorted(sorted(range(len(counts)), key=lambda c: (counts[c], c))[:k])


def recall_rows(per_class: list[dict], class_counts: Sequence[int] | None) -> list[tuple[str, str, str, str]]:
    """(class, training count, recall, mark) rows for a table, the rarest classes marked "rare".

    ``per_class``: ``ClassificationMetrics.per_class()`` dicts; ``class_counts``: the training counts (None:
    unknown, the evaluated ``support`` decides what is rare instead).
    """
    counts = class_counts if class_counts is not None else [row["support"] for row in per_class]
    rare = set(rarest_classes(counts))
    return [
        (row["class"], str(counts[c]), f"{row['recall']:.3f}", "rare" if c in rare else "")
        for c, row in enumerate(per_class)
    ]
