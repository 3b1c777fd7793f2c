"""Benchmark: MixUp / CutMix / FMix against a plain ``x.clone()`` (the memory-bandwidth floor), same run.

    .venv/bin/python benchmarks/mixing.py            # 512×3×32×32 and 128×3×224×224 float32, CPU
    .venv/bin/python benchmarks/mixing.py --quick    # smaller batches, fewer repeats (smoke test)
    .venv/bin/python benchmarks/mixing.py --device cuda

Each figure is the minimum over repeats (other jobs share the machine; the minimum is the least disturbed).
"ratio" is time / clone time. Rows marked "loop" are a per-sample Python loop, the way timm's "elem"/"pair"
modes work, kept as a reference for the vectorised per-sample path. "fmix (mask given)" times only the blend,
"fmix mask only" only ``sample_fmix_mask``.
"""

from __future__ import annotations

import argparse
import time

import torch

from trickbag.mixing import BatchMixer, _blend, cutmix, fmix, mixup, sample_fmix_mask
from trickbag.mixing_masks import cutmix_boxes


def timed(fn, device: torch.device, repeats: int) -> float:
    """Minimum wall time of ``fn()`` in milliseconds, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def mixup_loop(x, lam, perm):
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = lam[i] * x[i] + (1 - lam[i]) * x[perm[i]]
    return out


def cutmix_loop(x, boxes, perm):
    out = x.clone()
    for i, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        out[i, :, y0:y1, x0:x1] = x[perm[i], :, y0:y1, x0:x1]
    return out


def cases(x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
    n, _, height, width = x.shape
    kw = {"num_classes": 10, "generator": generator}
    lam, perm = torch.rand(n, generator=generator), torch.randperm(n, generator=generator).to(x.device)
    boxes, _ = cutmix_boxes(lam, height, width, generator=generator)
    keep_batch, _ = sample_fmix_mask(0.6, height, width, generator=generator, device=x.device)
    keep_each, _ = sample_fmix_mask(lam, height, width, generator=generator, device=x.device)
    sample_mixer = BatchMixer(
        num_classes=10, mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, mode="sample"
    )
    yield "copy", "x.clone()", lambda: x.clone()
    yield "mixup", "batch", lambda: mixup(x, labels, **kw)
    yield "mixup", "batch, flip", lambda: mixup(x, labels, pairing="flip", **kw)
    yield "mixup", "sample", lambda: mixup(x, labels, per_sample=True, **kw)
    yield "mixup", "sample, loop", lambda: mixup_loop(x, lam.tolist(), perm.tolist())
    yield "cutmix", "batch", lambda: cutmix(x, labels, **kw)
    yield "cutmix", "batch, flip", lambda: cutmix(x, labels, pairing="flip", **kw)
    yield "cutmix", "sample", lambda: cutmix(x, labels, per_sample=True, **kw)
    yield "cutmix", "sample, loop", lambda: cutmix_loop(x, boxes, perm.tolist())
    yield "fmix", "batch", lambda: fmix(x, labels, **kw)
    yield "fmix", "sample", lambda: fmix(x, labels, per_sample=True, **kw)
    yield "fmix (mask given)", "batch", lambda: _blend(x, perm, keep_batch.unsqueeze(1))
    yield "fmix (mask given)", "sample", lambda: _blend(x, perm, keep_each.unsqueeze(1))
    yield "fmix mask only", "batch", lambda: sample_fmix_mask(0.6, height, width, generator=generator)
    yield "fmix mask only", "sample", lambda: sample_fmix_mask(lam, height, width, generator=generator)
    yield "BatchMixer", "sample, all 3", lambda: sample_mixer(x, labels)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small batches and 2 repeats (smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = [(64, 3, 32, 32), (8, 3, 224, 224)] if args.quick else [(512, 3, 32, 32), (128, 3, 224, 224)]
    repeats = 2 if args.quick else args.repeats
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, min of {repeats}")
    for shape in shapes:
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(shape, generator=generator).to(device)
        labels = torch.randint(0, 10, shape[:1], generator=generator).to(device)
        print(f"\n{'×'.join(map(str, shape))} float32 ({x.numel() * 4 / 2**20:.0f} MiB)")
        print(f"{'method':<20}{'mode':<16}{'ms':>10}{'× copy':>9}")
        copy_ms = None
        for method, mode, fn in cases(x, labels, generator):
            ms = timed(fn, device, repeats)
            copy_ms = copy_ms or ms
            print(f"{method:<20}{mode:<16}{ms:>10.3f}{ms / copy_ms:>9.2f}")


if __name__ == "__main__":
    main()
