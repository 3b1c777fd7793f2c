"""trickbag.transforms: crop boxes against hand-computed ones, fitting and resized crops against torch's resize."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trickbag import decode, transforms

DECODERS = [
    "pil",
    pytest.param(
        "simplejpeg",
        marks=pytest.mark.skipif(
            decode.choose_decoder("auto") != "simplejpeg", reason="simplejpeg not installed"
        ),
    ),
]


def smooth_image(height: int, width: int) -> np.ndarray:
    """A smooth RGB gradient: resampling filters agree on it to within a grey level or two."""
    y, x = np.mgrid[0:height, 0:width]
    channels = [127 + 100 * np.sin(x / 9.0), 127 + 100 * np.cos(y / 7.0), (x + y) * 255.0 / (height + width)]
    return np.stack(channels, axis=2).round().clip(0, 255).astype(np.uint8)


def torch_resize(array: np.ndarray, size) -> np.ndarray:
    """Reference: torch's antialiased bilinear resize (what PIL's BILINEAR does when downscaling)."""
    x = torch.from_numpy(np.array(array)).permute(2, 0, 1)[None].float()
    out = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).numpy()


def test_crop_boxes_hand_computed():
    # area 0.25 of 100x80 = 2000, ratio exp(0) = 1 -> 44.72 square; top/left at half the free room.
    u = torch.tensor([[0.0, 0.5, 0.5, 0.5], [1.0 - 1e-12, 0.0, 0.0, 1.0 - 1e-12]], dtype=torch.float64)
    boxes = transforms.crop_boxes(
        u, torch.tensor([100, 100]), torch.tensor([80, 80]), (0.25, 1.0), (0.5, 2.0)
    )
    side = math.sqrt(2000)
    expected0 = [(100 - side) / 2, (80 - side) / 2, (100 + side) / 2, (80 + side) / 2]
    assert boxes[0].tolist() == pytest.approx(expected0)
    # Whole area at ratio 0.5: w = sqrt(8000 * .5) = 63.2, h = sqrt(8000 / .5) = 126.5 -> shrunk to 80.
    assert boxes[1].tolist() == pytest.approx([100 - math.sqrt(4000), 0.0, 100.0, 80.0], abs=1e-6)


def test_crop_boxes_stay_inside_and_in_range():
    generator = torch.Generator().manual_seed(0)
    u = transforms.draw_resized_crops(generator, 2000)
    widths, heights = torch.randint(20, 400, (2000,)), torch.randint(20, 400, (2000,))
    boxes = transforms.crop_boxes(u, widths, heights, (0.08, 1.0), (3 / 4, 4 / 3))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= widths + 1e-9).all() and (boxes[:, 3] <= heights + 1e-9).all()
    area = w * h / (widths * heights)
    assert area.max() <= 1 + 1e-9 and area.min() >= 0.08 * 0.75 - 1e-9  # shrinking only lowers the area
    fits = (w < widths - 1e-6) & (h < heights - 1e-6)  # boxes not shrunk keep the drawn ratio exactly
    assert ((w / h)[fits] >= 3 / 4 - 1e-9).all() and ((w / h)[fits] <= 4 / 3 + 1e-9).all()


@pytest.mark.parametrize(
    ("scale", "ratio"), [((0.0, 1.0), (0.75, 1.33)), ((0.5, 0.2), (0.75, 1.33)), ((0.1, 1.0), (1.0, -1.0))]
)
def test_crop_boxes_reject_bad_ranges(scale, ratio):
    with pytest.raises(ValueError, match="scale|ratio"):
        transforms.crop_boxes(torch.zeros(1, 4), torch.ones(1), torch.ones(1), scale, ratio)


@pytest.mark.parametrize(("aspect", "expected"), [("squash", None), ("crop", "crop"), ("pad", "pad")])
def test_fit_image_aspect_handling(tmp_path, aspect, expected):
    array = smooth_image(60, 120)  # 2:1 landscape
    fitted = np.asarray(transforms.fit_image(Image.fromarray(array), (30, 30), aspect)).astype(float)
    if expected is None:  # both sides resized
        reference = torch_resize(array, (30, 30))
    elif expected == "crop":  # shorter side to 30, centre 30 columns of the 60
        reference = torch_resize(array, (30, 60))[:, 15:45]
    else:  # longer side to 30: a 15-row band in the middle, black above and below
        reference = np.zeros((30, 30, 3))
        top = (30 - 15) // 2
        reference[top : top + 15] = torch_resize(array, (15, 30))
    assert np.abs(fitted - reference).mean() < 1.0
    assert np.abs(fitted - reference).max() <= 6


def test_eval_image_centre_crop_and_formats(tmp_path):
    array = smooth_image(90, 120)
    for mode, suffix in (("RGB", "png"), ("L", "png"), ("RGBA", "png"), ("RGB", "jpg")):
        image = Image.fromarray(array).convert(mode)
        path = tmp_path / f"x_{mode}.{suffix}"
        image.save(path)
        out = transforms.eval_image(str(path), (32, 32), "crop", 0.8)  # fit to 40, centre 32
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        rgb = np.asarray(Image.open(path).convert("RGB"))
        # crop: the centred 90x90 square of the 90x120 image, resized to 40x40, then its centre 32x32.
        reference = torch_resize(np.ascontiguousarray(rgb[:, 15:105]), (40, 40))[4:36, 4:36]
        assert np.abs(out.astype(float) - reference).mean() < 1.5, mode


def test_resized_crop_matches_torch_on_the_box(tmp_path):
    array = smooth_image(200, 300)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    u = torch.tensor([0.3, 0.7, 0.25, 0.6], dtype=torch.float64)
    box = transforms.crop_boxes(u[None], torch.tensor([300]), torch.tensor([200]), (0.2, 1.0), (0.75, 4 / 3))[
        0
    ]
    left, top, right, bottom = (round(v) for v in box.tolist())
    out = transforms.resized_crop(str(path), u, (32, 24), (0.2, 1.0), (0.75, 4 / 3))
    assert out.shape == (32, 24, 3) and out.dtype == np.uint8
    reference = torch_resize(array[top:bottom, left:right], (32, 24))  # float maths, rounded: within 1 level
    assert np.abs(out.astype(float) - reference).max() <= 1


@pytest.mark.parametrize("decoder", DECODERS)
def test_draft_decoding_is_close_to_full_decoding(tmp_path, decoder):
    array = smooth_image(800, 1000)
    path = tmp_path / "big.jpg"
    Image.fromarray(array).save(path, quality=95)
    u = torch.tensor([0.9, 0.5, 0.5, 0.5], dtype=torch.float64)
    fast = transforms.resized_crop(
        str(path), u, (64, 64), (0.5, 1.0), (0.75, 4 / 3), draft=True, decoder=decoder
    )
    full = transforms.resized_crop(
        str(path), u, (64, 64), (0.5, 1.0), (0.75, 4 / 3), draft=False, decoder=decoder
    )
    assert np.abs(fast.astype(float) - full.astype(float)).mean() < 2.0
    _, factor = transforms.open_rgb(str(path), (125, 100))
    assert factor == (8.0, 8.0)  # 1000x800 -> 125x100 keeps the request: the 1/8 DCT scale
    _, factor = transforms.open_rgb(str(path), (300, 300))
    assert factor == (2.0, 2.0)  # 1/4 would give 250x200 < 300: 1/2


def test_the_decode_scale_never_upsamples_a_crop(tmp_path, monkeypatch):
    """Each box keeps at least the output's pixels at the scale its JPEG is decoded at."""
    path = tmp_path / "big.jpg"
    Image.fromarray(smooth_image(960, 1280)).save(path, quality=90)
    chosen = []
    real_decode = decode.decode

    def recording(encoded, factor=1):
        chosen.append(factor)
        return real_decode(encoded, factor)

    monkeypatch.setattr(decode, "decode", recording)
    u = transforms.draw_resized_crops(torch.Generator().manual_seed(0), 64)
    transforms.resized_crops([str(path)] * 64, u, (56, 40), (0.01, 1.0), (1 / 3, 3.0))
    boxes = transforms.crop_boxes(
        u, torch.full((64,), 1280), torch.full((64,), 960), (0.01, 1.0), (1 / 3, 3.0)
    )
    factors = torch.tensor(chosen, dtype=torch.float64)
    assert ((boxes[:, 2] - boxes[:, 0]) / factors >= 40).all() and (
        (boxes[:, 3] - boxes[:, 1]) / factors >= 56
    ).all()
    assert set(chosen) >= {2, 4, 8}  # and the reduced scales were used


