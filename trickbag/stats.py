"""Statistics for comparing training runs over seeds: t intervals, paired bootstrap, sign-flip test, Holm.

Plain functions over sequences of floats (one value per seed), numpy only: no scipy at run time (scipy is the
tests' reference). The design is *paired*: every arm of an ablation runs the same seed list, so arm and
reference are compared seed by seed through their differences ``d_i = arm_i - reference_i``.

- ``t_ppf(p, df)``: Student-t quantile (inverse CDF), Newton on an incomplete-beta CDF, |error| < 1e-9.
- ``mean_ci(values)``: mean with a Student-t 95% interval.
- ``bootstrap_ci(differences)``: percentile bootstrap interval of the mean difference over seeds (seeded).
- ``sign_flip_p_value(differences)``: paired permutation test; exact (all 2^n sign patterns) for n <= 16.
- ``holm(p_values)``: Holm's step-down adjustment across arms.
- ``verdict(...)``: "helps" / "hurts" / "cannot tell with n seeds".
- ``seeds_needed(effect, sd)``: seeds to resolve an effect with the observed spread of the differences.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Student t distribution


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast for x < (a+1)/(a+b+2); use the symmetry I_x(a,b) = 1 - I_1-x(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """Upper tail P(T > t) of Student's t with ``df`` degrees of freedom (t >= 0 keeps full precision)."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def _t_pdf(t: float, df: float) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))


def t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t: the t with P(T <= t) = p.

    Closed forms for df = 1 and 2; otherwise a Cornish-Fisher start refined by safeguarded Newton steps on the
    upper tail ``t_sf`` (an incomplete-beta continued fraction), so the result is accurate to ~1e-10.

    Raises:
        ValueError: p not in (0, 1) or df not > 0.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p!r} must be in (0, 1)")
    if not df > 0:
        raise ValueError(f"df={df!r} must be > 0")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    tail = 1.0 - p
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = statistics.NormalDist().inv_cdf(p)
    # Cornish-Fisher expansion of the t quantile in powers of 1/df (Abramowitz & Stegun 26.7.5).
    t = (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )
    low, high = 0.0, max(2 * t, 1.0)
    while t_sf(high, df) > tail:  # bracket the root: t_sf decreases in t
        low, high = high, high * 2
    for _ in range(100):
        error = t_sf(t, df) - tail  # > 0: t is too small
        if error > 0:
            low = max(low, t)
        else:
            high = min(high, t)
        step = error / _t_pdf(t, df)
        if abs(step) < 1e-13 * max(1.0, abs(t)):
            return t + step
        candidate = t + step
        # Newton can overshoot in the heavy tails: fall back to bisection when it leaves the bracket.
        t = candidate if low < candidate < high else (low + high) / 2
        if high - low < 1e-15 * max(1.0, high):
            break
    return t


# ---------------------------------------------------------------------------------------------------------------
# Intervals


@dataclass(frozen=True)
class MeanCI:
    """Mean of n values with a two-sided Student-t interval (low, high); nan bounds when n < 2."""

    mean: float
    low: float
    high: float
    sd: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite numbers, got {array.tolist()}")
    return array


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1), e.g. 0.95")


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> MeanCI:
    """Mean ± t_{(1+confidence)/2, n-1} · sd / sqrt(n), with the sample sd (ddof=1).

    Args:
        values: (n,) one number per seed, n >= 1.
    Returns:
        MeanCI; low = high = nan when n == 1 (no spread to estimate).
    """
    _check_confidence(confidence)
    array = _as_array(values, "values")
    n = len(array)
    if n == 0:
        raise ValueError("values is empty: need at least one number")
    mean = float(array.mean())
    if n == 1:
        return MeanCI(mean, math.nan, math.nan, math.nan, 1)
    sd = float(array.std(ddof=1))
    half = t_ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, sd, n)


def paired_differences(arm: Sequence[float], reference: Sequence[float]) -> np.ndarray:
    """(n,) ``arm - reference`` seed by seed; both must list the same seeds in the same order."""
    a, b = _as_array(arm, "arm"), _as_array(reference, "reference")
    if a.shape != b.shape:
        raise ValueError(f"arm and reference must have one value per seed each, got {len(a)} and {len(b)}")
    return a - b


