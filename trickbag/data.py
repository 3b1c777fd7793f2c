"""Image datasets as uint8 tensors, and a batch loader that augments on the training device.

Image folders and CSVs are decoded once, in parallel, into one cached uint8 array ``(N, C, H, W)``;
training then indexes that tensor directly. There is no ``DataLoader``: no worker
processes, no per-sample Python, and the random order and augmentation of an epoch are a pure function
of ``(seed, epoch)`` so a run resumed at an epoch boundary sees exactly the same batches.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ImageSet",
    "BatchLoader",
    "load_digits",
    "split_validation",
    "channel_stats",
    "epoch_generator",
    "load_image_folder",
    "load_csv",
    "load_images",
    "list_images",
    "IMAGE_EXTENSIONS",
]


# ---------------------------------------------------------------------------------------------------------
# The in-memory dataset
# ---------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, value, dtype: torch.dtype, shape: str) -> None:
    """TypeError unless ``value`` is a ``dtype`` tensor with as many dimensions as ``shape`` names."""
    ndim = shape.count(",") + (0 if shape.endswith(",)") else 1)
    if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != ndim:
        raise TypeError(
            f"{name} must be a tensor of dtype {str(dtype).removeprefix('torch.')} and shape {shape}, got "
            f"{getattr(value, 'dtype', type(value))} {tuple(getattr(value, 'shape', ()))}"
        )


@dataclass
class ImageSet:
    """A labelled image set held in memory.

    Attributes:
        images: (N, C, H, W) uint8 tensor.
        labels: (N,) int64 tensor of class indices into ``classes``.
        classes: class names; ``classes[i]`` is the name of label ``i``.
        paths: source file of each image, or None for generated/embedded data.
        skipped: files that could not be decoded and were skipped (``skip_bad_images=True``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    paths: list[str] | None = None
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_tensor("ImageSet.images", self.images, torch.uint8, "(N, C, H, W)")
        _check_tensor("ImageSet.labels", self.labels, torch.int64, "(N,)")
        if len(self.labels) != len(self.images):
            raise ValueError(f"ImageSet has {len(self.images)} images but {len(self.labels)} labels")
        if self.paths is not None and len(self.paths) != len(self.images):
            raise ValueError(f"ImageSet has {len(self.images)} images but {len(self.paths)} paths")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """The images at ``indices`` (a (K,) int64 tensor), keeping ``classes``."""
        paths = None if self.paths is None else [self.paths[i] for i in indices.tolist()]
        return ImageSet(self.images[indices], self.labels[indices], list(self.classes), paths)


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), split stratified.

    The 0..16 grey levels are scaled to uint8 0..255 so the set looks like any other image set.

    Returns:
        (train, test): ImageSets with images (N, 1, 8, 8) uint8 and classes "0".."9".
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    grey = torch.as_tensor(bunch.images, dtype=torch.float64)
    images = torch.round(grey * (255.0 / 16.0)).to(torch.uint8).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    full = ImageSet(images, labels, [str(c) for c in range(10)])
    return split_validation(full, test_fraction, seed)


# ---------------------------------------------------------------------------------------------------------
# Splits and statistics
# ---------------------------------------------------------------------------------------------------------


