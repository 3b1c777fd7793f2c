"""Image preprocessing for images of any size: fit to a size (aspect handling), eval resize + centre crop, and
random-resized-crop + flip for training, seeded by a plan drawn up front like ``trickbag.data``'s batched ops.

Three parts:

* **Plans** (batched, pure torch): ``draw_resized_crops(generator, n)`` draws the random numbers of ``n`` crops in
  one call; ``crop_boxes(uniforms, widths, heights, scale, ratio)`` turns them into boxes for images of given
  sizes. The boxes depend only on the generator and the image sizes, so every loader (in-memory or streaming,
  any number of worker processes) cuts the same crops for the same ``(seed, epoch)``.
* **Per image** (PIL): ``open_rgb`` (with JPEG draft-mode decoding at a reduced size when the output is much
  smaller than the file: the DCT is scaled by 1/2, 1/4 or 1/8 instead of decoding every pixel), ``fit_image``
  (aspect handling), ``eval_image`` (resize to ``size / crop_fraction`` then centre crop ``size``: the standard
  ImageNet evaluation with ``crop_fraction=0.875``).
* **Random-resized crops of files** (``trickbag.decode`` + torch): ``resized_crops`` reads a batch of files once,
  computes their boxes in one call, decodes each JPEG at the smallest scale that keeps its box at least the
  output size, and resizes each box with torch's antialiased bilinear resize.

Random-resized-crop (Szegedy et al. 2015, https://arxiv.org/abs/1409.4842): a box of ``scale`` x the image's area
and aspect ratio ``ratio`` (log-uniform), at a uniform position, resized to the output size. torchvision draws up
to 10 candidates and falls back to a centre crop; here each box is drawn once and shrunk to fit inside the image
(keeping its centre rule), so a box needs exactly four random numbers and plans are fixed-size tensors.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from trickbag import decode

__all__ = [
    "ASPECTS",
    "draw_resized_crops",
    "crop_boxes",
    "open_rgb",
    "fit_image",
    "eval_image",
    "resized_crop",
    "resized_crops",
    "resize_box",
    "eval_size",
    "check_range",
]

# crop: resize the shorter side, centre-crop the longer (no distortion, edges lost);
# squash: resize both sides (distorts, keeps everything); pad: resize the longer side, pad the shorter with black.
ASPECTS = ("crop", "squash", "pad")


def check_range(name: str, value, low: float, high: float | None = None) -> tuple[float, float]:
    """``value`` as a (min, max) pair of floats with ``low <= min <= max (<= high)``, else ValueError."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if ok:
        first, second = float(value[0]), float(value[1])
        ok = low <= first <= second and (high is None or second <= high)
    if not ok:
        allowed = f"{low} <= min <= max" + ("" if high is None else f" <= {high}")
        raise ValueError(f"{name} must be a (min, max) pair with {allowed}, got {value!r}")
    return first, second


def _check_aspect(aspect: str) -> None:
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")


def eval_size(size: int, crop_fraction: float) -> int:
    """The side an image is fitted to before the centre crop: ``round(size / crop_fraction)`` (224, 0.875: 256)."""
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
    return max(int(size), round(size / crop_fraction))


# ---------------------------------------------------------------------------------------------------------
# Plans: random numbers drawn up front, boxes computed for each image's size
# ---------------------------------------------------------------------------------------------------------


def draw_resized_crops(generator: torch.Generator, n: int) -> torch.Tensor:
    """(n, 4) float64 uniforms in [0, 1): (area, log-ratio, top, left) of ``n`` random-resized crops."""
    return torch.rand(n, 4, generator=generator, dtype=torch.float64)


