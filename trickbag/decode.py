"""Image files to RGB uint8 arrays, each file read once, JPEGs decoded at 1/2, 1/4 or 1/8 scale when asked.

Two steps, so that a batch's crop boxes can be computed from the files' sizes before any pixel is decoded:
``read_encoded(path, decoder)`` reads the file and its header (size), ``decode(encoded, factor)`` decodes it.

Two decoders, both libjpeg-turbo for JPEGs:

* ``"pil"``: Pillow (draft mode for the reduced scales). Every format Pillow reads.
* ``"simplejpeg"`` (the optional extra ``trickbag[fastjpeg]``): libjpeg-turbo's own API on the file's bytes, for
  YCbCr and greyscale JPEGs; anything else (PNG, CMYK JPEGs, ...) still goes to Pillow. It skips Pillow's
  per-image costs (file parsing, its 4-byte RGBX pixels and their copy to an array): a 640x480 JPEG cut to a
  224² crop costs ~0.8 ms instead of ~1.1 ms on one EPYC core (benchmarks/loader.py). Its pixels are Pillow's,
  bit for bit, at every scale (tests/test_decode.py).

Only the DCT scales 1/2, 1/4, 1/8 are used: libjpeg-turbo can also scale by 3/8, 5/8, 6/8, 7/8, but those IDCTs
are plain C, and decoding at 5/8 took 1.5-2x as long as a full decode here.
"""

from __future__ import annotations

import io
import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

__all__ = ["DECODERS", "choose_decoder", "draft_factor", "EncodedImage", "read_encoded", "decode", "naming"]

DECODERS = ("pil", "simplejpeg")


def choose_decoder(decoder: str = "auto") -> str:
    """``"auto"``: ``"simplejpeg"`` where it is installed, else ``"pil"``; a named decoder must be installed."""
    if decoder not in ("auto", *DECODERS):
        raise ValueError(f"decoder must be 'auto' or one of {DECODERS}, got {decoder!r}")
    if decoder == "pil":
        return decoder
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        if decoder == "simplejpeg":
            raise ValueError(
                "decoder='simplejpeg' needs the simplejpeg package: pip install 'trickbag[fastjpeg]'"
            ) from None
        return "pil"
    return "simplejpeg"


def draft_factor(size: tuple[int, int], want: tuple[int, int] | None) -> int:
    """The reduction (8, 4, 2 or 1) of a draft decode of a ``size`` (width, height) file that keeps ``want``.

    Pillow's rule (``JpegImageFile.draft``), so that both decoders cut a file at the same scale: the largest of
    8, 4, 2, 1 not above ``min(width // want_width, height // want_height)``.
    """
    if want is None:
        return 1
    fits = min(size[0] // max(1, int(want[0])), size[1] // max(1, int(want[1])))
    return next((factor for factor in (8, 4, 2) if fits >= factor), 1)


@dataclass
class EncodedImage:
    """A file read but not decoded: its bytes, its (width, height) from the header, and which decoder takes it."""

    path: str
    data: bytes
    size: tuple[int, int]
    turbo: bool  # simplejpeg decodes it; else Pillow


def read_encoded(path: str, decoder: str = "pil") -> EncodedImage:
    """Read ``path`` once and parse its header (``decoder`` from ``choose_decoder``)."""
    from PIL import Image

    with open(path, "rb") as handle:
        data = handle.read()
    if decoder == "simplejpeg":
        import simplejpeg

        if simplejpeg.is_jpeg(data):
            try:
                height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            # A header libjpeg-turbo's API cannot name (e.g. an unusual chroma subsampling): Pillow decodes it.
            except ValueError:
                colorspace = None
            # CMYK/YCCK JPEGs: Pillow's conversion to RGB, as for every other file.
            if colorspace in ("YCbCr", "Gray"):
                return EncodedImage(path, data, (width, height), True)
    with Image.open(io.BytesIO(data)) as image:
        return EncodedImage(path, data, image.size, False)


def decode(encoded: EncodedImage, factor: int = 1) -> tuple[np.ndarray, int]:
    """An encoded file as RGB pixels, a JPEG at ``1 / factor`` of its size (each side rounded up, libjpeg's rule).

    Greyscale is copied to 3 channels, alpha dropped, palette and CMYK converted (Pillow's ``convert("RGB")``).

    Returns:
        ((H, W, 3) uint8, the factor applied: ``factor`` for a JPEG, 1 for other files, decoded whole).
    """
    if factor not in (1, 2, 4, 8):
        raise ValueError(f"factor must be 1, 2, 4 or 8, got {factor!r}")
    width, height = encoded.size
    scaled = (math.ceil(width / factor), math.ceil(height / factor))
    if encoded.turbo:
        import simplejpeg

        return simplejpeg.decode_jpeg(encoded.data, "RGB", min_width=scaled[0], min_height=scaled[1]), factor
    from PIL import Image

    with Image.open(io.BytesIO(encoded.data)) as image:
        if factor > 1 and image.format == "JPEG":
            # Asking for (width // factor, height // factor) makes Pillow's own rule pick exactly ``factor``.
            image.draft("RGB", (width // factor, height // factor))
        applied = factor if image.size == scaled else 1
        image.load()  # a truncated file fails here, not later
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8), applied


@contextmanager
def naming(path: str):
    """Re-raise any error while reading or decoding ``path`` as a ValueError that names it (a DataLoader worker's
    traceback alone would not say which file)."""
    try:
        yield
    except Exception as error:
        raise ValueError(f"cannot decode {path!r}: {type(error).__name__}: {error}") from error