def split_validation(imageset: ImageSet, fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Stratified, seeded split: each class sends ``round(fraction * count)`` images to the second set.

    A class with at least two images keeps at least one on each side when ``0 < fraction < 1``.

    Returns:
        (train, val) ImageSets; the order inside each is the original order.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be a number in (0, 1), got {fraction!r}")
    generator = torch.Generator().manual_seed(int(seed))
    val_mask = torch.zeros(len(imageset), dtype=torch.bool)
    for label in torch.unique(imageset.labels).tolist():
        members = torch.nonzero(imageset.labels == label).flatten()
        count = len(members)
        n_val = round(fraction * count)
        if count >= 2:
            n_val = min(max(n_val, 1), count - 1)
        chosen = members[torch.randperm(count, generator=generator)[:n_val]]
        val_mask[chosen] = True
    train_index = torch.nonzero(~val_mask).flatten()
    val_index = torch.nonzero(val_mask).flatten()
    if len(train_index) == 0 or len(val_index) == 0:
        raise ValueError(
            f"split_validation with fraction={fraction} of {len(imageset)} images leaves an empty side; "
            "use more images or another fraction"
        )
    return imageset.subset(train_index), imageset.subset(val_index)


def channel_stats(images: torch.Tensor, *, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation in [0, 1] units.

    Args:
        images: (N, C, H, W) uint8.

    Returns:
        (mean, std): two lists of C floats (population std).
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(
            f"images must be a (N, C, H, W) uint8 tensor, got {getattr(images, 'dtype', type(images))} "
            f"{tuple(getattr(images, 'shape', ()))}"
        )
    if len(images) == 0:
        raise ValueError("images is empty; channel_stats needs at least one image")
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    # Chunked float64 sums: a float32 sum over 50M pixels loses digits, a float64 copy of all of CIFAR is 1.2 GB.
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].to(torch.float64) / 255.0
        total += block.sum(dim=(0, 2, 3))
        total_sq += (block * block).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    return mean.tolist(), var.sqrt().tolist()


# ---------------------------------------------------------------------------------------------------------
# Batched augmentation
# ---------------------------------------------------------------------------------------------------------


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, epoch)."""
    # Mix with a large odd constant so (seed, epoch) and (seed + 1, epoch - 1) do not collide.
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B97F4A7C15 + int(epoch)) % (2**63))


def random_crop(
    images: torch.Tensor, padding: int, offsets: torch.Tensor, *, padding_mode: str = "reflect"
) -> torch.Tensor:
    """Pad each image by ``padding`` and cut out an (H, W) window at its own offset, all in one gather.

    Args:
        images: (N, C, H, W) float.
        padding: pixels added on every side.
        offsets: (N, 2) int64, (top, left) of each window in the padded image, each in [0, 2 * padding].
        padding_mode: "reflect" or "zeros".

    Returns:
        (N, C, H, W), same dtype and device as ``images``.
    """
    if padding == 0:
        return images
    n, c, h, w = images.shape
    mode = {"reflect": "reflect", "zeros": "constant"}.get(padding_mode)
    if mode is None:
        raise ValueError(f"padding_mode must be 'reflect' or 'zeros', got {padding_mode!r}")
    padded = F.pad(images, (padding, padding, padding, padding), mode=mode)
    offsets = offsets.to(images.device)
    rows = offsets[:, 0:1] + torch.arange(h, device=images.device)  # (N, H)
    cols = offsets[:, 1:2] + torch.arange(w, device=images.device)  # (N, W)
    # Gather rows then columns: two index_selects worth of memory traffic, no per-image loop.
    rows_index = rows[:, None, :, None].expand(n, c, h, padded.shape[3])
    picked = padded.gather(2, rows_index)
    cols_index = cols[:, None, None, :].expand(n, c, h, w)
    return picked.gather(3, cols_index)


def random_flip(images: torch.Tensor, flip_mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images where ``flip_mask`` (N,) bool is True; (N, C, H, W) in and out."""
    mask = flip_mask.to(images.device)[:, None, None, None]
    return torch.where(mask, images.flip(3), images)