@pytest.mark.parametrize("decoder", DECODERS)
def test_resized_crops_of_a_batch_equal_each_file_alone(tmp_path, decoder):
    paths = []
    for i, (mode, suffix) in enumerate([("RGB", "jpg"), ("L", "jpg"), ("RGBA", "png"), ("CMYK", "jpg")]):
        paths.append(str(tmp_path / f"{i}.{suffix}"))
        Image.fromarray(smooth_image(300 + 40 * i, 500 - 30 * i)).convert(mode).save(paths[-1])
    u = transforms.draw_resized_crops(torch.Generator().manual_seed(1), len(paths))
    batch = transforms.resized_crops(paths, u, (48, 40), (0.08, 1.0), (3 / 4, 4 / 3), decoder=decoder)
    assert batch.shape == (4, 3, 48, 40) and batch.dtype == torch.uint8 and batch.is_contiguous()
    for k, path in enumerate(paths):
        alone = transforms.resized_crop(path, u[k], (48, 40), (0.08, 1.0), (3 / 4, 4 / 3), decoder=decoder)
        assert np.array_equal(batch[k].permute(1, 2, 0).numpy(), alone)
    if decoder == "simplejpeg":  # the same pixels as Pillow's decoding
        pil = transforms.resized_crops(paths, u, (48, 40), (0.08, 1.0), (3 / 4, 4 / 3), decoder="pil")
        assert torch.equal(batch, pil)


def test_eval_size_and_check_range():
    assert transforms.eval_size(224, 0.875) == 256
    assert transforms.eval_size(32, 1.0) == 32
    with pytest.raises(ValueError, match="crop_fraction"):
        transforms.eval_size(32, 0.0)
    with pytest.raises(ValueError, match="aspect"):
        transforms.fit_image(Image.new("RGB", (4, 4)), (2, 2), "stretch")
