"""λ ~ Beta(α, α) for ``trickbag.mixing``, drawn only from an optional ``torch.Generator``.

Split from ``mixing_masks.py`` so each file holds one concept: this one the λ draws (Marsaglia–Tsang Gamma
sampling, vectorised rejection), that one the pairing, blending, CutMix boxes and FMix masks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["sample_beta"]


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_alpha(alpha: float, name: str = "alpha") -> None:
    if not _is_number(alpha) or alpha <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (1.0 draws λ uniformly), got {alpha!r}")


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _sample_log_gamma(shape: float, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """log of ``count`` Gamma(shape, 1) draws, float64, by Marsaglia & Tsang (2000).

    torch's own Gamma/Beta samplers take no generator, so seeded runs would depend on global state.
    Working in log space keeps tiny shapes (α = 0.05 gives U**20) from underflowing to 0/0 in the Beta ratio.
    """
    device = _generator_device(generator)
    boosted = shape < 1.0  # Gamma(a) = Gamma(a + 1) * U**(1/a): the rejection step needs a >= 1
    a = shape + 1.0 if boosted else shape
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(count, dtype=torch.float64, device=device)
    filled = 0
    while filled < count:  # a loop over rejection rounds (acceptance > 95 %), not over samples
        need = count - filled
        draws = need + need // 8 + 16  # oversample so one round nearly always suffices
        z = torch.randn(draws, dtype=torch.float64, device=device, generator=generator)
        u = torch.rand(draws, dtype=torch.float64, device=device, generator=generator)
        v = (1.0 + c * z) ** 3
        v_safe = v.clamp_min(1e-300)
        accept = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v_safe + d * torch.log(v_safe))
        accepted = torch.log(d * v_safe[accept])[:need]
        out[filled : filled + accepted.numel()] = accepted
        filled += accepted.numel()
    if boosted:  # u in (0, 1]: no log(0)
        u = 1.0 - torch.rand(count, dtype=torch.float64, device=device, generator=generator)
        out += torch.log(u) / shape
    return out


def _log_gamma_numpy(shape: float, count: int, generator: torch.Generator | None):
    """``_sample_log_gamma`` for a CPU generator, with the arithmetic in NumPy (float64 ndarray).

    The same Marsaglia–Tsang method, but each round takes all its uniforms from ONE ``torch.rand`` call
    (normals by Box–Muller) and the ~20 elementwise steps run in NumPy, whose per-call overhead on a few
    hundred elements is ~1 µs against ~4 µs for a torch op: for 512 draws ~15 µs instead of ~70 µs.
    """
    boosted = shape < 1.0  # Gamma(a) = Gamma(a + 1) * U**(1/a): the rejection step needs a >= 1
    a = shape + 1.0 if boosted else shape
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    parts, filled, extra = [np.empty(0)], 0, count if boosted else 0
    while filled < count:  # a loop over rejection rounds (acceptance > 95 %), not over samples
        need = count - filled
        half = (need + need // 8 + 16) // 2  # oversample so one round nearly always suffices
        # 1 − U lies in (0, 1]: no log(0). Box–Muller uses both halves (cos and sin) of each pair.
        u = 1.0 - torch.rand(4 * half + extra, dtype=torch.float64, generator=generator).numpy()
        radius = np.sqrt(-2.0 * np.log(u[:half]))
        angle = torch.from_numpy(u[half : 2 * half] * (2.0 * math.pi))  # torch's cos/sin are ~3x NumPy's
        z = np.concatenate((radius * angle.cos().numpy(), radius * angle.sin().numpy()))
        u3, boost = u[2 * half : 4 * half], u[4 * half :]
        w = 1.0 + c * z
        v = w * w * w  # ~5x faster than w ** 3 in NumPy
        log_v = np.log(np.maximum(v, 1e-300))
        accept = (v > 0) & (np.log(u3) < 0.5 * z * z + d * (1.0 - v + log_v))
        accepted = log_v[accept][:need] + math.log(d)
        if extra:  # the boost uniforms come with the first round
            boost_log, extra = np.log(boost) / shape, 0
        parts.append(accepted)
        filled += accepted.size
    out = np.concatenate(parts) if len(parts) > 2 else parts[-1]
    return out + boost_log if boosted else out


def _uniforms(generator: torch.Generator | None, block: int = 64):
    """Endless floats in (0, 1] from a CPU ``generator``, drawn in blocks (for the scalar path)."""
    while True:
        yield from (1.0 - torch.rand(block, dtype=torch.float64, generator=generator)).tolist()


def _log_gamma_scalar(shape: float, uniforms) -> float:
    """One ``_sample_log_gamma`` draw on Python floats; normals by Box–Muller."""
    boosted = shape < 1.0
    a = shape + 1.0 if boosted else shape
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = math.sqrt(-2.0 * math.log(next(uniforms))) * math.cos(2.0 * math.pi * next(uniforms))
        v = (1.0 + c * z) ** 3
        if v > 0 and math.log(next(uniforms)) < 0.5 * z * z + d - d * v + d * math.log(v):
            break
    log_gamma = math.log(d * v)
    return log_gamma + math.log(next(uniforms)) / shape if boosted else log_gamma


def _sigmoid(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t)) if t >= 0 else math.exp(t) / (1.0 + math.exp(t))


def sample_beta(
    alpha: float,
    count: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw ``count`` values of λ ~ Beta(alpha, alpha) from ``generator``.

    Beta(α, α) = G1 / (G1 + G2) with G1, G2 ~ Gamma(α) = sigmoid(log G1 − log G2).

    Args:
        alpha: concentration α > 0 (α = 1: uniform; α < 1: λ near 0 or 1; α > 1: λ near 0.5).
        count: number of draws (>= 0).
        generator: source of randomness; ``None`` uses torch's default CPU generator.
        device: where the result goes (default: the generator's device).
        dtype: result dtype. float32 cannot hold values within 6e-8 of 1, which for α = 0.2 is ~2 % of the
            mass (they become exactly 1.0); ask for float64 to study the distribution itself.

    Returns:
        (count,) ``dtype`` in [0, 1].
    """
    _check_alpha(alpha)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    if count == 1 and _generator_device(generator).type == "cpu":
        # One λ per batch: ~25 tensor ops on one element cost ~35 µs (a 512×3×32×32 copy is ~130 µs);
        # the same method on Python floats costs ~8 µs.
        uniforms = _uniforms(generator)
        diff = _log_gamma_scalar(float(alpha), uniforms) - _log_gamma_scalar(float(alpha), uniforms)
        lam = torch.tensor([_sigmoid(diff)], dtype=torch.float64).to(dtype)
        return lam.to(device) if device is not None else lam
    if _generator_device(generator).type == "cpu":
        log_gamma = _log_gamma_numpy(float(alpha), 2 * count, generator)
        lam = torch.from_numpy(log_gamma[:count] - log_gamma[count:]).sigmoid_().to(dtype)
        return lam.to(device) if device is not None else lam
    log_gamma = _sample_log_gamma(float(alpha), 2 * count, generator)
    lam = torch.sigmoid(log_gamma[:count] - log_gamma[count:]).to(dtype)
    return lam.to(device) if device is not None else lam
