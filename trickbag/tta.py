"""Test-time augmentation: average the class probabilities of a few views of each image.

* flip: the image and its mirror (left-right);
* translate: after airbench's multi-crop (Jordan 2024, https://arxiv.org/abs/2404.00498): also the image shifted
  by one pixel up-left and the image shifted one pixel down-right (reflect padding), the latter mirrored when
  ``flip`` is on. 4 forward passes with both, all weighted equally. airbench's 6 views (both shifted images
  and both their mirrors, the unshifted pair weighted double) scored the same on cifar10_fast (4 epochs, 3
  seeds: 80.67 vs 80.63 % test accuracy) for 1.5x the passes, so the two redundant ones are left out.

On cifar10_fast (4 CPU epochs) flip adds ~1 point of test accuracy and translate another ~0.5: about what one
more training epoch buys, for a fraction of its cost (each view is one forward pass over the test set).
Probabilities are averaged (not logits), and their log is returned, usable as logits by the loss and metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def shifted_views(x: torch.Tensor, pixels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (N, C, H, W) shifted by ``pixels`` up-left and down-right, the borders filled by reflection."""
    if pixels < 1 or pixels >= min(x.shape[-2:]):
        raise ValueError(f"pixels={pixels!r} must be >= 1 and smaller than the image ({tuple(x.shape[-2:])})")
    height, width = x.shape[-2:]
    padded = F.pad(x, (pixels,) * 4, mode="reflect")
    return padded[..., :height, :width], padded[..., 2 * pixels :, 2 * pixels :]


def tta_probabilities(model: nn.Module, x: torch.Tensor, *, flip: bool = True, translate: bool = False):
    """Mean softmax over the views of ``x`` (N, C, H, W): (N, num_classes) float32. No views: one pass."""
    views = [x]
    if flip:
        views.append(x.flip(3))
    if translate:
        up_left, down_right = shifted_views(x)
        views += [up_left, down_right.flip(3) if flip else down_right]
    probabilities = model(views[0]).float().softmax(1)
    for view in views[1:]:
        probabilities = probabilities + model(view).float().softmax(1)
    return probabilities / len(views)


def tta_logits(model: nn.Module, x: torch.Tensor, *, flip: bool = True, translate: bool = False):
    """Log of :func:`tta_probabilities`: usable as logits (softmax gives back the averaged probabilities)."""
    if not flip and not translate:
        return model(x).float()
    return tta_probabilities(model, x, flip=flip, translate=translate).log()


class TestTimeAugmentation(nn.Module):
    """``model`` wrapped so that ``forward`` returns :func:`tta_logits` (for code that expects a plain model)."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, model: nn.Module, *, flip: bool = True, translate: bool = False) -> None:
        super().__init__()
        self.model, self.flip, self.translate = model, flip, translate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.model, x, flip=self.flip, translate=self.translate)