class BatchLoader:
    """Batches from in-memory uint8 tensors, normalised and augmented on ``device``.

    Each batch: index -> float -> normalise ``(x / 255 - mean) / std`` -> random crop with padding -> random
    horizontal flip -> ``(x (N, C, H, W) float32, y (N,) int64)``. The permutation, crop offsets and flips of
    an epoch are drawn up front from ``epoch_generator(seed, epoch)``, so they depend on nothing else
    (not the device, not how many batches were consumed before). Iterating to the end advances ``epoch`` by
    one; call ``set_epoch(epoch)`` to choose it explicitly (e.g. on resume).

    For evaluation use ``shuffle=False`` with no crop/flip (``BatchLoader.for_eval``).

    Args:
        images: (N, C, H, W) uint8 tensor (moved once to ``device``).
        labels: (N,) int64 tensor, or None (batches then yield ``y = None``; for prediction).
        batch_size: images per batch.
        shuffle: draw a new order each epoch.
        drop_last: skip a final batch smaller than ``batch_size``.
        seed: base seed of the per-epoch generator.
        device: where images live and batches are built.
        mean, std: per-channel normalisation in [0, 1] units (sequences of C floats); None computes them
            from ``images`` (pass the training set's values to an eval loader).
        crop_padding: pixels of padding for the random crop; 0 disables it.
        flip: random horizontal flips with probability 0.5.
        channels_last: return batches in ``torch.channels_last`` memory format.
        padding_mode: "reflect" or "zeros" (zeros after normalising = the mean colour).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        mean: list[float] | tuple[float, ...] | None = None,
        std: list[float] | tuple[float, ...] | None = None,
        crop_padding: int = 0,
        flip: bool = False,
        channels_last: bool = False,
        padding_mode: str = "reflect",
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(
                f"images must be a (N, C, H, W) uint8 tensor, got {getattr(images, 'dtype', type(images))} "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        if labels is not None and (labels.dim() != 1 or len(labels) != len(images)):
            raise ValueError(
                f"labels must have shape ({len(images)},) to match images, got {tuple(labels.shape)}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
        if padding_mode not in ("reflect", "zeros"):
            raise ValueError(f"padding_mode must be 'reflect' or 'zeros', got {padding_mode!r}")
        if padding_mode == "reflect" and crop_padding >= min(images.shape[2], images.shape[3]):
            raise ValueError(
                f"crop_padding={crop_padding} must be smaller than the image size {tuple(images.shape[2:])} "
                "for reflect padding; use padding_mode='zeros' or less padding"
            )
        channels = images.shape[1]
        if mean is None or std is None:
            computed_mean, computed_std = (
                channel_stats(images) if len(images) else ([0.0] * channels, [1.0] * channels)
            )
            mean = computed_mean if mean is None else mean
            std = computed_std if std is None else std
        mean, std = list(mean), list(std)
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"mean and std need one value per channel ({channels}), got mean={mean} std={std}"
            )
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {std}")

        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = None if labels is None else labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.epoch = 0
        self.mean, self.std = mean, std
        self.crop_padding = crop_padding
        self.flip = bool(flip)
        self.channels_last = bool(channels_last)
        self.padding_mode = padding_mode
        # Folding the scale into one multiply-add: x * scale + shift == (x / 255 - mean) / std.
        std_t = torch.tensor(std, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(self.device)
        self._shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, -1, 1, 1).to(self.device)

    @classmethod
    def for_eval(
        cls,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        mean: list[float] | tuple[float, ...] | None = None,
        std: list[float] | tuple[float, ...] | None = None,
        channels_last: bool = False,
    ) -> BatchLoader:
        """A loader in eval mode: fixed order, every image once, no augmentation."""
        return cls(
            images,
            labels,
            batch_size=batch_size,
            shuffle=False,
            drop_last=False,
            device=device,
            mean=mean,
            std=std,
            channels_last=channels_last,
        )

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation the next iteration uses."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]))

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 on ``device`` -> normalised float32."""
        return images_uint8.to(torch.float32).mul_(self._scale).add_(self._shift)

    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(order (N,), crop offsets (N, 2) or None, flip mask (N,) or None) for ``epoch``, on the CPU.

        Offsets and flips are indexed by position in the epoch's order, drawn in a fixed sequence.
        """
        n = len(self.images)
        generator = epoch_generator(self.seed, epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        offsets = None
        if self.crop_padding > 0:
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5 if self.flip else None
        return order, offsets, flips

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        epoch = self.epoch
        order, offsets, flips = self.epoch_plan(epoch)
        order_device = order.to(self.device)
        n = len(order)
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            index = order_device[start : start + self.batch_size]
            x = self.images[index]
            # Without a crop, mirror the uint8 batch: flipping commutes with the per-channel normalisation
            # and moves 4x fewer bytes (the loader's largest cost on CPU).
            if flips is not None and offsets is None:
                x = random_flip(x, flips[start : start + self.batch_size])
            x = self.normalize(x)
            if offsets is not None:
                x = random_crop(
                    x,
                    self.crop_padding,
                    offsets[start : start + self.batch_size],
                    padding_mode=self.padding_mode,
                )
                if flips is not None:
                    x = random_flip(x, flips[start : start + self.batch_size])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = None if self.labels is None else self.labels[index]
            yield x, y
        # Only a completed pass moves on, so a loop broken off mid-epoch repeats that epoch's plan.
        if self.epoch == epoch:
            self.epoch = epoch + 1


# ---------------------------------------------------------------------------------------------------------
# Decoding image files (image folders, CSV lists, prediction inputs)
# ---------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CACHE_VERSION = 1
_FOLDER_LAYOUT = "root/<class name>/<image>.jpg|jpeg|png|bmp|webp, e.g. data/train/cat/0001.jpg"


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(path_or_dir: str | os.PathLike) -> list[str]:
    """One image file, or every image under a folder (recursively, sorted, hidden entries skipped)."""
    path = Path(path_or_dir)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"no such image file or folder: {str(path)!r}")
    found = sorted(
        str(p) for p in path.rglob("*") if p.is_file() and _is_image(p) and ".trickbag-cache" not in p.parts
    )
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(path)!r}")
    return found


def _decode_one(path: str, size: tuple[int, int] | None) -> tuple[np.ndarray | None, str | None]:
    """(H, W, 3) uint8 array or (None, reason). Greyscale, palette, RGBA, CMYK all become RGB."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # a truncated file fails here, not later
            rgb = image.convert("RGB")  # RGBA: alpha dropped (not blended); L: grey copied to 3 channels
            if size is not None and rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8), None
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError ... for bad files
        return None, f"{type(error).__name__}: {error}"


