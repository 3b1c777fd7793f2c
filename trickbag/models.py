"""Image classifiers by name: ``build_model("resnet18_cifar", num_classes=10)``.

Built-in: ``digits_cnn`` (8x8 greyscale digits), ``resnet18_cifar`` (CIFAR ResNet-18, BasicBlocks whose
``last_bn`` can be zero-initialised), ``airbench`` (airbench94-style conv-BN-GELU net), ``cifar_fast`` (a
small net tuned for CIFAR-10 on a few CPU cores). ``timm:<name>`` and ``torchvision:<name>`` build those
libraries' models when installed, always with ``pretrained=False`` / ``weights=None``: trickbag never
downloads weights; fine-tuning starts from a local file instead (``trickbag.finetune``).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "DigitsCNN",
    "ResNetCIFAR",
    "BasicBlock",
    "AirbenchNet",
    "CifarFastNet",
    "ModelOptionError",
    "PatchWhitening",
]


def conv_bn(in_channels: int, out_channels: int, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """3x3 conv (no bias: BN follows) -> BatchNorm -> activation."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        activation(),
    )


# ---------------------------------------------------------------------------------------------------------
# digits_cnn
# ---------------------------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 greyscale digits: (N, C, 8, 8) -> (N, num_classes) logits.

    Two conv stages (8x8 -> 4x4 -> 2x2), then global pooling and a linear head; works on any H, W >= 4.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(in_channels, width),
            conv_bn(width, width),
            nn.MaxPool2d(2),
            conv_bn(width, 2 * width),
            conv_bn(2 * width, 2 * width),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------------------
# resnet18_cifar
# ---------------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet BasicBlock: conv-BN-ReLU-conv-BN plus shortcut, then ReLU.

    ``last_bn`` is the BN closing the residual branch; setting its weight to 0 makes the block start as
    the identity ("zero-gamma", Goyal et al. 2017, https://arxiv.org/abs/1706.02677).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.last_bn = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.last_bn(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet-18 (He et al. 2015, https://arxiv.org/abs/1512.03385): 3x3 stem, no stem pooling.

    (N, C, 32, 32) -> (N, num_classes). ``width`` is the first stage's channels (64 in the paper's
    ImageNet ResNet-18; 11M parameters); ``blocks`` the BasicBlocks per stage.
    """

    def __init__(
        self, num_classes: int, in_channels: int = 3, width: int = 64, blocks: Sequence[int] = (2, 2, 2, 2)
    ) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, width)
        stages: list[nn.Module] = []
        channels = width
        for index, count in enumerate(blocks):
            out_channels = width * 2**index
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.layers = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


# ---------------------------------------------------------------------------------------------------------
# airbench and cifar_fast
# ---------------------------------------------------------------------------------------------------------


class ConvGroup(nn.Module):
    """airbench's block: conv -> maxpool 2 -> BN -> GELU -> conv -> BN -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, activation: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = activation()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.pool(self.conv1(x))))
        return self.act2(self.bn2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """airbench94-style net (Jordan 2024, https://arxiv.org/abs/2404.00498), without the whitening layer.

    stem conv (3x3, ``stem_width``) -> BN -> GELU -> three ConvGroups (each halves H, W) -> global max pool
    -> linear (no bias) scaled by ``1 / temperature``. (N, C, H, W) -> (N, num_classes).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 256, 256),
        stem_width: int = 24,
        temperature: float = 9.0,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if len(widths) < 1:
            raise ValueError(f"widths must list at least one block width, got {widths!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.stem = conv_bn(in_channels, stem_width, activation)
        groups, channels = [], stem_width
        for width in widths:
            groups.append(ConvGroup(channels, int(width), activation))
            channels = int(width)
        self.groups = nn.Sequential(*groups)
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.linear = nn.Linear(channels, num_classes, bias=False)
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(self.groups(self.stem(x)))) / self.temperature


class PatchWhitening(nn.Module):
    """A conv whose filters whiten image patches, fitted on the first training batch.

    airbench's patch-whitening layer (https://arxiv.org/abs/2404.00498, after Coates & Ng 2012), as a
    data-dependent init: the first forward in training mode computes the (uncentred) covariance of the batch's
    ``kernel_size`` x ``kernel_size`` patches (taken with the conv's own stride and padding) and sets the
    filters to its leading eigenvectors scaled by ``1 / sqrt(eigenvalue + eps)``, each with its negation (so a
    following ReLU keeps both signs). ``out_channels`` (even; default ``2 * C * k * k``: every eigenvector)
    keeps the ``out_channels / 2`` leading ones. ``trainable=False`` (airbench) freezes the filters
    (``requires_grad=False``); ``trainable=True`` makes it only an initialisation. ``fitted`` is a buffer, so a
    loaded checkpoint is never re-fitted. Under torchrun every rank takes rank 0's filters.
    (N, C, H, W) -> (N, out_channels, H', W') as ``nn.Conv2d`` with the same kernel, stride and padding.
    """

    def __init__(
        self,
        in_channels: int,
        kernel_size: int = 2,
        eps: float = 5e-4,
        *,
        stride: int | None = None,
        padding: int = 0,
        out_channels: int | None = None,
        trainable: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        most = 2 * in_channels * kernel_size**2
        self.out_channels = most if out_channels is None else int(out_channels)
        if self.out_channels % 2 or not 2 <= self.out_channels <= most:
            raise ValueError(
                f"out_channels must be even and in [2, {most}] (2 x the patch size {in_channels}x{kernel_size}"
                f"x{kernel_size}), got {out_channels!r}"
            )
        stride = kernel_size if stride is None else stride
        self.conv = nn.Conv2d(in_channels, self.out_channels, kernel_size, stride, padding, bias=bias)
        self.conv.weight.requires_grad_(trainable)
        self.eps = eps
        self.register_buffer("fitted", torch.zeros(1, dtype=torch.uint8))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Set the filters from the patches of ``x`` (N, C, H, W)."""
        conv = self.conv
        k = conv.kernel_size[0]
        with torch.autocast(x.device.type, enabled=False):
            patches = F.unfold(x.float(), k, padding=conv.padding, stride=conv.stride)
            patches = patches.transpose(1, 2).reshape(-1, x.shape[1] * k * k)
            covariance = patches.T @ patches / len(patches)
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())  # ascending
            filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + self.eps)).T.flip(0)
        filters = filters[: self.out_channels // 2].to(conv.weight.dtype).reshape(-1, x.shape[1], k, k)
        conv.weight.copy_(torch.cat([filters, -filters]))
        if conv.bias is not None:
            conv.bias.zero_()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(conv.weight.data, 0)  # one init for all ranks, as DDP assumes
        self.fitted.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.fitted):
            self.fit(x)
        return self.conv(x)


