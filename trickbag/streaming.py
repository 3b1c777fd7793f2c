"""A loader for image sets that do not fit in memory: files decoded and augmented per batch in worker processes.

Built on ``torch.utils.data.DataLoader`` (worker processes, pinned memory, prefetching): each item is a whole
batch, decoded and augmented by one worker, so there is no per-sample collate; the batch crosses to the main
process as uint8 (a quarter of the shared memory of floats to fill and map) and is normalised there, on the
device (on a CPU: ~3 ms for 32x3x224², about what receiving it as floats cost), by a thread that runs
``lookahead`` batches ahead of the trainer (``trickbag.prefetch.ThreadAhead``), so neither the receiving nor the
normalising is on the trainer's step (5-7 ms a batch on a CPU otherwise). The workers persist across
epochs and run on into the next epoch's first batches while the trainer consumes the last ones of this one, so
the queue does not drain at epoch boundaries. The plan of an epoch (order, crop boxes, pad-crop offsets, flips)
is drawn up front from ``trickbag.data.epoch_generator(seed, epoch)`` exactly as ``trickbag.data.BatchLoader``
draws it, and the order is sharded the same way (rank r of world_size takes positions r::world_size); so with
the same pipeline (images fitted to one size, pad-crop + flip) both loaders give identical batches, and the
batches do not depend on the number of workers. ``state_dict()`` records the batches consumed in the current
epoch: a run resumed from it continues mid-epoch with exactly the batches it would have seen.

Two training pipelines:

* ``random_resized_crop=True``: ``trickbag.transforms.resized_crops`` (each file read once, its crop box computed
  on its full size, the JPEG decoded at 1/2, 1/4 or 1/8 scale when the box allows, the box resized by torch),
  then flipped;
* otherwise: each file fitted to ``image_size`` as evaluation fits it (``trickbag.transforms.eval_image``), then
  BatchLoader's pad-crop and flip on the batch (in the workers, for a CPU device).

``choose_streaming`` decides between this loader and the in-memory one from a memory budget.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import torch

from trickbag import decode, transforms
from trickbag.data import channel_stats, check_flip, epoch_generator, flip_mask, random_crop, random_flip
from trickbag.prefetch import ThreadAhead

__all__ = [
    "StreamingLoader",
    "choose_streaming",
    "decoded_bytes",
    "memory_budget_bytes",
    "sample_stats",
    "streams",
    "loader_for",
    "preprocessing",
    "fit_args",
]


# ---------------------------------------------------------------------------------------------------------
# In memory or streamed?
# ---------------------------------------------------------------------------------------------------------


def decoded_bytes(num_images: int, image_size: int, channels: int = 3) -> int:
    """Bytes of ``num_images`` decoded uint8 images of ``channels`` x ``image_size``²."""
    return int(num_images) * channels * int(image_size) ** 2


def memory_budget_bytes(budget_gb: float | None) -> int:
    """``budget_gb`` in bytes; None: a quarter of this machine's RAM (the rest is for the model and the OS)."""
    if budget_gb is not None:
        if not budget_gb > 0:
            raise ValueError(f"memory budget must be > 0 GB, got {budget_gb!r}")
        return int(budget_gb * 1e9)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def choose_streaming(in_memory, num_images: int, image_size: int, budget_gb: float | None) -> bool:
    """True to stream: ``in_memory`` False, or "auto" and the decoded set would exceed the budget."""
    if in_memory not in (True, False, "auto"):
        raise ValueError(f"in_memory must be true, false or 'auto', got {in_memory!r}")
    if in_memory == "auto":
        return decoded_bytes(num_images, image_size) > memory_budget_bytes(budget_gb)
    return not in_memory


