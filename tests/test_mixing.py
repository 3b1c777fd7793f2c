"""Tests for trickbag.mixing: references are per-sample Python loops, scipy's Beta and pixel counts."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from trickbag.mixing import BatchMixer, cutmix, fmix, mixup, sample_beta, sample_fmix_mask, save_mix_grid
from trickbag.mixing_masks import cutmix_boxes

MIXERS = {"mixup": mixup, "cutmix": cutmix, "fmix": fmix}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def constant_images(n: int, height: int = 12, width: int = 20, channels: int = 3) -> torch.Tensor:
    """Image i is filled with the value i + 1, so every output pixel tells which image it came from."""
    return (
        (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1, 1).expand(n, channels, height, width).clone()
    )


def derangement(n: int) -> torch.Tensor:
    return torch.roll(torch.arange(n), -1)


def random_images(n: int, height: int = 9, width: int = 14, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=seeded(seed))


# ---------------------------------------------------------------------------------------------------------------
# λ ~ Beta(α, α)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.2, 0.4, 1.0, 2.0])
def test_sample_beta_matches_scipy(alpha):
    # float64: float32 cannot hold λ within 6e-8 of 1, which is ~2 % of Beta(0.2, 0.2) (documented).
    draws = sample_beta(alpha, 20_000, generator=seeded(3), dtype=torch.float64).numpy()
    assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    # The same test rejects a neighbouring α, so it has power.
    assert stats.kstest(draws, stats.beta(alpha * 1.5, alpha * 1.5).cdf).pvalue < 1e-6


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_one_lambda_per_batch_follows_beta(alpha):
    # count == 1 takes a scalar path (Python floats); it must draw the same distribution.
    generator = seeded(9)
    draws = [sample_beta(alpha, 1, generator=generator, dtype=torch.float64).item() for _ in range(20_000)]
    assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_one_box_matches_first_row_of_batched_boxes():
    # cutmix_boxes draws one box on Python numbers and several as tensors; row 0 uses the same two uniforms.
    for seed in range(200):
        lam = torch.rand(1, generator=seeded(10_000 + seed))
        height, width = 5 + seed % 29, 3 + seed % 37
        one, one_lam = cutmix_boxes(lam, height, width, generator=seeded(seed))
        many, many_lam = cutmix_boxes(lam.repeat(2), height, width, generator=seeded(seed))
        assert torch.equal(one[0], many[0]), (seed, one, many)
        torch.testing.assert_close(one_lam[0], many_lam[0])


def test_mixup_lambda_per_sample_follows_beta():
    n = 20_000
    x = torch.zeros(n, 1, 1, 1)
    _, soft = mixup(x, torch.arange(n) % 2, num_classes=2, per_sample=True, perm=torch.roll(torch.arange(n), 1),
                    alpha=1.0, generator=seeded(4))  # fmt: skip
    # Neighbours have different labels (i and i-1 differ in parity), so column label(i) holds λ_i.
    lam = soft[torch.arange(n), torch.arange(n) % 2].double().numpy()
    assert stats.kstest(lam, stats.beta(1.0, 1.0).cdf).pvalue > 1e-3


def test_sample_beta_seeded_and_bounded():
    a = sample_beta(0.3, 500, generator=seeded(1))
    assert torch.equal(a, sample_beta(0.3, 500, generator=seeded(1)))
    assert not torch.equal(a, sample_beta(0.3, 500, generator=seeded(2)))
    assert a.dtype == torch.float32 and a.shape == (500,) and bool(((a >= 0) & (a <= 1)).all())
    assert sample_beta(1.0, 0).shape == (0,)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_sample_beta_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        sample_beta(alpha, 3)


def test_sample_beta_rejects_bad_count():
    with pytest.raises(ValueError, match="count must be an int >= 0, got -1"):
        sample_beta(1.0, -1)


# ---------------------------------------------------------------------------------------------------------------
# Exact outputs against a per-sample loop (given lam and perm)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixup_equals_loop(per_sample):
    n = 7
    x, labels = random_images(n), torch.tensor([0, 1, 2, 0, 1, 2, 2])
    perm = torch.randperm(n, generator=seeded(5))
    lam = torch.rand(n, generator=seeded(6)) if per_sample else 0.3
    out, soft = mixup(x, labels, num_classes=3, lam=lam, perm=perm)
    lams = lam if per_sample else torch.full((n,), lam)
    onehot = torch.eye(3)[labels]
    for i in range(n):
        torch.testing.assert_close(out[i], lams[i] * x[i] + (1 - lams[i]) * x[perm[i]])
        torch.testing.assert_close(soft[i], lams[i] * onehot[i] + (1 - lams[i]) * onehot[perm[i]])


@pytest.mark.parametrize("per_sample", [False, True])
def test_cutmix_equals_loop(per_sample):
    n, height, width = 6, 11, 16
    x, labels = random_images(n, height, width), torch.arange(n)
    perm = torch.randperm(n, generator=seeded(5))
    lam = torch.rand(n, generator=seeded(6)) if per_sample else torch.tensor([0.55])
    boxes, real = cutmix_boxes(lam, height, width, generator=seeded(7))  # the draws cutmix makes itself
    out, soft = cutmix(
        x, labels, num_classes=n, lam=lam if per_sample else 0.55, perm=perm, generator=seeded(7)
    )
    for i in range(n):
        y0, y1, x0, x1 = boxes[i if per_sample else 0].tolist()
        expected = x[i].clone()
        expected[:, y0:y1, x0:x1] = x[perm[i], :, y0:y1, x0:x1]
        assert torch.equal(out[i], expected)
        share = 1 - (y1 - y0) * (x1 - x0) / (height * width)
        assert soft[i, perm[i]].item() == pytest.approx(1 - share if perm[i] != i else 1.0)
    assert torch.allclose(
        real, 1 - (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]) / (height * width)
    )


@pytest.mark.parametrize("per_sample", [False, True])
def test_fmix_equals_loop(per_sample):
    n, height, width = 5, 10, 13
    x, labels = random_images(n, height, width), torch.arange(n)
    perm = torch.randperm(n, generator=seeded(5))
    lam = torch.rand(n, generator=seeded(6)) if per_sample else 0.7
    masks, _ = sample_fmix_mask(lam, height, width, generator=seeded(8))
    out, _ = fmix(x, labels, num_classes=n, lam=lam, perm=perm, generator=seeded(8))
    for i in range(n):
        keep = masks[i if per_sample else 0].bool()
        assert torch.equal(out[i], torch.where(keep, x[i], x[perm[i]]))


# ---------------------------------------------------------------------------------------------------------------
# Label mass equals the real pixel share
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cutmix", "fmix"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_target_weights_equal_pixel_shares(name, per_sample, alpha):
    n, height, width = 9, 12, 20
    x, perm = constant_images(n, height, width), derangement(n)
    for seed in range(4):
        out, soft = MIXERS[name](x, torch.arange(n), num_classes=n, per_sample=per_sample, alpha=alpha,
                                 perm=perm, generator=seeded(seed))  # fmt: skip
        torch.testing.assert_close(soft.sum(1), torch.ones(n))
        for i in range(n):
            from_self = (out[i] == i + 1).float().mean()
            from_partner = (out[i] == perm[i] + 1).float().mean()
            assert from_self + from_partner == 1  # every pixel comes from one of the two images
            assert soft[i, i] == pytest.approx(from_self.item(), abs=1e-6)
            assert soft[i, perm[i]] == pytest.approx(from_partner.item(), abs=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.13, 0.5, 0.87, 1.0])
@pytest.mark.parametrize("size", [(12, 20), (17, 31), (16, 16), (1, 7)])
def test_fmix_partner_pixel_count_is_exact(lam, size):
    height, width = size
    x = constant_images(4, height, width, channels=1)
    out, soft = fmix(x, torch.arange(4), num_classes=4, lam=lam, perm=derangement(4), generator=seeded(0))
    partner_pixels = (out[:, 0] != x[:, 0]).sum(dim=(1, 2))
    assert partner_pixels.tolist() == [round((1 - lam) * height * width)] * 4
    torch.testing.assert_close(soft[torch.arange(4), torch.arange(4)], 1 - partner_pixels / (height * width))


def test_fmix_mask_is_binary_nonsquare_and_low_frequency():
    height, width, lam = 32, 48, torch.full((64,), 0.5)
    masks, real = sample_fmix_mask(lam, height, width, generator=seeded(0))
    assert masks.dtype == torch.float32 and masks.shape == (64, height, width)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(real, torch.full((64,), 0.5))
    white = (
        torch.rand(64, height, width, generator=seeded(1)).flatten(1).argsort(1).argsort(1)
        < height * width // 2
    )

    def high_frequency_fraction(m):
        m = m.view(-1, height, width).float()
        power = torch.fft.fft2(m - m.mean(dim=(1, 2), keepdim=True)).abs().pow(2).mean(0)
        radius = torch.sqrt(
            torch.fft.fftfreq(height).view(-1, 1) ** 2 + torch.fft.fftfreq(width).view(1, -1) ** 2
        )
        return (power[radius > 0.15].sum() / power.sum()).item()

    fmix_fraction, white_fraction = high_frequency_fraction(masks), high_frequency_fraction(white)
    assert white_fraction > 0.6
    assert fmix_fraction < 0.1 * white_fraction


def test_fmix_soft_mask_keeps_exact_share():
    masks, real = sample_fmix_mask(torch.tensor([0.3, 0.5, 0.9]), 20, 24, max_soft=0.1, generator=seeded(0))
    assert masks.dtype == torch.float32 and bool(((masks >= 0) & (masks <= 1)).all())
    assert ((masks > 0) & (masks < 1)).any()  # there is a ramp
    torch.testing.assert_close(masks.mean(dim=(1, 2)), torch.tensor([0.3, 0.5, 0.9]), atol=1e-6, rtol=0)
    torch.testing.assert_close(real, masks.mean(dim=(1, 2)))


def test_fmix_decay_power_smooths():
    lam = torch.full((32,), 0.5)
    rough, _ = sample_fmix_mask(lam, 32, 32, decay_power=1.0, generator=seeded(0))
    smooth, _ = sample_fmix_mask(lam, 32, 32, decay_power=4.0, generator=seeded(0))

    def edges(m):  # neighbouring pixels that differ
        return (m[:, 1:] != m[:, :-1]).sum() + (m[:, :, 1:] != m[:, :, :-1]).sum()

    assert edges(smooth) < 0.5 * edges(rough)


# ---------------------------------------------------------------------------------------------------------------
# Seeds, pairing, batch sizes, dtypes, memory format, soft targets
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("per_sample", [False, True])
def test_seeded_determinism(name, per_sample):
    x, labels = random_images(8), torch.arange(8) % 4
    a = MIXERS[name](x, labels, num_classes=4, per_sample=per_sample, generator=seeded(11))
    b = MIXERS[name](x, labels, num_classes=4, per_sample=per_sample, generator=seeded(11))
    c = MIXERS[name](x, labels, num_classes=4, per_sample=per_sample, generator=seeded(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("n", [2, 3, 5])
def test_flip_pairing_mixes_with_reversed_batch(name, n):
    x = constant_images(n)
    out, soft = MIXERS[name](x, torch.arange(n), num_classes=n, pairing="flip", per_sample=True,
                             lam=torch.full((n,), 0.5), generator=seeded(0))  # fmt: skip
    for i in range(n):
        partner = n - 1 - i
        assert set(out[i].unique().tolist()) <= {float(i + 1), float(partner + 1), (i + 1 + partner + 1) / 2}
        if partner != i:
            assert soft[i, partner] > 0


@pytest.mark.parametrize("name", list(MIXERS))
def test_batch_of_one_warns_and_is_unchanged(name):
    x = random_images(1)
    with pytest.warns(UserWarning, match="batch of 1 sample"):
        out, soft = MIXERS[name](x, torch.tensor([2]), num_classes=3)
    assert out is x
    assert torch.equal(soft, torch.tensor([[0.0, 0.0, 1.0]]))


@pytest.mark.parametrize("name", list(MIXERS))
def test_empty_batch_warns_and_keeps_shapes(name):
    x = torch.rand(0, 3, 5, 5)
    with pytest.warns(UserWarning, match="batch of 0 sample"):
        out, soft = MIXERS[name](x, torch.zeros(0, dtype=torch.long), num_classes=4)
    assert out is x and soft.shape == (0, 4) and soft.dtype == torch.float32


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("n", [3, 5, 7])
def test_odd_batches(name, n):
    out, soft = MIXERS[name](random_images(n), torch.arange(n) % 2, num_classes=2, generator=seeded(n))
    assert out.shape == (n, 3, 9, 14) and soft.shape == (n, 2)
    torch.testing.assert_close(soft.sum(1), torch.ones(n))


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_kept_and_close_to_float_reference(name, dtype):
    n = 6
    base = torch.randint(0, 256, (n, 3, 8, 10), generator=seeded(2)).float()
    x = base.to(dtype) if dtype == torch.uint8 else (base / 255).to(dtype)
    lam, perm = torch.rand(n, generator=seeded(3)), derangement(n)
    out, soft = MIXERS[name](x, torch.arange(n), num_classes=n, lam=lam, perm=perm, generator=seeded(4))
    ref, ref_soft = MIXERS[name](
        x.float(), torch.arange(n), num_classes=n, lam=lam, perm=perm, generator=seeded(4)
    )
    assert out.dtype == dtype and soft.dtype == torch.float32
    torch.testing.assert_close(soft, ref_soft)
    if name == "mixup" and dtype == torch.uint8:
        assert torch.equal(out, ref.round().clamp(0, 255).to(torch.uint8))  # documented: rounds to nearest
    elif name == "mixup":
        torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    else:  # pure copies: exact in every dtype
        assert torch.equal(out.float(), ref)


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("per_sample", [False, True])
def test_channels_last_preserved(name, per_sample):
    x = random_images(6).contiguous(memory_format=torch.channels_last)
    out, _ = MIXERS[name](x, torch.arange(6) % 3, num_classes=3, per_sample=per_sample, generator=seeded(0))
    assert out.is_contiguous(memory_format=torch.channels_last)
    plain, _ = MIXERS[name](x.contiguous(), torch.arange(6) % 3, num_classes=3, per_sample=per_sample,
                            generator=seeded(0))  # fmt: skip
    assert plain.is_contiguous()
    assert torch.equal(out, plain)


@pytest.mark.parametrize("name", list(MIXERS))
def test_soft_input_targets_compose(name):
    n, classes = 6, 4
    soft_in = torch.softmax(torch.randn(n, classes, generator=seeded(1)), dim=1)
    perm, lam = derangement(n), torch.rand(n, generator=seeded(2))
    x = constant_images(n)
    out, soft = MIXERS[name](x, soft_in, lam=lam, perm=perm, generator=seeded(3))
    share = (out[:, 0] == x[:, 0]).float().mean(dim=(1, 2)) if name != "mixup" else lam
    torch.testing.assert_close(soft, share[:, None] * soft_in + (1 - share[:, None]) * soft_in[perm])


def test_lam_one_and_zero_are_identity_and_swap():
    x = random_images(4)
    same, _ = mixup(x, torch.arange(4), num_classes=4, lam=1.0, perm=derangement(4))
    swapped, soft = mixup(x, torch.arange(4), num_classes=4, lam=0.0, perm=derangement(4))
    assert torch.equal(same, x) and torch.equal(swapped, x[derangement(4)])
    assert torch.equal(soft, torch.eye(4)[derangement(4)])


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("alpha", [0.0, -0.5, float("nan")])
def test_invalid_alpha(name, alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        MIXERS[name](random_images(2), torch.tensor([0, 1]), num_classes=2, alpha=alpha)


@pytest.mark.parametrize(
    ("x", "target", "kwargs", "error", "match"),
    [
        (torch.rand(2, 3, 4), torch.tensor([0, 1]), {"num_classes": 2}, ValueError, r"x must have shape \(N, C, H, W\)"),
        (np.zeros((2, 1, 2, 2)), torch.tensor([0, 1]), {"num_classes": 2}, TypeError, "x must be a torch.Tensor"),
        (torch.zeros(2, 1, 2, 2, dtype=torch.int32), torch.tensor([0, 1]), {"num_classes": 2}, TypeError, "uint8 or floating"),
        (torch.rand(2, 1, 2, 2), torch.tensor([0, 1, 1]), {"num_classes": 2}, ValueError, r"target must have shape \(2,\)"),
        (torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), {}, ValueError, "num_classes is required"),
        (torch.rand(2, 1, 2, 2), torch.tensor([0, 2]), {"num_classes": 2}, ValueError, r"allowed \[0, 1\]"),
        (torch.rand(2, 1, 2, 2), torch.tensor([-1, 0]), {"num_classes": 2}, ValueError, r"allowed \[0, 1\]"),
        (torch.rand(2, 1, 2, 2), torch.tensor([0.0, 1.0]), {"num_classes": 2}, TypeError, "integer class indices"),
        (torch.rand(2, 1, 2, 2), torch.zeros(2, 3, dtype=torch.long), {}, TypeError, "float soft rows"),
        (torch.rand(2, 1, 2, 2), torch.rand(2, 3), {"num_classes": 2}, ValueError, "3 columns but num_classes=2"),
        (torch.rand(2, 1, 2, 2), [0, 1], {"num_classes": 2}, TypeError, "target must be a torch.Tensor"),
        (torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), {"num_classes": 0}, ValueError, "num_classes must be >= 1"),
        (torch.rand(2, 1, 2, 2), torch.tensor([0, 1], device="meta"), {"num_classes": 2}, ValueError, "same device"),
        (torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), {"num_classes": 2, "pairing": "shuffle"}, ValueError, "pairing must be one of"),
        (torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), {"num_classes": 2, "lam": 1.5}, ValueError, r"lam must lie in \[0, 1\]"),
        (torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), {"num_classes": 2, "lam": torch.rand(3)}, ValueError, r"got shape \(3,\)"),
        (torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), {"num_classes": 2, "lam": "0.5"}, TypeError, "lam must be a float"),
        (torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), {"num_classes": 2, "perm": torch.tensor([0, 2])}, ValueError, r"indices in \[0, 1\]"),
        (torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), {"num_classes": 2, "perm": torch.tensor([0])}, ValueError, r"shape \(2,\), got \(1,\)"),
        (torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), {"num_classes": 2, "perm": torch.tensor([0.0, 1.0])}, ValueError, "integer tensor"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("name", list(MIXERS))
def test_invalid_inputs(name, x, target, kwargs, error, match):
    with pytest.raises(error, match=match):
        MIXERS[name](x, target, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"decay_power": 0.0}, "decay_power must be a number > 0"), ({"max_soft": 0.5}, r"max_soft must be a number in \[0, 0.5\)")],
)  # fmt: skip
def test_invalid_fmix_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fmix(random_images(2), torch.tensor([0, 1]), num_classes=2, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# BatchMixer
# ---------------------------------------------------------------------------------------------------------------


def check_mixed_rows(x, out, soft):
    """Each row of ``out`` is x[i] unchanged, a MixUp blend, or a pixel mix, with weights equal to ``soft``.

    x holds constant images with value i + 1 and the labels are arange(N), so soft[i] names the partner.
    Returns the kind of each row: "none", "blend" or "pixels".
    """
    kinds = []
    for i in range(len(x)):
        others = [j for j in torch.nonzero(soft[i]).flatten().tolist() if j != i]
        if not others:
            assert torch.equal(out[i], x[i]) and soft[i, i] == 1
            kinds.append("none")
            continue
        (j,) = others
        lam = soft[i, i].item()
        values = out[i].unique()
        if len(values) == 1 and values.item() not in (i + 1, j + 1):
            assert values.item() == pytest.approx(lam * (i + 1) + (1 - lam) * (j + 1), abs=1e-5)
            kinds.append("blend")
        else:
            assert set(values.tolist()) <= {float(i + 1), float(j + 1)}
            assert (out[i] == i + 1).float().mean().item() == pytest.approx(lam, abs=1e-6)
            kinds.append("pixels")
    return kinds


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_batch_mixer_rows_are_consistent(mode):
    n = 12
    x = constant_images(n, 16, 16, channels=2)
    mixer = BatchMixer(num_classes=n, mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, mode=mode, prob=0.7)
    kinds = []
    for _ in range(12):
        out, soft = mixer(x, torch.arange(n))
        torch.testing.assert_close(soft.sum(1), torch.ones(n))
        kinds += check_mixed_rows(x, out, soft)
    assert {"none", "blend", "pixels"} <= set(kinds)


def test_batch_mixer_sample_mode_matches_loop_reference_for_mixup():
    n = 10
    x = random_images(n)
    out, soft = BatchMixer(num_classes=n, mixup_alpha=0.5, mode="sample", pairing="flip", seed=3)(
        x, torch.arange(n)
    )
    for i in range(n):
        j, lam = n - 1 - i, soft[i, i].item() if i != n - 1 - i else 1.0
        torch.testing.assert_close(out[i], lam * x[i] + (1 - lam) * x[j])


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [
        ({"mixup_alpha": 1.0, "cutmix_alpha": 1.0, "switch_prob": 1.0}, "pixels"),
        ({"mixup_alpha": 1.0, "cutmix_alpha": 1.0, "switch_prob": 0.0}, "blend"),
        ({"mixup_alpha": 1.0, "cutmix_alpha": 1.0, "fmix_alpha": 1.0, "method_weights": (1, 0, 0)}, "blend"),
        ({"mixup_alpha": 1.0, "fmix_alpha": 1.0, "method_weights": (0, 5, 1)}, "pixels"),  # cutmix is off
    ],
)
@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_batch_mixer_method_choice(kwargs, kind, mode):
    n = 8
    x = constant_images(n, 16, 16, channels=1)
    mixer = BatchMixer(num_classes=n, mode=mode, pairing="flip", **kwargs)
    kinds = set()
    for _ in range(6):
        out, soft = mixer(x, torch.arange(n))
        kinds |= set(check_mixed_rows(x, out, soft))
    assert kinds == {kind}


@pytest.mark.parametrize(("style", "torch_smoothing"), [("uniform", 0.1), ("off_target", 0.1 * 4 / 3)])
def test_batch_mixer_label_smoothing_matches_cross_entropy(style, torch_smoothing):
    logits, labels = torch.randn(5, 4, generator=seeded(0)), torch.tensor([0, 3, 1, 1, 2])
    mixer = BatchMixer(num_classes=4, label_smoothing=0.1, smoothing_style=style)  # no method: targets only
    assert not mixer.active
    x = random_images(5)
    out, soft = mixer(x, labels)
    assert out is x
    expected = F.cross_entropy(logits, labels, label_smoothing=torch_smoothing)
    torch.testing.assert_close(torch.sum(-soft * F.log_softmax(logits, 1), 1).mean(), expected)


def test_batch_mixer_off_epoch():
    mixer = BatchMixer(num_classes=3, cutmix_alpha=1.0, off_epoch=5)
    x, labels = random_images(4), torch.tensor([0, 1, 2, 0])
    mixer.set_epoch(4)
    assert mixer.active
    assert not torch.equal(mixer(x, labels)[0], x)
    mixer.set_epoch(5)
    assert not mixer.active
    out, soft = mixer(x, labels)
    assert out is x and torch.equal(soft, torch.eye(3)[labels])


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_batch_mixer_state_round_trip_gives_identical_next_batch(mode):
    make = lambda seed: BatchMixer(num_classes=4, mixup_alpha=0.4, cutmix_alpha=1.0, fmix_alpha=1.0,  # noqa: E731
                                   mode=mode, prob=0.8, seed=seed)  # fmt: skip
    x, labels = random_images(6), torch.arange(6) % 4
    first = make(0)
    first(x, labels)
    first.set_epoch(3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    expected = [first(x, labels) for _ in range(3)]
    buffer.seek(0)
    resumed = make(99)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.epoch == 3
    for out, soft in expected:
        got_out, got_soft = resumed(x, labels)
        assert torch.equal(got_out, out) and torch.equal(got_soft, soft)
    assert not torch.equal(make(1)(x, labels)[0], make(2)(x, labels)[0])


def test_batch_mixer_keeps_dtype_and_channels_last():
    x = (random_images(6) * 255).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    mixer = BatchMixer(num_classes=3, mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, mode="sample")
    out, soft = mixer(x, torch.arange(6) % 3)
    assert out.dtype == torch.uint8 and out.is_contiguous(memory_format=torch.channels_last)
    assert soft.dtype == torch.float32


def test_batch_mixer_batch_of_one_passes_through():
    x = random_images(1)
    out, soft = BatchMixer(num_classes=2, mixup_alpha=1.0)(x, torch.tensor([1]))
    assert out is x and torch.equal(soft, torch.tensor([[0.0, 1.0]]))


def test_batch_mixer_reports_all_config_errors_together():
    with pytest.raises(ValueError) as error:
        BatchMixer(num_classes=0, mixup_alpha=-1.0, prob=1.5, mode="pixel", smoothing_style="other", seed="0")
    message = str(error.value)
    for part in [
        "num_classes=0",
        "mixup_alpha=-1.0",
        "prob=1.5",
        "mode='pixel'",
        "smoothing_style='other'",
        "seed='0'",
    ]:
        assert part in message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fmix_alpha": 1.0, "switch_prob": 0.5}, "switch_prob chooses between mixup and cutmix only"),
        ({"mixup_alpha": 1.0, "switch_prob": 2.0}, r"switch_prob=2.0 not in \[0, 1\]"),
        ({"mixup_alpha": 1.0, "method_weights": (1, 1)}, "must be 3 numbers >= 0"),
        ({"mixup_alpha": 1.0, "method_weights": (0, 1, 1)}, "give no weight to an enabled method"),
        ({"mixup_alpha": 1.0, "off_epoch": 2.5}, "off_epoch=2.5 must be an int or None"),
        ({"mixup_alpha": 1.0, "label_smoothing": -0.1}, r"label_smoothing=-0.1 not in \[0.0, 1.0\)"),
        ({"mixup_alpha": 1.0, "label_smoothing": 1.0}, r"label_smoothing=1.0 not in \[0.0, 1.0\)"),
        ({"num_classes": 1, "smoothing_style": "off_target"}, "needs num_classes >= 2"),
        ({"mixup_alpha": 1.0, "pairing": "roll"}, "pairing='roll'"),
        ({"mixup_alpha": 1.0, "fmix_decay_power": 0.0}, "fmix_decay_power=0.0"),
    ],
)
def test_batch_mixer_invalid_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchMixer(**{"num_classes": 3, **kwargs})


def test_batch_mixer_invalid_calls():
    mixer = BatchMixer(num_classes=3, mixup_alpha=1.0)
    with pytest.raises(ValueError, match="epoch must be an int >= 0, got -1"):
        mixer.set_epoch(-1)
    with pytest.raises(ValueError, match=r"missing \['epoch'\]"):
        mixer.load_state_dict({"generator_state": mixer.generator.get_state()})
    with pytest.raises(ValueError, match=r"allowed \[0, 2\]"):
        mixer(random_images(2), torch.tensor([0, 3]))


# ---------------------------------------------------------------------------------------------------------------
# Visual check and CLI
# ---------------------------------------------------------------------------------------------------------------


def test_save_mix_grid_writes_png(tmp_path):
    from PIL import Image

    images = (random_images(4, 16, 16) * 255).to(torch.uint8)
    path = save_mix_grid(images, tmp_path / "sub" / "grid.png", methods=("cutmix", "fmix"), alpha=0.5)
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.width > picture.height


@pytest.mark.parametrize(
    ("images", "methods", "match"),
    [
        (torch.rand(4, 3, 8, 8), ("mixup",), "uint8"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ("mixup",), "N >= 2"),
        (
            torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
            ("mixup", "cutout"),
            "methods must be a non-empty subset",
        ),
    ],
)
def test_save_mix_grid_invalid(tmp_path, images, methods, match):
    with pytest.raises(ValueError, match=match):
        save_mix_grid(images, tmp_path / "grid.png", methods=methods)


def test_cli_mix_grid(tmp_path, capsys):
    from PIL import Image

    from trickbag.cli import main

    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            pixels = np.full((12, 10 + i, 3), 40 * i + (100 if label == "dog" else 0), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    out = tmp_path / "mix.png"
    assert (
        main(["mix", "grid", str(tmp_path / "images"), "--out", str(out), "--n", "4", "--alpha", "0.5"]) == 0
    )
    assert out.exists() and "wrote" in capsys.readouterr().out
    assert main(["mix", "grid", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["mix", "grid", str(tmp_path / "images"), "--n", "1"]) == 2
    assert "--n must be >= 2" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["mix", "grid", str(empty)]) == 2
    assert "no images" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_cuda_batch_stays_on_device(name, generator_device):
    x = torch.rand(8, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.arange(8, device="cuda") % 4
    generator = torch.Generator(device=generator_device).manual_seed(0)
    out, soft = MIXERS[name](x, labels, num_classes=4, per_sample=True, generator=generator)
    assert out.device.type == "cuda" and soft.device.type == "cuda"
    assert out.is_contiguous(memory_format=torch.channels_last)
    cpu_out, cpu_soft = MIXERS[name](x.cpu(), labels.cpu(), num_classes=4, per_sample=True,
                                     generator=torch.Generator(device=generator_device).manual_seed(0))  # fmt: skip
    assert soft.sum(1).sub(1).abs().max() < 1e-5
    if generator_device == "cpu":  # same draws, so the same mix
        torch.testing.assert_close(out.cpu(), cpu_out)
        torch.testing.assert_close(soft.cpu(), cpu_soft)


@pytest.mark.parametrize("pixels", [1, 7, 64, 1000])
def test_largest_selection_equals_sort_reference_with_ties(pixels):
    from trickbag.mixing_masks import _largest

    generator = seeded(pixels)
    for values in (
        torch.randn(6, pixels, generator=generator),
        torch.randint(0, 3, (6, pixels), generator=generator).float(),  # heavy ties
        torch.zeros(6, pixels),
    ):
        count = torch.randint(0, pixels + 1, (6,), generator=generator)
        count[0], count[-1] = 0, pixels
        chosen = _largest(values, count)
        assert set(chosen.unique().tolist()) <= {0.0, 1.0}
        chosen = chosen.bool()
        assert chosen.sum(1).tolist() == count.tolist()
        for row in range(6):
            ordered = values[row].sort(descending=True).values
            k = int(count[row])
            if 0 < k:  # every chosen value is >= every value left out
                assert values[row][chosen[row]].min() >= ordered[k - 1]
            if k < pixels:
                assert values[row][~chosen[row]].max() <= ordered[k]
