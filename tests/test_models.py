import builtins
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trickbag.models import MODEL_NAMES, BasicBlock, build_model


@pytest.mark.parametrize(
    "name, in_channels, size, options",
    [
        ("digits_cnn", 1, 8, {}),
        ("resnet18_cifar", 3, 32, {"width": 8}),
        ("airbench", 3, 32, {"widths": [8, 16, 16]}),
        ("cifar_fast", 3, 32, {}),
        ("cifar_fast", 3, 32, {"stem_kernel": 3}),
        ("cifar_fast", 3, 32, {"stem_kernel": 2, "widths": [8, 8, 8]}),
        ("cifar_fast", 3, 32, {"widths": [8, 16, 16], "depth": 1, "whiten": True}),
        ("cifar_fast", 3, 32, {"pool_first": True, "widths": [8, 16, 16]}),
        ("cifar_fast", 3, 32, {"pool_first": True, "stem_kernel": 3}),
    ],
)
def test_forward_shapes(name, in_channels, size, options):
    model = build_model(name, 7, in_channels=in_channels, **options)
    out = model(torch.randn(3, in_channels, size, size))
    assert out.shape == (3, 7)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, in_channels, size, size)).shape == (1, 7)  # N=1 in eval mode
    assert name in MODEL_NAMES


def test_channels_last_forward_matches_contiguous():
    torch.manual_seed(0)
    model = build_model("cifar_fast", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_cifar_fast_pool_first_moves_the_stem_pool_and_matches_pool_after_a_monotone_bn():
    # At init in eval mode each BN is x / sqrt(1 + eps): increasing, so max pooling commutes with BN and
    # ReLU and both orders give the same logits; only the position of the first MaxPool2d differs.
    torch.manual_seed(0)
    pool_after = build_model("cifar_fast", 10, widths=[8, 16]).eval()
    torch.manual_seed(0)
    pool_before = build_model("cifar_fast", 10, widths=[8, 16], pool_first=True).eval()
    kinds = [type(m).__name__ for m in pool_before.features[:5]]
    assert kinds == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU", "Sequential"]
    assert [type(m).__name__ for m in pool_after.features[:5]] == [
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "MaxPool2d",
        "Sequential",
    ]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pool_before(x), pool_after(x))
        pool_before.features[2].weight.fill_(-1.0)  # a decreasing BN no longer commutes with max pooling
        assert not torch.allclose(pool_before(x), pool_after(x))


def test_resnet18_cifar_blocks_expose_last_bn_and_zero_gamma_makes_identity_branch():
    model = build_model("resnet18_cifar", 10)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    assert all(isinstance(b.last_bn, torch.nn.BatchNorm2d) for b in blocks)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the standard CIFAR ResNet-18
    block = BasicBlock(4, 4).eval()
    torch.nn.init.zeros_(block.last_bn.weight)
    torch.nn.init.zeros_(block.last_bn.bias)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(block(x), torch.relu(x))


