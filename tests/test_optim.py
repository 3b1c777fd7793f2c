import inspect

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from trickbag.config import OptimizerConfig, build_optimizer_from_config
from trickbag.optim import (
    build_optimizer,
    choose_implementation,
    param_groups,
    scale_lr,
)

CPU_HAS_FUSED = "cpu" in torch.utils._foreach_utils._get_fused_kernels_supported_devices()


class Net(nn.Module):
    """Conv + every norm type + a head tied to the embedding, and one frozen layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(3, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.ln = nn.LayerNorm(6)
        self.gn = nn.GroupNorm(2, 6)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(6, 10)
        self.head.weight = self.embed.weight  # tied
        self.scale = nn.Parameter(torch.ones(1))  # ndim <= 1


def ids(tensors):
    return {id(t) for t in tensors}


def test_param_groups_split_against_hand_listing():
    net = Net()
    groups = param_groups(net, 5e-4)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    decay, no_decay = groups
    assert ids(decay["params"]) == ids([net.embed.weight, net.conv.weight])
    expected_no_decay = [net.bn.weight, net.bn.bias, net.ln.weight, net.ln.bias, net.gn.weight, net.gn.bias]
    expected_no_decay += [net.inorm.weight, net.inorm.bias, net.head.bias, net.scale]
    assert ids(no_decay["params"]) == ids(expected_no_decay)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    # every trainable parameter exactly once; frozen and tied duplicates left out
    every = decay["params"] + no_decay["params"]
    assert len(every) == len(ids(every)) == len([p for p in net.parameters() if p.requires_grad])
    assert id(net.frozen.weight) not in ids(every)


def test_param_groups_tied_to_a_norm_counts_as_norm():
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.LayerNorm(4))
    net[0].weight = nn.Parameter(torch.ones(4, 4))
    net[1].weight = net[0].weight  # contrived: a 2-D tensor shared with a norm layer
    groups = param_groups(net, 0.1)
    assert [g["name"] for g in groups] == ["no_decay"]
    assert len(groups[0]["params"]) == 2  # tied weight once + LayerNorm bias


def test_param_groups_without_exemption_and_empty_groups_omitted():
    net = Net()
    (only,) = param_groups(net, 0.01, no_decay_bias_norm=False)
    assert only["name"] == "decay" and len(only["params"]) == len(
        [p for p in net.parameters() if p.requires_grad]
    )
    (only,) = param_groups(nn.BatchNorm1d(3), 0.01)
    assert only["name"] == "no_decay"
    assert param_groups(nn.ReLU(), 0.01) == []


def test_param_groups_make_sgd_decay_only_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(param_groups(net, 0.5), lr=1.0)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    after = list(net.parameters())
    assert torch.allclose(after[0], before[0] * 0.5)  # linear weight decayed: p -= lr * wd * p
    for old, new in zip(before[1:], after[1:]):
        assert torch.equal(old, new)  # biases and BN untouched with zero grads


def test_param_groups_validation():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        param_groups([torch.zeros(1)], 0.1)
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0, got -1"):
        param_groups(nn.Linear(2, 2), -1)


def test_scale_lr_linear_rule():
    assert scale_lr(0.1, 256) == pytest.approx(0.1)
    assert scale_lr(0.1, 1024) == pytest.approx(0.4)
    assert scale_lr(0.1, 128) == pytest.approx(0.05)
    assert scale_lr(0.2, 64, base_batch_size=128) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "args,message",
    [
        ((0.0, 256), "base_lr must be > 0"),
        ((0.1, 0), "batch_size must be an int > 0"),
        ((0.1, 2.5), "batch_size"),
    ],
)
def test_scale_lr_validation(args, message):
    with pytest.raises(ValueError, match=message):
        scale_lr(*args)
    with pytest.raises(ValueError, match="base_batch_size"):
        scale_lr(0.1, 32, base_batch_size=0)


@pytest.mark.parametrize(
    "name,reference",
    [
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
        ("adamw", lambda p: torch.optim.AdamW(p, lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.01)),
        ("adam", lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.01)),
        ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=0.05, momentum=0.8, eps=1e-6, weight_decay=0.01)),
    ],
)
@pytest.mark.parametrize("implementation", ["auto", "foreach", "for_loop", "fused"])
def test_build_optimizer_matches_torch_updates(name, reference, implementation):
    if implementation == "fused" and (name == "rmsprop" or not CPU_HAS_FUSED):
        pytest.skip("no fused kernel for this optimizer on CPU with this torch")
    torch.manual_seed(0)
    ours_params = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    ref_params = [p.detach().clone().requires_grad_(True) for p in ours_params]
    ours = build_optimizer(
        name,
        ours_params,
        lr=0.05,
        weight_decay=0.01,
        momentum=0.8,
        nesterov=name == "sgd",
        betas=(0.8, 0.9),
        eps=1e-6,
        implementation=implementation,
    )
    ref = reference(ref_params)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ours_params]
        for p, q, g in zip(ours_params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_build_optimizer_keeps_group_weight_decay():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    optimizer = build_optimizer("sgd", param_groups(net, 0.1), lr=0.1, weight_decay=0.1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]


def test_choose_implementation_on_cpu():
    fused_or_loop = "fused" if CPU_HAS_FUSED else "for_loop"
    assert choose_implementation("adamw", [torch.zeros(2)]) == fused_or_loop
    assert choose_implementation("sgd", [torch.zeros(2)]) == fused_or_loop
    assert (
        choose_implementation("rmsprop", [torch.zeros(2)]) == "for_loop"
    )  # no fused RMSprop, no CPU foreach
    assert choose_implementation("adam", [torch.zeros(2, dtype=torch.int64)]) == "for_loop"
    assert choose_implementation("sgd", []) == "for_loop"
    optimizer = build_optimizer("adamw", [torch.zeros(2, requires_grad=True)], lr=0.1)
    assert bool(optimizer.defaults["fused"]) is CPU_HAS_FUSED
    assert not optimizer.defaults.get("foreach")
    optimizer = build_optimizer(
        "rmsprop", [torch.zeros(2, requires_grad=True)], lr=0.1, implementation="foreach"
    )
    assert optimizer.defaults["foreach"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_picks_fused_on_cuda():
    params = [torch.zeros(2, device="cuda", requires_grad=True)]
    assert choose_implementation("adamw", params) == "fused"
    assert choose_implementation("rmsprop", params) == "foreach"
    assert build_optimizer("sgd", params, lr=0.1).defaults["fused"] is True
    assert build_optimizer("rmsprop", params, lr=0.1).defaults["foreach"] is True


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"name": "adagrad"},
            r"optimizer name 'adagrad' is not one of \['sgd', 'adamw', 'adam', 'rmsprop'\]",
        ),
        ({"implementation": "magic"}, "implementation 'magic' is not one of"),
        ({"name": "rmsprop", "implementation": "fused"}, "not available for 'rmsprop'"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"weight_decay": -0.1}, "weight_decay must be"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"nesterov": True, "momentum": 0.0}, "nesterov=True needs"),
        ({"name": "adam", "nesterov": True}, "nesterov=True needs name='sgd'"),
        ({"betas": (0.9, 1.0)}, "betas must be"),
        ({"eps": 0.0}, "eps must be > 0"),
    ],
)
def test_build_optimizer_validation(kwargs, message):
    arguments = {"name": "sgd", "lr": 0.1} | kwargs
    name = arguments.pop("name")
    with pytest.raises(ValueError, match=message):
        build_optimizer(name, [torch.zeros(1, requires_grad=True)], **arguments)


def test_build_optimizer_rejects_unknown_keywords():
    with pytest.raises(TypeError):
        build_optimizer("sgd", [torch.zeros(1, requires_grad=True)], lr=0.1, dampening=0.1)


def test_build_optimizer_from_config_scales_lr_and_groups():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    cfg = OptimizerConfig(name="sgd", lr=0.1, ref_batch_size=256, weight_decay=5e-4, nesterov=True)
    optimizer = build_optimizer_from_config(net, cfg, effective_batch_size=512)
    assert isinstance(optimizer, torch.optim.SGD)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2, 0.2])  # 0.1 * 512 / 256
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]
    assert [len(g["params"]) for g in optimizer.param_groups] == [
        1,
        3,
    ]  # Linear weight | bias, BN weight, BN bias
    assert optimizer.defaults["nesterov"] is True
    unscaled = build_optimizer_from_config(
        net, cfg.model_copy(update={"scale_lr": False}), effective_batch_size=512
    )
    assert unscaled.param_groups[0]["lr"] == 0.1
    everything = build_optimizer_from_config(net, cfg.model_copy(update={"no_decay_bias_norm": False}), 256)
    assert [len(g["params"]) for g in everything.param_groups] == [4]
    adamw = build_optimizer_from_config(net, OptimizerConfig(name="adamw", lr=1e-3, betas=(0.8, 0.95)), 128)
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_build_optimizer_from_config_validation():
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="effective_batch_size must be an int > 0"):
        build_optimizer_from_config(net, OptimizerConfig(), effective_batch_size=0)
    with pytest.raises(ValueError, match="effective_batch_size must be an int > 0"):
        build_optimizer_from_config(net, OptimizerConfig(), effective_batch_size=True)
    with pytest.raises(TypeError, match="cfg must be an OptimizerConfig"):
        build_optimizer_from_config(net, {"name": "sgd"}, effective_batch_size=8)


def test_optimizer_config_defaults_match_build_optimizer():
    # The section's defaults for the arguments it passes through are build_optimizer's own.
    parameters = inspect.signature(build_optimizer).parameters
    for name in ("momentum", "nesterov", "betas", "eps", "implementation"):
        assert OptimizerConfig.model_fields[name].default == parameters[name].default, name


@pytest.mark.parametrize(
    "fields,location",
    [
        ({"name": "sgdd"}, "name"),
        ({"lr": 0}, "lr"),
        ({"ref_batch_size": 0}, "ref_batch_size"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"momentum": 1.0}, "momentum"),
        ({"betas": (0.9, 1.5)}, "betas"),
        ({"eps": 0}, "eps"),
        ({"lrr": 0.1}, "lrr"),
    ],
)
def test_optimizer_config_validation(fields, location):
    with pytest.raises(ValidationError, match=location) as info:
        OptimizerConfig(**fields)
    assert info.value.errors()[0]["loc"][0] == location