def _decode_chunk(
    paths: list[str], size: tuple[int, int] | None
) -> list[tuple[np.ndarray | None, str | None]]:
    return [_decode_one(path, size) for path in paths]


def _decode_files(
    paths: list[str], size: tuple[int, int] | None, num_workers: int | None, progress: bool
) -> list[tuple[np.ndarray | None, str | None]]:
    """Decode every path, in parallel across processes when there are many, with a progress bar."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"num_workers must be an int >= 0 (0 decodes in this process), got {num_workers!r}")
    console = Console(stderr=True)
    show = progress and console.is_terminal
    results: list = [None] * len(paths)
    # Chunks of a few hundred files keep the process-pool overhead (pickling, scheduling) small per image.
    chunk = max(16, min(512, len(paths) // max(1, 8 * workers) + 1))
    starts = list(range(0, len(paths), chunk))
    columns = (TextColumn("decoding images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not show, transient=True) as bar:
        task = bar.add_task("decode", total=len(paths))
        if workers <= 1 or len(paths) < 4 * chunk:
            for start in starts:
                results[start : start + chunk] = _decode_chunk(paths[start : start + chunk], size)
                bar.advance(task, len(paths[start : start + chunk]))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(_decode_chunk, paths[s : s + chunk], size): s for s in starts}
                for future in as_completed(futures):
                    start = futures[future]
                    decoded = future.result()
                    results[start : start + len(decoded)] = decoded
                    bar.advance(task, len(decoded))
    return results


def _stack(paths: list[str], decoded: list[np.ndarray]) -> torch.Tensor:
    """(N, 3, H, W) uint8 from same-sized (H, W, 3) arrays; mixed sizes name an example of each."""
    if not decoded:
        return torch.zeros(0, 3, 0, 0, dtype=torch.uint8)
    first_shape = decoded[0].shape
    for path, array in zip(paths, decoded):
        if array.shape != first_shape:
            raise ValueError(
                f"images differ in size: {paths[0]!r} is {first_shape[0]}x{first_shape[1]} but {path!r} is "
                f"{array.shape[0]}x{array.shape[1]} (HxW); pass size=(H, W) to load_image_folder/load_csv to resize them"
            )
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()


def _bad_files_message(bad: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{path} ({reason})" for path, reason in bad[:10])
    more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
    return f"{len(bad)} image(s) could not be decoded: {shown}{more}"


def load_images(
    paths: list[str],
    *,
    size: tuple[int, int] | None = None,
    num_workers: int | None = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Decode image files for prediction, with the same RGB conversion as the loaders.

    Returns:
        (N, 3, H, W) uint8. Any unreadable file is a ValueError naming it; mixed sizes need ``size``.
    """
    size = _check_size(size)
    results = _decode_files(list(paths), size, num_workers, progress)
    bad = [(p, reason) for p, (_, reason) in zip(paths, results) if reason is not None]
    if bad:
        raise ValueError(_bad_files_message(bad))
    return _stack(list(paths), [array for array, _ in results])


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"size must be None or (H, W) with two positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _cache_folder(root: Path, cache_dir: str | os.PathLike | None) -> Path:
    """The cache folder: ``cache_dir``, else ``<root>/.trickbag-cache``, else ``~/.cache/trickbag``."""
    candidates = [Path(cache_dir)] if cache_dir is not None else [root / ".trickbag-cache"]
    if cache_dir is None:
        candidates.append(Path.home() / ".cache" / "trickbag")
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise PermissionError(f"cannot create a writable cache folder; tried {[str(c) for c in candidates]}")


