"""Regression metrics against scikit-learn."""

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trickbag.metrics import (
    RegressionMetrics,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    root_mean_squared_error,
)

PAIRS = {
    "mae": (mean_absolute_error, skm.mean_absolute_error),
    "mse": (mean_squared_error, skm.mean_squared_error),
    "rmse": (root_mean_squared_error, skm.root_mean_squared_error),
    "r2": (r2_score, skm.r2_score),
}


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 50),
    d=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    offset=st.sampled_from([0.0, 1e4]),
)
def test_functions_equal_sklearn(n, d, seed, offset):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(n, d, generator=gen, dtype=torch.float64) + offset
    preds = target + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    for name, (ours, ref) in PAIRS.items():
        for multioutput in ("uniform_average", "raw_values"):
            expected = ref(target.numpy(), preds.numpy(), multioutput=multioutput)
            got = ours(preds, target, multioutput=multioutput)
            np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-9, atol=1e-9, err_msg=name)


def test_one_dimensional_and_n1_and_float16():
    preds, target = torch.tensor([2.5, 0.0, 2.0, 8.0]), torch.tensor([3.0, -0.5, 2.0, 7.0])
    for name, (ours, ref) in PAIRS.items():
        assert ours(preds, target) == pytest.approx(ref(target.numpy(), preds.numpy()), abs=1e-7), name
    half_p, half_t = preds.half(), target.half()
    assert mean_squared_error(half_p, half_t) == pytest.approx(
        skm.mean_squared_error(half_t.float(), half_p.float())
    )
    assert mean_absolute_error(torch.tensor([1.0]), torch.tensor([3.0])) == 2.0


def test_r2_constant_target_follows_sklearn_force_finite():
    target = torch.full((5,), 0.1, dtype=torch.float64)
    assert r2_score(target.clone(), target) == 1.0 == skm.r2_score(target.numpy(), target.numpy())
    preds = target + torch.tensor([0.0, 0.1, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert r2_score(preds, target) == 0.0 == skm.r2_score(target.numpy(), preds.numpy())
    assert r2_score(torch.tensor([1.0]), torch.tensor([2.0])) == 0.0  # N=1: constant target


def test_streaming_uneven_batches_equals_one_shot():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(101, 2, generator=gen) * 3 + 1000
    preds = target + torch.randn(101, 2, generator=gen)
    metrics = RegressionMetrics(2)
    for start, stop in [(0, 1), (1, 1), (1, 50), (50, 63), (63, 101)]:
        metrics.update(preds[start:stop], target[start:stop])
    result = metrics.compute()
    for name, (_, ref) in PAIRS.items():
        assert result[name] == pytest.approx(
            ref(target.double().numpy(), preds.double().numpy()), rel=1e-9
        ), name
    state = metrics.state_tensors()
    assert state["sums"].shape == (5, 2) and state["sums"].dtype == torch.float64
    metrics.reset()
    with pytest.raises(ValueError, match="needs at least one sample"):
        metrics.compute()


def test_shift_does_not_change_result():
    target = torch.tensor([1.0, 2.0, 4.0])
    preds = torch.tensor([1.5, 2.0, 3.0])
    a, b = RegressionMetrics(), RegressionMetrics(shift=-7.0)
    a.update(preds, target)
    b.update(preds, target)
    assert a.compute() == pytest.approx(b.compute())


def test_validation():
    with pytest.raises(ValueError, match="preds shape \\(3,\\) != target shape \\(2,\\)"):
        mean_squared_error(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="preds must be \\(N,\\) or \\(N, D\\)"):
        r2_score(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2))
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        r2_score(torch.zeros(2), [0.0, 1.0])
    with pytest.raises(ValueError, match="multioutput='variance_weighted' not in"):
        r2_score(torch.zeros(2), torch.zeros(2), multioutput="variance_weighted")
    with pytest.raises(ValueError, match="mae needs at least one sample"):
        mean_absolute_error(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="num_outputs=0 must be a positive int"):
        RegressionMetrics(0)
    with pytest.raises(ValueError, match="got 2 outputs per sample but num_outputs=1"):
        RegressionMetrics().update(torch.zeros(3, 2), torch.zeros(3, 2))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 60), seed=st.integers(0, 2**31 - 1), cuts=st.lists(st.integers(0, 60), max_size=4))
def test_streaming_random_splits_equal_sklearn(n, seed, cuts):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(n, generator=gen, dtype=torch.float64) * 5 - 3
    preds = target + torch.randn(n, generator=gen, dtype=torch.float64)
    metrics = RegressionMetrics()
    bounds = [0, *sorted(min(cut, n) for cut in cuts), n]
    for start, stop in zip(bounds, bounds[1:]):
        metrics.update(preds[start:stop], target[start:stop])
    result = metrics.compute()
    for name, (_, ref) in PAIRS.items():
        assert result[name] == pytest.approx(ref(target.numpy(), preds.numpy()), rel=1e-9, abs=1e-12), name
