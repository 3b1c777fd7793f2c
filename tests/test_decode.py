"""trickbag.decode: both decoders against Pillow's own decoding (open_rgb), the draft factor against Pillow's rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from trickbag import decode, transforms

needs_simplejpeg = pytest.mark.skipif(
    decode.choose_decoder("auto") != "simplejpeg",
    reason="simplejpeg not installed (pip install 'trickbag[fastjpeg]')",
)
DECODERS = ["pil", pytest.param("simplejpeg", marks=needs_simplejpeg)]


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth shapes plus noise: every DCT coefficient is used, as in a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([127 + 90 * np.sin(x / 13.0), 127 + 90 * np.cos(y / 9.0), (x + y) % 256], axis=2)
    return (smooth + rng.normal(0, 20, smooth.shape)).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """JPEGs of every kind a camera or a scanner writes, and the other formats Pillow reads."""
    root = tmp_path_factory.mktemp("decode")
    array = photo_like(123, 161)  # odd sides: the scaled sizes are rounded up
    image = Image.fromarray(array)
    out = {}
    for name, (converted, options) in {
        "ycbcr420": (image, {"subsampling": 2}),
        "ycbcr444": (image, {"subsampling": 0}),
        "progressive": (image, {"progressive": True}),
        "grey": (image.convert("L"), {}),
        "cmyk": (image.convert("CMYK"), {}),
    }.items():
        out[name] = root / f"{name}.jpg"
        converted.save(out[name], "JPEG", quality=90, **options)
    for name, mode in (("rgba", "RGBA"), ("palette", "P"), ("grey_png", "L")):
        out[name] = root / f"{name}.png"
        image.convert(mode).save(out[name])
    return {name: str(path) for name, path in out.items()}


def test_choose_decoder():
    assert decode.choose_decoder("pil") == "pil"
    assert decode.choose_decoder("auto") in decode.DECODERS
    with pytest.raises(ValueError, match="decoder must be"):
        decode.choose_decoder("turbo")


def test_choose_decoder_without_simplejpeg(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_simplejpeg(name, *args, **kwargs):
        if name == "simplejpeg":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_simplejpeg)
    assert decode.choose_decoder("auto") == "pil"  # the fallback
    with pytest.raises(ValueError, match="fastjpeg"):
        decode.choose_decoder("simplejpeg")


@pytest.mark.parametrize("size", [(640, 480), (641, 479), (643, 214), (17, 9), (1000, 800)])
def test_draft_factor_is_pillows_choice(tmp_path, size):
    path = tmp_path / "x.jpg"
    Image.new("RGB", size).save(path)
    for want in [(1, 1), (80, 60), (100, 100), (size[0] // 3, size[1] // 3), (size[0] // 2 + 1, 1), size]:
        with Image.open(path) as image:
            image.draft("RGB", want)
            pillow = image.decoderconfig[0]  # the DCT scale Pillow chose
            assert image.size == (math.ceil(size[0] / pillow), math.ceil(size[1] / pillow))
        assert decode.draft_factor(size, want) == pillow, want
    assert decode.draft_factor(size, None) == 1


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name", ["ycbcr420", "ycbcr444", "progressive", "grey", "cmyk"])
def test_jpegs_decode_as_pillow_decodes_them_at_every_factor(files, name, decoder):
    encoded = decode.read_encoded(files[name], decoder)
    assert encoded.size == (161, 123)
    # simplejpeg takes the YCbCr and greyscale JPEGs; CMYK stays with Pillow's conversion.
    assert encoded.turbo == (decoder == "simplejpeg" and name != "cmyk")
    for factor in (1, 2, 4, 8):
        array, applied = decode.decode(encoded, factor)
        reference, scale = transforms.open_rgb(files[name], (161 // factor, 123 // factor))  # Pillow's draft
        want = (math.ceil(161 / factor), math.ceil(123 / factor))
        assert applied == factor and array.shape == (want[1], want[0], 3) and array.dtype == np.uint8
        assert np.array_equal(array, np.asarray(reference)), factor


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name", ["rgba", "palette", "grey_png"])
def test_other_formats_decode_whole_as_open_rgb(files, name, decoder):
    encoded = decode.read_encoded(files[name], decoder)
    assert not encoded.turbo
    array, applied = decode.decode(encoded, 4)  # not a JPEG: no reduced scale
    assert applied == 1
    assert np.array_equal(array, np.asarray(transforms.open_rgb(files[name])[0]))


@pytest.mark.parametrize("decoder", DECODERS)
def test_bad_files_raise_and_are_named(tmp_path, decoder):
    truncated = tmp_path / "truncated.jpg"
    buffer = tmp_path / "whole.jpg"
    Image.fromarray(photo_like(64, 64)).save(buffer, "JPEG")
    truncated.write_bytes(buffer.read_bytes()[:300])
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_bytes(b"not a jpeg")
    for path in (truncated, not_an_image):
        with pytest.raises(ValueError, match=path.name):
            with decode.naming(str(path)):
                decode.decode(decode.read_encoded(str(path), decoder))
    with pytest.raises(ValueError, match="factor"):
        decode.decode(decode.read_encoded(str(buffer), decoder), 3)