def _decode_cached(
    paths: list[str],
    labels: list[int],
    classes: list[str],
    *,
    root: Path,
    key_extra: str,
    cache_dir: str | os.PathLike | None,
    skip_bad_images: bool,
    num_workers: int | None,
    progress: bool,
    size: tuple[int, int] | None,
) -> ImageSet:
    """Decode ``paths`` once; later calls with the same files (names, sizes, mtimes) read the cache."""
    digest = hashlib.sha256(f"trickbag-cache v{CACHE_VERSION}\n{size}\n{key_extra}\n".encode())
    for path, label in zip(paths, labels):
        stat = os.stat(path)
        digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\t{label}\n".encode())
    folder = _cache_folder(root, cache_dir)
    cache_file = folder / f"{digest.hexdigest()[:32]}.npz"

    if cache_file.exists():
        with np.load(cache_file, allow_pickle=False) as stored:
            images = torch.from_numpy(stored["images"])
            kept = torch.from_numpy(stored["kept"])
            bad = [tuple(item) for item in stored["bad"].tolist()]
    else:
        results = _decode_files(paths, size, num_workers, progress)
        bad = [(p, reason) for p, (_, reason) in zip(paths, results) if reason is not None]
        kept_list = [i for i, (_, reason) in enumerate(results) if reason is None]
        kept = torch.tensor(kept_list, dtype=torch.int64)
        images = _stack([paths[i] for i in kept_list], [results[i][0] for i in kept_list])
        # Write to a temp file in the same folder and rename: a crash never leaves a half-written cache.
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as handle:
            np.savez(
                handle, images=images.numpy(), kept=kept.numpy(), bad=np.array(bad, dtype=str).reshape(-1, 2)
            )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, cache_file)

    if bad and not skip_bad_images:
        raise ValueError(_bad_files_message(bad) + "; fix or remove them, or set skip_bad_images=True")
    skipped = [path for path, _ in bad]
    if skipped:
        warnings.warn(f"skipped {_bad_files_message(bad)}", stacklevel=3)
    if len(kept) == 0:
        raise ValueError(f"no readable images under {str(root)!r}")
    kept_paths = [paths[i] for i in kept.tolist()]
    label_tensor = torch.tensor(labels, dtype=torch.int64)[kept]
    return ImageSet(images, label_tensor, classes, kept_paths, skipped)


