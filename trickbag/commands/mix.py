"""``trickbag mix``: look at what MixUp, CutMix and FMix do to your images."""

from __future__ import annotations

import argparse
from pathlib import Path

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


def image_files(inputs: list[str]) -> list[Path]:
    """The files of ``inputs`` (image files, or folders searched as ``trickbag.images.list_images`` does)."""
    from trickbag.images import list_images

    missing = [name for name in inputs if not Path(name).exists()]
    if missing:  # all of them at once, before any folder is searched
        raise FileNotFoundError(f"no such file or folder: {' '.join(missing)}")
    return [Path(file) for name in inputs for file in list_images(name)]


def run_grid(args: argparse.Namespace) -> int:
    if args.n < 2:
        raise ValueError(f"--n must be >= 2 (every image needs a partner), got {args.n}")
    import torch

    from trickbag.images import load_images
    from trickbag.mixing import save_mix_grid

    files = image_files(args.inputs)
    if len(files) < 2:
        raise ValueError(f"need at least 2 images, found {len(files)} in {' '.join(args.inputs)}")
    generator = torch.Generator().manual_seed(args.seed)
    picked = [str(files[i]) for i in torch.randperm(len(files), generator=generator)[: args.n].tolist()]
    # Decoded as the loader decodes (RGB, bilinear resize); mixing needs one size: the first image's.
    _, _, height, width = load_images(picked[:1]).shape
    batch = load_images(picked, size=(height, width))  # (N, 3, H, W) uint8
    out = save_mix_grid(batch, args.out, alpha=args.alpha, seed=args.seed)
    print(f"wrote {out} ({len(picked)} images, alpha={args.alpha}, seed={args.seed})")
    return 0
