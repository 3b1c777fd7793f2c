"""Streaming loader vs the usual per-image pipeline, same run: random-resized-crop 224² + flip from JPEG files.

torchvision is not in the project's venv (its wheel is a multi-GB CUDA build), so the reference is torchvision's
ImageFolder + RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize pipeline written the usual way: a
``torch.utils.data.Dataset`` that opens each file with PIL, decodes it in full, crops and resizes it with PIL
(``Image.resize(box=...)``, what torchvision's PIL path does), flips, converts to a normalised float tensor, and a
``DataLoader`` with the same workers and batch size collating the samples. Ours: ``trickbag.streaming``
(a whole batch per worker item, each file read once, JPEGs decoded at 1/2, 1/4 or 1/8 scale when the crop allows
it, boxes resized by torch, uint8 batches received and normalised by a thread of the trainer's process running
two batches ahead, workers running on into the next epoch), with the decoder ``StreamingLoader(decoder="auto")`` picks here, with Pillow's, and without draft.

The images (``--images-from``): CIFAR-10 test JPEGs (/work/data/cifar10) upscaled to 640x480 JPEGs (smooth, ~22 KB
files: cheap to entropy-decode), or scikit-learn's two sample photos (china, flower) at 640x480 (~80 KB: a camera
photo's detail), written once to a temp folder (generated gradients when the CIFAR folder is missing). Each loader
is measured alone (its workers stopped before the next one starts, so none decodes while another is timed), over
``--epochs`` consecutive epochs after a warm-up one, epoch boundaries included as a trainer sees them, the
consumer reading every pixel of each batch (``x.sum()``: a model's first layer does, and for a batch in shared
memory that maps its pages: ~3 ms for 32x3x224² floats). The trainer's wait: a simulated model step of
``--step-ms`` per batch (default: twice our batch time); reported are the fraction of wall time spent waiting
for the next batch (for ours, before its lookahead thread: receiving and normalising it, 5-7 ms a batch on the
trainer's step) and the batches waited on > 10 ms. The warm-up epoch has no model step, so it drains the queues:
the first timed batches may wait for the workers (a start transient, counted).

    .venv/bin/python benchmarks/loader.py --images 256 --workers 2 [--torchvision-python /path/to/venv/bin/python]

``--torchvision-python``: a Python whose environment has torch + torchvision (not this project's venv; trickbag
never depends on it) runs torchvision's real ImageFolder + RandomResizedCrop + RandomHorizontalFlip + ToTensor +
Normalize DataLoader on the same files, workers and batch size, in a subprocess of the same run, timed the same
way; its row's ratio is to the hand-written reference, and the last line is ours / torchvision.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# trickbag is imported in main(): with --torchvision-python this file also runs in that other venv, without it.

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_images(folder: Path, count: int, size=(640, 480), source: str = "cifar10") -> list[str]:
    if source == "photos":
        from sklearn.datasets import load_sample_image

        photos = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    cifar = Path("/work/data/cifar10/test/airplane")
    files = sorted(cifar.glob("*.jpg"))[:count] if cifar.is_dir() else []
    paths = []
    for i in range(count):
        if source == "photos":  # each file a slightly different crop, so no two files are the same
            photo = photos[i % 2]
            image = photo.crop((i % 17, i % 13, photo.width - i % 11, photo.height - i % 7)).resize(size)
        elif files:
            image = Image.open(files[i % len(files)]).convert("RGB").resize(size, Image.BICUBIC)
        else:
            y, x = np.mgrid[0 : size[1], 0 : size[0]]
            image = Image.fromarray(np.stack([x % 256, y % 256, (x + y + i) % 256], 2).astype(np.uint8))
        path = folder / "images" / f"{i:05d}.jpg"  # a class folder, as ImageFolder wants
        path.parent.mkdir(exist_ok=True)
        image.save(path, quality=90)
        paths.append(str(path))
    return paths


class PerImageRRC(torch.utils.data.Dataset):
    """The usual pipeline: PIL open + full decode, RandomResizedCrop (10 tries), flip, float normalise, per image."""

    def __init__(self, paths, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.paths, self.size, self.scale, self.ratio = paths, size, scale, ratio
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self):
        return len(self.paths)

    def box(self, width, height):  # torchvision.transforms.RandomResizedCrop.get_params
        area = width * height
        for _ in range(10):
            target = area * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                return left, top, left + w, top + h
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2

    def __getitem__(self, index):
        with open(self.paths[index], "rb") as handle:
            image = Image.open(handle).convert("RGB")
        image = image.resize((self.size, self.size), Image.BILINEAR, box=self.box(*image.size))
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, 0


def epochs(loader, count: int):
    """``count`` consecutive epochs of ``loader`` as one stream of batches, as a trainer's loop sees them."""
    for _ in range(count):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(loader.epoch)
        yield from loader


