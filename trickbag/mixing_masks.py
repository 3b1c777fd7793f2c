"""Parts behind ``trickbag.mixing``: input checks, pairing and blending, CutMix boxes, FMix masks (λ draws: mixing_beta).

Everything here takes its randomness from an optional ``torch.Generator`` (``None`` means torch's default CPU
generator) and samples on the generator's device; callers pass ``device=`` to get the result where the batch
lives. ``trickbag.mixing`` builds ``mixup`` / ``cutmix`` / ``fmix`` on top of these.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from trickbag.mixing_beta import _check_alpha, _generator_device, _is_number, sample_beta

__all__ = ["sample_beta", "cutmix_boxes", "box_masks", "sample_fmix_mask"]

PAIRINGS = ("permute", "flip")


# ---------------------------------------------------------------------------------------------------------------
# Input checks and draws shared by mixup / cutmix / fmix / BatchMixer
# ---------------------------------------------------------------------------------------------------------------


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
        raise TypeError(f"x must be uint8 or floating point (float16/bfloat16/float32), got {x.dtype}")


def _soft_targets(
    target: torch.Tensor, n: int, num_classes: int | None, device: torch.device
) -> torch.Tensor:
    """Validate ``target`` and return it as (N, C) float32 rows."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            f"target must be a torch.Tensor, (N,) int64 or (N, C) float, got {type(target).__name__}"
        )
    if target.device != device:
        raise ValueError(f"target is on {target.device} but x is on {device}; move both to the same device")
    if target.ndim not in (1, 2) or target.shape[0] != n:
        raise ValueError(f"target must have shape ({n},) or ({n}, C) to match x, got {tuple(target.shape)}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
        raise TypeError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if target.ndim == 2:
        if not target.dtype.is_floating_point:
            raise TypeError(f"target of shape (N, C) must hold float soft rows, got {target.dtype}")
        if num_classes is not None and target.shape[1] != num_classes:
            raise ValueError(f"target has {target.shape[1]} columns but num_classes={num_classes}")
        return target.to(torch.float32)
    if target.dtype.is_floating_point or target.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise TypeError(f"target of shape (N,) must hold integer class indices, got {target.dtype}")
    if num_classes is None:
        raise ValueError("num_classes is required when target holds class indices (shape (N,))")
    # On an accelerator this check would force a sync; F.one_hot raises there instead.
    low, high = (int(v) for v in torch.aminmax(target)) if target.device.type == "cpu" and n else (0, 0)
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"target holds class indices in [{low}, {high}], "
            f"allowed [0, {num_classes - 1}] for num_classes={num_classes}"
        )
    if target.device.type == "cpu":  # range checked above; F.one_hot would check it again (~5 µs)
        rows = torch.zeros(n, num_classes)
        return rows.scatter_(1, target.long().view(-1, 1), 1.0)
    return F.one_hot(target.long(), num_classes).to(torch.float32)


def _resolve_perm(perm, n, pairing, generator, device) -> torch.Tensor | None:
    """(N,) int64 partner indices on ``device``, or None for ``"flip"`` (reversal is cheaper than a gather)."""
    if perm is None:
        if pairing == "flip":
            return None
        gen_device = _generator_device(generator)
        return torch.randperm(n, generator=generator, device=gen_device).to(device, non_blocking=True)
    if not isinstance(perm, torch.Tensor) or perm.shape != (n,) or perm.dtype.is_floating_point:
        shape = tuple(perm.shape) if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise ValueError(f"perm must be an integer tensor of shape ({n},), got {shape}")
    low, high = (int(v) for v in torch.aminmax(perm.long()))
    if perm.dtype == torch.bool or low < 0 or high >= n:
        raise ValueError(f"perm must hold indices in [0, {n - 1}], got values in [{low}, {high}]")
    return perm.to(device=device, dtype=torch.long)


def _resolve_lam(lam, n, per_sample, alpha, generator, device) -> torch.Tensor:
    """λ as (1,) or (N,) float32 on ``device``: drawn from Beta(α, α) unless given."""
    if lam is None:
        return sample_beta(alpha, n if per_sample else 1, generator=generator, device=device)
    if isinstance(lam, bool) or not isinstance(lam, (int, float, torch.Tensor)):
        raise TypeError(f"lam must be a float or a tensor of shape () or ({n},), got {type(lam).__name__}")
    lam = torch.as_tensor(lam, dtype=torch.float32)
    if lam.ndim > 1 or lam.numel() not in (1, n):
        raise ValueError(
            f"lam must be a float or a tensor of shape () or ({n},), got shape {tuple(lam.shape)}"
        )
    if not bool(((lam >= 0) & (lam <= 1)).all()):
        low, high = float(lam.min()), float(lam.max())
        raise ValueError(f"lam must lie in [0, 1] (the weight of the original sample), got [{low}, {high}]")
    return lam.reshape(-1).to(device) if device is not None else lam.reshape(-1)


