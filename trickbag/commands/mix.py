"""``trickbag mix``: look at what MixUp, CutMix and FMix do to your images."""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

EPILOG = """examples:
  trickbag mix grid /data/cifar10/train --out mix.png           8 random images from a class-folder tree
  trickbag mix grid a.jpg b.jpg c.jpg --out mix.png --alpha 0.4  given files, λ mostly near 0 or 1
  trickbag mix grid photos/ --n 6 --seed 3 --out mix.png         another draw

rows: the originals, then MixUp, CutMix and FMix; column i is mixed with column i+1, and each title shows
λ, the weight of the original image (for CutMix and FMix: the share of its pixels that were kept).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "mix",
        help="visual check of MixUp, CutMix and FMix",
        description="Visual checks of the batch-mixing tricks (MixUp, CutMix, FMix).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="mix_command", metavar="ACTION", required=True)
    grid = actions.add_parser(
        "grid",
        help="write a PNG grid of mixed images",
        description="Load a few images (files, or folders searched recursively) and write a PNG grid.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    grid.add_argument("inputs", nargs="+", metavar="IMAGE_DIR_OR_FILES", help="image files or folders")
    grid.add_argument("--out", type=Path, default=Path("mix.png"), help="PNG to write (default: mix.png)")
    grid.add_argument("--alpha", type=float, default=1.0, help="Beta(α, α) concentration (default: 1.0)")
    grid.add_argument("--seed", type=int, default=0, help="seed for picking images and mixing (default: 0)")
    grid.add_argument("--n", type=int, default=8, help="number of images (columns), >= 2 (default: 8)")
    grid.set_defaults(func=run_grid)


def _image_files(inputs: list[str]) -> list[Path]:
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {name}")
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {' '.join(inputs)}")
    return files


def run_grid(args: argparse.Namespace) -> int:
    if args.n < 2:
        raise ValueError(f"--n must be >= 2 (every image needs a partner), got {args.n}")
    import numpy as np
    import torch
    from PIL import Image

    from trickbag.mixing import save_mix_grid

    files = _image_files(args.inputs)
    if len(files) < 2:
        raise ValueError(f"need at least 2 images, found {len(files)} in {' '.join(args.inputs)}")
    generator = torch.Generator().manual_seed(args.seed)
    picked = [files[i] for i in torch.randperm(len(files), generator=generator)[: args.n].tolist()]
    images, size = [], None
    for path in picked:
        with Image.open(path) as image:
            image = image.convert("RGB")
            size = size or image.size  # mixing needs one size: the first image's
            images.append(np.asarray(image.resize(size) if image.size != size else image))
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    out = save_mix_grid(batch, args.out, alpha=args.alpha, seed=args.seed)
    print(f"wrote {out} ({len(picked)} images, alpha={args.alpha}, seed={args.seed})")
    return 0
