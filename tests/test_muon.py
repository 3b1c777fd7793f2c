"""Muon (trickbag.muon) against independent references: the SVD for the orthogonalization, torch.optim.Muon for
the update of 2-D weights, torch.optim.SGD for the other groups; then its parameter split, config and resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from trickbag.cli import main
from trickbag.config import ConfigError, build_optimizer_from_config, build_scheduler, load_config
from trickbag.models import build_model
from trickbag.muon import Muon, hidden_weight_names, muon_param_groups, orthogonalize
from trickbag.optim import choose_implementation

DIGITS = str(Path(__file__).resolve().parents[1] / "recipes" / "digits.yaml")
TINY = ["epochs=2", "batch_size=64", "threads=1", "deterministic=true", "model.options={width: 8}"]


@pytest.mark.parametrize("method", ["direct", "gram"])
@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32), (1, 9), (9, 1)])
def test_orthogonalize_keeps_the_singular_vectors_and_brings_every_singular_value_near_one(shape, method):
    torch.manual_seed(0)
    matrix = torch.randn(*shape, dtype=torch.float64) @ torch.diag(torch.logspace(0, 2, shape[1])).double()
    result = orthogonalize(matrix, steps=5, dtype=torch.float64, method=method)
    assert result.dtype == matrix.dtype and result.shape == matrix.shape
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    inner = u.T @ result @ vh.T  # diagonal iff result = U diag(s') V^T with the input's singular vectors
    off_diagonal = inner - torch.diag(torch.diagonal(inner))
    assert off_diagonal.abs().max() < 1e-6
    # the quintic's fixed point is not 1: five steps leave each singular value that is not tiny next to the
    # matrix's norm in about [0.7, 1.2] (a tiny one grows ~3.4x a step and may not get there)
    singular = torch.diagonal(inner)
    _, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    large = s / s.norm() > 1e-2
    assert singular[large].min() > 0.6 and singular.max() < 1.25, singular
    assert large.sum() >= min(shape) // 2  # the test would be empty without this


def test_the_gram_form_equals_the_direct_one_in_fp32_and_auto_takes_it_only_where_it_is_cheaper():
    torch.manual_seed(6)
    for shape in [(64, 576), (576, 64), (128, 1152)]:
        # a gradient-like matrix: a few strong directions over noise (condition number ~1e3)
        matrix = torch.randn(shape[0], 4) @ torch.randn(4, shape[1]) * 30 + torch.randn(*shape)
        direct = orthogonalize(matrix, method="direct")
        gram = orthogonalize(matrix, method="gram")
        # squaring the condition number costs precision: ~2 % here, where the bf16 direct form (torch's and
        # Jordan's default on GPUs) is ~14 % off
        assert (gram - direct).norm() / direct.norm() < 0.05
        in_bf16 = orthogonalize(matrix, dtype=torch.bfloat16, method="direct")
        assert (gram - direct).norm() < (in_bf16 - direct).norm() / 3
        assert torch.equal(orthogonalize(matrix), gram)  # 9x wider than tall: the Gram form is cheaper
        assert torch.equal(orthogonalize(matrix, dtype=torch.bfloat16), orthogonalize(matrix, dtype=torch.bfloat16,
                                                                                     method="direct"))  # fmt: skip
    square = torch.randn(32, 32)
    assert torch.equal(orthogonalize(square), orthogonalize(square, method="direct"))


def test_orthogonalize_of_zero_is_zero_and_checks_its_arguments():
    for method in ("direct", "gram"):
        assert torch.equal(orthogonalize(torch.zeros(4, 6), method=method), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="method must be 'auto', 'direct' or 'gram', got 'svd'"):
        orthogonalize(torch.zeros(2, 3), method="svd")
    with pytest.raises(ValueError, match="2-D matrix, got shape"):
        orthogonalize(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        orthogonalize(torch.zeros(2, 3), steps=0)


def test_orthogonalize_in_bf16_is_close_to_fp32():
    torch.manual_seed(1)
    matrix = torch.randn(64, 576)
    difference = orthogonalize(matrix, dtype=torch.bfloat16) - orthogonalize(matrix)
    assert difference.norm() / orthogonalize(matrix).norm() < 0.05


def _grads(steps, *shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(*shape, generator=generator) for shape in shapes] for _ in range(steps)]


def _run(optimizer, params, grads):
    for step in grads:
        for p, grad in zip(params, step):
            p.grad = grad.clone()
        optimizer.step()


def test_muon_groups_match_torch_optim_muon_on_matrices():
    # torch's Muon keeps its momentum as a lerp ((1 - m) times ours) and orthogonalizes in bf16; the direction,
    # hence the update, is the same up to bf16 rounding. Its LR factor sqrt(max(1, rows / cols)) is 1 here.
    torch.manual_seed(2)
    start = [torch.randn(8, 24), torch.randn(16, 16)]
    ours = [p.clone().requires_grad_() for p in start]
    reference = [p.clone().requires_grad_() for p in start]
    grads = _grads(5, (8, 24), (16, 16))
    _run(Muon([{"params": ours, "muon": True}], lr=0.1, muon_lr=0.02, muon_momentum=0.9, ns_dtype=torch.bfloat16,
              normalize=False), ours, grads)  # fmt: skip
    _run(
        torch.optim.Muon(reference, lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.0), reference, grads
    )
    for a, b, s in zip(ours, reference, start):
        assert not torch.equal(a, s)
        # bf16 rounding leaves <= 1e-3 after 5 steps; with Nesterov off ours would be ~1e-2 away
        assert (a - b).abs().max() < 2e-3, (a - b).abs().max()


def test_sgd_groups_match_torch_optim_sgd_exactly():
    torch.manual_seed(3)
    start = [torch.randn(5, 3), torch.randn(7)]
    ours = [p.clone().requires_grad_() for p in start]
    reference = [p.clone().requires_grad_() for p in start]
    grads = _grads(4, (5, 3), (7,))
    groups = [{"params": [ours[0]], "weight_decay": 0.01}, {"params": [ours[1]], "weight_decay": 0.0}]
    _run(Muon(groups, lr=0.1, momentum=0.9, nesterov=True), ours, grads)
    torch_groups = [
        {"params": [reference[0]], "weight_decay": 0.01},
        {"params": [reference[1]], "weight_decay": 0.0},
    ]
    fused = choose_implementation("sgd", reference) == "fused"  # the kernel ours takes here
    _run(
        torch.optim.SGD(torch_groups, lr=0.1, momentum=0.9, nesterov=True, fused=fused or None),
        reference,
        grads,
    )
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_conv_filter_steps_as_its_flattened_matrix_and_normalize_fixes_its_norm_first():
    torch.manual_seed(4)
    conv = torch.randn(6, 4, 3, 3).requires_grad_()
    flat = conv.detach().reshape(6, -1).clone().requires_grad_()
    grads = _grads(3, (6, 4, 3, 3))
    _run(Muon([{"params": [conv], "muon": True}], lr=1.0, muon_lr=0.05, normalize=False), [conv], grads)
    flat_grads = [[g.reshape(6, -1) for g in step] for step in grads]
    _run(Muon([{"params": [flat], "muon": True}], lr=1.0, muon_lr=0.05, normalize=False), [flat], flat_grads)
    torch.testing.assert_close(conv.detach().reshape(6, -1), flat.detach())

    # a channels_last filter bank is flattened in its memory order: the same step (permuting columns commutes)
    nhwc = torch.randn(6, 4, 3, 3)
    nchw = nhwc.clone().requires_grad_()
    nhwc = nhwc.to(memory_format=torch.channels_last).requires_grad_()
    assert not nhwc.is_contiguous()
    for param in (nchw, nhwc):
        _run(Muon([{"params": [param], "muon": True}], lr=1.0, muon_lr=0.05), [param], grads)
    torch.testing.assert_close(nhwc, nchw)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)

    # normalize: w <- w * sqrt(rows) / |w|, then w -= lr * orthogonalize(nesterov momentum) (hand-computed)
    weight = (3 * torch.randn(6, 10)).requires_grad_()
    expected = weight.detach() * 6**0.5 / weight.detach().norm()
    grad = torch.randn(6, 10)
    expected = expected - 0.05 * orthogonalize(grad + 0.6 * grad)
    _run(
        Muon([{"params": [weight], "muon": True}], lr=1.0, muon_lr=0.05, muon_momentum=0.6),
        [weight],
        [[grad]],
    )
    torch.testing.assert_close(weight.detach(), expected)


def test_muon_param_groups_put_the_hidden_convs_on_muon_and_the_stem_head_biases_norms_on_sgd():
    model = build_model("cifar_fast", 10, widths=[16, 32], stem_width=8)
    params = dict(model.named_parameters())
    stem = next(iter(params))
    assert params[stem].shape == (8, 3, 4, 4)
    hidden = hidden_weight_names(model)
    assert hidden == [
        "features.4.0.weight",
        "features.5.0.weight",
        "features.7.0.weight",
        "features.8.0.weight",
    ]
    groups = muon_param_groups(model, lr=0.2, weight_decay=1e-3)
    by_name = {group["name"]: group for group in groups}
    assert [group["muon"] for group in groups] == [False, False, True]
    assert by_name["decay"]["lr"] == 0.2 and by_name["decay"]["weight_decay"] == 1e-3
    assert [id(p) for p in by_name["muon"]["params"]] == [id(params[name]) for name in hidden]
    assert {id(p) for p in by_name["decay"]["params"]} == {id(params[stem]),
                                                           id(params["linear.weight"])}  # fmt: skip
    every = [id(p) for group in groups for p in group["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters()) and len(every) == len(set(every))
    with pytest.raises(ValueError, match="no hidden conv/linear weight"):
        muon_param_groups(nn.Sequential(nn.Linear(4, 3)), lr=0.1, weight_decay=0.0)


def test_the_config_builds_muon_and_the_schedule_scales_its_group_too():
    cfg = load_config(None, ["optimizer.name=muon", "optimizer.lr=0.2", "optimizer.muon_lr=0.05",
                             "schedule.kind=linear", "schedule.warmup_epochs=1", "schedule.warmup_start_factor=0.5"])  # fmt: skip
    model = build_model("cifar_fast", 10, widths=[16, 32], stem_width=8)
    optimizer = build_optimizer_from_config(model, cfg.optimizer, 128)
    assert isinstance(optimizer, Muon) and optimizer.ns_dtype == torch.float32
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.1, 0.1, 0.05])
    build_scheduler(optimizer, cfg.schedule, steps_per_epoch=4, epochs=3)
    # the warmup starts every group at half its own LR
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.05, 0.05, 0.025])
    with pytest.raises(ConfigError, match="backbone_lr_factor is not supported with name='muon'"):
        load_config(None, ["optimizer.name=muon", "optimizer.backbone_lr_factor=0.1"])
    with pytest.raises(ConfigError, match="implementation='for_loop' is not available with name='muon'"):
        load_config(None, ["optimizer.name=muon", "optimizer.implementation=for_loop"])
    with pytest.raises(ConfigError, match="muon_momentum"):
        load_config(None, ["optimizer.name=muon", "optimizer.muon_momentum=1"])


def test_muon_state_round_trips_through_a_weights_only_load_and_continues_identically():
    torch.manual_seed(5)
    model = build_model("cifar_fast", 10, widths=[8, 16], stem_width=8)
    optimizer = Muon(muon_param_groups(model, lr=0.1, weight_decay=1e-3), lr=0.1)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])

    def step(model, optimizer):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step(model, optimizer)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = build_model("cifar_fast", 10, widths=[8, 16], stem_width=8)
    twin.load_state_dict(saved["model"])
    twin_optimizer = Muon(muon_param_groups(twin, lr=0.1, weight_decay=1e-3), lr=0.1)
    twin_optimizer.load_state_dict(saved["optimizer"])
    step(model, optimizer)
    step(twin, twin_optimizer)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_a_digits_run_trains_with_muon_and_resumes(tmp_path):
    out = tmp_path / "runs"
    assert (
        main(
            ["train", DIGITS, *TINY, f"output_dir={out}", "optimizer.name=muon", "precision=fp32", "--quiet"]
        )
        == 0
    )
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["checkpoints"]["last"]["test"]["accuracy"] > 0.5  # 2 tiny epochs (SGD: 0.79); chance: 0.1
    log = (run_dir / "train.log").read_text()
    assert (
        "optimizer muon: Muon (muon_lr 0.06, momentum 0.75, 5 Newton-Schulz steps in float32) on 3 hidden"
        in log
    )
    assert main(["resume", str(run_dir), "epochs=3", "--quiet"]) == 0
    assert json.loads((run_dir / "results.json").read_text())["epochs"] == 3
