"""Classification metrics against scikit-learn on random and adversarial inputs."""

import math
import warnings

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trickbag.metrics import (
    ClassificationMetrics,
    UndefinedMetricWarning,
    accuracy,
    confusion_matrix,
    f1_score,
    precision,
    recall,
    roc_auc,
)

SK_PRF = {"precision": skm.precision_score, "recall": skm.recall_score, "f1": skm.f1_score}
OURS_PRF = {"precision": precision, "recall": recall, "f1": f1_score}


def _close(ours, ref):
    ours = np.asarray(ours.numpy() if isinstance(ours, torch.Tensor) else ours, dtype=float)
    np.testing.assert_allclose(ours, np.asarray(ref, dtype=float), rtol=0, atol=1e-12, equal_nan=True)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


CASES = {
    "random": (torch.tensor([0, 1, 2, 2, 1, 0, 3, 3, 1]), torch.tensor([0, 2, 2, 1, 1, 0, 3, 0, 1])),
    "never_predicted": (torch.tensor([0, 0, 1, 1, 0]), torch.tensor([0, 2, 1, 2, 0])),
    "never_present": (torch.tensor([0, 2, 1, 2, 0]), torch.tensor([0, 0, 1, 1, 0])),
    "one_class": (torch.tensor([1, 1, 1]), torch.tensor([1, 1, 1])),
    "all_correct": (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])),
    "all_wrong": (torch.tensor([1, 2, 3, 0]), torch.tensor([0, 1, 2, 3])),
    "n1": (torch.tensor([2]), torch.tensor([0])),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("metric", ["precision", "recall", "f1"])
@pytest.mark.parametrize("average", ["micro", "macro", "weighted", None])
@pytest.mark.parametrize("zero_division", [0, 1, float("nan"), "warn"])
@pytest.mark.parametrize("labels", [None, [0, 1, 2, 3, 4]])
def test_prf_equals_sklearn(case, metric, average, zero_division, labels):
    preds, target = CASES[case]
    ref = _quiet(
        SK_PRF[metric],
        target.numpy(),
        preds.numpy(),
        average=average,
        labels=labels,
        zero_division=zero_division,
    )
    ours = _quiet(
        OURS_PRF[metric],
        preds,
        target,
        average=average,
        labels=labels,
        zero_division=zero_division,
        num_classes=5,
    )
    _close(ours, ref)


@pytest.mark.parametrize("metric", ["precision", "recall", "f1"])
def test_warns_exactly_where_sklearn_warns(metric):
    for preds, target in CASES.values():
        for labels in (None, [0, 1, 2, 3, 4]):
            with warnings.catch_warnings(record=True) as ref_w:
                warnings.simplefilter("always")
                SK_PRF[metric](target.numpy(), preds.numpy(), average="macro", labels=labels)
            with warnings.catch_warnings(record=True) as our_w:
                warnings.simplefilter("always")
                OURS_PRF[metric](preds, target, average="macro", labels=labels, num_classes=5)
            ref_msgs = [
                str(w.message)
                for w in ref_w
                if issubclass(w.category, skm._classification.UndefinedMetricWarning)
            ]
            our_msgs = [str(w.message) for w in our_w if issubclass(w.category, UndefinedMetricWarning)]
            assert our_msgs == ref_msgs


def test_zero_division_one_and_warning_class():
    preds, target = torch.tensor([0, 0]), torch.tensor([0, 1])
    with pytest.warns(UndefinedMetricWarning, match="Precision is ill-defined"):
        assert precision(preds, target, average=None)[1] == 0.0
    assert precision(preds, target, average=None, zero_division=1)[1] == 1.0


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    c=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    average=st.sampled_from(["micro", "macro", "weighted", None]),
)
def test_prf_random_scores_equal_sklearn(n, c, seed, average):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, c, generator=gen)
    target = torch.randint(0, c, (n,), generator=gen)
    pred_labels = scores.argmax(1).numpy()
    for name in SK_PRF:
        ref = _quiet(SK_PRF[name], target.numpy(), pred_labels, average=average, zero_division=0)
        _close(OURS_PRF[name](scores, target, average=average, zero_division=0), ref)
    _close(accuracy(scores, target), skm.accuracy_score(target.numpy(), pred_labels))
    _close(
        confusion_matrix(scores, target), skm.confusion_matrix(target.numpy(), pred_labels, labels=range(c))
    )


