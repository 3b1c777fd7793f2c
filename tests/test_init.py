import warnings

import pytest
import torch
from torch import nn

from trickbag.init import last_bn_of_block, zero_init_residual_bn


def make_block_class(class_name, module_path, bn_names):
    """A tiny class named and placed like torchvision's / timm's blocks, without importing them."""

    def __init__(self):
        nn.Module.__init__(self)
        for name in bn_names:
            setattr(self, name, nn.BatchNorm2d(2))

    return type(class_name, (nn.Module,), {"__init__": __init__, "__module__": module_path})


TVBasic = make_block_class("BasicBlock", "torchvision.models.resnet", ["bn1", "bn2"])
TVBottleneck = make_block_class("Bottleneck", "torchvision.models.resnet", ["bn1", "bn2", "bn3"])
TimmBasic = make_block_class("BasicBlock", "timm.models.resnet", ["bn1", "bn2"])
TimmBottleneck = make_block_class("Bottleneck", "timm.models.resnet", ["bn1", "bn2", "bn3"])
ForeignBasic = make_block_class("BasicBlock", "someone.else", ["bn1", "bn2"])


class OwnBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_a = nn.BatchNorm2d(2)
        self.bn_b = nn.BatchNorm2d(2)
        self.last_bn = self.bn_b


def gammas(model):
    return {
        name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
    }


def test_zero_init_touches_exactly_the_last_bn_of_each_block():
    model = nn.Sequential(
        TVBasic(), TVBottleneck(), TimmBasic(), TimmBottleneck(), OwnBlock(), ForeignBasic()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert zero_init_residual_bn(model) == 5
    zeroed = {name for name, gamma in gammas(model).items() if torch.all(gamma == 0)}
    assert zeroed == {"0.bn2", "1.bn3", "2.bn2", "3.bn3", "4.bn_b"}
    # the rest keep gamma = 1 and biases are never touched
    for name, gamma in gammas(model).items():
        if name not in zeroed:
            assert torch.all(gamma == 1), name
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_zero_init_makes_residual_branch_output_zero():
    block = OwnBlock()
    zero_init_residual_bn(block)
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(block.last_bn(x), torch.zeros_like(x))


def test_last_bn_that_is_not_batchnorm_is_ignored():
    block = nn.Module()
    block.last_bn = nn.LayerNorm(2)
    assert last_bn_of_block(block) is None
    no_affine = nn.Module()
    no_affine.last_bn = nn.BatchNorm2d(2, affine=False)
    assert last_bn_of_block(no_affine) is None


def test_shared_bn_counted_once():
    first, second = OwnBlock(), OwnBlock()
    second.last_bn = first.last_bn
    assert zero_init_residual_bn(nn.Sequential(first, second)) == 1


def test_warns_when_no_block():
    with pytest.warns(UserWarning, match="found no residual block in Sequential"):
        assert (
            zero_init_residual_bn(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), ForeignBasic())) == 0
        )


def test_rejects_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        zero_init_residual_bn([nn.BatchNorm2d(2)])


# ---------------------------------------------------------------------------------------------------------------
# identity (Dirac) init of plain convolutions


def test_identity_init_passes_input_through():
    from trickbag.init import identity_init_convs

    square = nn.Conv2d(5, 5, 3, padding=1, bias=False)
    wider = nn.Conv2d(4, 6, 5, padding=2, bias=False)
    strided = nn.Conv2d(5, 4, 3, stride=2, padding=1, bias=False)
    even = nn.Conv2d(4, 4, 2, bias=False)
    untouched = {name: conv.weight.clone() for name, conv in [("strided", strided), ("even", even)]}
    before_extra = wider.weight[4:].clone()
    assert identity_init_convs(nn.Sequential(square, wider, strided, even)) == 2
    x = torch.randn(3, 5, 7, 9)  # odd sizes
    torch.testing.assert_close(square(x), x)  # reference: the identity map, by construction
    y = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(wider(y)[:, :4], y)
    torch.testing.assert_close(wider.weight[4:], before_extra)  # the extra filters keep their random init
    assert torch.equal(strided.weight, untouched["strided"]) and torch.equal(even.weight, untouched["even"])


def test_identity_init_on_cifar_fast_and_bad_input():
    from trickbag.init import identity_init_convs
    from trickbag.models import CifarFastNet

    model = CifarFastNet(10, widths=(8, 16), stem_width=8, depth=2)
    assert identity_init_convs(model) == 4  # the two 3x3 convs of each stage; the stride-2 stem is skipped
    with pytest.raises(TypeError, match="nn.Module"):
        identity_init_convs("model")


def test_config_identity_init_applies_and_names_the_key(monkeypatch):
    from trickbag import models
    from trickbag.config import load_config
    from trickbag.parts import build_model_for

    cfg = load_config(None, ["model.name=cifar_fast", "model.identity_init=true"])
    model = build_model_for(cfg, 10, 3, torch.device("cpu"))
    conv = model.features[5][0]  # the second 3x3 conv of the first stage (64 -> 64): the identity map
    x = torch.randn(2, conv.in_channels, 8, 8)
    torch.testing.assert_close(conv(x), x)
    monkeypatch.setattr(models, "build_model", lambda *args, **kwargs: nn.Linear(4, 2))
    with pytest.raises(ValueError, match="model.identity_init: .* no stride-1"):
        build_model_for(cfg, 10, 3, torch.device("cpu"))