class CifarFastNet(nn.Module):
    """A small CIFAR net for a few CPU cores, built for accuracy per FLOP rather than peak accuracy.

    A stride-2 stem halves the resolution at once (full-resolution 3x3 convs are most of a small net's cost
    on CPU): a trained ``stem_kernel`` x ``stem_kernel`` conv (overlapping 4x4 patches by default: 80.6% vs
    77.8% for 2x2 patches after 7 CPU epochs, at the same cost) -BN-ReLU of ``stem_width`` channels, or with
    ``whiten=True`` a frozen 2x2 ``PatchWhitening`` fitted on the first training batch (2 * C * 4 channels;
    worse here, so off by default). ``stem_init="whiten"`` keeps the trained stem but starts it as the whitening
    filters of the first batch's patches (the leading ``stem_width / 2`` eigenvectors and their negations):
    +0.4 points after 4 CPU epochs (10 seeds). Then per width: maxpool 2 -> ``depth`` x (conv3x3-BN-activation),
    ``depth`` one int or one per width (``[1, 2]`` drops the costliest 8x8 conv: ~25% less time a step, 79.3 vs
    80.7% at 4 epochs); ``downsample`` (one bool or one per width) false skips a width's max-pool, so its convs
    run at the resolution before it; global max pool; linear (no bias) / ``temperature``. ``activation``: "relu"
    or "gelu" (airbench's): GELU costs ~6% more training time on 2 CPU cores and gave +0.48 points at 4 epochs
    (10 paired seeds, fp32; docs/ablation-cifar10-gelu), +0.3-0.5 at 16.
    ``pool_first=True`` moves the first maxpool between the stem conv and its BN (airbench's conv -> pool -> BN
    -> act order): the stem's BN and activation then see 4x fewer elements (~5% faster on 2 CPU cores, same accuracy
    in the recipe).
    (N, C, H, W) -> (N, num_classes); H, W divisible by 2 ** (len(widths) + 1).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128),
        stem_width: int = 32,
        depth: int | Sequence[int] = 2,
        temperature: float = 4.0,
        whiten: bool = False,
        stem_kernel: int = 4,
        pool_first: bool = False,
        stem_init: str = "random",
        downsample: bool | Sequence[bool] = True,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        activations = {"relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in activations:
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        act = activations[activation]
        if stem_init not in ("random", "whiten"):
            raise ValueError(f"stem_init must be 'random' or 'whiten', got {stem_init!r}")
        if stem_init == "whiten" and (
            whiten or stem_width % 2 or stem_width > 2 * in_channels * stem_kernel**2
        ):
            raise ValueError(
                "stem_init='whiten' initialises the trained stem (whiten=False) from the patch whitening: "
                f"stem_width must be even and <= {2 * in_channels * stem_kernel**2}, got {stem_width!r}"
            )
        depths = [depth] * len(widths) if isinstance(depth, int) else list(depth)
        if len(widths) < 1 or len(depths) != len(widths) or any(d < 1 for d in depths):
            raise ValueError(
                "widths must list at least one width and depth must be an int >= 1 or one such int per "
                f"width, got widths={widths!r}, depth={depth!r}"
            )
        pools = [downsample] * len(widths) if isinstance(downsample, bool) else list(downsample)
        if len(pools) != len(widths) or not all(isinstance(p, bool) for p in pools):
            raise ValueError(
                f"downsample must be true/false or one such value per width, got {downsample!r} for widths={widths!r}"
            )
        if pool_first and not pools[0]:
            raise ValueError(
                "pool_first=True moves the first width's max-pool into the stem: downsample[0] must be true"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if stem_kernel not in (2, 3, 4):
            raise ValueError(
                f"stem_kernel must be 2, 3 or 4 (stride 2, output H/2 x W/2), got {stem_kernel!r}"
            )
        if whiten and pool_first:
            raise ValueError("pool_first=True needs the trained stem: it cannot be combined with whiten=True")
        if whiten:
            stem = PatchWhitening(in_channels, 2)
            layers: list[nn.Module] = [stem, act()]
            channels = stem.out_channels
        else:
            padding = (stem_kernel - 1) // 2
            if stem_init == "whiten":  # trainable, initialised as the whitening filters of the first batch
                stem_conv: nn.Module = PatchWhitening(
                    in_channels, stem_kernel, stride=2, padding=padding, out_channels=stem_width,
                    trainable=True, bias=False,
                )  # fmt: skip
            else:
                stem_conv = nn.Conv2d(
                    in_channels, stem_width, stem_kernel, stride=2, padding=padding, bias=False
                )
            layers = [
                stem_conv,
                nn.BatchNorm2d(stem_width),
                act(),
            ]
            if pool_first:
                # airbench's conv -> pool -> BN -> act order: BN and the activation see 4x fewer elements.
                layers.insert(1, nn.MaxPool2d(2))
            channels = stem_width
        for i, width in enumerate(widths):
            if pools[i] and not (i == 0 and pool_first):
                layers.append(nn.MaxPool2d(2))
            for _ in range(depths[i]):
                layers.append(conv_bn(channels, int(width), act))
                channels = int(width)
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.linear = nn.Linear(channels, num_classes, bias=False)
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(self.features(x))) / self.temperature


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "resnet18_cifar": ResNetCIFAR,
    "airbench": AirbenchNet,
    "cifar_fast": CifarFastNet,
}
MODEL_NAMES: tuple[str, ...] = (*_BUILDERS, "timm:<name>", "torchvision:<name>")


def _build_timm(name: str, num_classes: int, in_channels: int, options: dict) -> nn.Module:
    try:
        import timm
    except ImportError as error:
        raise ValueError(f"model 'timm:{name}' needs the timm package: pip install trickbag[timm]") from error
    if options.pop("pretrained", False):
        raise ValueError("trickbag never downloads weights: remove model.options.pretrained for timm models")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)


def _build_torchvision(name: str, num_classes: int, in_channels: int, options: dict) -> nn.Module:
    try:
        import torchvision.models
    except ImportError as error:
        raise ValueError(
            f"model 'torchvision:{name}' needs the torchvision package: pip install trickbag[torchvision]"
        ) from error
    if options.pop("weights", None) is not None or options.pop("pretrained", False):
        raise ValueError("trickbag never downloads weights: remove weights/pretrained for torchvision models")
    if in_channels != 3:
        raise ValueError(f"torchvision models take 3 input channels, got in_channels={in_channels}")
    available = torchvision.models.list_models()
    if name not in available:
        near = difflib.get_close_matches(name, available, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ValueError(f"unknown torchvision model {name!r}{hint}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)


class ModelOptionError(ValueError):
    """A model's constructor refused its options (unknown keyword or bad value); the message names the option."""