def test_confusion_matrix_rows_true_cols_pred():
    cm = confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 0]), num_classes=3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]


def test_top_k_accuracy_equals_sklearn_without_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 7, generator=gen)
    target = torch.randint(0, 7, (200,), generator=gen)
    for k in (1, 2, 5, 7):
        ref = skm.top_k_accuracy_score(target.numpy(), scores.numpy(), k=k, labels=range(7))
        assert accuracy(scores, target, top_k=k) == pytest.approx(ref, abs=1e-12)


def test_top_k_ties_broken_by_lower_index_like_argmax():
    scores = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [1.0, 1.0, 1.0]])
    target = torch.tensor([0, 1, 2])
    # argmax picks class 0 on ties: only row 0 is a top-1 hit; row 1 is 2nd, row 2 is 3rd
    assert accuracy(scores, target) == pytest.approx(1 / 3)
    assert accuracy(scores, target, top_k=2) == pytest.approx(2 / 3)
    assert accuracy(scores, target, top_k=3) == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_scores(dtype):
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(64, 5, generator=gen).to(dtype)
    target = torch.randint(0, 5, (64,), generator=gen)
    ref_scores = scores.float().numpy()
    _close(
        f1_score(scores, target, zero_division=0),
        skm.f1_score(target, ref_scores.argmax(1), average="macro", zero_division=0),
    )
    _close(
        roc_auc(scores, target),
        skm.roc_auc_score(target, ref_scores, multi_class="ovr", labels=range(5))
        if False
        else _sk_ovr(ref_scores, target.numpy()),
    )


def _sk_ovr(scores, target, average="macro"):
    """sklearn one-vs-rest without its 'rows sum to 1' check: the binary AUC per column."""
    per = []
    for c in range(scores.shape[1]):
        per.append(_quiet(skm.roc_auc_score, (target == c).astype(int), scores[:, c]))
    per = np.array(per)
    if average is None:
        return per
    if average == "macro":
        return per.mean()
    support = np.bincount(target, minlength=scores.shape[1])
    keep = support > 0
    return (per[keep] * support[keep]).sum() / support[keep].sum()


def test_roc_auc_multiclass_probabilities_equal_sklearn():
    gen = torch.Generator().manual_seed(2)
    probs = torch.randn(300, 4, generator=gen).softmax(1).double()
    target = torch.randint(0, 4, (300,), generator=gen)
    for average in ("macro", "weighted", None):
        ref = skm.roc_auc_score(target.numpy(), probs.numpy(), multi_class="ovr", average=average)
        _close(roc_auc(probs, target, average=average), ref)


def test_roc_auc_ties_equal_sklearn():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (500, 3), generator=gen).float() / 4  # heavy ties
    target = torch.randint(0, 3, (500,), generator=gen)
    for average in ("macro", "weighted", None):
        _close(roc_auc(scores, target, average=average), _sk_ovr(scores.numpy(), target.numpy(), average))
    binary = torch.tensor([0.1, 0.4, 0.4, 0.4, 0.8, 0.8])
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    _close(roc_auc(binary, y), skm.roc_auc_score(y.numpy(), binary.numpy()))