def load_image_folder(
    root: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    skip_bad_images: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
    size: tuple[int, int] | None = None,
) -> ImageSet:
    """Images in ``root/<class>/*.jpg|jpeg|png|bmp|webp``, decoded once into a cached uint8 array.

    Classes are the sorted subfolder names (hidden folders ignored); every image becomes RGB (greyscale
    copied to 3 channels, RGBA's alpha dropped). All images must share a size unless ``size=(H, W)``
    resizes them. The cache (``cache_dir``, default ``<root>/.trickbag-cache`` or ``~/.cache/trickbag``)
    is keyed by the sorted file list with sizes and mtimes, so editing any file re-decodes.

    Args:
        skip_bad_images: False: an unreadable image is a ValueError naming it. True: skip it, warn, and
            list it in the result's ``skipped``.
        num_workers: decoding processes (None: one per CPU core; 0: decode in this process).
        progress: show a progress bar (only on a terminal).

    Returns:
        ImageSet with images (N, 3, H, W) uint8 and absolute ``paths``.
    """
    size = _check_size(size)
    root_path = Path(root).expanduser().resolve()
    if not root_path.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist; expected {_FOLDER_LAYOUT}")
    classes = sorted(p.name for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{str(root)!r} has no class subfolders; expected {_FOLDER_LAYOUT}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(str(p) for p in (root_path / name).iterdir() if p.is_file() and _is_image(p))
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"no images in the class subfolders of {str(root)!r}; expected {_FOLDER_LAYOUT}")
    return _decode_cached(
        paths,
        labels,
        classes,
        root=root_path,
        key_extra=f"folder {classes}",
        cache_dir=cache_dir,
        skip_bad_images=skip_bad_images,
        num_workers=num_workers,
        progress=progress,
        size=size,
    )


def load_csv(
    csv_path: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    skip_bad_images: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
    size: tuple[int, int] | None = None,
) -> ImageSet:
    """Images listed in a CSV with columns ``path,label``.

    Relative paths are relative to ``root`` if given, else to the CSV's folder. Labels are either all
    integers (label i -> classes[i] = "i", classes "0".."max") or names (classes sorted). Other arguments
    as ``load_image_folder``; the cache defaults to ``<root or CSV folder>/.trickbag-cache``.
    """
    csv_file = Path(csv_path).expanduser().resolve()
    if not csv_file.is_file():
        raise FileNotFoundError(f"CSV file {str(csv_path)!r} does not exist")
    base = Path(root).expanduser().resolve() if root is not None else csv_file.parent
    with open(csv_file, newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        if "path" not in header or "label" not in header:
            raise ValueError(f"{csv_file}: needs a header with columns 'path' and 'label', got {header}")
        reader.fieldnames = header
        rows = [(reader.line_num, row["path"].strip(), (row["label"] or "").strip()) for row in reader]
    if not rows:
        raise ValueError(f"{csv_file}: no rows after the header")
    paths = []
    for line, path_text, label_text in rows:
        if not path_text or not label_text:
            raise ValueError(f"{csv_file} line {line}: empty path or label")
        path = Path(path_text).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise FileNotFoundError(
                f"{csv_file} line {line}: image {path_text!r} not found (looked for {path})"
            )
        paths.append(str(path))
    label_texts = [label for _, _, label in rows]
    if all(text.lstrip("-").isdigit() for text in label_texts):
        numbers = [int(text) for text in label_texts]
        if min(numbers) < 0:
            line = rows[numbers.index(min(numbers))][0]
            raise ValueError(f"{csv_file} line {line}: integer labels must be >= 0, got {min(numbers)}")
        classes = [str(i) for i in range(max(numbers) + 1)]
        labels = numbers
    else:
        classes = sorted(set(label_texts))
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[text] for text in label_texts]
    return _decode_cached(
        paths,
        labels,
        classes,
        root=base,
        key_extra=f"csv {classes}",
        cache_dir=cache_dir,
        skip_bad_images=skip_bad_images,
        num_workers=num_workers,
        progress=progress,
        size=_check_size(size),
    )