def bootstrap_ci(
    differences: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences`` (resampling seeds with replacement).

    Args:
        differences: (n,) paired differences, one per seed, n >= 1.
        resamples: bootstrap samples drawn from ``numpy.random.default_rng(seed)``.
    Returns:
        (low, high): the (1-confidence)/2 and (1+confidence)/2 quantiles (linear interpolation) of the
        resampled means. With few seeds the interval is too narrow (n = 3 has only 10 distinct resamples):
        read it together with the t interval and the permutation p-value.
    """
    _check_confidence(confidence)
    d = _as_array(differences, "differences")
    if len(d) == 0:
        raise ValueError("differences is empty: need at least one number")
    if resamples < 1:
        raise ValueError(f"resamples={resamples!r} must be >= 1")
    generator = np.random.default_rng(seed)
    indices = generator.integers(0, len(d), size=(resamples, len(d)))
    means = d[indices].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------------------------
# Tests and decisions


def sign_flip_p_value(
    differences: Sequence[float], exact_max_n: int = 16, resamples: int = 100_000, seed: int = 0
) -> float:
    """Two-sided paired permutation p-value of mean(differences) = 0, by flipping signs.

    Under the null (arm and reference exchangeable within each seed) every sign pattern of the differences is
    equally likely. p = fraction of patterns whose |mean| >= the observed |mean| (a relative tolerance of 1e-12
    counts float ties as ties). Exact over all 2^n patterns for n <= ``exact_max_n``, so the smallest possible
    p is 2 / 2^n (0.25 with 3 seeds, 0.0625 with 5); above, Monte Carlo with ``resamples`` patterns from
    ``numpy.random.default_rng(seed)`` and p = (hits + 1) / (resamples + 1).
    """
    d = _as_array(differences, "differences")
    n = len(d)
    if n == 0:
        raise ValueError("differences is empty: need at least one number")
    observed = abs(d.mean())
    threshold = observed * (1 - 1e-12) - 1e-300
    if n <= exact_max_n:
        # Row k of `signs` is the binary expansion of k mapped to ±1: all 2^n patterns exactly once.
        patterns = np.arange(2**n)[:, None] >> np.arange(n)[None, :] & 1
        means = np.abs((1 - 2 * patterns) @ d) / n
        return float(np.mean(means >= threshold))
    generator = np.random.default_rng(seed)
    signs = generator.choice(np.array([-1.0, 1.0]), size=(resamples, n))
    hits = int(np.sum(np.abs(signs @ d) / n >= threshold))
    return (hits + 1) / (resamples + 1)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control across arms); nan entries stay nan.

    Sorted ascending p_(1) <= ... <= p_(m): adjusted_(i) = max_{j <= i} min(1, (m - j + 1) · p_(j)), m the
    number of non-nan p-values. An arm "helps" at level alpha when its adjusted p < alpha.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or np.any((p[~np.isnan(p)] < 0) | (p[~np.isnan(p)] > 1)):
        raise ValueError(f"p_values must be a 1-D sequence of numbers in [0, 1] (or nan), got {p_values!r}")
    adjusted = np.full(len(p), math.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def verdict(
    delta_low: float,
    delta_high: float,
    p_adjusted: float,
    n: int,
    alpha: float = 0.05,
    higher_is_better: bool = True,
) -> str:
    """ "helps", "hurts" or "cannot tell with n seeds".

    A trick helps (hurts) when its Holm-adjusted p < alpha *and* the interval of the difference lies entirely
    on the better (worse) side of zero; anything else is not resolved by these seeds.

    Args:
        delta_low, delta_high: interval of (with trick) - (without trick).
        higher_is_better: False for losses.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha!r} must be in (0, 1)")
    if math.isnan(p_adjusted) or math.isnan(delta_low) or math.isnan(delta_high) or p_adjusted >= alpha:
        return f"cannot tell with {n} seeds"
    better_low, better_high = (delta_low, delta_high) if higher_is_better else (-delta_high, -delta_low)
    if better_low > 0:
        return "helps"
    if better_high < 0:
        return "hurts"
    return f"cannot tell with {n} seeds"


def seeds_needed(
    effect: float, sd: float, alpha: float = 0.05, power: float = 0.8, comparisons: int = 1
) -> int:
    """Seeds a paired comparison needs to resolve a true mean difference ``effect`` with difference sd ``sd``.

    Formula (paired t test, two-sided, Bonferroni-level alpha / comparisons as Holm's first step):
    the smallest n >= 2 with  n >= ((t_{1 - a/2, n-1} + t_{power, n-1}) · sd / effect)^2,  a = alpha/comparisons;
    and at least the n whose exact sign-flip test can reach p < a at all: 2 / 2^n < a.

    Args:
        effect: smallest difference of interest (metric units, e.g. 0.005 = 0.5 points of accuracy), != 0.
        sd: standard deviation of the per-seed paired differences (ddof=1), >= 0.
    """
    if not effect or not math.isfinite(effect):
        raise ValueError(f"effect={effect!r} must be a finite non-zero number")
    if not sd >= 0 or not math.isfinite(sd):
        raise ValueError(f"sd={sd!r} must be a finite number >= 0")
    if not 0 < alpha < 1 or not 0 < power < 1 or comparisons < 1:
        raise ValueError(
            f"need 0 < alpha < 1, 0 < power < 1, comparisons >= 1; got {alpha}, {power}, {comparisons}"
        )
    level = alpha / comparisons
    minimum = max(2, math.floor(math.log2(2 / level)) + 1)  # 2 / 2^n < level
    ratio = abs(sd / effect)
    normal = statistics.NormalDist()
    # The normal-quantile n is a lower bound (t quantiles are larger): start the search there.
    start = (normal.inv_cdf(1 - level / 2) + normal.inv_cdf(power)) ** 2 * ratio**2
    if start > 1_000_000:
        raise ValueError(f"effect={effect!r} is too small for sd={sd!r}: more than a million seeds")
    for n in range(max(2, math.floor(start)), 1_000_002):
        if n >= ((t_ppf(1 - level / 2, n - 1) + t_ppf(power, n - 1)) * ratio) ** 2:
            return max(n, minimum)
    raise ValueError(f"effect={effect!r} is too small for sd={sd!r}: more than a million seeds")
