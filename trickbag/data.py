"""Image sets in memory, and a batch loader that augments on the training device.

Training indexes one uint8 tensor ``(N, C, H, W)`` directly (decoding image files into it lives in
``trickbag.images``). There is no ``DataLoader``: no worker processes, no per-sample Python, and the random
order and augmentation of an epoch are a pure function of ``(seed, epoch)`` so a run resumed at an epoch
boundary sees exactly the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

# Re-exported so ``from trickbag.data import load_image_folder`` (and ImageSet) keeps working; images.py
# imports nothing from here, so the dependency runs one way.
from trickbag.images import (
    IMAGE_EXTENSIONS,
    ImageSet,
    list_images,
    load_csv,
    load_image_folder,
    load_images,
)

__all__ = [
    "ImageSet",
    "BatchLoader",
    "load_digits",
    "split_validation",
    "channel_stats",
    "epoch_generator",
    "shard_positions",
    "load_image_folder",
    "load_csv",
    "load_images",
    "list_images",
    "IMAGE_EXTENSIONS",
]


# ---------------------------------------------------------------------------------------------------------
# A bundled dataset
# ---------------------------------------------------------------------------------------------------------


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


# Stream of the images' first-epoch coins for flip="alternate" (any constant apart from the epoch numbers).
_ALTERNATE_STREAM = 2**40 + 7


def flip_mask(
    flip: bool | str, generator: torch.Generator, order: torch.Tensor, epoch: int, seed: int, n_images: int
) -> torch.Tensor | None:
    """The epoch's flips by position in ``order`` (N,) bool, or None for ``flip=False``.

    ``True``: a fair coin per position. ``"alternate"`` (airbench, Jordan 2024): each image is mirrored in
    every other epoch, a random half of them in epoch 0 and the other half in epoch 1, and so on, so a short
    schedule sees both orientations of every image as evenly as it can (random coins leave a quarter of the
    images in one orientation across two epochs). The coins are drawn from ``generator`` in both modes, so
    the draws after them stay in the same sequence.
    """
    if not flip:
        return None
    coins = torch.rand(len(order), generator=generator) < 0.5
    if flip != "alternate":
        return coins
    first = torch.rand(n_images, generator=epoch_generator(seed, _ALTERNATE_STREAM)) < 0.5
    return first[order] ^ bool(epoch % 2)


def check_flip(flip: bool | str) -> bool | str:
    """``flip`` as given when it is True, False or "alternate"; a ValueError naming the value otherwise."""
    if flip is True or flip is False or flip == "alternate":
        return flip
    raise ValueError(f"flip must be true, false or 'alternate', got {flip!r}")


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


def random_flip(images: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images where ``mirror`` (N,) bool is True; (N, C, H, W) in and out."""
    mask = mirror.to(images.device)[:, None, None, None]
    return torch.where(mask, images.flip(3), images)


