"""trickbag.stats against scipy (t quantiles and intervals, permutation test, bootstrap) and hand-computed cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sp

from trickbag.stats import (
    bootstrap_ci,
    holm,
    mean_ci,
    paired_differences,
    seeds_needed,
    sign_flip_p_value,
    t_ppf,
    t_sf,
    verdict,
)

# ---------------------------------------------------------------------------------------------------------------
# t distribution


@pytest.mark.parametrize("p", [0.5001, 0.6, 0.8, 0.9, 0.95, 0.975, 0.99, 0.995, 0.9995, 0.025, 0.1])
def test_t_ppf_matches_scipy_for_df_1_to_200(p):
    for df in range(1, 201):
        expected = sp.t.ppf(p, df)
        assert t_ppf(p, df) == pytest.approx(expected, rel=1e-9, abs=1e-9), (p, df)


@pytest.mark.parametrize("df", [2.5, 7.3, 1000, 1e6])
def test_t_ppf_non_integer_and_large_df(df):
    for p in (0.8, 0.975, 0.999):
        assert t_ppf(p, df) == pytest.approx(sp.t.ppf(p, df), rel=1e-9)


def test_t_sf_matches_scipy():
    for df, t in itertools.product((1, 3, 10, 57), (-3.0, -0.2, 0.0, 0.7, 2.5, 40.0)):
        assert t_sf(t, df) == pytest.approx(sp.t.sf(t, df), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("p, df", [(0.0, 3), (1.0, 3), (-0.1, 3), (0.9, 0), (0.9, -2)])
def test_t_ppf_rejects_bad_arguments(p, df):
    with pytest.raises(ValueError, match="p=|df="):
        t_ppf(p, df)


# ---------------------------------------------------------------------------------------------------------------
# intervals


def test_mean_ci_matches_scipy_t_interval():
    rng = np.random.default_rng(1)
    for n in (2, 3, 5, 10, 31):
        values = rng.normal(0.9, 0.02, n)
        ci = mean_ci(values, confidence=0.95)
        low, high = sp.t.interval(0.95, n - 1, loc=values.mean(), scale=sp.sem(values))
        assert (ci.low, ci.high) == pytest.approx((low, high), rel=1e-10)
        assert ci.mean == pytest.approx(values.mean()) and ci.n == n
        assert ci.sd == pytest.approx(values.std(ddof=1))


def test_mean_ci_hand_case_and_edges():
    # [1, 2, 3]: mean 2, sd 1, t_{0.975,2} = 0.95 / sqrt(2 * 0.975 * 0.025) = 4.3026527297494639 (exact)
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.half_width == pytest.approx(4.3026527297494639 / math.sqrt(3), rel=1e-12)
    single = mean_ci([0.5])
    assert single.mean == 0.5 and math.isnan(single.low) and math.isnan(single.high)
    same = mean_ci([0.7, 0.7, 0.7])
    assert same.low == pytest.approx(0.7) and same.high == pytest.approx(0.7)
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="finite"):
        mean_ci([1.0, math.nan])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=95)


def test_paired_differences_checks_lengths():
    assert paired_differences([3.0, 5.0], [1.0, 1.5]).tolist() == [2.0, 3.5]
    with pytest.raises(ValueError, match="one value per seed"):
        paired_differences([1.0, 2.0], [1.0])


def test_bootstrap_ci_is_the_percentile_interval_of_resampled_means():
    d = np.array([0.01, -0.004, 0.02, 0.007, 0.0])
    low, high = bootstrap_ci(d, resamples=2000, seed=3)
    # Same draws by a naive loop, then scipy's percentile as the quantile reference.
    rng = np.random.default_rng(3)
    indices = rng.integers(0, len(d), size=(2000, len(d)))
    means = [float(np.mean([d[i] for i in row])) for row in indices]
    assert low == pytest.approx(np.percentile(means, 2.5))
    assert high == pytest.approx(np.percentile(means, 97.5))
    # and close to scipy.stats.bootstrap's percentile interval (different random draws)
    ref = sp.bootstrap((d,), np.mean, method="percentile", n_resamples=20000, random_state=0)
    assert low == pytest.approx(ref.confidence_interval.low, abs=2e-3)
    assert high == pytest.approx(ref.confidence_interval.high, abs=2e-3)
    assert bootstrap_ci(d, seed=3) == bootstrap_ci(d, seed=3)  # seeded: reproducible


def test_bootstrap_ci_edges():
    assert bootstrap_ci([0.02, 0.02, 0.02]) == pytest.approx((0.02, 0.02))
    assert bootstrap_ci([0.5]) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci([1.0, 2.0], resamples=0)


# ---------------------------------------------------------------------------------------------------------------
# permutation test, Holm, verdict, seeds needed


@pytest.mark.parametrize(
    "d",
    [
        [0.01, 0.02, 0.015],
        [0.01, -0.02, 0.015, 0.003],
        [0.5, 0.2, -0.1, 0.3, 0.25, 0.4],
        [1.0, 1.0, -1.0, 1.0, 1.0],  # ties in |mean| across patterns
        [0.0, 0.0, 0.0],
        [0.003, -0.001, 0.004, 0.002, 0.006, 0.001, 0.002, 0.005],
    ],
)
def test_sign_flip_exact_matches_scipy_permutation_test(d):
    expected = sp.permutation_test(
        (np.array(d),), np.mean, permutation_type="samples", alternative="two-sided", n_resamples=np.inf
    ).pvalue
    assert sign_flip_p_value(d) == pytest.approx(expected, rel=1e-12)


def test_sign_flip_hand_cases():
    # All three differences positive: only the all-plus and all-minus patterns reach |mean| -> 2/8.
    assert sign_flip_p_value([0.01, 0.02, 0.03]) == pytest.approx(0.25)
    # Opposite equal differences: mean 0, every pattern is as extreme.
    assert sign_flip_p_value([0.1, -0.1]) == 1.0


def test_sign_flip_monte_carlo_above_exact_limit():
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 1.0, 20)
    exact = sign_flip_p_value(d, exact_max_n=20)  # 2^20 patterns, still fast
    approx = sign_flip_p_value(d, exact_max_n=16, resamples=200_000, seed=1)
    assert approx == pytest.approx(exact, abs=0.005)
    assert approx == sign_flip_p_value(d, exact_max_n=16, resamples=200_000, seed=1)


def test_holm_by_hand():
    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, max(0.06, 0.06)=0.06, max(0.06, 0.5)=0.5
    assert holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    # monotone step-down and capped at 1
    assert holm([0.4, 0.3]) == pytest.approx([0.6, 0.6])
    assert holm([0.9, 0.8, 0.7]) == pytest.approx([1.0, 1.0, 1.0])
    adjusted = holm([0.01, math.nan, 0.04])
    assert (
        adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    )
    assert holm([]) == []
    with pytest.raises(ValueError, match="p_values"):
        holm([1.5])


def test_verdict():
    assert verdict(0.01, 0.03, 0.01, 8) == "helps"
    assert verdict(-0.03, -0.01, 0.01, 8) == "hurts"
    assert verdict(-0.01, 0.03, 0.01, 8) == "cannot tell with 8 seeds"
    assert verdict(0.01, 0.03, 0.2, 3) == "cannot tell with 3 seeds"
    assert verdict(-0.3, -0.1, 0.01, 8, higher_is_better=False) == "helps"  # lower loss
    assert verdict(math.nan, math.nan, math.nan, 1) == "cannot tell with 1 seeds"
    with pytest.raises(ValueError, match="alpha"):
        verdict(0.0, 1.0, 0.01, 5, alpha=5)


def test_seeds_needed_matches_a_direct_t_power_search():
    for effect, sd in ((0.005, 0.004), (0.01, 0.02), (0.002, 0.001), (1.0, 3.0)):
        n = 2
        while n < ((sp.t.ppf(0.975, n - 1) + sp.t.ppf(0.8, n - 1)) * sd / effect) ** 2:
            n += 1
        assert seeds_needed(effect, sd) == max(n, 6)  # 2/2^6 < 0.05 is the sign-flip floor
    assert seeds_needed(0.01, 0.0) == 6
    assert seeds_needed(0.01, 0.0, comparisons=4) == 8  # 2/2^8 < 0.0125
    with pytest.raises(ValueError, match="effect"):
        seeds_needed(0.0, 0.1)
    with pytest.raises(ValueError, match="sd"):
        seeds_needed(0.1, -1.0)