def sample_stats(paths: list[str], image_size: int, *, aspect: str = "crop", count: int = 512, seed: int = 0):
    """Per-channel (mean, std) in [0, 1] units from ``count`` files drawn with ``seed`` (eval preprocessing).

    A streamed set is never decoded whole; 512 images estimate a channel mean to about 1e-3.
    """
    generator = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(len(paths), generator=generator)[: min(count, len(paths))].tolist()
    arrays = [transforms.eval_image(paths[i], (image_size, image_size), aspect) for i in chosen]
    return channel_stats(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------------------
# The epoch plan, shared by the main process and the workers
# ---------------------------------------------------------------------------------------------------------


def _shard(n: int, rank: int, world_size: int, batch_size: int, drop_last: bool) -> torch.Tensor:
    """Positions of rank ``rank``: r, r + world_size, ...; with drop_last cut to whole global batches first.

    The rule of ``trickbag.data.shard_positions`` (BatchLoader), so both loaders shard alike.
    """
    stop = (n // (batch_size * world_size)) * batch_size * world_size if drop_last else n
    return torch.arange(rank, stop, world_size)


class _Plan:
    """Everything random about one epoch, as tensors indexed by this rank's position in the epoch."""

    def __init__(self, settings: dict, epoch: int) -> None:
        n, s = settings["n"], settings
        generator = epoch_generator(s["seed"], epoch)
        # The draws in BatchLoader.epoch_plan's sequence (order, offsets, flips), then the crop boxes.
        order = torch.randperm(n, generator=generator) if s["shuffle"] else torch.arange(n)
        offsets = None
        if s["crop_padding"] > 0:
            offsets = torch.randint(0, 2 * s["crop_padding"] + 1, (n, 2), generator=generator)
        flips = flip_mask(s["flip"], generator, order, epoch, s["seed"], n)
        crops = transforms.draw_resized_crops(generator, n) if s["random_resized_crop"] else None
        mine = _shard(n, s["rank"], s["world_size"], s["batch_size"], s["drop_last"])
        if s["world_size"] > 1 or len(mine) != n:
            order, offsets, flips, crops = (
                None if t is None else t[mine] for t in (order, offsets, flips, crops)
            )
        self.order, self.offsets, self.flips, self.crops = order, offsets, flips, crops

    def batch(self, index: int, batch_size: int) -> slice:
        return slice(index * batch_size, min((index + 1) * batch_size, len(self.order)))


def _normalizer(
    mean: list[float], std: list[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, 3, 1, 1) float32: uint8 * scale + shift == (uint8 / 255 - mean) / std."""
    std_t = torch.tensor(std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(device)
    return scale, (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, -1, 1, 1).to(device)


def _finish(
    x: torch.Tensor, plan: _Plan, part: slice, settings: dict, scale: torch.Tensor, shift: torch.Tensor
):
    """uint8 (B, 3, S, S) -> normalised float32 (B, 3, S, S), with the pad-crop pipeline's crops and flips.

    BatchLoader's order of operations, so both give the same floats. Run on the device (uint8 crosses from the
    workers and PCIe: a quarter of the bytes; a GPU normalises in microseconds, one CPU core in ~3 ms for
    32x3x224²), except the pad-crop pipeline on a CPU device, finished in the workers (the crop and flip would
    otherwise hold up the trainer's process).
    """
    offsets = None if plan.offsets is None else plan.offsets[part]
    # Random-resized crops are flipped in the workers on the decoded array; only the pad-crop pipeline flips here.
    flips = None if plan.flips is None or plan.crops is not None else plan.flips[part]
    if flips is not None and offsets is None:
        x = random_flip(x, flips)
    if offsets is None:
        # The last step: normalise straight into the batch's final memory (no .to() copy; in a worker, shared
        # memory, so DataLoader does not copy 4 bytes a pixel again to send it). Convert, mul, add: the floats of
        # normalize(), and faster than one mixed-dtype mul (2.1 vs 3.1 ms for 32x3x224² on one EPYC core).
        form = torch.channels_last if settings["channels_last"] else torch.contiguous_format
        out = _empty_batch(x.shape, form, x.device)
        return out.copy_(x).mul_(scale).add_(shift)
    x = x.to(torch.float32).mul_(scale).add_(shift)
    if offsets is not None:
        x = random_crop(x, settings["crop_padding"], offsets, padding_mode=settings["padding_mode"])
        if flips is not None:
            x = random_flip(x, flips)
    if settings["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _empty_batch(shape: torch.Size, form: torch.memory_format, device: torch.device) -> torch.Tensor:
    """Uninitialised float32 of ``shape`` on ``device``.

    In a DataLoader worker: in shared memory (as its collate allocates), where it is sent to the main process as
    is. In the main process (its lookahead thread) on the CPU: numpy's memory (plain ``malloc``), which glibc hands to the next batch of
    the same size once this one is freed; ``torch.empty``'s 64-byte-aligned ``posix_memalign`` cannot reuse that
    block, so each batch touched fresh pages: 7-8 ms per 32x3x224² float batch on a 2-core EPYC VM, vs 0.6.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.float32, memory_format=form, device=device)
    if torch.utils.data.get_worker_info() is None:
        n, c, h, w = shape
        if form == torch.channels_last:
            return torch.from_numpy(np.empty((n, h, w, c), dtype=np.float32)).permute(0, 3, 1, 2)
        return torch.from_numpy(np.empty((n, c, h, w), dtype=np.float32))
    out = torch.empty(shape, dtype=torch.float32, memory_format=form)
    storage = out.untyped_storage()._new_shared(out.untyped_storage().nbytes())
    return out.new_empty(0).set_(storage, 0, out.shape, out.stride())


class _BatchFiles(torch.utils.data.Dataset):
    """Item ``(epoch, batch index)`` -> (images (B, 3, H, W), labels (B,) int64), decoded in a worker.

    The images are uint8 as decoded, or, with ``settings["finish_in_worker"]``, finished (``_finish``) float32.
    """

    def __init__(self, paths: list[str], labels: torch.Tensor | None, settings: dict) -> None:
        self.paths, self.labels, self.settings = paths, labels, settings
        self.scale, self.shift = _normalizer(settings["mean"], settings["std"], torch.device("cpu"))
        self._plan: tuple[int, _Plan] | None = None

    def plan(self, epoch: int) -> _Plan:
        # Each worker draws the plan itself (a randperm of N: milliseconds), once per epoch.
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, _Plan(self.settings, epoch))
        return self._plan[1]

    def __len__(self) -> int:  # only for DataLoader's bookkeeping; the sampler yields the items
        return 0

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = item
        s, plan = self.settings, self.plan(epoch)
        part = plan.batch(index, s["batch_size"])
        order = plan.order[part].tolist()
        size = (s["image_size"], s["image_size"])
        if plan.crops is not None:
            images = transforms.resized_crops([self.paths[i] for i in order], plan.crops[part], size, s["scale"],
                                              s["ratio"], draft=s["draft"], decoder=s["decoder"])  # fmt: skip
            if plan.flips is not None:
                # Here, on the uint8 crops, so _finish has nothing to flip (a flip of the whole batch would cost
                # a pass over it).
                for k in plan.flips[part].nonzero().flatten().tolist():
                    images[k] = images[k].flip(2)
        else:
            arrays = []
            for i in order:
                with decode.naming(self.paths[i]):
                    arrays.append(transforms.eval_image(self.paths[i], size, s["aspect"], s["crop_fraction"],
                                                        draft=s["draft"]))  # fmt: skip
            # Contiguous (N, 3, H, W): normalising channels-last uint8 into NCHW floats is 2-5x slower.
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        if s["finish_in_worker"]:
            images = _finish(images, plan, part, s, self.scale, self.shift)
        labels = torch.zeros(0, dtype=torch.int64) if self.labels is None else self.labels[order]
        return images, labels


class _Batches(torch.utils.data.Sampler):
    """The items from (epoch, start) on: (epoch, k) for k in [start, batches), then, with ``endless``, every batch
    of epoch + 1, epoch + 2, ... Endless, the workers decode the next epoch's first batches while the trainer
    still consumes this one (the plan is a pure function of (seed, epoch)), so the pipeline does not drain at each
    epoch boundary. Mutable: the workers persist; ``len`` is only DataLoader's bookkeeping."""

    def __init__(self, batches: int, endless: bool) -> None:
        self.batches, self.endless = batches, endless
        self.epoch, self.start = 0, 0

    def __iter__(self):
        epoch, start = self.epoch, self.start
        while True:
            yield from ((epoch, k) for k in range(start, self.batches))
            if not self.endless or self.batches == 0:
                return
            epoch, start = epoch + 1, 0

    def __len__(self) -> int:
        return self.batches - self.start


# ---------------------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------------------


class StreamingLoader:
    """Batches decoded from files per batch by ``num_workers`` processes, normalised on ``device``.

    Iterating yields ``(x (N, 3, S, S) float32, y (N,) int64 or None)`` like ``trickbag.data.BatchLoader``, with
    the same ``set_epoch``, ``state_dict`` / ``load_state_dict`` (plus the batches consumed mid-epoch) and
    ``len()``.

    Args:
        paths: image files; labels: (N,) int64 or None (prediction).
        image_size: side S of the square batches.
        batch_size, shuffle, drop_last, seed, device, mean, std, crop_padding, flip, padding_mode,
            channels_last, rank, world_size: as ``BatchLoader`` (mean and std are required here: a streamed set
            is never decoded whole; see ``sample_stats``).
        random_resized_crop: train with random-resized crops of the original files (``scale``, ``ratio``);
            False: fit each file as evaluation does (``aspect``, ``crop_fraction``), then pad-crop/flip.
        num_workers: decoding processes (0: in this process); prefetch_factor: batches each worker prepares
            ahead; pin_memory: None pins when ``device`` is CUDA.
        lookahead: batches a thread of this process receives from the workers and finishes (normalised, on
            ``device``) ahead of the trainer, so that the trainer's step does not wait for that work (~5-7 ms
            per 32x3x224² batch on one CPU core); 0, or ``num_workers=0``: done on the trainer's ``next()``.
        prefetch_next_epoch: let the workers run on into epoch + 1 (batch 0 on) while this epoch is consumed,
            so the trainer does not wait at each epoch start; a pass at another epoch or mid-epoch position
            (``set_epoch``, ``load_state_dict``, a loop broken off) restarts the workers' queue there instead.
        draft: JPEG reduced-size decoding when the output is much smaller than the file.
        decoder: JPEG decoder of the random-resized crops, "auto" (simplejpeg where installed, else Pillow), "pil"
            or "simplejpeg" (``trickbag.decode``); resolved once here, so every worker of a run decodes alike
            (``self.decoder`` says which). Both give the same pixels for YCbCr and greyscale JPEGs.
    """

    def __init__(
        self,
        paths: list[str],
        labels: torch.Tensor | None,
        *,
        image_size: int,
        batch_size: int,
        shuffle: bool,
        mean: list[float] | tuple[float, ...],
        std: list[float] | tuple[float, ...],
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        random_resized_crop: bool = False,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        aspect: str = "crop",
        crop_fraction: float = 1.0,
        crop_padding: int = 0,
        flip: bool | str = False,
        padding_mode: str = "reflect",
        channels_last: bool = False,
        num_workers: int = 0,
        prefetch_factor: int = 4,
        pin_memory: bool | None = None,
        draft: bool = True,
        decoder: str = "auto",
        prefetch_next_epoch: bool = True,
        lookahead: int = 2,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        paths = [str(p) for p in paths]
        if labels is not None and (labels.dim() != 1 or len(labels) != len(paths)):
            raise ValueError(
                f"labels must have shape ({len(paths)},) to match paths, got {tuple(labels.shape)}"
            )
        for name, value, low in (("image_size", image_size, 1), ("batch_size", batch_size, 1),
                                 ("crop_padding", crop_padding, 0), ("num_workers", num_workers, 0),
                                 ("prefetch_factor", prefetch_factor, 1), ("world_size", world_size, 1),
                                 ("lookahead", lookahead, 0)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if aspect not in transforms.ASPECTS:
            raise ValueError(f"aspect must be one of {transforms.ASPECTS}, got {aspect!r}")
        if padding_mode not in ("reflect", "zeros"):
            raise ValueError(f"padding_mode must be 'reflect' or 'zeros', got {padding_mode!r}")
        if random_resized_crop and crop_padding:
            raise ValueError("random_resized_crop and crop_padding are two crops: use one of them")
        if padding_mode == "reflect" and crop_padding >= image_size:
            raise ValueError(f"crop_padding={crop_padding} must be smaller than image_size={image_size}")
        transforms.eval_size(image_size, crop_fraction)  # validates crop_fraction
        if random_resized_crop:
            # The same checks the workers would make, now: a bad range should not surface from a worker.
            transforms.crop_boxes(torch.zeros(1, 4), torch.ones(1), torch.ones(1), scale, ratio)
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != 3 or len(std) != 3 or any(v <= 0 for v in std):
            raise ValueError(f"mean and std need 3 values (RGB), std > 0; got mean={mean} std={std}")

        self.device = torch.device(device)
        self.paths, self.labels = paths, labels
        self.batch_size, self.seed, self.epoch = batch_size, int(seed), 0
        self.drop_last, self.shuffle = bool(drop_last), bool(shuffle)
        self.crop_padding, self.flip, self.padding_mode = crop_padding, check_flip(flip), padding_mode
        self.random_resized_crop = bool(random_resized_crop)
        self.channels_last = bool(channels_last)
        self.mean, self.std = mean, std
        self.rank, self.world_size = rank, world_size
        self.decoder = decode.choose_decoder(decoder)
        self._settings = {
            "n": len(paths), "seed": self.seed, "shuffle": self.shuffle, "crop_padding": crop_padding,
            "flip": self.flip, "random_resized_crop": self.random_resized_crop, "rank": rank,
            "world_size": world_size, "batch_size": batch_size, "drop_last": self.drop_last,
            "image_size": image_size, "scale": tuple(scale), "ratio": tuple(ratio), "aspect": aspect,
            "crop_fraction": float(crop_fraction), "draft": bool(draft), "decoder": self.decoder, "mean": mean,
            "std": std, "padding_mode": padding_mode, "channels_last": self.channels_last,
            # Workers finish only the pad-crop pipeline's batches, on a CPU (see _finish).
            "finish_in_worker": self.device.type == "cpu" and crop_padding > 0, "labelled": labels is not None,
        }  # fmt: skip
        self._scale, self._shift = _normalizer(mean, std, self.device)
        self._resume_at = (
            0  # batches of self.epoch already consumed (load_state_dict), skipped by the next pass
        )
        self._consumed = 0
        self._dataset = _BatchFiles(paths, labels, self._settings)
        self._sampler = _Batches(len(self), bool(prefetch_next_epoch))
        # The finished batches left running by the last pass (a ThreadAhead, or with no workers the generator),
        # and the (epoch, batch) its next item is.
        self.lookahead = lookahead
        self._ahead: Iterator | None = None
        self._ahead_at: tuple[int, int] | None = None
        pin = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        workers = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if num_workers else {}
        self._loader = torch.utils.data.DataLoader(
            self._dataset, batch_size=None, sampler=self._sampler, num_workers=num_workers, pin_memory=pin,
            **workers,
        )  # fmt: skip

    @property
    def image_size(self) -> int:
        return self._settings["image_size"]

    @property
    def num_workers(self) -> int:
        """Decoding processes (0: decoded in this process)."""
        return self._loader.num_workers

    def _items(self) -> int:
        return len(_shard(len(self.paths), self.rank, self.world_size, self.batch_size, self.drop_last))

    def __len__(self) -> int:
        n = self._items()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of the next pass; another epoch than the current one forgets a mid-epoch resume."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if epoch != self.epoch:
            self._resume_at = 0
        self.epoch = epoch

    def state_dict(self) -> dict:
        """{"seed", "epoch", "batch"}: ``batch`` batches of ``epoch`` were consumed (0 between epochs)."""
        return {"seed": self.seed, "epoch": self.epoch, "batch": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state seed {state['seed']} differs from this loader's seed {self.seed}")
        self.epoch = int(state["epoch"])
        self._resume_at = self._consumed = int(state.get("batch", 0))

    def epoch_plan(self, epoch: int) -> _Plan:
        """The epoch's order, crops, offsets and flips at this rank's positions (see ``BatchLoader.epoch_plan``)."""
        return _Plan(self._settings, epoch)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 on ``device`` -> normalised float32, as BatchLoader.normalize."""
        return images_uint8.to(torch.float32).mul_(self._scale).add_(self._shift)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        epoch, start = self.epoch, self._resume_at
        self._resume_at, self._consumed = 0, start
        if self._ahead is None or self._ahead_at != (epoch, start):
            # Not where the batches in flight are (first pass, resume, another epoch, a broken-off loop): restart
            # the workers' queue here; DataLoader drops the batches still in flight.
            self._close_ahead()
            self._sampler.epoch, self._sampler.start = epoch, start
            ready = _ready_batches(iter(self._loader), self._settings, epoch, start, len(self), self._sampler.endless,
                                   self.device, self._scale, self._shift)  # fmt: skip
            # With workers, a thread of this process receives and finishes the batches ahead of the trainer (see
            # _ready_batches); without, decoding is in this process anyway and stays on the trainer's call.
            self._ahead = (
                ThreadAhead(ready, self.lookahead) if self._loader.num_workers and self.lookahead else ready
            )
        finished = False
        try:
            for index in range(start, len(self)):
                self._ahead_at = None  # while next() runs: an error there leaves the position unknown
                x, y = next(self._ahead)
                last = index + 1 == len(self)
                self._ahead_at = (epoch + 1, 0) if last and self._sampler.endless else (epoch, index + 1)
                self._consumed = index + 1  # what the trainer has received, not what the thread has prepared
                yield x, y
            finished = True
        finally:
            if not finished:
                # Broken off (break, an error, KeyboardInterrupt, the loop's generator collected): the next pass
                # starts elsewhere, so the thread stops now rather than holding finished batches until then.
                self._close_ahead()
        # Only a completed pass moves on, so a loop broken off mid-epoch repeats that epoch's plan.
        if self.epoch == epoch:
            self.epoch, self._consumed = epoch + 1, 0

    def _close_ahead(self) -> None:
        if isinstance(self._ahead, ThreadAhead):
            self._ahead.close()
        self._ahead = self._ahead_at = None


def _ready_batches(stream: Iterator, settings: dict, epoch: int, start: int, batches: int, endless: bool,
                   device: torch.device, scale: torch.Tensor, shift: torch.Tensor):  # fmt: skip
    """(x, y) on ``device``, finished, from (epoch, start) on, in the sampler's order (_Batches): the per-batch
    work of the trainer's process (receiving from the workers, normalising, channels_last, the copy to the device).

    Run by a ``ThreadAhead`` thread, ``StreamingLoader.lookahead`` batches ahead, so the trainer receives a
    finished batch. The floats: each batch gets its own block (``_empty_batch``), freed when the trainer drops
    the batch; none is reused while anything refers to it. A ring of lookahead + 1 reused buffers would save the
    allocation, but would overwrite a batch a trainer keeps longer (a list of batches, a logged input), silently.
    """
    non_blocking = device.type == "cuda"
    while True:
        # Pad-cropped batches come finished from the workers for a CPU device; the others are finished here.
        plan = None if settings["finish_in_worker"] else _Plan(settings, epoch)
        for index in range(start, batches):
            images, labels = next(stream)
            x = images.to(device, non_blocking=non_blocking)
            if plan is not None:
                x = _finish(x, plan, plan.batch(index, settings["batch_size"]), settings, scale, shift)
            yield x, (labels.to(device, non_blocking=non_blocking) if settings["labelled"] else None)
        if not endless or batches == 0:
            return
        epoch, start = epoch + 1, 0


def streams(section) -> bool:
    """Whether the image sets of a ``data:`` section (``trickbag.config.DataConfig``) are streamed.

    Random-resized crops cut the original files, so they stream; else ``in_memory`` true/false decides, and
    "auto" streams when the decoded training set would exceed ``memory_budget_gb`` (image folders; a CSV's
    files are counted but not sized without ``image_size``: they stay in memory).
    """
    from pathlib import Path

    from PIL import Image

    from trickbag.images import list_image_folder

    if section.kind == "digits":
        return False
    if section.random_resized_crop or section.in_memory is False:
        if section.image_size is None:
            raise ValueError("streaming (data.in_memory=false or random_resized_crop) needs data.image_size")
        return True
    if section.in_memory is True:
        return False
    side = section.image_size or 0
    if section.kind == "image_folder":
        files = list_image_folder(Path(section.root) / section.train_dir)[0] if section.root else []
        count = len(files)
        if files and not side:  # the files' own size: the first file's larger side stands for all
            with Image.open(files[0]) as image:
                side = max(image.size)
    else:
        with open(section.csv, encoding="utf-8") as handle:
            count = max(0, sum(1 for line in handle if line.strip()) - 1)
    stream = choose_streaming("auto", count, side, section.memory_budget_gb)
    if stream and section.image_size is None:
        raise ValueError(
            f"{count} images of about {side}x{side} would exceed the memory budget "
            f"({memory_budget_bytes(section.memory_budget_gb) / 1e9:.1f} GB): set data.image_size to stream "
            "them at that size, or raise data.memory_budget_gb"
        )
    return stream


def loader_for(section, imageset, *, train: bool, batch_size: int, device, mean, std, seed: int = 0,
               drop_last: bool = False, channels_last: bool = False, rank: int = 0,
               world_size: int = 1) -> StreamingLoader:  # fmt: skip
    """The StreamingLoader of a listed ``imageset`` (``images`` None) for a ``data:`` section.

    ``train``: shuffled, with the section's augmentation (random-resized crop, or pad-crop, and flip);
    else every image once in order, fitted and centre-cropped as evaluation does.
    """
    if imageset.paths is None:
        raise ValueError("a streamed image set needs its file paths")
    if train and getattr(section, "sampling", "none") != "none":
        raise ValueError("data.sampling is not supported with streamed data yet; set data.in_memory=true")
    workers = (os.cpu_count() or 1) if section.num_workers is None else section.num_workers
    common = {
        "image_size": section.image_size, "batch_size": batch_size, "mean": mean, "std": std,
        "device": device, "aspect": section.aspect, "crop_fraction": section.crop_fraction,
        "channels_last": channels_last, "num_workers": workers, "rank": rank, "world_size": world_size,
    }  # fmt: skip
    if not train:
        # An evaluation pass comes after a training epoch: decoding the next one early would only take the cores
        # from the training workers.
        return StreamingLoader(
            imageset.paths, imageset.labels, shuffle=False, prefetch_next_epoch=False, **common
        )
    return StreamingLoader(
        imageset.paths, imageset.labels, shuffle=True, drop_last=drop_last, seed=seed,
        random_resized_crop=section.random_resized_crop, scale=tuple(section.rrc_scale),
        ratio=tuple(section.rrc_ratio), crop_padding=section.crop_padding, flip=section.flip, **common,
    )  # fmt: skip


def preprocessing(section, image_shape) -> dict:
    """What a checkpoint stores so that eval and predict fit any image as the run did (``fit_args``)."""
    return {
        "image_size": section.image_size,
        "aspect": section.aspect if section.image_size is not None else "squash",
        "crop_fraction": section.crop_fraction if section.image_size is not None else 1.0,
        "image_shape": list(image_shape),
    }


def fit_args(meta: dict) -> dict:
    """``size``, ``aspect``, ``crop_fraction`` for ``trickbag.images.load_images`` / ``load_image_folder`` from
    a checkpoint's meta; a checkpoint from before ``preprocess`` was stored resizes to its image shape."""
    stored = meta.get("preprocess")
    channels, height, width = meta["image_shape"]
    if not stored or stored.get("image_size") is None:
        return {"size": (height, width), "aspect": "squash", "crop_fraction": 1.0}
    side = int(stored["image_size"])
    return {"size": (side, side), "aspect": stored["aspect"], "crop_fraction": float(stored["crop_fraction"])}
