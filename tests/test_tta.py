"""Test-time augmentation (trickbag.tta): views and weights against hand-computed cases."""

import pytest
import torch
from torch import nn

from trickbag.tta import TestTimeAugmentation, shifted_views, tta_logits, tta_probabilities


class TopLeftPixel(nn.Module):
    """Logits (pixel (0, 0) of channel 0, 0): each view's prediction is a known function of one pixel."""

    def forward(self, x):
        return torch.stack([x[:, 0, 0, 0], torch.zeros(len(x), dtype=x.dtype)], 1)


def two_class(v: float) -> torch.Tensor:
    return torch.tensor([v, 0.0]).softmax(0)


def test_shifted_views_by_hand():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)  # [[0,1,2],[3,4,5],[6,7,8]]
    up_left, down_right = shifted_views(x)
    # Reflect padding: the row/column before the first is the second one.
    assert up_left[0, 0].tolist() == [[4, 3, 4], [1, 0, 1], [4, 3, 4]]
    assert down_right[0, 0].tolist() == [[4, 5, 4], [7, 8, 7], [4, 5, 4]]
    with pytest.raises(ValueError, match="pixels"):
        shifted_views(x, pixels=3)


def test_flip_and_translate_views_by_hand():
    x = torch.randn(2, 1, 5, 7)
    got = tta_probabilities(TopLeftPixel(), x, flip=True, translate=True)
    for i in range(2):
        a, b = x[i, 0, 0, 0], x[i, 0, 0, -1]  # the image's and its mirror's top-left pixel
        # Shifted up-left, the top-left pixel is (1, 1) (reflection); shifted down-right then mirrored: (1, W-2).
        c, d = x[i, 0, 1, 1], x[i, 0, 1, -2]
        expected = (two_class(a) + two_class(b) + two_class(c) + two_class(d)) / 4
        torch.testing.assert_close(got[i], expected)
    assert torch.allclose(got.sum(1), torch.ones(2))


def test_views_without_flip_and_without_anything():
    model = TopLeftPixel()
    x = torch.randn(3, 1, 4, 4)
    got = tta_probabilities(model, x, flip=False, translate=True)
    # the image, shifted up-left and shifted down-right: top-left pixels (0, 0), (1, 1) and (1, 1)
    expected = (
        torch.stack([two_class(v) for v in x[:, 0, 0, 0]])
        + 2 * torch.stack([two_class(v) for v in x[:, 0, 1, 1]])
    ) / 3
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(tta_logits(model, x, flip=False, translate=False), model(x))


def test_logits_are_log_of_mean_probabilities_and_wrapper_matches():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )
    x = torch.randn(7, 3, 9, 11)  # odd batch and odd sizes
    logits = tta_logits(model, x, flip=True, translate=True)
    torch.testing.assert_close(logits.softmax(1), tta_probabilities(model, x, flip=True, translate=True))
    torch.testing.assert_close(TestTimeAugmentation(model, flip=True, translate=True)(x), logits)
    # flip only: the mean of the two softmaxes, computed directly
    expected = ((model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2).log()
    torch.testing.assert_close(tta_logits(model, x, flip=True), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gives_float32(dtype):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=dtype):
        out = tta_logits(model, x, flip=True, translate=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, tta_logits(model, x, flip=True, translate=True), atol=0.05, rtol=0)


def test_evaluate_uses_translate_tta():
    from trickbag.losses import ClassifierLoss
    from trickbag.train import evaluate

    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 3, (10,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    scores = evaluate(model, batches, ClassifierLoss(num_classes=3), flip_tta=True, translate_tta=True)
    with torch.no_grad():
        expected = torch.nn.functional.nll_loss(tta_logits(model, x, flip=True, translate=True), y)
    assert scores["loss"] == pytest.approx(float(expected), rel=1e-5)