def test_unknown_name_suggests_nearest():
    with pytest.raises(
        ValueError, match=r"unknown model name 'resnet18'; did you mean 'resnet18_cifar'\?.*digits_cnn"
    ):
        build_model("resnet18", 10)
    with pytest.raises(ValueError, match="unknown model name 'zzz' Known: digits_cnn"):
        build_model("zzz", 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        build_model("digits_cnn", 0)
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        build_model("digits_cnn", 10, in_channels=0)
    with pytest.raises(TypeError, match="model name must be a str"):
        build_model(None, 10)
    from trickbag.models import ModelOptionError

    with pytest.raises(
        ModelOptionError, match=r"model 'airbench' has no option 'widht'; did you mean 'widths'\?"
    ):
        build_model("airbench", 10, widht=3)
    with pytest.raises(
        ModelOptionError, match=r"model 'airbench' has no option 'zzz' \(its options: widths, .*temperature"
    ):
        build_model("airbench", 10, zzz=3)
    with pytest.raises(ModelOptionError, match="model 'airbench': temperature must be > 0"):
        build_model("airbench", 10, temperature=0)
    with pytest.raises(ValueError, match="widths must list at least one width"):
        build_model("cifar_fast", 10, widths=[])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        build_model("cifar_fast", 10, temperature=-1.0)
    with pytest.raises(ValueError, match="stem_kernel must be 2, 3 or 4"):
        build_model("cifar_fast", 10, stem_kernel=5)
    with pytest.raises(ValueError, match="pool_first=True needs the trained stem.*whiten=True"):
        build_model("cifar_fast", 10, whiten=True, pool_first=True)


@pytest.fixture
def hide_modules(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] in ("timm", "torchvision"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for module in [m for m in sys.modules if m.split(".")[0] in ("timm", "torchvision")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_timm_gives_install_hint(hide_modules):
    with pytest.raises(ValueError, match=r"pip install trickbag\[timm\]"):
        build_model("timm:resnet18", 10)


def test_missing_torchvision_gives_install_hint(hide_modules):
    with pytest.raises(ValueError, match=r"pip install trickbag\[torchvision\]"):
        build_model("torchvision:resnet18", 10)


def test_digits_cnn_learns_digits_quickly():
    from trickbag.data import BatchLoader, channel_stats, load_digits

    torch.manual_seed(0)
    train, test = load_digits()
    mean, std = channel_stats(train.images)
    loader = BatchLoader(train.images, train.labels, batch_size=64, shuffle=True, mean=mean, std=std)
    model = build_model("digits_cnn", 10, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for _ in range(4):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    evaluator = BatchLoader.for_eval(test.images, test.labels, batch_size=512, mean=mean, std=std)
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in evaluator)
    assert correct / len(test) >= 0.93


def test_patch_whitening_fits_once_on_first_training_batch():
    from trickbag.models import PatchWhitening

    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(12, 12, generator=generator)
    patches = torch.randn(4096, 12, generator=generator) @ mixing  # correlated patch pixels
    x = F.fold(patches.reshape(16, 256, 12).transpose(1, 2), (32, 32), 2, stride=2)  # (16, 3, 32, 32)
    layer = PatchWhitening(3, 2, eps=1e-8)
    layer.eval()
    layer(x)
    assert int(layer.fitted) == 0  # eval mode never fits
    layer.train()
    out = layer(x)
    assert out.shape == (16, 24, 16, 16) and int(layer.fitted) == 1
    # Reference: whitened patches have identity second moment; the second half is the negation.
    flat = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    torch.testing.assert_close(
        flat.T @ flat / len(flat), torch.eye(12, dtype=torch.float64), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(out[:, 12:], -out[:, :12])
    weights = layer.conv.weight.clone()
    layer(x * 3 + 1)  # already fitted: filters unchanged
    assert torch.equal(layer.conv.weight, weights) and not layer.conv.weight.requires_grad
    fresh = PatchWhitening(3, 2)
    fresh.load_state_dict(layer.state_dict())
    fresh.train()
    fresh(x * 3 + 1)
    assert torch.equal(fresh.conv.weight, weights)  # a loaded, fitted layer is not re-fitted


def test_patch_whitening_overlapping_trainable_keeps_leading_components():
    """stride 2, padding 1, 4x4 patches, half the channels: against numpy's patches and eigendecomposition."""
    from trickbag.models import CifarFastNet, PatchWhitening

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 12, 12, generator=generator)
    x = x + 0.8 * x.roll(1, dims=3) + 0.5 * x[:, [1, 2, 0]]  # correlated neighbours and channels
    layer = PatchWhitening(3, 4, eps=1e-9, stride=2, padding=1, out_channels=16, trainable=True, bias=False)
    layer.train()
    out = layer(x).detach()
    assert out.shape == (6, 16, 6, 6) and layer.conv.weight.requires_grad and layer.conv.bias is None
    # Reference: patches cut by hand from the zero-padded images, numpy's eigh of their second moment.
    padded = np.pad(x.double().numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    corners = range(0, 11, 2)  # output positions 0..5 at stride 2 on the 14x14 padded image
    patches = np.stack(
        [padded[n, :, i : i + 4, j : j + 4].ravel() for n in range(6) for i in corners for j in corners]
    )
    assert len(patches) == 6 * 36
    second_moment = patches.T @ patches / len(patches)
    eigenvalues = np.linalg.eigh(second_moment)[0][::-1][:8]
    flat = out[:, :8].permute(0, 2, 3, 1).reshape(-1, 8).double().numpy()
    # Whitened leading components: identity second moment; the filters span numpy's leading eigenvectors.
    np.testing.assert_allclose(flat.T @ flat / len(flat), np.eye(8), atol=1e-4)
    weights = layer.conv.weight.detach()[:8].reshape(8, -1).double().numpy()
    np.testing.assert_allclose(np.linalg.norm(weights, axis=1), 1 / np.sqrt(eigenvalues), rtol=1e-4)
    torch.testing.assert_close(out[:, 8:], -out[:, :8])
    with pytest.raises(ValueError, match="out_channels must be even"):
        PatchWhitening(3, 2, out_channels=25)
    with pytest.raises(ValueError, match="stem_init"):
        CifarFastNet(10, stem_init="pca")
    with pytest.raises(ValueError, match="stem_width must be even"):
        CifarFastNet(10, stem_init="whiten", stem_width=33)


def test_cifar_fast_whitened_stem_is_fitted_once_and_trains():
    from trickbag.models import CifarFastNet

    torch.manual_seed(0)
    model = CifarFastNet(10, widths=(8, 16), stem_width=8, stem_init="whiten", pool_first=True)
    stem = model.features[0]
    x = torch.randn(5, 3, 32, 32)
    model(x).sum().backward()
    assert int(stem.fitted) == 1 and stem.conv.weight.grad is not None  # trained after the init
    fitted = stem.conv.weight.detach().clone()
    model(x * 2).sum().backward()
    assert torch.equal(stem.conv.weight, fitted)
    clone = CifarFastNet(10, widths=(8, 16), stem_width=8, stem_init="whiten", pool_first=True)
    clone.load_state_dict(model.state_dict())
    clone(torch.randn(5, 3, 32, 32))
    assert torch.equal(clone.features[0].conv.weight, fitted)  # a checkpoint is never re-fitted


def test_cifar_fast_depth_per_width():
    """``depth`` as one int per width: that many conv-BN-ReLU blocks in each group, and errors that say why."""
    from trickbag.models import CifarFastNet

    def conv_counts(model):  # conv blocks after each maxpool, and the last block's width
        counts, last_width = [], None
        for layer in model.features:
            if isinstance(layer, torch.nn.MaxPool2d):
                counts.append(0)
            elif isinstance(layer, torch.nn.Sequential) and isinstance(layer[0], torch.nn.Conv2d):
                counts[-1] += 1
                last_width = layer[0].out_channels
        return counts, last_width

    counts, last_width = conv_counts(CifarFastNet(10, widths=(8, 16), stem_width=8, depth=[1, 3]))
    assert counts[-2:] == [1, 3] and last_width == 16
    assert conv_counts(CifarFastNet(10, widths=(8, 16), stem_width=8, depth=2))[0][-2:] == [2, 2]
    assert CifarFastNet(10, widths=(8, 16), stem_width=8, depth=[1, 3])(torch.randn(2, 3, 32, 32)).shape == (
        2,
        10,
    )
    for bad in ([1], [1, 2, 3], [0, 2]):
        with pytest.raises(ValueError, match="depth must be an int >= 1 or one such int per width"):
            CifarFastNet(10, widths=(8, 16), depth=bad)


def test_cifar_fast_downsample_false_keeps_a_width_at_the_stems_resolution():
    """``downsample=[False, True, True]``: the first width's convs see the stem's 16x16 output (no max-pool
    before them), the next two are pooled to 8x8 and 4x4; the resolutions seen by each conv, from hooks."""
    from trickbag.models import CifarFastNet

    model = CifarFastNet(
        10, widths=(8, 16, 32), stem_width=8, depth=[1, 1, 1], downsample=[False, True, True]
    )
    sides = []
    for layer in model.modules():
        if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (3, 3):
            layer.register_forward_hook(lambda module, inputs, output: sides.append(inputs[0].shape[-1]))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sides == [16, 8, 4]
    default_sides = []
    plain = CifarFastNet(10, widths=(8, 16, 32), stem_width=8, depth=1)
    for layer in plain.modules():
        if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (3, 3):
            layer.register_forward_hook(
                lambda module, inputs, output: default_sides.append(inputs[0].shape[-1])
            )
    plain(torch.randn(2, 3, 32, 32))
    assert default_sides == [8, 4, 2]
    with pytest.raises(ValueError, match="downsample must be true/false or one such value per width"):
        CifarFastNet(10, widths=(8, 16), downsample=[False])
    with pytest.raises(ValueError, match="downsample\\[0\\] must be true"):
        CifarFastNet(10, widths=(8, 16), pool_first=True, downsample=[False, True])


def test_cifar_fast_activation_option():
    """``activation="gelu"`` puts GELU after the stem and every conv (ReLU by default); other names say what is valid."""
    from trickbag.models import CifarFastNet

    def kinds(model):
        return {type(m).__name__ for m in model.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.GELU))}

    gelu = CifarFastNet(10, widths=(8, 16), stem_width=8, activation="gelu")
    assert kinds(gelu) == {"GELU"} and sum(isinstance(m, torch.nn.GELU) for m in gelu.modules()) == 5
    assert kinds(CifarFastNet(10, widths=(8, 16), stem_width=8)) == {"ReLU"}
    assert gelu(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    with pytest.raises(ValueError, match="activation must be 'relu' or 'gelu', got 'swish'"):
        CifarFastNet(10, activation="swish")
