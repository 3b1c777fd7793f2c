import io

import pytest
import torch
from torch import nn

import trickbag.precision as precision_module
from trickbag.optim import build_optimizer
from trickbag.precision import Precision


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def batches(n=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 5, generator=generator), torch.randint(0, 3, (6,), generator=generator))
        for _ in range(n)
    ]


def train_plain(model, clip=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()


def train_with(precision, model, clip=None, autocast=True):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    results = []
    for x, y in batches():
        with precision.autocast() if autocast else torch.autocast("cpu", enabled=False):
            loss = nn.functional.cross_entropy(model(x), y)
        precision.backward(loss)
        results.append(precision.step(optimizer, clip_grad_norm=clip))
        optimizer.zero_grad()
    return results


@pytest.mark.parametrize("clip", [None, 0.05])
def test_fp32_is_bit_identical_to_plain_loop(clip):
    reference, ours = make_model(), make_model()
    train_plain(reference, clip)
    results = train_with(Precision("fp32", "cpu"), ours, clip)
    assert results == [True] * 4
    for p, q in zip(reference.parameters(), ours.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_fp16_scaler_unscales_before_clipping(clip):
    # Without autocast the fp32 loss is scaled by a power of two, which is exact, so after unscaling the
    # update must equal the plain loop bit for bit; clipping the still-scaled gradients would not.
    reference, ours = make_model(), make_model()
    train_plain(reference, clip)
    precision = Precision("fp16", "cpu")
    assert precision.uses_scaler
    assert train_with(precision, ours, clip, autocast=False) == [True] * 4
    for p, q in zip(reference.parameters(), ours.parameters()):
        assert torch.equal(p, q)
    if clip is not None:
        assert precision.last_grad_norm > clip


@pytest.mark.parametrize("implementation", ["for_loop", "auto"])  # auto: fused on CPU with torch >= 2.4
def test_skipped_fp16_step_returns_false_and_leaves_the_weights(implementation):
    # (The trainer still advances the schedule after a skipped update: tests/test_train.py.)
    model = make_model()
    optimizer = build_optimizer("adamw", model.parameters(), lr=0.1, implementation=implementation)
    precision = Precision("fp16", "cpu")
    x, y = batches(1)[0]

    def one_update(poison):
        with precision.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        precision.backward(loss)
        if poison:
            model[0].weight.grad[0, 0] = float("inf")
        stepped = precision.step(optimizer, clip_grad_norm=1.0)
        optimizer.zero_grad()
        return stepped

    before = [p.detach().clone() for p in model.parameters()]
    scale = precision.scaler.get_scale()
    assert one_update(poison=True) is False
    assert precision.scaler.get_scale() == scale / 2
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert one_update(poison=False) is True
    assert not all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


@pytest.mark.parametrize("policy,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cpu_autocast_runs_matmul_in_low_precision_with_fp32_master_weights(policy, dtype):
    model = make_model()
    precision = Precision(policy, "cpu")
    x, y = batches(1)[0]
    with precision.autocast():
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
    assert out.dtype == dtype
    assert loss.dtype == torch.float32  # autocast runs cross_entropy in fp32
    precision.backward(loss)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert precision.uses_scaler is (policy == "fp16")


def test_fp32_autocast_is_a_no_op():
    with Precision("fp32", "cpu").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")


def test_state_round_trip():
    precision = Precision("fp16", "cpu")
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for poison in (True, True, False):
        precision.backward(model(torch.ones(1, 5)).sum())
        if poison:
            model[0].bias.grad[0] = float("nan")
        precision.step(optimizer)
        optimizer.zero_grad()
    buffer = io.BytesIO()
    torch.save(precision.state_dict(), buffer)
    buffer.seek(0)
    restored = Precision("fp16", "cpu")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.scaler.get_scale() == precision.scaler.get_scale() == 65536.0 / 4
    assert restored.scaler.state_dict() == precision.scaler.state_dict()
    assert restored.scaler.state_dict()["_growth_tracker"] == 1


def test_validation():
    with pytest.raises(ValueError, match=r"precision policy 'fp8' is not one of \['fp32', 'fp16', 'bf16'\]"):
        Precision("fp8", "cpu")
    with pytest.raises(ValueError, match="supports device types 'cpu' and 'cuda', got 'meta'"):
        Precision("bf16", "meta")
    with pytest.raises(ValueError, match="clip_grad_norm must be > 0 or None, got 0"):
        Precision("fp32", "cpu").step(torch.optim.SGD(make_model().parameters(), lr=0.1), clip_grad_norm=0)
    with pytest.raises(ValueError, match="saved with policy='fp16', this run uses 'bf16'"):
        Precision("bf16", "cpu").load_state_dict(Precision("fp16", "cpu").state_dict())


def test_refuses_fp16_where_autocast_cannot_run(monkeypatch):
    monkeypatch.setattr(precision_module, "_autocast_runs", lambda device_type, dtype: False)
    with pytest.raises(ValueError, match="'fp16' autocast does not run on cpu"):
        Precision("fp16", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_refuses_cuda_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        Precision("fp16", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cuda_autocast(policy, dtype):
    if policy == "bf16" and not torch.cuda.is_bf16_supported():
        with pytest.raises(ValueError, match="bfloat16 support"):
            Precision(policy, "cuda")
        return
    precision = Precision(policy, "cuda")
    model = make_model().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with precision.autocast():
        out = model(torch.randn(4, 5, device="cuda"))
    assert out.dtype == dtype
    precision.backward(out.float().sum())
    assert precision.step(optimizer, clip_grad_norm=1.0) is True
