"""What checksums cost: save and load of a ResNet-18 checkpoint with and without sha256 verification, one run.

The checkpoint is ``resnet18_cifar`` (11.2 M parameters, ~45 MB of weights) plus SGD momentum buffers in the
training state (~45 MB), ~90 MB in all, as ``trickbag train`` writes it. Verified loads read each file once and
hash the bytes they parse; unverified loads memory-map the weights (safetensors' ``load_file``). Files are in the
page cache after the first load, as they are when resume follows a save: this is the hashing cost, not the disk.
Time: the median over repeats, loads of the two kinds interleaved (the machine may be shared).

    .venv/bin/python benchmarks/checkpoint_hash.py [--repeats 7] [--threads 2]
"""

import argparse
import hashlib
import platform
import statistics
import tempfile
import time

import torch

from trickbag.checkpoint import load_checkpoint, save_checkpoint
from trickbag.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model("resnet18_cifar", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # creates the momentum buffers
    state = {"optimizer": optimizer.state_dict()}
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        folder = save_checkpoint(run_dir, "last", weights=model.state_dict(), meta={"epoch": 1}, state=state)
        save_s = time.perf_counter() - started
        size = sum(f.stat().st_size for f in folder.iterdir())
        data = b"".join((folder / name).read_bytes() for name in ("model.safetensors", "state.pt"))
        started = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        hash_s = time.perf_counter() - started
        times: dict[bool, list[float]] = {True: [], False: []}
        load_checkpoint(folder)  # warm the page cache
        for _ in range(args.repeats):
            for verify in (False, True):
                started = time.perf_counter()
                load_checkpoint(folder, verify=verify)
                times[verify].append(time.perf_counter() - started)
    plain, verified = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"checkpoint: {size / 1e6:.1f} MB (weights + SGD momentum state + meta), saved in {save_s:.2f} s (hashed while written)"
    )
    print(f"sha256 alone: {hash_s:.3f} s ({size / 1e6 / hash_s:.0f} MB/s)")
    print(f"load without verification: {plain:.3f} s (median of {args.repeats})")
    print(f"load with verification:    {verified:.3f} s (median of {args.repeats})")
    print(f"ratio verified / plain: {verified / plain:.2f}x (+{verified - plain:.3f} s)")


if __name__ == "__main__":
    main()