def crop_boxes(
    uniforms: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Boxes of random-resized crops, one per image, from ``draw_resized_crops``'s numbers.

    Args:
        uniforms: (N, 4) float in [0, 1).
        widths, heights: (N,) image sizes in pixels.
        scale: (min, max) fraction of the image area, in (0, 1].
        ratio: (min, max) width / height of the box, drawn log-uniformly.

    Returns:
        (N, 4) float64 boxes ``(left, top, right, bottom)`` in pixels, inside each image; a box that does not
        fit is shrunk to the image's width and/or height.
    """
    scale = check_range("scale", scale, 0.0, 1.0)
    ratio = check_range("ratio", ratio, 0.0)
    if scale[0] <= 0 or ratio[0] <= 0:
        raise ValueError(f"scale and ratio must be > 0, got scale={scale}, ratio={ratio}")
    u = uniforms.to(torch.float64)
    width = torch.as_tensor(widths, dtype=torch.float64)
    height = torch.as_tensor(heights, dtype=torch.float64)
    area = width * height * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_ratio)
    box_w = torch.sqrt(area * aspect).clamp(min=1.0).minimum(width)
    box_h = torch.sqrt(area / aspect).clamp(min=1.0).minimum(height)
    top = u[:, 2] * (height - box_h)
    left = u[:, 3] * (width - box_w)
    return torch.stack([left, top, left + box_w, top + box_h], dim=1)


# ---------------------------------------------------------------------------------------------------------
# Per image (PIL)
# ---------------------------------------------------------------------------------------------------------


def open_rgb(path: str, want: tuple[int, int] | None = None, *, draft: bool = True):
    """A file as an RGB PIL image (greyscale copied to 3 channels, alpha dropped, palette/CMYK converted).

    Args:
        want: (width, height) the decoded image must at least have; with ``draft`` a JPEG is decoded at the
            smallest of 1/1, 1/2, 1/4, 1/8 scale that keeps it (Pillow's ``draft``). None: full size.

    Returns:
        (image, factor): the loaded RGB image and the factor (>= 1) by which it is smaller than the file,
        (file width / decoded width, file height / decoded height).
    """
    from PIL import Image

    with Image.open(path) as image:
        full = image.size
        if draft and want is not None and image.format == "JPEG":
            image.draft("RGB", (max(1, int(want[0])), max(1, int(want[1]))))
        image.load()  # a truncated file fails here, not later
        rgb = image.convert("RGB")
    return rgb, (full[0] / rgb.size[0], full[1] / rgb.size[1])


def fit_image(image, size: tuple[int, int], aspect: str = "squash", *, box=None):
    """Resize a PIL image (or its ``box``) to ``size`` = (H, W) with the given aspect handling (``ASPECTS``)."""
    from PIL import Image

    _check_aspect(aspect)
    height, width = size
    left, top, right, bottom = box if box is not None else (0.0, 0.0, float(image.width), float(image.height))
    source_w, source_h = right - left, bottom - top
    if aspect == "squash" or source_w * height == source_h * width:
        if box is None and image.size == (width, height):
            return image
        return image.resize((width, height), Image.BILINEAR, box=(left, top, right, bottom))
    if aspect == "crop":
        # The largest box of the output's aspect ratio, centred.
        keep_w = min(source_w, source_h * width / height)
        keep_h = min(source_h, source_w * height / width)
        cx, cy = left + source_w / 2, top + source_h / 2
        box = (cx - keep_w / 2, cy - keep_h / 2, cx + keep_w / 2, cy + keep_h / 2)
        return image.resize((width, height), Image.BILINEAR, box=box)
    factor = min(width / source_w, height / source_h)  # pad: the whole box fits
    inner = (max(1, round(source_w * factor)), max(1, round(source_h * factor)))
    resized = image.resize(inner, Image.BILINEAR, box=(left, top, right, bottom))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(resized, ((width - inner[0]) // 2, (height - inner[1]) // 2))
    return canvas


def eval_image(path: str, size: tuple[int, int], aspect: str = "squash", crop_fraction: float = 1.0,
               *, draft: bool = True) -> np.ndarray:  # fmt: skip
    """Evaluation preprocessing of one file: fit to ``size / crop_fraction`` (aspect handling), centre crop ``size``.

    Returns:
        (H, W, 3) uint8.
    """
    height, width = size
    outer = (eval_size(height, crop_fraction), eval_size(width, crop_fraction))
    image, _ = open_rgb(path, _draft_request(outer, aspect), draft=draft)
    fitted = fit_image(image, outer, aspect)
    top, left = (outer[0] - height) // 2, (outer[1] - width) // 2
    if (top, left) != (0, 0):
        fitted = fitted.crop((left, top, left + width, top + height))
    return np.asarray(fitted, dtype=np.uint8)


def _draft_request(size: tuple[int, int], aspect: str) -> tuple[int, int]:
    """(width, height) a draft decode must keep so that fitting to ``size`` (H, W) never upsamples."""
    # crop fits the shorter side, so both sides must stay >= the larger output side; squash and pad: each side.
    side = max(size)
    return (side, side) if aspect == "crop" else (size[1], size[0])


def resized_crops(paths: list[str], uniforms, size: tuple[int, int], scale, ratio, *, draft: bool = True,
                  decoder: str = "pil") -> torch.Tensor:  # fmt: skip
    """Random-resized crops of files, one per row of plan uniforms (``draw_resized_crops``).

    Each file is read once: the boxes of all files come from their headers' sizes in one ``crop_boxes`` call,
    then each JPEG is decoded at the smallest of 1, 1/2, 1/4, 1/8 scale at which its box still has at least
    ``size`` pixels (the scale never upsamples a crop), and the box, in whole pixels of the decoded image (as
    torchvision's RandomResizedCrop cuts whole pixels), is resized by torch's antialiased bilinear resize (PIL's
    BILINEAR filter; PIL's resize, with the copies into and out of a PIL image, cost ~2x as much here).

    Args:
        paths: N files; uniforms: (N, 4) float in [0, 1); size: (H, W) of the crops.
        scale, ratio: as ``crop_boxes``.
        draft: decode JPEGs at a reduced scale when the box allows it; False: always whole.
        decoder: ``trickbag.decode.DECODERS`` (resolve "auto" once with ``decode.choose_decoder``).

    Returns:
        (N, 3, H, W) uint8, contiguous (normalising a channels-last uint8 batch into NCHW floats is 2-5x slower).

    Raises:
        ValueError naming the file that cannot be read or decoded.
    """
    height, width = size
    encoded = []
    for path in paths:
        with decode.naming(path):
            encoded.append(decode.read_encoded(path, decoder))
    sizes = torch.tensor([image.size for image in encoded], dtype=torch.float64).reshape(-1, 2)
    u = torch.as_tensor(uniforms, dtype=torch.float64).reshape(-1, 4)
    boxes = crop_boxes(u, sizes[:, 0], sizes[:, 1], scale, ratio).tolist()
    out = torch.empty((len(paths), 3, height, width), dtype=torch.uint8)
    for k, (image, box) in enumerate(zip(encoded, boxes)):
        box_w, box_h = box[2] - box[0], box[3] - box[1]
        want = (math.ceil(image.size[0] * width / box_w), math.ceil(image.size[1] * height / box_h))
        with decode.naming(image.path):
            array, factor = decode.decode(image, decode.draft_factor(image.size, want) if draft else 1)
        out[k] = resize_box(array, [v / factor for v in box], size)
    return out


def resize_box(array: np.ndarray, box, size: tuple[int, int]) -> torch.Tensor:
    """The ``box`` (left, top, right, bottom), rounded to whole pixels, of a (h, w, 3) uint8 image resized to
    ``size`` (H, W) with antialiased bilinear: (3, H, W) uint8, channels-last memory."""
    left, top, right, bottom = (round(v) for v in box)
    right, bottom = max(right, left + 1), max(bottom, top + 1)
    with warnings.catch_warnings():
        # Pillow's arrays are read-only; torch only reads this one.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        pixels = torch.from_numpy(array)
    x = pixels[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def resized_crop(
    path: str, uniforms, size: tuple[int, int], scale, ratio, *, draft: bool = True, decoder: str = "pil"
) -> np.ndarray:
    """Random-resized crop of one file from its (4,) plan uniforms: ``resized_crops`` of one file, (H, W, 3) uint8."""
    crop = resized_crops([path], torch.as_tensor(uniforms).reshape(1, 4), size, scale, ratio, draft=draft,
                         decoder=decoder)  # fmt: skip
    return crop[0].permute(1, 2, 0).numpy()
