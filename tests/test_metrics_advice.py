"""advise(): class balance -> which metric to trust; plot_confusion_matrix writes a PNG."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from trickbag.metrics import Advice, advise, plot_confusion_matrix


def test_balanced_leads_with_accuracy():
    advice = advise([0, 1, 2, 0, 1, 2, 2], class_names=["a", "b", "c"])
    assert isinstance(advice, Advice)
    assert advice.counts == {"a": 2, "b": 2, "c": 3}
    assert advice.imbalance_ratio == pytest.approx(1.5)
    assert advice.majority_baseline_accuracy == pytest.approx(3 / 7)
    assert (advice.is_imbalanced, advice.best_metric, advice.recommend_class_weights) == (
        False,
        "accuracy",
        False,
    )
    assert "lead with accuracy" in advice.render()


def test_imbalanced_thresholds_at_3_and_10():
    just_below = advise({"x": 299, "y": 100})
    assert not just_below.is_imbalanced
    at_three = advise({"x": 300, "y": 100})
    assert (
        at_three.is_imbalanced and at_three.best_metric == "macro_f1" and not at_three.recommend_class_weights
    )
    text = at_three.render()
    assert "macro-F1" in text and "Accuracy is misleading" in text and "75.0%" in text
    at_ten = advise(Counter({"x": 1000, "y": 100, "z": 400}))
    assert at_ten.recommend_class_weights and "effective_number" in at_ten.render()
    assert at_ten.imbalance_ratio == 10.0
    assert at_ten.majority_baseline_accuracy == pytest.approx(1000 / 1500)


def test_inputs_tensor_numpy_strings_and_absent_class():
    expected = {"0": 3, "1": 1}
    assert advise(torch.tensor([0, 0, 1, 0])).counts == expected
    assert advise(np.array([0, 0, 1, 0])).counts == expected
    assert advise(["cat", "dog", "cat"]).counts == {"cat": 2, "dog": 1}
    advice = advise([0, 0, 1], class_names=["a", "b", "never"])
    assert advice.counts == {"a": 2, "b": 1, "never": 0}
    assert advice.imbalance_ratio == 2.0  # over classes that have examples
    assert "Classes with no example: never" in advice.render()


def test_one_class_and_empty():
    advice = advise([3, 3, 3])
    assert advice.imbalance_ratio == 1.0 and advice.majority_baseline_accuracy == 1.0
    assert "Only one class" in advice.render()
    with pytest.raises(ValueError, match="no examples to advise on"):
        advise([])
    with pytest.raises(ValueError, match="no examples to advise on"):
        advise({"a": 0})


def test_validation():
    with pytest.raises(ValueError, match="integer labels must be >= 0, got -1"):
        advise([0, -1])
    with pytest.raises(ValueError, match="label 2 has no name"):
        advise([0, 2], class_names=["a", "b"])
    with pytest.raises(ValueError, match="count for class 'a' must be an int >= 0"):
        advise({"a": -3})
    with pytest.raises(ValueError, match="not in class_names"):
        advise({"z": 3}, class_names=["a"])
    with pytest.raises(ValueError, match="not in class_names"):
        advise(["z"], class_names=["a"])
    with pytest.raises(TypeError, match="labels_or_counts must be a sequence"):
        advise(42)
    with pytest.raises(TypeError, match="all ints or all strings"):
        advise([0, "a"])
    with pytest.raises(ValueError, match="labels must be 1-D"):
        advise(torch.zeros(2, 2, dtype=torch.long))


def test_plot_confusion_matrix_writes_png(tmp_path):
    cm = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    path = plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "sub" / "cm.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height
    with pytest.raises(ValueError, match="class_names has 2 names but cm is 3x3"):
        plot_confusion_matrix(cm, ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="cm must be a square"):
        plot_confusion_matrix([[1, 2, 3]], ["a"], tmp_path / "x.png")


def test_equal_counts_are_stated_once_not_as_largest_and_smallest():
    advice = advise({"a": 7, "b": 7, "c": 7})
    assert advice.imbalance_ratio == 1.0
    text = " ".join(advice.lines)
    assert "21 examples in 3 classes, 7 each" in text
    assert "largest" not in text
