"""Batch mixing: MixUp, CutMix and FMix, tensor-native and seeded, plus ``BatchMixer`` for a training loop.

Conventions shared by ``mixup``, ``cutmix`` and ``fmix``:

- ``lam`` is always the weight of the ORIGINAL sample; the partner gets ``1 − lam``.
- ``x``: (N, C, H, W) uint8 / float16 / bfloat16 / float32 (float64 works too). The result keeps the dtype, the
  memory format (channels_last in, channels_last out) and the device. uint8 blends are rounded to nearest.
- ``target``: (N,) int class indices (needs ``num_classes``) or (N, C) float soft rows (so label smoothing or an
  earlier mix composes). The returned ``soft_target`` is (N, C) float32 whose rows sum to 1; for CutMix and FMix
  the weights equal the real pixel shares.
- Pairing: ``"permute"`` mixes each sample with a random other one, ``"flip"`` with the batch reversed (timm);
  a given ``perm`` (N,) overrides both: sample i is mixed with ``x[perm[i]]``.
- Randomness comes only from ``generator`` (``None``: torch's default CPU generator). Draws happen in this order:
  perm, λ, then box centres / mask noise; a given ``lam`` or ``perm`` is not drawn. Small tensors are drawn on
  the generator's device and moved to ``x.device``; a CUDA batch never goes to the CPU.
- ``per_sample=True`` draws one λ (and one box / mask) per sample, vectorised; a ``lam`` of shape (N,) implies it.
- A batch of one sample has no partner: it is returned unchanged with a warning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from trickbag.losses import SMOOTHING_STYLES, smooth_labels
from trickbag.mixing_masks import (
    PAIRINGS,
    _blend,
    _check_images,
    _mix_targets,
    _no_partner,
    _paste,
    _prepare,
    _resolve_lam,
    _resolve_perm,
    _same_format,
    _soft_targets,
    box_masks,
    cutmix_boxes,
    sample_beta,
    sample_fmix_mask,
)

__all__ = [
    "mixup",
    "cutmix",
    "fmix",
    "BatchMixer",
    "save_mix_grid",
    "sample_beta",
    "sample_fmix_mask",
    "cutmix_boxes",
]

METHODS = ("mixup", "cutmix", "fmix")


# ---------------------------------------------------------------------------------------------------------------
# The three mixers
# ---------------------------------------------------------------------------------------------------------------


def mixup(x, target, *, alpha=1.0, num_classes=None, per_sample=False, pairing="permute", generator=None,
          lam=None, perm=None):  # fmt: skip
    """MixUp (Zhang et al. 2018, https://arxiv.org/abs/1710.09412): ``λ·x + (1−λ)·x[perm]``, λ ~ Beta(α, α).

    Args:
        x: (N, C, H, W) uint8 or float images.
        target: (N,) int class indices or (N, C) float soft rows.
        alpha: Beta concentration α > 0.
        num_classes: C; required for index targets.
        per_sample: one λ per sample instead of one per batch.
        pairing: "permute" or "flip".
        generator: source of randomness (None: torch's default CPU generator).
        lam: fixed λ (float or (N,) tensor) instead of a draw.
        perm: fixed (N,) partner indices instead of a draw.

    Returns:
        x_mixed: like x (dtype, device, memory format); uint8 is rounded.
        soft_target: (N, C) float32, ``λ·target + (1−λ)·target[perm]``.
    """
    soft = _prepare(x, target, num_classes, alpha, pairing)
    if x.shape[0] < 2:
        return _no_partner(x, soft, "mixup")
    perm = _resolve_perm(perm, x.shape[0], pairing, generator, x.device)
    lam = _resolve_lam(lam, x.shape[0], per_sample, alpha, generator, x.device)
    mixed = _blend(x, perm, lam.view(-1, 1, 1, 1))
    return _same_format(mixed, x), _mix_targets(soft, lam, perm)


def cutmix(x, target, *, alpha=1.0, num_classes=None, per_sample=False, pairing="permute", generator=None,
           lam=None, perm=None):  # fmt: skip
    """CutMix (Yun et al. 2019, https://arxiv.org/abs/1905.04899): paste a box of the partner into each image.

    The box has area ≈ (1−λ)·H·W, a uniformly drawn centre, and is clipped at the border; λ is then corrected
    to the real pasted share (``cutmix_boxes``). Per batch, only the box region is gathered from the partner.
    Arguments as in ``mixup``.

    Returns:
        x_mixed: like x.
        soft_target: (N, C) float32 weighted by the real pixel shares.
    """
    soft = _prepare(x, target, num_classes, alpha, pairing)
    n, _, height, width = x.shape
    if n < 2:
        return _no_partner(x, soft, "cutmix")
    perm = _resolve_perm(perm, n, pairing, generator, x.device)
    lam = _resolve_lam(lam, n, per_sample, alpha, generator, None)  # boxes are drawn where the generator is
    boxes, lam = cutmix_boxes(lam, height, width, generator=generator)
    lam = lam.to(x.device, non_blocking=True)
    if boxes.shape[0] == 1:
        # Copy only the box region: at α = 1 measured ~1.1x faster on CPU (512×3×32×32) than a lerp through a
        # (1, 1, H, W) box mask into a gathered partner (the per-sample path), whose cost does not shrink with
        # the box; for boxes of half the image or more the lerp would win.
        # The Python ints are a sync when the generator is on the GPU.
        y0, y1, x0, x1 = boxes[0].tolist()
        mixed = x.clone()  # keeps the memory format
        if y1 > y0 and x1 > x0:
            region = x[:, :, y0:y1, x0:x1]
            mixed[:, :, y0:y1, x0:x1] = region.flip(0) if perm is None else region.index_select(0, perm)
    else:
        inside = box_masks(boxes.to(x.device, non_blocking=True), height, width).unsqueeze(1)
        mixed = _paste(x, perm, inside)
    return _same_format(mixed, x), _mix_targets(soft, lam, perm)


def fmix(x, target, *, alpha=1.0, decay_power=3.0, num_classes=None, per_sample=False, pairing="permute",
         generator=None, lam=None, perm=None, max_soft=0.0):  # fmt: skip
    """FMix (Harris et al. 2020, https://arxiv.org/abs/2002.12047): mix through a smooth random binary mask.

    Exactly ``round((1−λ)·H·W)`` pixels of each image come from the partner (``sample_fmix_mask``); the target
    uses that realised share. The mask follows the image shape (non-square is fine) and is shared across
    channels. Arguments as in ``mixup``, plus:

    Args:
        decay_power: spectrum decay of the random field (larger: smoother masks).
        max_soft: in [0, 0.5); > 0 softens the mask edge (see ``sample_fmix_mask``).

    Returns:
        x_mixed: like x.
        soft_target: (N, C) float32 weighted by the realised pixel shares.
    """
    soft = _prepare(x, target, num_classes, alpha, pairing)
    n, _, height, width = x.shape
    if n < 2:
        return _no_partner(x, soft, "fmix")
    perm = _resolve_perm(perm, n, pairing, generator, x.device)
    lam = _resolve_lam(lam, n, per_sample, alpha, generator, x.device)
    keep, lam = sample_fmix_mask(
        lam, height, width, decay_power=decay_power, max_soft=max_soft, generator=generator, device=x.device
    )
    mixed = _blend(x, perm, keep.unsqueeze(1))
    return _same_format(mixed, x), _mix_targets(soft, lam, perm)


_MIXERS = {"mixup": mixup, "cutmix": cutmix, "fmix": fmix}


# ---------------------------------------------------------------------------------------------------------------
# BatchMixer: the training-loop object
# ---------------------------------------------------------------------------------------------------------------


class BatchMixer:
    """Mix each training batch with MixUp, CutMix or FMix; always return soft targets.

    Per call (``mode="batch"``), with probability ``prob`` one enabled method (alpha > 0) is picked and applied
    to the whole batch with one λ. With ``mode="sample"`` every sample independently is mixed with probability
    ``prob``, by its own method and λ, in one vectorised pass. The method is picked with ``method_weights``
    (mixup, cutmix, fmix; disabled methods get 0), by default uniformly among the enabled ones;
    ``switch_prob=p`` is timm's rule (CutMix with probability p, else MixUp; FMix must be off).

    Targets are then label-smoothed by ``trickbag.losses.smooth_labels`` (ε = ``label_smoothing``; style
    "uniform": (1 − ε)·t + ε/C as ``F.cross_entropy(label_smoothing=ε)``, or "off_target"), also when mixing
    is off, so the loss sees (N, C) rows either way. Smooth in one place only: a loss that smooths soft rows
    again would apply ε twice.
    ``set_epoch(e)`` switches mixing off from ``off_epoch`` on (clean final epochs). A batch of one sample is
    passed through unmixed without a warning (it is the usual ragged last batch).

    Randomness comes from the mixer's own CPU ``torch.Generator`` seeded with ``seed``; its state is part of
    ``state_dict()``, so a resumed run mixes exactly like an uninterrupted one.
    """

    def __init__(self, *, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 fmix_alpha: float = 0.0, prob: float = 1.0, switch_prob: float | None = None,
                 method_weights: Sequence[float] | None = None, mode: str = "batch",
                 label_smoothing: float = 0.0, smoothing_style: str = "uniform", off_epoch: int | None = None,
                 fmix_decay_power: float = 3.0, pairing: str = "permute", seed: int = 0) -> None:  # fmt: skip
        errors = []

        def number(value, name, low, high, low_open=False, high_open=False):
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            ok = (
                ok
                and (low < value if low_open else low <= value)
                and (value < high if high_open else value <= high)
            )
            if not ok:
                bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
                errors.append(f"{name}={value!r} not in {bounds}")

        alphas = {"mixup": mixup_alpha, "cutmix": cutmix_alpha, "fmix": fmix_alpha}
        for name, value in alphas.items():
            number(value, f"{name}_alpha", 0.0, math.inf, high_open=True)
        number(prob, "prob", 0.0, 1.0)
        number(label_smoothing, "label_smoothing", 0.0, 1.0, high_open=True)
        number(fmix_decay_power, "fmix_decay_power", 0.0, math.inf, low_open=True, high_open=True)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            errors.append(f"num_classes={num_classes!r} must be an int >= 1")
        if mode not in ("batch", "sample"):
            errors.append(f"mode={mode!r} not in {{'batch', 'sample'}}")
        if smoothing_style not in SMOOTHING_STYLES:
            errors.append(f"smoothing_style={smoothing_style!r} not in {set(SMOOTHING_STYLES)}")
        elif smoothing_style == "off_target" and num_classes == 1:
            errors.append("smoothing_style='off_target' needs num_classes >= 2")
        if pairing not in PAIRINGS:
            errors.append(f"pairing={pairing!r} not in {set(PAIRINGS)}")
        if off_epoch is not None and (isinstance(off_epoch, bool) or not isinstance(off_epoch, int)):
            errors.append(f"off_epoch={off_epoch!r} must be an int or None")
        if isinstance(seed, bool) or not isinstance(seed, int):
            errors.append(f"seed={seed!r} must be an int")
        weights = self._method_weights(alphas, switch_prob, method_weights, errors)
        if errors:
            raise ValueError("BatchMixer: " + "; ".join(errors))
        self.num_classes, self.alphas, self.weights = num_classes, alphas, weights
        self.prob, self.mode, self.pairing, self.off_epoch = float(prob), mode, pairing, off_epoch
        self.label_smoothing, self.smoothing_style = float(label_smoothing), smoothing_style
        self.fmix_decay_power = float(fmix_decay_power)
        self.epoch = 0
        self.generator = torch.Generator().manual_seed(seed)

    @staticmethod
    def _method_weights(alphas, switch_prob, method_weights, errors) -> torch.Tensor:
        enabled = torch.tensor([float(isinstance(a, (int, float)) and a > 0) for a in alphas.values()])
        if switch_prob is not None:
            if method_weights is not None or enabled[2] > 0:
                errors.append(
                    "switch_prob chooses between mixup and cutmix only; use method_weights with fmix"
                )
            elif (
                isinstance(switch_prob, bool)
                or not isinstance(switch_prob, (int, float))
                or not 0 <= switch_prob <= 1
            ):
                errors.append(f"switch_prob={switch_prob!r} not in [0, 1]")
            else:
                method_weights = (1.0 - switch_prob, switch_prob, 0.0)
        if method_weights is None:
            return enabled
        values = list(method_weights) if isinstance(method_weights, (list, tuple)) else None
        if (
            values is None
            or len(values) != 3
            or not all(isinstance(v, (int, float)) and v >= 0 for v in values)
        ):
            errors.append(f"method_weights={method_weights!r} must be 3 numbers >= 0 (mixup, cutmix, fmix)")
            return enabled
        weights = torch.tensor(values, dtype=torch.float32) * enabled
        if enabled.any() and not weights.sum() > 0:
            errors.append(f"method_weights={method_weights!r} give no weight to an enabled method")
        return weights

    @property
    def active(self) -> bool:
        """Whether the next call mixes at all (some method enabled, prob > 0, before ``off_epoch``)."""
        in_time = self.off_epoch is None or self.epoch < self.off_epoch
        return bool(self.weights.sum() > 0) and self.prob > 0 and in_time

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix ``x`` (N, C, H, W) and ``target`` ((N,) int or (N, C) float); return (x, (N, C) float32)."""
        _check_images(x)
        soft = _soft_targets(target, x.shape[0], self.num_classes, x.device)
        if self.active and x.shape[0] >= 2:
            x, soft = self._mix_batch(x, soft) if self.mode == "batch" else self._mix_each(x, soft)
        if self.label_smoothing:
            soft = smooth_labels(soft, self.num_classes, self.label_smoothing, style=self.smoothing_style)
        return x, soft

    def _mix_batch(self, x, soft):
        apply = torch.rand(1, generator=self.generator).item() < self.prob
        name = METHODS[int(torch.multinomial(self.weights, 1, generator=self.generator))]
        if not apply:
            return x, soft
        extra = {"decay_power": self.fmix_decay_power} if name == "fmix" else {}
        mixer = _MIXERS[name]
        return mixer(
            x, soft, alpha=self.alphas[name], pairing=self.pairing, generator=self.generator, **extra
        )

    def _mix_each(self, x, soft):
        """Per sample: one weight map (N, H, W) of the original, built per method, and one blend for all."""
        n, _, height, width = x.shape
        g, device = self.generator, x.device
        perm = _resolve_perm(None, n, self.pairing, g, device)
        applied = torch.rand(n, generator=g) < self.prob
        method = torch.multinomial(self.weights, n, replacement=True, generator=g)
        lam = torch.ones(n)
        for index, name in enumerate(METHODS):  # a loop over the three methods, not over samples
            if self.weights[index] > 0:
                lam = torch.where(
                    applied & (method == index), sample_beta(self.alphas[name], n, generator=g), lam
                )
        keep = lam.to(device).view(n, 1, 1).expand(n, height, width).clone()
        rows = (applied & (method == 1)).nonzero().squeeze(1)
        if rows.numel():
            boxes, lam[rows] = cutmix_boxes(lam[rows], height, width, generator=g)
            keep[rows.to(device)] = 1.0 - box_masks(boxes.to(device), height, width)
        rows = (applied & (method == 2)).nonzero().squeeze(1)
        if rows.numel():
            masks, realised = sample_fmix_mask(
                lam[rows], height, width, decay_power=self.fmix_decay_power, generator=g, device=device
            )
            keep[rows.to(device)] = masks
            # λ and the generator stay on the CPU; only the masks live on x's device.
            lam[rows] = realised.cpu()
        mixed = _blend(x, perm, keep.unsqueeze(1))
        return _same_format(mixed, x), _mix_targets(soft, lam.to(device), perm)

    def state_dict(self) -> dict:
        """Generator state (uint8 tensor) and epoch; loadable with ``torch.load(weights_only=True)``."""
        return {"generator_state": self.generator.get_state(), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        missing = {"generator_state", "epoch"} - set(state)
        if missing:
            raise ValueError(
                f"BatchMixer state is missing {sorted(missing)}; expected a BatchMixer.state_dict()"
            )
        self.generator.set_state(state["generator_state"])
        self.set_epoch(int(state["epoch"]))


# ---------------------------------------------------------------------------------------------------------------
# Visual check
# ---------------------------------------------------------------------------------------------------------------


def save_mix_grid(images_uint8: torch.Tensor, path: str | Path, *, methods: Sequence[str] = METHODS,
                  alpha: float = 1.0, seed: int = 0) -> Path:  # fmt: skip
    """Write a PNG grid: the originals on top, then one row per method; column i is mixed with column i+1.

    Args:
        images_uint8: (N, C, H, W) uint8 with C in {1, 3} and N >= 2.
        path: output PNG file.
        methods: rows to draw, from ("mixup", "cutmix", "fmix").
        alpha: Beta concentration; every sample gets its own λ (shown in its title).
        seed: seeds the draws.

    Returns:
        The path written.
    """
    _check_images(images_uint8)
    n, channels = images_uint8.shape[:2]
    if images_uint8.dtype != torch.uint8 or channels not in (1, 3) or n < 2:
        raise ValueError(
            f"images_uint8 must be (N, C, H, W) uint8 with C in {{1, 3}} and N >= 2, "
            f"got {tuple(images_uint8.shape)} {images_uint8.dtype}"
        )
    unknown = [m for m in methods if m not in _MIXERS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {tuple(methods)}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: plotting is optional for training
    from matplotlib.figure import Figure

    images = images_uint8.cpu()
    perm = torch.roll(torch.arange(n), -1)  # a derangement, so every column shows a real mix
    labels = torch.arange(n)
    rows = [("original", images, None)]
    for name in methods:
        generator = torch.Generator().manual_seed(seed)
        mixed, soft = _MIXERS[name](
            images, labels, alpha=alpha, num_classes=n, per_sample=True, perm=perm, generator=generator
        )
        rows.append((name, mixed, soft[labels, labels]))
    figure = Figure(figsize=(1.25 * n, 1.45 * len(rows)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), n, squeeze=False)
    for r, (name, batch, lam) in enumerate(rows):
        for c in range(n):
            axis = axes[r][c]
            picture = batch[c].permute(1, 2, 0).numpy()
            axis.imshow(picture[..., 0] if channels == 1 else picture, cmap="gray", interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"λ={float(lam[c]):.2f}" if lam is not None else f"#{c}", fontsize=8)
        axes[r][0].set_ylabel(name, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
