"""per_class_scores against sklearn; draw_confusion_matrix draws what it is given on any Axes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support

from trickbag.metrics.classification import ClassificationMetrics, per_class_scores
from trickbag.metrics.plots import ANNOTATE_MAX_CLASSES, draw_confusion_matrix


def _labels(seed: int, n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, num_classes - 1, n)  # the last class is never a true label: support 0
    preds = np.where(rng.random(n) < 0.6, target, rng.integers(0, num_classes, n))
    preds[preds == 1] = 2  # class 1 is never predicted: precision 0/0
    return target, preds


@pytest.mark.parametrize("zero_division", [0.0, 1.0, math.nan])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_scores_match_sklearn(seed, zero_division):
    num_classes = 5
    target, preds = _labels(seed, 200, num_classes)
    confusion = sk_confusion_matrix(target, preds, labels=range(num_classes))
    expected = precision_recall_fscore_support(
        target, preds, labels=range(num_classes), average=None, zero_division=zero_division
    )
    rows = per_class_scores(confusion, ["a", "b", "c", "d", "e"], zero_division=zero_division)
    assert [row["class"] for row in rows] == ["a", "b", "c", "d", "e"]
    for key, reference in zip(("precision", "recall", "f1", "support"), expected):
        np.testing.assert_allclose([row[key] for row in rows], reference, rtol=1e-12, equal_nan=True)


def test_per_class_scores_takes_lists_tensors_and_default_names():
    confusion = [[3, 1], [0, 0]]  # class 1: no true and no predicted sample
    rows = per_class_scores(confusion)
    assert [row["class"] for row in rows] == ["0", "1"]
    assert rows[0] == {"class": "0", "support": 4, "precision": 1.0, "recall": 0.75, "f1": 6 / 7}
    assert rows[1]["f1"] == 0.0 and rows[1]["support"] == 0
    assert per_class_scores(torch.tensor(confusion)) == rows == per_class_scores(np.array(confusion))


def test_classification_metrics_per_class_is_per_class_scores():
    target, preds = _labels(3, 100, 4)
    metrics = ClassificationMetrics(4, class_names=list("wxyz"), zero_division=0.0)
    metrics.update(torch.from_numpy(preds), torch.from_numpy(target))
    assert metrics.per_class() == per_class_scores(metrics.confusion_matrix(), list("wxyz"))


@pytest.mark.parametrize(
    "confusion, names, message",
    [
        ([[1, 2, 3]], None, "square"),
        ([], None, "square"),
        ([[1.5, 0], [0, 1]], None, "integer counts"),
        ([[1, -1], [0, 1]], None, "non-negative"),
        ([[1, 0], [0, 1]], ["a"], "class_names has 1 names"),
    ],
)
def test_per_class_scores_rejects_bad_input(confusion, names, message):
    with pytest.raises(ValueError, match=message):
        per_class_scores(confusion, names)


def _figure():
    from matplotlib.figure import Figure

    return Figure()


@pytest.mark.parametrize("normalize", [False, True])
def test_draw_confusion_matrix_shows_counts_or_recall(normalize):
    target, preds = _labels(4, 60, 4)
    confusion = sk_confusion_matrix(target, preds, labels=range(4))
    axes = _figure().subplots()
    image = draw_confusion_matrix(axes, torch.from_numpy(confusion), list("abcd"), normalize=normalize)
    shown = np.asarray(image.get_array())
    if normalize:  # sklearn's normalize="true" divides rows; its empty rows are nan, ours 0
        reference = np.nan_to_num(
            sk_confusion_matrix(target, preds, labels=range(4), normalize="true"), nan=0.0
        )
        np.testing.assert_allclose(shown, reference)
        assert axes.get_title() == "row-normalised (recall on the diagonal)"
    else:
        np.testing.assert_array_equal(shown, confusion)
        assert axes.get_title() == "counts"
    assert [t.get_text() for t in axes.get_xticklabels()] == list("abcd")
    assert [t.get_text() for t in axes.get_yticklabels()] == list("abcd")
    assert len(axes.texts) == 16
    expected_cell = f"{shown[1, 2]:.2f}" if normalize else str(confusion[1, 2])
    assert axes.texts[1 * 4 + 2].get_text() == expected_cell


def test_draw_confusion_matrix_title_many_classes_and_errors():
    size = ANNOTATE_MAX_CLASSES + 1
    axes = _figure().subplots()
    draw_confusion_matrix(axes, np.eye(size, dtype=int), [str(i) for i in range(size)], title="epoch 3")
    assert axes.get_title() == "epoch 3" and len(axes.texts) == 0  # too many classes to number the cells
    with pytest.raises(ValueError, match="class_names has 2 names"):
        draw_confusion_matrix(axes, [[1, 0, 0]] * 3, ["a", "b"])
