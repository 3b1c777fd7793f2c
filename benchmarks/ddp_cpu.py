"""2 processes x 1 thread (DDP, gloo) vs 1 process x 2 threads on the same recipe: informative only.

Both train the same global batch (the 2-process run uses batch_size / 2 per process), so they do the same
updates; the figure is training throughput (images/s from results.json) and the test accuracy reached.

    python benchmarks/ddp_cpu.py --data-root /data/cifar10            # the fast recipe (cifar10_fast)
    python benchmarks/ddp_cpu.py --recipe digits epochs=3              # no download, a few seconds each

Scaling efficiency on GPUs belongs to the GPU suite ("GPU: pending" until a device is lent).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


def train(recipe: str, overrides: list[str], nproc: int, threads: int, out: Path) -> dict:
    """Run ``trickbag train`` (through torchrun when nproc > 1); the results.json of the run."""
    command = [sys.executable, "-m", "trickbag", "train", recipe, *overrides, f"output_dir={out}",
               f"threads={threads}", "name=bench", "--quiet", "--nproc", str(nproc)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    (run_dir,) = out.glob("bench-*")
    return json.loads((run_dir / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="cifar10_fast")
    parser.add_argument("--data-root", help="CIFAR-10 image folder for cifar10_fast")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the recipe's)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from trickbag.config import load_config
    from trickbag.recipe_files import recipe_path

    overrides = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    batch = args.batch_size or load_config(recipe_path(args.recipe), overrides).batch_size
    if batch % 2:
        raise ValueError(f"the global batch {batch} must be even to split over 2 processes")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, recipe {args.recipe}, "
          f"global batch {batch}")  # fmt: skip
    for label, nproc, threads in (("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)):
        with tempfile.TemporaryDirectory() as folder:
            results = train(
                args.recipe, [*overrides, f"batch_size={batch // nproc}"], nproc, threads, Path(folder)
            )
        last = results["checkpoints"]["last"]
        accuracy = last.get("test", last.get("val", {})).get("accuracy", float("nan"))
        print(f"{label:24s} {results['images_per_s']:9.1f} img/s  train {results['train_time_s']:7.1f} s  "
              f"last accuracy {accuracy:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