def build_model(name: str, num_classes: int, *, in_channels: int = 3, **options) -> nn.Module:
    """Build an untrained classifier by name.

    Args:
        name: one of ``MODEL_NAMES``; ``timm:<name>`` / ``torchvision:<name>`` for those libraries.
        num_classes: outputs of the final layer.
        in_channels: image channels (1 for greyscale digits).
        **options: the model's constructor keywords (e.g. ``width=32`` for ``resnet18_cifar``,
            ``widths=[64, 256, 256]`` for ``airbench``); an unknown keyword or a value the constructor refuses
            raises ``ModelOptionError`` (a ValueError) naming the model and the option.

    Returns:
        an ``nn.Module`` mapping (N, in_channels, H, W) float to (N, num_classes) logits.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if name.startswith("timm:"):
        return _build_timm(name[5:], num_classes, in_channels, dict(options))
    if name.startswith("torchvision:"):
        return _build_torchvision(name[12:], num_classes, in_channels, dict(options))
    builder = _BUILDERS.get(name)
    if builder is None:
        near = difflib.get_close_matches(name, list(_BUILDERS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown model name {name!r}{hint} Known: {', '.join(MODEL_NAMES)}")
    parameters = inspect.signature(builder).parameters
    known = [key for key in parameters if key not in ("num_classes", "in_channels")]
    open_ended = any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values())
    unknown = [key for key in options if key not in known and not open_ended]
    if unknown:  # a misspelt option names itself, not a bare constructor TypeError
        near = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ModelOptionError(
            f"model {name!r} has no option {unknown[0]!r}{hint} (its options: {', '.join(known)})"
        )
    try:
        return builder(num_classes, in_channels, **options)
    except (TypeError, ValueError) as error:
        raise ModelOptionError(f"model {name!r}: {error}") from error