# ---------------------------------------------------------------------------------------------------------------
# Shared steps of the mixers: pairing, blending, targets
# ---------------------------------------------------------------------------------------------------------------


def _prepare(x, target, num_classes, alpha, pairing) -> torch.Tensor:
    _check_images(x)
    _check_alpha(alpha)
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    return _soft_targets(target, x.shape[0], num_classes, x.device)


def _no_partner(x: torch.Tensor, soft: torch.Tensor, name: str):
    warnings.warn(
        f"{name}: a batch of {x.shape[0]} sample(s) has nothing to mix with; returning it unchanged",
        stacklevel=3,
    )
    return x, soft


def _partner(t: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """``t`` paired by ``perm`` (None: reversed); always a new tensor (flip and indexing copy), safe to write."""
    if perm is None:
        return t.flip(0)
    if t.requires_grad:  # out= variants do not record autograd (mixing hidden features, Manifold Mixup)
        return t[perm]
    # index_select is ~3x faster than t[perm] on CPU; empty_like keeps the memory format (channels_last).
    return torch.index_select(t, 0, perm, out=torch.empty_like(t))


def _same_format(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Give ``out`` the memory format of ``like`` (the ops used keep it already; this is the safety net)."""
    if like.is_contiguous():
        return out.contiguous()
    if like.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def _blend(x: torch.Tensor, perm: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """weight·x + (1 − weight)·x[perm]; ``weight`` float broadcastable to x. uint8 rounds to nearest."""
    if x.dtype == torch.uint8:
        mixed = _partner(x, perm).to(torch.float32).lerp_(x.to(torch.float32), weight)
        return mixed.round_().clamp_(0, 255).to(torch.uint8)
    # Blending into the fresh partner copy saves an allocation, whose first-touch page faults cost about as
    # much as a copy on CPU. lerp computes start + w·(end − start) for w < 0.5 and end − (end − start)·(1 − w)
    # otherwise, so weights 0 and 1 reproduce finite pixels exactly: masks can paste through it.
    return _partner(x, perm).lerp_(x, weight.to(x.dtype))


def _paste(x: torch.Tensor, perm: torch.Tensor | None, inside: torch.Tensor) -> torch.Tensor:
    """x with the partner's pixels where ``inside`` (0/1 float, broadcastable to x) is 1."""
    if x.dtype == torch.uint8 or x.requires_grad:
        return _blend(x, perm, 1.0 - inside)
    # Lerp from x toward the fresh partner copy, written into that copy (full overlap is allowed): saves the
    # 1 − inside pass. Weights 0 and 1 give x and the partner exactly (see _blend).
    partner = _partner(x, perm)
    return torch.lerp(x, partner, inside.to(x.dtype), out=partner)


def _mix_targets(soft: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    return torch.lerp(_partner(soft, perm), soft, lam.view(-1, 1))


# ---------------------------------------------------------------------------------------------------------------
# CutMix boxes
# ---------------------------------------------------------------------------------------------------------------


def cutmix_boxes(
    lam: torch.Tensor, height: int, width: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes to paste from the partner image, as in CutMix (Yun et al. 2019, https://arxiv.org/abs/1905.04899).

    A box of side ``round(H·sqrt(1−λ)) × round(W·sqrt(1−λ))`` is centred on a uniformly drawn pixel and clipped
    at the border, so its real area can be smaller than 1−λ; the returned λ is corrected to the real share.

    Args:
        lam: (M,) float, the weight of the original sample, in [0, 1].
        height, width: image size H, W.
        generator: draws the centres (on the generator's device).

    Returns:
        boxes: (M, 4) int64 ``[y0, y1, x0, x1]`` (half-open), on the generator's device.
        lam: (M,) float32 corrected λ = 1 − box area / (H·W), on the generator's device.
    """
    device = _generator_device(generator)
    if lam.numel() == 1 and device.type == "cpu":
        # One box per batch: the same draws on Python numbers cost ~10 µs, the tensor ops below ~35 µs.
        ratio = math.sqrt(min(max(1.0 - float(lam.reshape(())), 0.0), 1.0))
        u_y, u_x = torch.rand(2, dtype=torch.float64, generator=generator).tolist()
        box = []
        for size, u in ((height, u_y), (width, u_x)):
            cut = round(size * ratio)
            start = int(u * size) - cut // 2
            box += [max(start, 0), min(start + cut, size)]
        area = (box[1] - box[0]) * (box[3] - box[2])
        return torch.tensor([box]), torch.tensor([1.0 - area / (height * width)], dtype=torch.float32)
    if device.type == "cpu":
        # Many boxes, CPU generator: the same float64 arithmetic as above, in NumPy (~10 µs for 512 boxes
        # against ~50 µs of small torch ops); row 0 uses the same two uniforms as the one-box path.
        lam64 = lam.detach().to("cpu", torch.float64).reshape(-1).numpy()
        ratio = np.sqrt(np.clip(1.0 - lam64, 0.0, 1.0))[:, None]
        size = np.array([height, width], dtype=np.float64)  # integers, exact in float64: fewer int casts
        u = torch.rand(lam64.shape[0], 2, dtype=torch.float64, generator=generator).numpy()
        cut = np.round(size * ratio)
        start = np.floor(u * size) - np.floor(0.5 * cut)
        low, high = np.maximum(start, 0.0), np.minimum(start + cut, size)
        side = high - low
        area = side[:, 0] * side[:, 1]
        boxes = np.stack((low, high), axis=2).reshape(-1, 4).astype(np.int64)
        return torch.from_numpy(boxes), torch.from_numpy(1.0 - area / (height * width)).to(torch.float32)
    lam = lam.to(device=device, dtype=torch.float32).reshape(-1)
    # Rows and columns side by side as (M, 2): half the small ops, which dominate for one box.
    size = torch.tensor([height, width], device=device)
    cut = torch.round(torch.sqrt((1.0 - lam).clamp(0.0, 1.0)).unsqueeze(1) * size).long()
    centre = (
        torch.rand(lam.shape[0], 2, device=device, dtype=torch.float64, generator=generator) * size
    ).long()
    start = centre - cut // 2
    low, high = start.clamp_min(0), torch.minimum(start + cut, size)
    area = (high - low).prod(dim=1).to(torch.float32)
    return torch.stack((low, high), dim=2).reshape(-1, 4), 1.0 - area / float(height * width)


@functools.lru_cache(maxsize=8)
def _interval_table(size: int, device: torch.device) -> torch.Tensor:
    """((size + 1)², size) float32: row ``low · (size + 1) + high`` is 1 on [low, high), else 0."""
    index = torch.arange(size, device=device)
    bounds = torch.arange(size + 1, device=device)
    table = (index >= bounds.view(-1, 1, 1)) & (index < bounds.view(1, -1, 1))
    return table.float().view(-1, size)


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(M, H, W) float32 masks, 1 inside each half-open box ``[y0, y1, x0, x1]`` of ``boxes`` (M, 4), else 0.

    Built as the product of a row and a column indicator, so M boxes cost one broadcast pass and no Python
    loop (float: a broadcast ``&`` of bool tensors is ~10x slower on CPU).
    """
    size = max(height, width)
    low, high = boxes.view(-1, 2, 2).unbind(2)  # (M, 2): [y0, x0], [y1, x1]
    if size <= 64:
        # Look the (M, 2) row and column indicators up in a table of every [low, high) interval: one small
        # gather instead of ~6 small compare ops (~12 µs against ~40 µs for 512 boxes).
        inside = _interval_table(size, boxes.device).index_select(0, (low * (size + 1) + high).view(-1))
        inside = inside.view(-1, 2, size)
    else:  # the table would hold (size + 1)² · size floats
        index = torch.arange(size, device=boxes.device)
        inside = ((index >= low.unsqueeze(2)) & (index < high.unsqueeze(2))).float()
    return torch.mul(inside[:, 0, :height].unsqueeze(2), inside[:, 1, :width].unsqueeze(1))


# ---------------------------------------------------------------------------------------------------------------
# FMix masks
# ---------------------------------------------------------------------------------------------------------------


def _frequency_scale(height: int, width: int, decay_power: float, device: torch.device) -> torch.Tensor:
    """1 / f**decay_power on the rfft2 grid (H, W//2+1); f is floored at 1/max(H, W) as in the FMix code."""
    fy = torch.fft.fftfreq(height, device=device).view(-1, 1)
    fx = torch.fft.rfftfreq(width, device=device).view(1, -1)
    freq = torch.sqrt(fy * fy + fx * fx).clamp_min(1.0 / max(height, width))
    return freq.pow(-decay_power)


def _largest(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(M, P) float32, 1 at the ``count[m]`` largest entries of each row of ``values`` (M, P), else 0.

    A full argsort of every row costs ~20 copies of the batch on CPU. Instead, bisect a per-row threshold
    (each step is one compare-and-count pass), then take the few entries left inside the last bracket with a
    small ``topk``; that last step makes the count exact whatever the bisection reached (ties included).
    """
    rows, pixels = values.shape
    low = values.min(dim=1).values - 1.0  # invariant: at least count entries lie above low ...
    high = values.max(dim=1).values  # ... and at most count lie above high
    # Comparing into a float buffer and summing is ~20x faster on CPU than summing a bool tensor (which is
    # first copied to int64); counts stay exact below 2**24 (float32) / 2**53 (float64) pixels.
    above = torch.empty_like(values, dtype=torch.float32 if pixels < 2**24 else torch.float64)
    for _ in range(min(2 + math.ceil(math.log2(max(pixels, 2))), 24)):
        middle = 0.5 * (low + high)
        too_many = torch.gt(values, middle.unsqueeze(1), out=above).sum(dim=1) > count
        low = torch.where(too_many, middle, low)
        high = torch.where(too_many, high, middle)
    chosen = torch.gt(values, high.unsqueeze(1), out=above)
    missing = count - chosen.sum(dim=1).long()
    k = int(missing.max()) if rows else 0
    if k > 0:
        inside = torch.where((values > low.unsqueeze(1)) & (chosen == 0), values, -math.inf)
        index = torch.topk(inside, k, dim=1).indices
        take = (torch.arange(k, device=values.device).view(1, -1) < missing.unsqueeze(1)).to(chosen.dtype)
        chosen.scatter_(1, index, torch.maximum(take, chosen.gather(1, index)))
    return chosen.to(torch.float32)


def sample_fmix_mask(
    lam: torch.Tensor | float,
    height: int,
    width: int,
    *,
    decay_power: float = 3.0,
    max_soft: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FMix masks (Harris et al. 2020, https://arxiv.org/abs/2002.12047), one per λ.

    A random field is drawn in Fourier space (complex Gaussian noise scaled by 1/f**decay_power) and brought
    back with ``irfft2``, giving a smooth low-frequency image. Its ``round((1−λ)·H·W)`` highest pixels come from
    the partner, selected per row (batched over M) so that the count is exact, unlike a fixed threshold.
    With ``max_soft > 0`` the ``2·s`` pixels around the cut (s = floor(H·W·min(max_soft, λ, 1−λ))) get a linear
    ramp instead of a hard edge; the ramp is symmetric, so the partner's share stays exact.

    Args:
        lam: float or (M,) float, the weight of the original sample, in [0, 1].
        height, width: mask size H, W (non-square is fine).
        decay_power: spectrum decay; larger means smoother, blobbier masks (FMix default 3).
        max_soft: in [0, 0.5); 0 gives binary masks.
        generator: draws the noise (on the generator's device).
        device: where the masks are built and returned (default: the generator's device); the noise is drawn on
            the generator's device and moved there.

    Returns:
        mask: (M, H, W) float32, the weight of the ORIGINAL sample per pixel: 1 = original, 0 = partner,
            in between only on the ramp when ``max_soft > 0``.
        lam: (M,) float32 realised λ = mean of the mask (differs from the request only by rounding to pixels).
    """
    if not _is_number(decay_power) or decay_power <= 0:
        raise ValueError(f"decay_power must be a number > 0, got {decay_power!r}")
    if not _is_number(max_soft) or not 0.0 <= max_soft < 0.5:
        raise ValueError(f"max_soft must be a number in [0, 0.5), got {max_soft!r}")
    noise_device = _generator_device(generator)
    device = torch.device(device) if device is not None else noise_device
    lam = torch.as_tensor(lam, dtype=torch.float32).reshape(-1).to(device)
    count, pixels = lam.numel(), height * width
    noise = torch.randn(count, height, width // 2 + 1, 2, device=noise_device, generator=generator)
    spectrum = torch.view_as_complex(noise.to(device)) * _frequency_scale(height, width, decay_power, device)
    field = torch.fft.irfft2(spectrum, s=(height, width)).reshape(count, pixels)
    n_partner = torch.round((1.0 - lam.double()) * pixels).float()  # float64: exact for large H·W
    if max_soft == 0.0:
        keep = 1.0 - _largest(field, n_partner.long())
    else:
        order = torch.argsort(field, dim=1, descending=True)
        rank = torch.arange(pixels, device=device, dtype=torch.float32).view(1, -1)
        n_partner = n_partner.view(-1, 1)
        soft = torch.floor(pixels * torch.minimum(lam, 1.0 - lam).clamp(max=max_soft)).view(-1, 1)
        ramp = ((n_partner + soft - rank - 0.5) / (2.0 * soft).clamp_min(1.0)).clamp(0.0, 1.0)
        partner_sorted = torch.where(soft > 0, ramp, (rank < n_partner).float())
        keep = 1.0 - torch.empty_like(partner_sorted).scatter_(1, order, partner_sorted)
    keep = keep.view(count, height, width)
    return keep, keep.mean(dim=(1, 2))
