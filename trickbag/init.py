"""Initialisations that start a network close to the identity.

* Zero-γ of the last BatchNorm in each residual block: with γ = 0 every residual block starts as the identity, so
  a deep ResNet behaves like a shallow one early in training and tolerates larger learning rates (Goyal et al.
  2017, https://arxiv.org/abs/1706.02677, Sec. 5.1; He et al. 2019, "Bag of Tricks",
  https://arxiv.org/abs/1812.01187).
* Identity (Dirac) init of plain convolutions, for nets without shortcuts: airbench's trick (Jordan 2024,
  https://arxiv.org/abs/2404.00498) of setting the first ``in_channels`` filters of each conv to pass its input
  through, so a deep plain stack starts as a shallow one. On cifar10_fast (4 CPU epochs, leave-one-out over 10
  seeds): +0.32 points [+0.18, +0.45], Holm p 0.012 (docs/ablation-cifar10-v3).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

# (module path prefix, class name) -> attribute holding the block's last BatchNorm. Matched by name so that
# neither torchvision nor timm has to be imported (or installed).
_KNOWN_BLOCKS = {
    ("torchvision.models.resnet", "BasicBlock"): "bn2",
    ("torchvision.models.resnet", "Bottleneck"): "bn3",
    ("timm.models.resnet", "BasicBlock"): "bn2",
    ("timm.models.resnet", "Bottleneck"): "bn3",
}


def last_bn_of_block(module: nn.Module) -> nn.modules.batchnorm._BatchNorm | None:
    """The last BatchNorm of a residual block, or None if ``module`` is not a block we recognise.

    Recognised: any module with a ``last_bn`` attribute that is a BatchNorm (trickbag's own models), and
    torchvision's / timm's ResNet ``BasicBlock`` (``bn2``) and ``Bottleneck`` (``bn3``).
    """
    candidate = getattr(module, "last_bn", None)
    if candidate is None:
        cls = type(module)
        for (path, name), attribute in _KNOWN_BLOCKS.items():
            if cls.__name__ == name and cls.__module__.startswith(path):
                candidate = getattr(module, attribute, None)
                break
    if isinstance(candidate, nn.modules.batchnorm._BatchNorm) and candidate.weight is not None:
        return candidate
    return None


def zero_init_residual_bn(model: nn.Module) -> int:
    """Set γ (the BatchNorm weight) to 0 in the last BatchNorm of every residual block of ``model``.

    Returns:
        How many BatchNorm layers were set (a BatchNorm shared by blocks counts once). Warns if none: the
        model has no block this function recognises (see :func:`last_bn_of_block`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    touched: dict[int, nn.Module] = {}
    for module in model.modules():
        bn = last_bn_of_block(module)
        if bn is not None:
            touched[id(bn)] = bn
    with torch.no_grad():
        for bn in touched.values():
            bn.weight.zero_()
    if not touched:
        warnings.warn(
            f"zero_init_residual_bn: found no residual block in {type(model).__name__}; nothing was changed "
            "(give blocks a `last_bn` attribute pointing at their last BatchNorm)",
            stacklevel=2,
        )
    return len(touched)


def identity_init_convs(model: nn.Module) -> int:
    """Dirac-initialise the first ``min(out, in)`` filters of every stride-1, odd-sized, ungrouped 2-D conv.

    Filter ``i < min(out_channels, in_channels)`` becomes the identity on input channel ``i`` (1 at the kernel's
    centre, 0 elsewhere: ``torch.nn.init.dirac_``); the other filters keep their random init, so the layer is
    not rank-deficient. Strided, grouped or even-sized convs (stems, downsampling) are left alone: they have no
    identity to start from. Returns how many convs were set.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if (
                isinstance(module, nn.Conv2d)
                and module.groups == 1
                and module.stride == (1, 1)
                and all(k % 2 == 1 for k in module.kernel_size)
            ):
                weight = module.weight
                nn.init.dirac_(weight[: min(weight.shape[0], weight.shape[1])])
                count += 1
    return count