def test_roc_auc_logits_not_squashed():
    """AUC is rank based per column: sigmoid keeps it, softmax (which mixes columns) does not."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(100, 3, generator=gen).double()
    target = torch.randint(0, 3, (100,), generator=gen)
    _close(roc_auc(logits, target, average=None), _sk_ovr(logits.numpy(), target.numpy(), None))
    _close(roc_auc(logits.sigmoid(), target, average=None), roc_auc(logits, target, average=None))
    assert roc_auc(logits.softmax(1), target) != pytest.approx(roc_auc(logits, target), abs=1e-9)


def test_roc_auc_absent_class_matches_sklearn_with_labels():
    gen = torch.Generator().manual_seed(5)
    probs = torch.randn(40, 3, generator=gen).softmax(1).double()
    target = torch.randint(0, 2, (40,), generator=gen)  # class 2 never present
    for average in ("macro", "weighted", None):
        with pytest.warns(UndefinedMetricWarning, match="Only one class"):
            ours = roc_auc(probs, target, average=average)
        ref = _quiet(
            skm.roc_auc_score,
            target.numpy(),
            probs.numpy(),
            multi_class="ovr",
            labels=[0, 1, 2],
            average=average,
        )
        _close(ours, ref)
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(roc_auc(torch.tensor([0.2, 0.3]), torch.tensor([1, 1])))


def test_validation_errors():
    with pytest.raises(ValueError, match="average='mean' not in"):
        f1_score(torch.tensor([0]), torch.tensor([0]), average="mean")
    with pytest.raises(ValueError, match="zero_division=2 not allowed"):
        precision(torch.tensor([0]), torch.tensor([0]), zero_division=2)
    with pytest.raises(ValueError, match="preds has 2 samples but target has 3"):
        recall(torch.tensor([0, 1]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"target holds labels in \[0, 5\], allowed are 0..2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 5]), num_classes=3)
    with pytest.raises(ValueError, match="preds must be \\(N,\\) labels or \\(N, C\\) scores"):
        accuracy(torch.zeros(2, 2, 2), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="must hold integer labels"):
        accuracy(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target must be \\(N,\\) integer labels"):
        accuracy(torch.tensor([0, 1]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="top_k=0 must be an int >= 1"):
        accuracy(torch.zeros(2, 3), torch.tensor([0, 1]), top_k=0)
    with pytest.raises(ValueError, match="top_k=2 needs \\(N, C\\) scores"):
        accuracy(torch.tensor([0, 1]), torch.tensor([0, 1]), top_k=2)
    with pytest.raises(ValueError, match="labels=\\[\\] is empty"):
        f1_score(torch.tensor([0]), torch.tensor([0]), labels=[])
    with pytest.raises(ValueError, match="num_classes=0 must be a positive int"):
        f1_score(torch.tensor([0]), torch.tensor([0]), num_classes=0)
    with pytest.raises(ValueError, match="multi_class='ovo' not in"):
        roc_auc(torch.rand(3, 2), torch.tensor([0, 1, 1]), multi_class="ovo")
    with pytest.raises(TypeError, match="scores must be a"):
        roc_auc(torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="preds must be a torch.Tensor"):
        accuracy([0, 1], torch.tensor([0, 1]))


def test_empty_input():
    with pytest.warns(UndefinedMetricWarning, match="0 samples"):
        assert math.isnan(accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
    cm = confusion_matrix(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert cm.shape == (3, 3) and int(cm.sum()) == 0
    assert math.isnan(_quiet(f1_score, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))


# ---------------------------------------------------------------------------------------------- streaming


def _batches(n, sizes):
    start = 0
    for size in sizes:
        yield slice(start, min(start + size, n))
        start += size


def test_streaming_uneven_batches_equals_one_shot_and_sklearn():
    gen = torch.Generator().manual_seed(6)
    n, c = 301, 7
    logits = torch.randn(n, c, generator=gen)
    target = torch.randint(0, c, (n,), generator=gen)
    metrics = ClassificationMetrics(c, top_k=(1, 5))
    probs = logits.softmax(1)
    for part in _batches(n, [1, 64, 17, 200, 19]):
        metrics.update(probs[part], target[part])
    result = metrics.compute()
    pred = probs.argmax(1).numpy()
    y = target.numpy()
    assert set(result) == {
        "accuracy", "top5_accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall",
        "balanced_accuracy", "auroc",
    }  # fmt: skip
    expected = {
        "accuracy": skm.accuracy_score(y, pred),
        "top5_accuracy": skm.top_k_accuracy_score(y, probs.numpy(), k=5, labels=range(c)),
        "macro_f1": skm.f1_score(y, pred, average="macro"),
        "weighted_f1": skm.f1_score(y, pred, average="weighted"),
        "macro_precision": skm.precision_score(y, pred, average="macro"),
        "macro_recall": skm.recall_score(y, pred, average="macro"),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "auroc": skm.roc_auc_score(
            y, probs.double().numpy() / probs.double().numpy().sum(1, keepdims=True), multi_class="ovr"
        ),
    }
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key
    _close(metrics.confusion_matrix(), skm.confusion_matrix(y, pred))
    rows = metrics.per_class()
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(c), zero_division=0)
    for row, pc, rc, fc, sc in zip(rows, p, r, f, s):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((pc, rc, fc, sc))
    state = metrics.state_tensors()
    assert state["confusion"].dtype == torch.int64 and state["scores"].shape == (n, c)
    metrics.reset()
    with pytest.raises(ValueError, match="needs at least one sample"):
        metrics.compute()


def test_streaming_absent_class_and_labels_only():
    metrics = ClassificationMetrics(4, class_names=["a", "b", "c", "d"], top_k=(1, 5))
    metrics.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    metrics.update(torch.tensor([2]), torch.tensor([1]))
    result = metrics.compute()
    y, p = [0, 1, 0, 1], [0, 1, 1, 2]
    assert "auroc" not in result and "top5_accuracy" not in result  # labels only; 5 >= C
    assert result["macro_f1"] == pytest.approx(_quiet(skm.f1_score, y, p, average="macro"))
    assert result["balanced_accuracy"] == pytest.approx(_quiet(skm.balanced_accuracy_score, y, p))
    assert [row["class"] for row in metrics.per_class()] == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="update\\(\\) got scores after labels"):
        metrics.update(torch.rand(2, 4), torch.tensor([0, 1]))


def test_streaming_auroc_skips_absent_class():
    gen = torch.Generator().manual_seed(7)
    probs = torch.randn(50, 3, generator=gen).softmax(1)
    target = torch.randint(0, 2, (50,), generator=gen)
    metrics = ClassificationMetrics(3)
    metrics.update(probs, target)
    per = _sk_ovr(probs.double().numpy(), target.numpy(), None)
    assert metrics.compute()["auroc"] == pytest.approx(np.nanmean(per))


def test_streaming_validation():
    with pytest.raises(ValueError, match="num_classes=0 must be a positive int"):
        ClassificationMetrics(0)
    with pytest.raises(ValueError, match="class_names has 1 names but num_classes=2"):
        ClassificationMetrics(2, class_names=["x"])
    with pytest.raises(ValueError, match="top_k=\\(0,\\) must hold ints >= 1"):
        ClassificationMetrics(2, top_k=(0,))
    metrics = ClassificationMetrics(3)
    with pytest.raises(ValueError, match="preds has 4 score columns but num_classes=3"):
        metrics.update(torch.rand(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target holds labels in \\[0, 3\\]"):
        metrics.update(torch.rand(2, 3), torch.tensor([0, 3]))


def test_auroc_nan_scores_rejected_and_buffer_reuse_safe():
    with pytest.raises(ValueError, match="scores contain nan"):
        roc_auc(torch.tensor([[0.1, float("nan")], [0.3, 0.2]]), torch.tensor([0, 1]))
    metrics = ClassificationMetrics(2)
    metrics.update(torch.tensor([[0.5, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="scores given to update\\(\\) contain nan"):
        metrics.compute()
    metrics = ClassificationMetrics(2)
    buffer = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    metrics.update(buffer, torch.tensor([0, 1]))
    buffer.fill_(0.5)  # a caller reusing its output buffer
    metrics.update(buffer, torch.tensor([0, 1]))
    expected = roc_auc(
        torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.5, 0.5]]), torch.tensor([0, 1, 0, 1])
    )
    assert metrics.compute()["auroc"] == pytest.approx(expected)


def test_auroc_many_classes_equals_sklearn():
    gen = torch.Generator().manual_seed(8)
    probs = torch.randn(2000, 50, generator=gen).softmax(1).double()
    target = torch.arange(2000) % 50
    ref = skm.roc_auc_score(target.numpy(), probs.numpy(), multi_class="ovr")
    assert roc_auc(probs, target) == pytest.approx(ref, abs=1e-12)


def test_from_logits_and_inference_mode_state():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(60, 4, generator=gen)
    target = torch.randint(0, 4, (60,), generator=gen)
    metrics = ClassificationMetrics(4, from_logits=True)
    with torch.inference_mode():
        metrics.reset()
        metrics.update(logits[:30], target[:30])
    metrics.update(logits[30:], target[30:])  # state made under inference_mode, updated outside it
    probs = logits.double().softmax(1).numpy()
    ref = skm.roc_auc_score(target.numpy(), probs / probs.sum(1, keepdims=True), multi_class="ovr")
    result = metrics.compute()
    assert result["auroc"] == pytest.approx(ref, abs=1e-6)
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(target.numpy(), logits.argmax(1).numpy()))
    raw = ClassificationMetrics(4)
    raw.update(logits, target)
    assert raw.compute()["auroc"] == pytest.approx(roc_auc(logits, target))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(500, 6, generator=gen)
    target = torch.randint(0, 6, (500,), generator=gen)
    results = []
    for device in ("cpu", "cuda"):
        metrics = ClassificationMetrics(6, top_k=(1, 5), from_logits=True)
        for part in _batches(500, [100, 250, 150]):
            metrics.update(logits[part].to(device), target[part].to(device))
        results.append(metrics.compute())
        assert metrics.confusion_matrix().device.type == device
    assert results[0] == pytest.approx(results[1], abs=1e-6)
    _close(roc_auc(logits.cuda(), target.cuda(), average=None), roc_auc(logits, target, average=None))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 80),
    c=st.integers(2, 7),
    seed=st.integers(0, 2**31 - 1),
    cuts=st.lists(st.integers(0, 80), max_size=5),
)
def test_streaming_random_splits_equal_sklearn(n, c, seed, cuts):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.randn(n, c, generator=gen).softmax(1)
    target = torch.randint(0, c, (n,), generator=gen)
    metrics = ClassificationMetrics(c, top_k=(1, 2), zero_division=0)
    bounds = [0, *sorted(min(cut, n) for cut in cuts), n]
    for start, stop in zip(bounds, bounds[1:]):
        metrics.update(probs[start:stop], target[start:stop])  # empty batches included
    result = metrics.compute()
    y, p = target.numpy(), probs.argmax(1).numpy()
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert result["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0))
    assert result["weighted_f1"] == pytest.approx(skm.f1_score(y, p, average="weighted", zero_division=0))
    assert result["balanced_accuracy"] == pytest.approx(_quiet(skm.balanced_accuracy_score, y, p))
    if c > 2:
        assert result["top2_accuracy"] == pytest.approx(
            skm.top_k_accuracy_score(y, probs.numpy(), k=2, labels=range(c))
        )
    per = _sk_ovr(probs.double().numpy(), y, None)
    expected_auc = np.nanmean(per) if not np.all(np.isnan(per)) else float("nan")
    assert result["auroc"] == pytest.approx(expected_auc, nan_ok=True)


def test_state_tensors_summed_over_shards_load_into_one_metrics_object():
    """Two ranks' sufficient statistics, summed/concatenated, give the metrics of all the data at once."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.softmax(torch.randn(41, 4, generator=generator), 1)
    target = torch.randint(0, 4, (41,), generator=generator)
    whole = ClassificationMetrics(4, top_k=(2,), zero_division=0.0)
    whole.update(scores, target)
    parts = []
    for chunk in (slice(0, 17), slice(17, 41)):
        shard = ClassificationMetrics(4, top_k=(2,), zero_division=0.0)
        shard.update(scores[chunk], target[chunk])
        parts.append(shard.state_tensors())
    merged = {key: parts[0][key] + parts[1][key] for key in ("confusion", "topk_correct")}
    merged |= {key: torch.cat([parts[0][key], parts[1][key]]) for key in ("scores", "targets")}
    loaded = ClassificationMetrics(4, top_k=(2,), zero_division=0.0)
    loaded.load_state_tensors(merged)
    assert loaded.compute() == pytest.approx(whole.compute())
    with pytest.raises(ValueError, match="lacks"):
        loaded.load_state_tensors({"confusion": merged["confusion"]})
    with pytest.raises(ValueError, match="confusion has shape"):
        loaded.load_state_tensors({"confusion": torch.zeros(3, 3), "topk_correct": torch.zeros(1)})
