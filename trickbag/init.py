"""Zero-γ initialization of the last BatchNorm in each residual block.

With γ = 0 every residual block starts as the identity, so a deep ResNet behaves like a shallow one early in
training and tolerates larger learning rates (Goyal et al. 2017, https://arxiv.org/abs/1706.02677, Sec. 5.1;
He et al. 2019, "Bag of Tricks", https://arxiv.org/abs/1812.01187).
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
