"""Regression metrics MAE, MSE, RMSE and R², equal to scikit-learn's, as functions and a streaming class.

Sufficient statistics are float64 sums per output (count, sum |e|, sum e², sum y', sum y'², with
y' = y - shift), so batches add up exactly and the state can be summed across data-parallel ranks (give every
rank the same ``shift``). R² uses SS_tot = sum y'² - (sum y')² / n; the shift (by default the first target
seen) keeps that free of cancellation when the targets' offset is large against their spread, and makes a
constant target give SS_tot = 0 exactly.

Multi-output targets (N, D) are averaged uniformly over outputs, as sklearn's ``multioutput="uniform_average"``.
R² of a constant target follows sklearn (``force_finite=True``): 1.0 for a perfect prediction, else 0.0.
"""

from __future__ import annotations

import torch

__all__ = [
    "mean_absolute_error",
    "mean_squared_error",
    "root_mean_squared_error",
    "r2_score",
    "RegressionMetrics",
]


def _check_pair(preds: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, value in (("preds", preds), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.ndim not in (1, 2):
            raise ValueError(f"{name} must be (N,) or (N, D), got shape {tuple(value.shape)}")
    if preds.shape != target.shape:
        raise ValueError(f"preds shape {tuple(preds.shape)} != target shape {tuple(target.shape)}")
    preds, target = preds.double(), target.double()
    return (preds[:, None], target[:, None]) if preds.ndim == 1 else (preds, target)


def _regression_update(preds: torch.Tensor, target: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(5, D) float64 sums: count, sum |error|, sum error², sum (target - shift), sum (target - shift)²."""
    error = preds - target
    centred = target - shift
    count = torch.full_like(target[0], target.shape[0])
    return torch.stack(
        [count, error.abs().sum(0), error.square().sum(0), centred.sum(0), centred.square().sum(0)]
    )


def _regression_compute(state: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-output (D,) MAE, MSE, RMSE, R² from the summed statistics (nan when no sample)."""
    count, abs_sum, sq_sum, y_sum, y_sq_sum = state
    count = torch.where(count > 0, count, torch.full_like(count, float("nan")))
    mse = sq_sum / count
    ss_tot = (y_sq_sum - y_sum.square() / count).clamp_min(0)
    # sklearn force_finite: a constant target scores 1 if predicted perfectly, else 0
    r2 = torch.where(ss_tot > 0, 1 - sq_sum / ss_tot.clamp_min(1e-300), (sq_sum == 0).double())
    r2 = torch.where(torch.isnan(count), count, r2)
    return {"mae": abs_sum / count, "mse": mse, "rmse": mse.sqrt(), "r2": r2}


def _reduce(per_output: torch.Tensor, multioutput: str) -> float | torch.Tensor:
    if multioutput == "raw_values":
        return per_output
    if multioutput != "uniform_average":
        raise ValueError(f"multioutput={multioutput!r} not in ('uniform_average', 'raw_values')")
    return float(per_output.mean())


def _metric(name: str, preds, target, multioutput: str):
    if multioutput not in ("uniform_average", "raw_values"):
        raise ValueError(f"multioutput={multioutput!r} not in ('uniform_average', 'raw_values')")
    preds, target = _check_pair(preds, target)
    if preds.shape[0] == 0:
        raise ValueError(f"{name} needs at least one sample, got preds of shape {tuple(preds.shape)}")
    state = _regression_update(preds, target, target[0])
    return _reduce(_regression_compute(state)[name], multioutput)


def mean_absolute_error(preds: torch.Tensor, target: torch.Tensor, *, multioutput: str = "uniform_average"):
    """Mean |preds - target|. preds, target: (N,) or (N, D) float. Returns float, or (D,) for "raw_values"."""
    return _metric("mae", preds, target, multioutput)


def mean_squared_error(preds: torch.Tensor, target: torch.Tensor, *, multioutput: str = "uniform_average"):
    """Mean (preds - target)². Shapes as :func:`mean_absolute_error`."""
    return _metric("mse", preds, target, multioutput)


def root_mean_squared_error(
    preds: torch.Tensor, target: torch.Tensor, *, multioutput: str = "uniform_average"
):
    """sqrt(MSE) per output, then averaged (as ``sklearn.metrics.root_mean_squared_error``)."""
    return _metric("rmse", preds, target, multioutput)


def r2_score(preds: torch.Tensor, target: torch.Tensor, *, multioutput: str = "uniform_average"):
    """Coefficient of determination 1 - SS_res / SS_tot (constant target: 1.0 if perfect else 0.0)."""
    return _metric("r2", preds, target, multioutput)


class RegressionMetrics:
    """Streaming MAE, MSE, RMSE and R² over batches; exact (sums, not averages of batch averages).

    Args:
        num_outputs: D, the number of regression targets per sample (1 for (N,) inputs).
        shift: (D,) value subtracted from targets before summing (numerical care for R² only; any value
            gives the same metrics up to rounding). Default: the first target row seen. Set it when
            summing states across ranks.
    """

    def __init__(self, num_outputs: int = 1, *, shift: torch.Tensor | float | None = None) -> None:
        if not isinstance(num_outputs, int) or isinstance(num_outputs, bool) or num_outputs < 1:
            raise ValueError(f"num_outputs={num_outputs!r} must be a positive int")
        self.num_outputs = num_outputs
        self._given_shift = (
            None if shift is None else torch.as_tensor(shift, dtype=torch.float64).expand(num_outputs)
        )
        self.reset()

    def reset(self) -> None:
        self._state = torch.zeros(5, self.num_outputs, dtype=torch.float64)
        self._shift = self._given_shift

    @torch.no_grad()
    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: preds and target (N,) or (N, D) float."""
        preds, target = _check_pair(preds, target)
        if preds.shape[1] != self.num_outputs:
            raise ValueError(f"got {preds.shape[1]} outputs per sample but num_outputs={self.num_outputs}")
        if preds.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = target[0].clone()
        self._shift = self._shift.to(preds.device)
        self._state = self._state.to(preds.device) + _regression_update(preds, target, self._shift)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """(5, D) float64 sums (sum them across ranks before :meth:`compute`) and the (D,) shift."""
        shift = self._shift if self._shift is not None else torch.zeros(self.num_outputs, dtype=torch.float64)
        return {"sums": self._state, "shift": shift}

    def compute(self) -> dict[str, float]:
        """{"mae", "mse", "rmse", "r2"}, averaged uniformly over outputs. Raises ValueError before any sample."""
        if float(self._state[0, 0]) == 0:
            raise ValueError("RegressionMetrics.compute() needs at least one sample: call update() first")
        return {name: float(value.mean()) for name, value in _regression_compute(self._state).items()}