def free_rate(make, count: int) -> float:
    """Images/s over ``count`` epochs with no model, after one warm-up epoch (worker start, page cache)."""
    loader = make()
    for _ in epochs(loader, 1):
        pass
    images, started = 0, time.perf_counter()
    for x, _ in epochs(loader, count):
        images += len(x)
        x.sum()  # a model reads every pixel of its batch (and maps a batch in shared memory page by page)
    rate = images / (time.perf_counter() - started)
    shut_down(loader)
    return rate


def waiting(make, count: int, step_s: float, late_s: float = 0.010) -> tuple[float, int, int]:
    """(fraction of wall time spent waiting for a batch, batches waited on > late_s, batches) over ``count``
    epochs with a model step of ``step_s`` per batch, after one warm-up epoch that has the step too (a trainer never
    drains its loader without stepping: a step-less warm-up would start the timed epochs with the workers behind)."""
    loader = make()
    for x, _ in epochs(loader, 1):
        x.sum()
        time.sleep(step_s)
    waited, late, total = 0.0, 0, 0
    started = before = time.perf_counter()
    for x, _ in epochs(loader, count):
        wait = time.perf_counter() - before
        waited, late, total = waited + wait, late + (wait > late_s), total + 1
        x.sum()
        time.sleep(step_s)  # the model's step: the workers keep decoding meanwhile
        before = time.perf_counter()
    fraction = waited / (time.perf_counter() - started)
    shut_down(loader)
    return fraction, late, total


def shut_down(loader) -> None:
    """Stop the loader's workers now, so that they take no core from the next loader measured."""
    del loader
    gc.collect()
    time.sleep(0.5)


def torchvision_loader(folder: str, size: int, batch_size: int, workers: int):
    """The real thing: torchvision's ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize."""
    from torchvision import datasets
    from torchvision import transforms as T

    pipeline = T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
    )
    return torch.utils.data.DataLoader(
        datasets.ImageFolder(folder, pipeline), batch_size=batch_size, shuffle=True, num_workers=workers,
        persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
    )  # fmt: skip


def measure_torchvision(args) -> None:
    """In the torchvision venv: one JSON line with the free rate and the wait, measured as for the others."""
    make = lambda: torchvision_loader(args.measure_torchvision, args.size, args.batch_size, args.workers)  # noqa: E731
    rate = free_rate(make, args.epochs)
    fraction, late, total = waiting(make, args.epochs, args.step_ms / 1e3)
    versions = f"torch {torch.__version__}, torchvision {__import__('torchvision').__version__}"
    print(
        json.dumps({"rate": rate, "fraction": fraction, "late": late, "total": total, "versions": versions})
    )


