"""Metrics that tell you which number to trust: classification, regression, ranking, and dataset advice.

Everything here is exact and streaming-safe: functions and classes share ``_x_update`` (sufficient statistics
as plain tensors) and ``_x_compute`` (the reduction), checked against scikit-learn.
"""

from trickbag.metrics._checks import UndefinedMetricWarning
from trickbag.metrics.advice import Advice, advise
from trickbag.metrics.classification import (
    ClassificationMetrics,
    accuracy,
    confusion_matrix,
    f1_score,
    precision,
    recall,
    roc_auc,
)
from trickbag.metrics.plots import plot_confusion_matrix
from trickbag.metrics.ranking import map_at_k, mrr, ndcg, ranking_from_flat, recall_at_k
from trickbag.metrics.regression import (
    RegressionMetrics,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    root_mean_squared_error,
)

__all__ = [
    "UndefinedMetricWarning",
    "ClassificationMetrics",
    "accuracy",
    "confusion_matrix",
    "f1_score",
    "precision",
    "recall",
    "roc_auc",
    "RegressionMetrics",
    "mean_absolute_error",
    "mean_squared_error",
    "r2_score",
    "root_mean_squared_error",
    "map_at_k",
    "mrr",
    "ndcg",
    "ranking_from_flat",
    "recall_at_k",
    "Advice",
    "advise",
    "plot_confusion_matrix",
]