def check_sizes(sizes, image_size: tuple[int, int]) -> tuple[int, ...] | None:
    """``sizes`` (progressive resizing, one side per epoch) validated against the images' (H, W)."""
    if sizes is None:
        return None
    sizes = tuple(sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(
            f"sizes must be a non-empty list of image sides >= 1 (one per epoch), got {list(sizes)}"
        )
    if max(sizes) > min(image_size):
        raise ValueError(
            f"sizes {list(sizes)} go above the images' size {tuple(image_size)}: progressive resizing only "
            "downsamples (train the last epochs at the full size)"
        )
    return sizes


def downsample(images: torch.Tensor, side: int | None) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, side, side * W / H) by area averaging; unchanged at its own size or None."""
    if side is None or side == images.shape[2]:
        return images
    height, width = side, round(side * images.shape[3] / images.shape[2])
    factor = images.shape[2] // height
    if images.shape[2:] == (height * factor, width * factor):  # a whole factor: a plain average pool
        return F.avg_pool2d(images, factor)
    return F.interpolate(images, size=(height, width), mode="area")


def _check_shard(rank: int, world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def shard_positions(n: int, rank: int, world_size: int, batch_size: int, drop_last: bool) -> torch.Tensor:
    """Positions (in an epoch's order of ``n`` items) that rank ``rank`` of ``world_size`` takes, in order.

    Strided: ``rank, rank + world_size, ...``. Taken ``batch_size`` at a time, the k-th batch of every rank
    together is exactly the k-th batch of size ``batch_size * world_size`` of one process. With ``drop_last``
    the order is first cut to whole global batches, so every rank has the same number of full batches (DDP
    steps together); without it each item is taken exactly once, and ranks may differ by one item (and one
    batch): for evaluation, where nothing is padded or duplicated.

    Returns:
        (M,) int64.
    """
    _check_shard(rank, world_size)
    stop = (n // (batch_size * world_size)) * batch_size * world_size if drop_last else n
    return torch.arange(rank, stop, world_size)


def shard_size(n: int, rank: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """``len(shard_positions(...))`` without building it."""
    stop = (n // (batch_size * world_size)) * batch_size * world_size if drop_last else n
    return max(0, math.ceil((stop - rank) / world_size))


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
        flip: random horizontal flips with probability 0.5; "alternate": each image mirrored every other
            epoch (``flip_mask``).
        channels_last: return batches in ``torch.channels_last`` memory format.
        padding_mode: "reflect" or "zeros" (zeros after normalising = the mean colour).
        sampler: optional object whose ``indices(epoch)`` (M,) int64 replaces the shuffled order and whose
            ``len()`` is M (e.g. ``trickbag.longtail.ClassBalancedSampler``).
        sizes: progressive resizing (fast.ai, Howard 2018; FixRes, Touvron et al. 2019): the side of the
            training images per epoch, ``sizes[min(epoch, len(sizes) - 1)]`` (the last repeats); each batch is
            area-downsampled after the crop and flip. Convolutions cost in proportion to the pixels, so early
            epochs at half the side cost ~1/4. None: the images' own size.
        rank, world_size: this process's shard of each epoch (see ``shard_positions``): the epoch's plan
            (order, crops, flips) is drawn exactly as with one process, then each rank takes its positions, so
            every sample is used once per epoch across ranks and ``world_size`` x ``batch_size`` with the same
            seed sees the same global batches, augmented identically, as one process with the global batch.
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
        flip: bool | str = False,
        channels_last: bool = False,
        padding_mode: str = "reflect",
        sampler=None,
        sizes: list[int] | tuple[int, ...] | None = None,
        rank: int = 0,
        world_size: int = 1,
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
        _check_shard(rank, world_size)
        sizes = check_sizes(sizes, tuple(images.shape[2:]))
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
        self.flip = check_flip(flip)
        self.channels_last = bool(channels_last)
        self.padding_mode = padding_mode
        self.sampler = sampler
        self.sizes = sizes
        self.rank, self.world_size = rank, world_size
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
        rank: int = 0,
        world_size: int = 1,
    ) -> BatchLoader:
        """A loader in eval mode: fixed order, every image once (across ranks: no padded duplicates), no
        augmentation."""
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
            rank=rank,
            world_size=world_size,
        )

    def __len__(self) -> int:
        n = len(self.images) if self.sampler is None else len(self.sampler)
        if self.world_size > 1:
            n = shard_size(n, self.rank, self.world_size, self.batch_size, self.drop_last)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation the next iteration uses."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def size_at(self, epoch: int) -> int | None:
        """The side of epoch ``epoch``'s training images (``sizes``), None for the images' own size."""
        return None if self.sizes is None else self.sizes[min(epoch, len(self.sizes) - 1)]

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
        n = len(self.images) if self.sampler is None else len(self.sampler)
        generator = epoch_generator(self.seed, epoch)
        if self.sampler is not None:
            order = self.sampler.indices(epoch)
        else:
            order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        offsets = None
        if self.crop_padding > 0:
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=generator)
        flips = flip_mask(self.flip, generator, order, epoch, self.seed, len(self.images))
        return order, offsets, flips

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        epoch = self.epoch
        order, offsets, flips = self.epoch_plan(epoch)
        if self.world_size > 1:  # this rank's positions of the epoch's plan
            mine = shard_positions(len(order), self.rank, self.world_size, self.batch_size, self.drop_last)
            order = order[mine]
            offsets = None if offsets is None else offsets[mine]
            flips = None if flips is None else flips[mine]
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
            if self.sizes is not None:
                x = downsample(x, self.size_at(epoch))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = None if self.labels is None else self.labels[index]
            yield x, y
        # Only a completed pass moves on, so a loop broken off mid-epoch repeats that epoch's plan.
        if self.epoch == epoch:
            self.epoch = epoch + 1