def run_torchvision(python: str, folder: str, args, step: float) -> dict:
    """measure_torchvision in ``python``'s interpreter (a venv with torchvision; never a trickbag dependency)."""
    command = [python, __file__, "--measure-torchvision", folder, "--size", str(args.size), "--batch-size",
               str(args.batch_size), "--workers", str(args.workers), "--epochs", str(args.epochs),
               "--step-ms", str(step * 1e3)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"--torchvision-python {python} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed per loader, after a warm-up one")
    parser.add_argument("--images-from", choices=("cifar10", "photos"), default="cifar10")
    parser.add_argument("--step-ms", type=float, default=None, help="simulated model step (default: 2x ours)")
    parser.add_argument("--torchvision-python", help="a Python with torchvision: times its real pipeline too")
    parser.add_argument("--measure-torchvision", metavar="FOLDER", help=argparse.SUPPRESS)  # the child's mode
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.measure_torchvision:
        return measure_torchvision(args)
    from trickbag.decode import choose_decoder
    from trickbag.hardware import cpu_info
    from trickbag.streaming import StreamingLoader

    with tempfile.TemporaryDirectory() as folder:
        paths = make_images(Path(folder), args.images, source=args.images_from)
        labels = torch.zeros(len(paths), dtype=torch.int64)

        def ours(decoder: str, draft: bool = True):
            return lambda: StreamingLoader(
                paths, labels, image_size=args.size, batch_size=args.batch_size, shuffle=True, mean=MEAN,
                std=STD, random_resized_crop=True, flip=True, num_workers=args.workers, draft=draft,
                decoder=decoder,
            )  # fmt: skip

        def reference():
            return torch.utils.data.DataLoader(
                PerImageRRC(paths, args.size), batch_size=args.batch_size, shuffle=True,
                num_workers=args.workers, persistent_workers=args.workers > 0,
                prefetch_factor=4 if args.workers else None,
            )  # fmt: skip

        # One loader at a time, each with fresh workers that are stopped before the next one starts.
        best = choose_decoder("auto")  # what StreamingLoader(decoder="auto") uses here
        makers = {"reference (per-image PIL)": reference, f"trickbag streaming, {best}": ours(best)}
        if best != "pil":
            makers["trickbag streaming, pil"] = ours("pil")
        makers[f"trickbag streaming, {best}, no draft"] = ours(best, draft=False)
        free = {name: free_rate(make, args.epochs) for name, make in makers.items()}
        step = (
            args.step_ms / 1e3 if args.step_ms else args.batch_size / free[f"trickbag streaming, {best}"] * 2
        )
        cpu = cpu_info()  # model name and vector flags, as every figure is recorded with
        print(f"{cpu['model']} ({' '.join(cpu['flags']) or 'no AVX2'}), {os.cpu_count()} cores, torch {torch.__version__}, {args.images} 640x480 "
              f"JPEGs ({args.images_from}) -> RRC {args.size}² + flip, batch {args.batch_size}, {args.workers} workers, "
              f"{args.epochs} epochs timed per loader")  # fmt: skip
        print(f"simulated model step {step * 1e3:.0f} ms per batch")
        rows = {}
        for name, make in makers.items():
            rows[name] = (free[name], *waiting(make, args.epochs, step))
        if args.torchvision_python:
            real = run_torchvision(args.torchvision_python, folder, args, step)
            print(f"torchvision: {real['versions']} ({args.torchvision_python})")
            rows["torchvision ImageFolder (real)"] = (
                real["rate"],
                real["fraction"],
                real["late"],
                real["total"],
            )
        for name, (rate, fraction, late, total) in rows.items():
            ratio = rate / free["reference (per-image PIL)"]
            print(f"{name:38s} {rate:7.1f} images/s ({ratio:4.2f}x), waiting {100 * fraction:5.1f}% of "
                  f"the time, {late}/{total} batches waited > 10 ms")  # fmt: skip
        if args.torchvision_python:
            ours_rate = free[f"trickbag streaming, {best}"]
            print(f"trickbag streaming, {best} / torchvision: {ours_rate / real['rate']:.2f}x")


if __name__ == "__main__":
    main()
