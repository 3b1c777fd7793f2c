"""trickbag.losses against independent references: F.cross_entropy, F.kl_div, naive loops, closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trickbag.losses import (
    ClassifierLoss,
    DistillationLoss,
    FocalLoss,
    LabelSmoothingCrossEntropy,
    SoftTargetCrossEntropy,
    class_weights,
    distillation_loss,
    focal_loss,
    label_smoothing_cross_entropy,
    smooth_labels,
    soft_target_cross_entropy,
)


def make(n, c, *, seed=0, dtype=torch.float64, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=generator, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, c, (n,), generator=generator)
    return logits.requires_grad_(), target


def naive_focal(logits, target, gamma, alpha=None, ignore_index=-100, reduction="mean"):
    """Per-sample Python loop with an explicit one-hot; the weighted mean of F.cross_entropy."""
    losses, weights = [], []
    for row, t in zip(logits.double(), target.tolist()):
        if t == ignore_index:
            continue
        p = torch.softmax(row, 0)
        one_hot = torch.zeros_like(p)
        one_hot[t] = 1.0
        w = 1.0 if alpha is None else float(alpha[t])
        losses.append(-w * (one_hot * (1 - p) ** gamma * torch.log(p)).sum())
        weights.append(w)
    total = torch.stack(losses).sum() if losses else torch.tensor(0.0, dtype=torch.float64)
    return total if reduction == "sum" else total / sum(weights)


# ---------------------------------------------------------------- focal loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_gamma0_equals_cross_entropy_values_and_gradients(reduction):
    logits, target = make(9, 5)
    ours = focal_loss(logits, target, gamma=0.0, reduction=reduction)
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    reference = F.cross_entropy(logits, target, reduction=reduction)
    (grad_reference,) = torch.autograd.grad(reference.sum(), logits)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad_ours, grad_reference)


@pytest.mark.parametrize("classes", [5, 40])  # both sides of the small-C kernel switch
def test_focal_gamma0_alpha_ignore_index_equals_weighted_cross_entropy(classes):
    logits, target = make(11, classes, seed=1)
    target[[2, 7]] = -100
    weight = torch.rand(classes, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.1
    ours = focal_loss(logits, target, gamma=0.0, alpha=weight)
    reference = F.cross_entropy(logits, target, weight=weight)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(*(torch.autograd.grad(v, logits)[0] for v in (ours, reference)))


def test_focal_gamma0_label_smoothing_matches_cross_entropy_with_weight_and_ignore():
    logits, target = make(10, 6, seed=2)
    target[4] = 3
    target[5] = -1
    weight = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    for w in (None, weight):
        ours = focal_loss(logits, target, gamma=0.0, alpha=w, label_smoothing=0.2, ignore_index=-1)
        reference = F.cross_entropy(logits, target, weight=w, label_smoothing=0.2, ignore_index=-1)
        torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.7])
@pytest.mark.parametrize("classes", [3, 20])
def test_focal_matches_naive_one_hot_with_nonuniform_alpha(gamma, classes):
    logits, target = make(13, classes, seed=4)
    target[0] = -100
    alpha = torch.linspace(0.1, 3.0, classes, dtype=torch.float64)
    for reduction in ("mean", "sum"):
        ours = focal_loss(logits, target, gamma=gamma, alpha=alpha, reduction=reduction)
        reference = naive_focal(logits, target, gamma, alpha, reduction=reduction)
        torch.testing.assert_close(ours, reference)
        torch.testing.assert_close(*(torch.autograd.grad(v, logits)[0] for v in (ours, reference)))


def test_focal_scalar_alpha_scales_and_list_alpha_accepted():
    logits, target = make(8, 4, seed=5)
    base = focal_loss(logits, target)
    torch.testing.assert_close(focal_loss(logits, target, alpha=0.25), 0.25 * base)
    torch.testing.assert_close(focal_loss(logits, target, alpha=torch.tensor(0.25)), 0.25 * base)
    as_list = focal_loss(logits, target, alpha=[1.0, 2.0, 0.5, 1.0])
    reference = naive_focal(logits, target, 2.0, [1.0, 2.0, 0.5, 1.0])
    torch.testing.assert_close(as_list, reference)


def test_focal_closed_form_two_classes():
    # logits (0, log 3): p = (1/4, 3/4); target 1 -> -(1/4)^2 log(3/4).
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    expected = -(0.25**2) * math.log(0.75)
    assert focal_loss(logits, torch.tensor([1])).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_gradcheck_float64(gamma):
    logits, target = make(6, 4, seed=6)
    target[1] = -100
    alpha = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: focal_loss(x, target, gamma=gamma, alpha=alpha), (logits,))
    soft = torch.softmax(torch.randn(6, 4, dtype=torch.float64), 1)
    assert torch.autograd.gradcheck(lambda x: focal_loss(x, soft, gamma=gamma, alpha=alpha), (logits,))
    wide, wide_target = make(5, 17, seed=7)
    assert torch.autograd.gradcheck(lambda x: focal_loss(x, wide_target, gamma=gamma), (wide,))


def naive_weighted_focal(logits, target, gamma, alpha):
    """Weighted-mean focal loss by its formula, differentiable in alpha: sum_i a_t l_i / sum_i a_t."""
    keep = target != -100
    logits, target = logits[keep], target[keep]
    p = torch.softmax(logits, 1)
    one_hot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    per_sample = -(one_hot * (1 - p) ** gamma * torch.log(p)).sum(1)
    sample_weight = (one_hot * alpha).sum(1)
    return (sample_weight * per_sample).sum() / sample_weight.sum()


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("classes", [5, 40])  # both sides of the small-C kernel switch
def test_focal_gradients_wrt_logits_and_alpha_match_naive_formula(gamma, classes):
    logits, target = make(12, classes, seed=31)
    target[3] = -100
    alpha = torch.linspace(0.2, 3.0, classes, dtype=torch.float64).requires_grad_()
    ours = focal_loss(logits, target, gamma=gamma, alpha=alpha)
    reference = naive_weighted_focal(logits, target, gamma, alpha)
    torch.testing.assert_close(ours, reference)
    ours_grads = torch.autograd.grad(ours, (logits, alpha))
    reference_grads = torch.autograd.grad(reference, (logits, alpha))
    # The alpha gradient is not zero: the denominator sum_i a_t depends on alpha.
    assert ours_grads[1].abs().max() > 1e-3
    torch.testing.assert_close(ours_grads, reference_grads)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("classes", [4, 17])
def test_focal_gradcheck_and_gradgradcheck_in_logits_and_alpha(gamma, classes):
    logits, target = make(4, classes, seed=32, scale=1.5)
    target[2] = -100
    alpha = torch.linspace(0.5, 2.0, classes, dtype=torch.float64).requires_grad_()
    # The full Jacobians for the hand-written small-C kernel; random projections (fast_mode) for the
    # autograd path at C=17, whose full second-order check takes seconds.
    fast = classes >= 16
    for reduction in ("mean", "none"):

        def loss(x, a, reduction=reduction):
            return focal_loss(x, target, gamma=gamma, alpha=a, reduction=reduction)

        assert torch.autograd.gradcheck(loss, (logits, alpha), fast_mode=fast)
        assert torch.autograd.gradgradcheck(loss, (logits, alpha), fast_mode=fast)
    no_alpha = lambda x: focal_loss(x, target.clamp_min(0), gamma=gamma)  # noqa: E731
    assert torch.autograd.gradgradcheck(no_alpha, (logits,), fast_mode=fast)


def test_focal_small_classes_double_backward_matches_naive_gradient_penalty():
    # create_graph=True through the hand-written backward equals autograd through the formula.
    logits, target = make(8, 6, seed=33)
    alpha = torch.linspace(0.3, 2.0, 6, dtype=torch.float64)
    penalties = []
    for fn in (focal_loss, lambda x, t, alpha: naive_weighted_focal(x, t, 2.0, alpha)):
        (grad,) = torch.autograd.grad(fn(logits, target, alpha=alpha), logits, create_graph=True)
        penalties.append(torch.autograd.grad(grad.square().sum(), logits)[0])
    torch.testing.assert_close(*penalties)


def test_focal_soft_targets_match_definition_and_one_hot_rows():
    logits, target = make(7, 5, seed=8)
    q = torch.softmax(torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9)), 1)
    alpha = torch.tensor([0.2, 1.0, 3.0, 0.7, 1.1], dtype=torch.float64)
    p = torch.softmax(logits, 1)
    per_sample = -(alpha * q * (1 - p) ** 2 * torch.log(p)).sum(1)
    torch.testing.assert_close(focal_loss(logits, q, alpha=alpha, reduction="none"), per_sample)
    torch.testing.assert_close(focal_loss(logits, q, alpha=alpha), per_sample.sum() / (alpha * q).sum())
    one_hot = F.one_hot(target, 5).double()
    torch.testing.assert_close(
        focal_loss(logits, one_hot, alpha=alpha), focal_loss(logits, target, alpha=alpha)
    )
    torch.testing.assert_close(focal_loss(logits, one_hot), focal_loss(logits, target))


def test_focal_soft_target_label_smoothing_smooths_rows():
    logits, target = make(6, 4, seed=10)
    q = F.one_hot(target, 4).double() * 0.7 + 0.075
    smoothed = (1 - 0.1) * q + 0.1 / 4
    torch.testing.assert_close(
        focal_loss(logits, q, label_smoothing=0.1), focal_loss(logits, smoothed, label_smoothing=0.0)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("classes", [4, 32])
def test_focal_half_precision_extreme_logits_finite_and_close_to_float32(dtype, gamma, classes):
    generator = torch.Generator().manual_seed(11)
    signs = torch.randint(0, 2, (16, classes), generator=generator).float() * 2 - 1
    logits32 = signs * 1e4
    logits32[:8] = torch.randn(8, classes, generator=generator) * 4
    target = torch.randint(0, classes, (16,), generator=generator)
    for targets in (target, torch.softmax(torch.randn(16, classes, generator=generator), 1)):
        half = logits32.to(dtype).requires_grad_()
        loss = focal_loss(half, targets, gamma=gamma)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(half.grad).all() and half.grad.dtype == dtype
        reference = focal_loss(half.detach().float(), targets, gamma=gamma)
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            loss, focal_loss(logits32, targets, gamma=gamma), rtol=1e-2, atol=1e-2 * float(loss.detach())
        )


@pytest.mark.parametrize("classes", [10, 40])
def test_focal_under_cpu_autocast_bfloat16(classes):
    generator = torch.Generator().manual_seed(12)
    layer = torch.nn.Linear(8, classes)
    inputs = torch.randn(12, 8, generator=generator) * 1e3
    target = torch.randint(0, classes, (12,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(inputs)
        assert logits.dtype == torch.bfloat16
        loss = focal_loss(logits, target)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(layer.weight.grad).all()
    torch.testing.assert_close(loss, focal_loss(logits.detach().float(), target))


@pytest.mark.parametrize("classes", [3, 20])
def test_focal_saturated_probability_gamma_below_one_has_zero_not_nan_gradient(classes):
    logits = torch.zeros(1, classes)
    logits[0, 0] = 200.0
    logits.requires_grad_()
    for target in (torch.tensor([0]), F.one_hot(torch.tensor([0]), classes).float()):
        loss = focal_loss(logits, target, gamma=0.5)
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss.item() == 0.0
        assert torch.isfinite(grad).all() and grad.abs().max() < 1e-20


@pytest.mark.parametrize("n,c", [(1, 2), (3, 1), (2, 1000), (5, 2)])
def test_focal_odd_shapes_match_naive(n, c):
    logits, target = make(n, c, seed=13)
    torch.testing.assert_close(focal_loss(logits, target), naive_focal(logits, target, 2.0))


def test_focal_empty_and_all_ignored_batches_follow_cross_entropy():
    empty = torch.zeros(0, 3)
    empty_target = torch.zeros(0, dtype=torch.long)
    assert torch.isnan(focal_loss(empty, empty_target)) and torch.isnan(F.cross_entropy(empty, empty_target))
    assert focal_loss(empty, empty_target, reduction="sum").item() == 0.0
    assert focal_loss(empty, empty_target, reduction="none").shape == (0,)
    logits, _ = make(3, 4)
    ignored = torch.full((3,), -100)
    assert torch.isnan(focal_loss(logits, ignored)) and torch.isnan(F.cross_entropy(logits, ignored))
    assert focal_loss(logits, ignored, reduction="none").tolist() == [0.0, 0.0, 0.0]


def test_focal_spatial_logits_match_flattened():
    generator = torch.Generator().manual_seed(14)
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=generator)
    target = torch.randint(0, 5, (2, 3, 4), generator=generator)
    flat_logits = logits.movedim(1, -1).reshape(-1, 5)
    per_pixel = focal_loss(logits, target, reduction="none")
    assert per_pixel.shape == (2, 3, 4)
    torch.testing.assert_close(
        per_pixel.reshape(-1), focal_loss(flat_logits, target.reshape(-1), reduction="none")
    )
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target))
    soft = torch.softmax(torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=generator), 1)
    torch.testing.assert_close(focal_loss(logits, soft, gamma=0.0), F.cross_entropy(logits, soft))


def test_focal_loss_module_moves_alpha_and_matches_function():
    alpha = [0.5, 1.0, 2.0]
    module = FocalLoss(gamma=1.5, alpha=alpha, reduction="sum").double()
    assert "alpha" in dict(module.named_buffers())
    logits, target = make(6, 3, seed=15)
    torch.testing.assert_close(
        module(logits, target), focal_loss(logits, target, gamma=1.5, alpha=alpha, reduction="sum")
    )
    torch.testing.assert_close(FocalLoss(alpha=0.5)(logits, target), 0.5 * focal_loss(logits, target))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    c=st.integers(1, 24),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.01, 50.0),
)
def test_property_gamma0_is_cross_entropy(n, c, seed, scale):
    logits, target = make(n, c, seed=seed, scale=scale)
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 10), c=st.integers(2, 20), seed=st.integers(0, 2**16), gamma=st.floats(0.1, 5.0))
def test_property_focal_between_zero_and_cross_entropy(n, c, seed, gamma):
    logits, target = make(n, c, seed=seed)
    focal = focal_loss(logits, target, gamma=gamma, reduction="none")
    cross_entropy = F.cross_entropy(logits, target, reduction="none")
    assert bool((focal >= 0).all()) and bool((focal <= cross_entropy + 1e-12).all())


# ---------------------------------------------------------------- label smoothing


def test_smooth_labels_five_class_examples():
    target = torch.tensor([1])
    off = smooth_labels(target, 5, 0.1, style="off_target")
    torch.testing.assert_close(off, torch.tensor([[0.025, 0.9, 0.025, 0.025, 0.025]]))
    uniform = smooth_labels(target, 5, 0.1)
    torch.testing.assert_close(uniform, torch.tensor([[0.02, 0.92, 0.02, 0.02, 0.02]]))
    assert uniform.dtype == torch.float32


def test_smooth_labels_soft_rows():
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(smooth_labels(q, 4, 0.2), 0.8 * q + 0.05)
    off = smooth_labels(q, 4, 0.3, style="off_target")
    torch.testing.assert_close(off, torch.tensor([[0.4, 0.4, 0.1, 0.1]], dtype=torch.float64))
    assert off.dtype == torch.float64 and off.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_uniform_equals_pytorch_also_with_weight(reduction):
    logits, target = make(9, 7, seed=16)
    weight = torch.linspace(0.3, 2.0, 7, dtype=torch.float64)
    for w in (None, weight):
        ours = label_smoothing_cross_entropy(logits, target, smoothing=0.15, weight=w, reduction=reduction)
        reference = F.cross_entropy(logits, target, weight=w, label_smoothing=0.15, reduction=reduction)
        torch.testing.assert_close(ours, reference)


def test_label_smoothing_off_target_equals_explicit_soft_targets():
    logits, target = make(8, 5, seed=17)
    q = torch.full((8, 5), 0.1 / 4, dtype=torch.float64)
    q[torch.arange(8), target] = 0.9
    expected = -(q * torch.log_softmax(logits, 1)).sum(1).mean()
    ours = label_smoothing_cross_entropy(logits, target, smoothing=0.1, style="off_target")
    torch.testing.assert_close(ours, expected)
    module = LabelSmoothingCrossEntropy(smoothing=0.1, style="off_target")
    torch.testing.assert_close(module(logits, target), expected)


def test_label_smoothing_soft_targets_use_soft_cross_entropy():
    logits, _ = make(6, 4, seed=18)
    q = torch.softmax(torch.randn(6, 4, dtype=torch.float64), 1)
    ours = label_smoothing_cross_entropy(logits, q, smoothing=0.2)
    torch.testing.assert_close(ours, F.cross_entropy(logits, q, label_smoothing=0.2))
    assert label_smoothing_cross_entropy(logits, q, smoothing=0.2, reduction="none").shape == (6,)


# ---------------------------------------------------------------- soft-target cross-entropy


def test_soft_target_cross_entropy_matches_pytorch_probability_targets():
    logits, _ = make(7, 6, seed=19)
    q = torch.softmax(torch.randn(7, 6, dtype=torch.float64), 1)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            soft_target_cross_entropy(logits, q, reduction=reduction),
            F.cross_entropy(logits, q, reduction=reduction),
        )
    torch.testing.assert_close(SoftTargetCrossEntropy()(logits, q), F.cross_entropy(logits, q))


def test_soft_target_cross_entropy_weighted_one_hot_equals_weighted_index_cross_entropy():
    logits, target = make(9, 4, seed=20)
    weight = torch.tensor([0.2, 1.0, 4.0, 0.5], dtype=torch.float64)
    one_hot = F.one_hot(target, 4).double()
    ours = soft_target_cross_entropy(logits, one_hot, weight=weight)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, weight=weight))
    q = torch.softmax(torch.randn(9, 4, dtype=torch.float64), 1)
    expected = -(weight * q * torch.log_softmax(logits, 1)).sum() / (weight * q).sum()
    torch.testing.assert_close(soft_target_cross_entropy(logits, q, weight=weight), expected)
    torch.testing.assert_close(SoftTargetCrossEntropy(weight=weight).double()(logits, q), expected)


def test_soft_target_cross_entropy_gradcheck():
    logits, _ = make(5, 3, seed=21)
    q = torch.softmax(torch.randn(5, 3, dtype=torch.float64), 1)
    weight = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: soft_target_cross_entropy(x, q, weight=weight), (logits,))


# ---------------------------------------------------------------- ClassifierLoss


def naive_classifier_loss(kind, logits, target, smoothing, style, gamma, weight):
    """The mean by its definition, one formula for every path: -sum_c w_c q_ic f_ic log p_ic / sum_i w_i."""
    classes = logits.shape[1]
    w = torch.ones(classes, dtype=torch.float64) if weight is None else weight.double()
    log_p = torch.log_softmax(logits.double(), 1)
    focus = (1 - log_p.exp()) ** gamma if kind == "focal" else torch.ones_like(log_p)
    if target.is_floating_point():
        q = target.double()  # rows come smoothed from the mixer: used as given
        sample_weight = q @ w
    else:
        one_hot = F.one_hot(target, classes).double()
        q = one_hot
        if smoothing and style == "uniform":
            q = one_hot * (1 - smoothing) + smoothing / classes
        elif smoothing:
            q = one_hot * (1 - smoothing) + (1 - one_hot) * smoothing / (classes - 1)
        # F.cross_entropy's weighted mean divides by w[y_i], also with its uniform smoothing; rows smoothed
        # before the loss (focal, off_target) divide by sum_c w_c q_ic.
        via_cross_entropy = kind == "ce" and (not smoothing or style == "uniform")
        sample_weight = one_hot @ w if via_cross_entropy else q @ w
    return -(w * q * focus * log_p).sum() / sample_weight.sum()


COMBINATIONS = [
    (kind, smoothing, style, soft, weighted)
    for kind in ("ce", "focal")
    for smoothing in (0.0, 0.1)
    for style in ("uniform", "off_target")
    for soft in (False, True)
    for weighted in (False, True)
]


@pytest.mark.parametrize("kind,smoothing,style,soft,weighted", COMBINATIONS)
def test_classifier_loss_mean_sums_and_any_split_agree_in_values_and_gradients(
    kind, smoothing, style, soft, weighted
):
    generator = torch.Generator().manual_seed(40)
    classes = 6
    logits = (torch.randn(13, classes, generator=generator) * 3).requires_grad_()
    target = torch.randint(0, classes, (13,), generator=generator)
    if soft:
        target = torch.softmax(torch.randn(13, classes, generator=generator) * 2, 1)
    weight = torch.tensor([0.2, 1.0, 3.0, 0.5, 1.7, 0.9]) if weighted else None
    loss = ClassifierLoss(
        kind,
        num_classes=classes,
        label_smoothing=smoothing,
        smoothing_style=style,
        focal_gamma=1.5,
        weight=weight,
    )
    mean = loss(logits, target)
    reference = naive_classifier_loss(kind, logits, target, smoothing, style, 1.5, weight)
    torch.testing.assert_close(mean.double(), reference)
    numerator, denominator = loss.sums(logits, target)
    assert (
        numerator.shape == denominator.shape == () and numerator.dtype == denominator.dtype == torch.float32
    )
    torch.testing.assert_close(numerator / denominator, mean)
    if not weighted:
        assert denominator.item() == 13
    (grad_mean,) = torch.autograd.grad(mean, logits)
    torch.testing.assert_close(grad_mean, torch.autograd.grad(reference, logits)[0])
    for sizes in ([13], [4, 1, 8], [5, 0, 2, 6], [1] * 13):
        parts = [loss.sums(x, t) for x, t in zip(logits.split(sizes), target.split(sizes))]
        split_mean = sum(n for n, _ in parts) / sum(d for _, d in parts)
        torch.testing.assert_close(split_mean, mean)
        torch.testing.assert_close(torch.autograd.grad(split_mean, logits)[0], grad_mean)


@pytest.mark.parametrize("kind", ["ce", "focal"])
def test_classifier_loss_ignored_targets_count_in_neither_part(kind):
    logits, target = make(9, 5, seed=41, dtype=torch.float32)
    target[[1, 6]] = -100
    weight = torch.tensor([0.5, 1.0, 2.0, 0.3, 1.2])
    loss = ClassifierLoss(kind, num_classes=5, focal_gamma=0.0, weight=weight)
    numerator, denominator = loss.sums(logits, target)
    keep = target != -100
    torch.testing.assert_close(denominator, weight[target[keep]].sum())
    torch.testing.assert_close(numerator / denominator, F.cross_entropy(logits, target, weight=weight))
    unweighted = ClassifierLoss(kind, num_classes=5, focal_gamma=0.0)
    assert unweighted.sums(logits, target)[1].item() == 7


@pytest.mark.parametrize(
    "kind,smoothing,style", [("ce", 0.0, "uniform"), ("ce", 0.1, "off_target"), ("focal", 0.1, "uniform")]
)
def test_classifier_loss_empty_batch_sums_to_zeros_without_nan(kind, smoothing, style):
    loss = ClassifierLoss(
        kind, num_classes=4, label_smoothing=smoothing, smoothing_style=style, weight=[1, 2, 3, 4]
    )
    logits = torch.zeros(0, 4, requires_grad=True)
    for target in (torch.zeros(0, dtype=torch.long), torch.zeros(0, 4)):
        numerator, denominator = loss.sums(logits, target)
        assert numerator.item() == 0.0 and denominator.item() == 0.0
        (grad,) = torch.autograd.grad(numerator, logits)
        assert grad.shape == (0, 4)


def test_classifier_loss_half_logits_float64_logits_and_buffer():
    loss = ClassifierLoss("focal", num_classes=3, weight=[1.0, 2.0, 0.5])
    assert dict(loss.named_buffers())["weight"].dtype == torch.float32
    logits, target = make(5, 3, seed=42, dtype=torch.float32)
    numerator, denominator = loss.sums(logits.bfloat16(), target)
    assert numerator.dtype == denominator.dtype == torch.float32
    wide, _ = make(5, 3, seed=42)
    assert loss.sums(wide, target)[0].dtype == torch.float64
    torch.testing.assert_close(
        loss(wide, target), focal_loss(wide, target, alpha=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    )
    assert ClassifierLoss(num_classes=3).weight is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_classifier_loss_moves_weight_to_the_logits_device():
    logits, target = make(8, 5, seed=43, dtype=torch.float32)
    loss = ClassifierLoss("ce", num_classes=5, label_smoothing=0.1, weight=torch.linspace(0.5, 2, 5))
    expected = loss.sums(logits, target)
    on_gpu = loss.sums(logits.cuda(), target.cuda())
    torch.testing.assert_close([part.cpu() for part in on_gpu], list(expected))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "bce"}, r"kind='bce' is not one of \('ce', 'focal'\)"),
        ({"num_classes": 0}, r"num_classes=0 must be an int >= 1"),
        ({"num_classes": 2.0}, r"num_classes=2.0 must be an int"),
        ({"label_smoothing": 1.0}, r"label_smoothing=1.0 must be in \[0, 1\)"),
        ({"smoothing_style": "gauss"}, r"smoothing_style='gauss' is not one of"),
        ({"focal_gamma": -1}, r"focal_gamma=-1 must be >= 0"),
        ({"weight": [1.0, 2.0]}, r"weight must have shape \(3,\)"),
        ({"weight": [1.0, -2.0, 1.0]}, r"weight must be finite and >= 0"),
    ],
)
def test_classifier_loss_rejects_bad_arguments(kwargs, match):
    arguments = {"num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        ClassifierLoss(**arguments)


def test_classifier_loss_rejects_logits_of_the_wrong_width():
    loss = ClassifierLoss(num_classes=3)
    with pytest.raises(ValueError, match=r"logits must have shape \(N, 3\) for num_classes=3, got \(4, 5\)"):
        loss(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got \(4, 3, 2\)"):
        loss.sums(torch.zeros(4, 3, 2), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"off_target' needs num_classes >= 2"):
        ClassifierLoss(num_classes=1, label_smoothing=0.1, smoothing_style="off_target")


# ---------------------------------------------------------------- class weights


def test_class_weights_effective_number_closed_form():
    counts = [5000, 500, 50]
    beta = 0.999
    raw = torch.tensor([(1 - beta) / (1 - beta**n) for n in counts], dtype=torch.float64)
    expected = (raw / raw.sum() * 3).float()
    ours = class_weights(counts, beta=beta)
    assert ours.dtype == torch.float32 and ours.shape == (3,)
    torch.testing.assert_close(ours, expected)
    assert ours.sum().item() == pytest.approx(3.0)


def test_class_weights_inverse_frequency_and_limits():
    counts = torch.tensor([10, 20, 40])
    expected = torch.tensor([1 / 10, 1 / 20, 1 / 40]) * 3 / (1 / 10 + 1 / 20 + 1 / 40)
    torch.testing.assert_close(class_weights(counts, method="inverse_frequency"), expected)
    torch.testing.assert_close(class_weights(counts, beta=0.0), torch.ones(3))
    assert class_weights([7]).tolist() == [1.0]
    weights = class_weights([100, 10])
    logits, target = make(4, 2, seed=22, dtype=torch.float32)
    torch.testing.assert_close(
        focal_loss(logits, target, gamma=0.0, alpha=weights), F.cross_entropy(logits, target, weight=weights)
    )


# ---------------------------------------------------------------- distillation


def test_distillation_matches_kl_div_and_cross_entropy():
    student, target = make(8, 5, seed=23)
    teacher, _ = make(8, 5, seed=24)
    temperature, alpha = 3.0, 0.7
    kl = F.kl_div(
        F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1), reduction="batchmean"
    )
    expected = alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(student, target)
    ours = distillation_loss(student, teacher, target, temperature=temperature, alpha=alpha)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(
        DistillationLoss(temperature=temperature, alpha=alpha)(student, teacher, target), expected
    )
    soft = F.one_hot(target, 5).double()
    torch.testing.assert_close(
        distillation_loss(student, teacher, soft, temperature=temperature, alpha=alpha), expected
    )
    only_kl = distillation_loss(student, teacher, temperature=temperature, alpha=1.0)
    torch.testing.assert_close(only_kl, temperature**2 * kl)


def test_distillation_detaches_teacher_and_gradchecks():
    student, target = make(4, 3, seed=25)
    teacher, _ = make(4, 3, seed=26)
    distillation_loss(student, teacher, target).backward()
    assert teacher.grad is None and student.grad is not None
    assert torch.autograd.gradcheck(
        lambda s: distillation_loss(s, teacher, target, temperature=2.0, alpha=0.6),
        (student.detach().requires_grad_(),),
    )


def test_distillation_identical_logits_gives_zero_kl():
    student, _ = make(3, 4, seed=27)
    assert distillation_loss(student, student.detach().clone(), alpha=1.0).item() == pytest.approx(
        0.0, abs=1e-12
    )


# ---------------------------------------------------------------- validation


LOGITS = torch.zeros(4, 3)
TARGET = torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"gamma": -1.0}, r"gamma=-1.0 must be >= 0"),
        ({"gamma": float("nan")}, r"gamma=nan"),
        ({"label_smoothing": 1.0}, r"label_smoothing=1.0 must be in \[0, 1\)"),
        ({"label_smoothing": -0.1}, r"label_smoothing=-0.1"),
        ({"reduction": "avg"}, r"reduction='avg' is not one of"),
        ({"alpha": -0.5}, r"alpha=-0.5 must be >= 0"),
        ({"alpha": [1.0, 2.0]}, r"alpha must have shape \(3,\).*got \(2,\)"),
        ({"alpha": [1.0, -2.0, 1.0]}, r"alpha must be finite and >= 0"),
    ],
)
def test_focal_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        focal_loss(LOGITS, TARGET, **kwargs)


def test_focal_module_validates_at_construction():
    with pytest.raises(ValueError, match=r"gamma=-2"):
        FocalLoss(gamma=-2)
    with pytest.raises(ValueError, match=r"reduction='bad'"):
        FocalLoss(reduction="bad")


def test_bad_targets_and_logits_are_rejected():
    with pytest.raises(ValueError, match=r"target with class indices must have shape \(4,\).*got \(4, 1\)"):
        focal_loss(LOGITS, TARGET.unsqueeze(1))
    with pytest.raises(
        ValueError, match=r"target with class probabilities must have shape \(4, 3\).*got \(4,\)"
    ):
        focal_loss(LOGITS, TARGET.float())
    with pytest.raises(TypeError, match=r"target must be int64 class indices.*torch.bool"):
        focal_loss(LOGITS, TARGET.bool())
    with pytest.raises(ValueError, match=r"class index 3, outside \[0, 3\)"):
        focal_loss(LOGITS, torch.tensor([0, 3, 1, 1]))
    with pytest.raises(ValueError, match=r"class index -5"):
        focal_loss(LOGITS, torch.tensor([0, -5, 1, 1]))
    with pytest.raises(TypeError, match=r"logits must be a float tensor"):
        focal_loss(torch.zeros(4, 3, dtype=torch.long), TARGET)
    with pytest.raises(ValueError, match=r"logits must have shape \(N, C\)"):
        focal_loss(torch.zeros(4), TARGET)


def test_smooth_labels_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"smoothing=1.5 must be in \[0, 1\)"):
        smooth_labels(TARGET, 3, 1.5)
    with pytest.raises(ValueError, match=r"style='gaussian' is not one of"):
        smooth_labels(TARGET, 3, 0.1, style="gaussian")
    with pytest.raises(ValueError, match=r"num_classes=0 must be an int >= 1"):
        smooth_labels(TARGET, 0, 0.1)
    with pytest.raises(ValueError, match=r"off_target' needs num_classes >= 2"):
        smooth_labels(torch.tensor([0]), 1, 0.1, style="off_target")
    with pytest.raises(ValueError, match=r"soft target must have shape \(N, 4\)"):
        smooth_labels(torch.rand(2, 3), 4, 0.1)
    with pytest.raises(ValueError, match=r"index target must be a 1-D integer tensor"):
        smooth_labels(TARGET.reshape(2, 2), 3, 0.1)
    with pytest.raises(ValueError, match=r"class index 5, outside \[0, 3\)"):
        smooth_labels(torch.tensor([5]), 3, 0.1)


def test_cross_entropy_variants_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"smoothing=-0.1 must be in \[0, 1\)"):
        label_smoothing_cross_entropy(LOGITS, TARGET, smoothing=-0.1)
    with pytest.raises(ValueError, match=r"style='x' is not one of"):
        LabelSmoothingCrossEntropy(style="x")
    with pytest.raises(ValueError, match=r"smoothing=0.8 with style='off_target' and C=3"):
        label_smoothing_cross_entropy(LOGITS, TARGET, smoothing=0.8, style="off_target")
    with pytest.raises(ValueError, match=r"off_target' needs at least 2 classes"):
        label_smoothing_cross_entropy(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), style="off_target")
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        label_smoothing_cross_entropy(LOGITS, TARGET, weight=[1.0])
    with pytest.raises(TypeError, match=r"target_probs must be float class probabilities"):
        soft_target_cross_entropy(LOGITS, TARGET)
    with pytest.raises(ValueError, match=r"reduction='mean ' is not one of"):
        SoftTargetCrossEntropy(reduction="mean ")
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        soft_target_cross_entropy(LOGITS, torch.rand(4, 3), weight=torch.ones(4))


def test_class_weights_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"zero count for class index \[1\]"):
        class_weights([10, 0, 5])
    with pytest.raises(ValueError, match=r"class_counts must be finite and >= 0"):
        class_weights([10, -1])
    with pytest.raises(ValueError, match=r"class_counts is empty"):
        class_weights([])
    with pytest.raises(ValueError, match=r"beta=1.0 must be in \[0, 1\)"):
        class_weights([1, 2], beta=1.0)
    with pytest.raises(ValueError, match=r"method='sqrt' is not one of"):
        class_weights([1, 2], method="sqrt")


def test_distillation_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"temperature=0.0 must be > 0"):
        distillation_loss(LOGITS, LOGITS, TARGET, temperature=0.0)
    with pytest.raises(ValueError, match=r"alpha=1.5 must be in \[0, 1\]"):
        distillation_loss(LOGITS, LOGITS, TARGET, alpha=1.5)
    with pytest.raises(ValueError, match=r"target=None needs alpha=1"):
        distillation_loss(LOGITS, LOGITS, None, alpha=0.5)
    with pytest.raises(ValueError, match=r"must both be \(N, C\), got \(4, 3\) and \(4, 2\)"):
        distillation_loss(LOGITS, torch.zeros(4, 2), alpha=1.0)
    with pytest.raises(ValueError, match=r"target with class indices must have shape \(4,\)"):
        distillation_loss(LOGITS, LOGITS, torch.tensor([0, 1]), alpha=0.5)
    with pytest.raises(ValueError, match=r"temperature=-1"):
        DistillationLoss(temperature=-1)


def test_focal_ignore_index_inside_class_range_and_int32_targets():
    logits, target = make(12, 4, seed=28)
    target[:4] = 1
    ours = focal_loss(logits, target.int(), gamma=0.0, ignore_index=1)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, ignore_index=1))
    torch.testing.assert_close(
        focal_loss(logits, target, gamma=2.0, ignore_index=1),
        naive_focal(logits, target, 2.0, ignore_index=1),
    )


def test_accelerator_path_without_host_checks_gives_same_values(monkeypatch):
    # On CUDA the value checks are skipped (no host sync); emulate that path on CPU.
    logits, target = make(10, 5, seed=29)
    target[3] = -100
    alpha = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)
    all_valid = target.clamp_min(0)
    expected = [focal_loss(logits, target, alpha=alpha), focal_loss(logits, all_valid, gamma=0.5)]
    monkeypatch.setattr("trickbag.loss_inputs._on_host", lambda tensor: False)
    torch.testing.assert_close(focal_loss(logits, target, alpha=alpha), expected[0])
    torch.testing.assert_close(focal_loss(logits, all_valid, gamma=0.5), expected[1])
    torch.testing.assert_close(focal_loss(logits, all_valid, gamma=0.0), F.cross_entropy(logits, all_valid))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("classes", [10, 100])
def test_focal_on_cuda_matches_cpu_and_is_finite_under_autocast(classes):
    logits, target = make(64, classes, seed=30, dtype=torch.float32)
    alpha = torch.linspace(0.5, 2.0, classes)
    expected = focal_loss(logits, target, alpha=alpha)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    on_gpu = logits.detach().cuda().requires_grad_()
    loss = focal_loss(on_gpu, target.cuda(), alpha=alpha.cuda())
    (grad,) = torch.autograd.grad(loss, on_gpu)
    torch.testing.assert_close(loss.cpu(), expected)
    torch.testing.assert_close(grad.cpu(), expected_grad)
    with torch.autocast("cuda", dtype=torch.float16):
        half = (on_gpu.detach() * 1e4).half().requires_grad_()
        extreme = focal_loss(half, target.cuda(), gamma=0.5)
    extreme.backward()
    assert torch.isfinite(extreme) and torch.isfinite(half.grad).all()
