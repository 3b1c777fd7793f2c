"""Trainer overhead: the seed's bare loop vs ``trickbag.train.fit`` on the same model, data and batch size.

The bare loop is the one the seed copies from the PyTorch tutorial (zero_grad -> forward -> loss -> backward ->
step, ``running_loss += loss.item()`` every step). ``fit`` runs the same SGD updates through its parts (fp32
Precision, constant schedule, accumulation helper, running-loss window, progress bar) with evaluation and
checkpoints switched off, so the ratio is the price of the loop itself. Both consume the same pre-batched
tensors; each is timed for one epoch, alternating, and the minimum over repeats is kept (the machine is shared).

    .venv/bin/python benchmarks/trainer_overhead.py            # full
    .venv/bin/python benchmarks/trainer_overhead.py --quick    # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trickbag.losses import ClassifierLoss  # noqa: E402
from trickbag.models import build_model  # noqa: E402
from trickbag.precision import Precision  # noqa: E402
from trickbag.runlog import RunLogger  # noqa: E402
from trickbag.schedules import Scheduler  # noqa: E402
from trickbag.train import FitOptions, Loaders, Parts, fit  # noqa: E402


class Batches:
    """Pre-batched tensors with the loader interface ``fit`` expects."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch):
        pass

    def state_dict(self):
        return {}


def bare_epoch(model, batches, optimizer, criterion) -> None:
    running_loss = 0.0
    for i, (inputs, labels) in enumerate(batches):
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        if i % 2000 == 1999:
            print(f"[{i + 1}] loss: {running_loss / 2000:.3f}")
            running_loss = 0.0


def fit_epoch(model, batches, optimizer, options) -> None:
    scheduler = Scheduler(optimizer, "constant", steps_per_epoch=len(batches), epochs=1)
    parts = Parts(
        loss_fn=ClassifierLoss(num_classes=10),
        optimizer=optimizer,
        scheduler=scheduler,
        precision=Precision("fp32", batches[0][0].device),
        logger=RunLogger(quiet=True),
    )
    fit(model, Loaders(Batches(batches)), parts, options)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, model_name: str, shape, batch_size: int, steps: int, repeats: int, device) -> dict:
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(batch_size, *shape, generator=generator).to(device),
            torch.randint(0, 10, (batch_size,), generator=generator).to(device),
        )
        for _ in range(steps)
    ]
    cfg = FitOptions(epochs=1, log_every=50)
    torch.manual_seed(0)
    bare_model = build_model(model_name, 10, in_channels=shape[0])
    fit_model = build_model(model_name, 10, in_channels=shape[0])
    fit_model.load_state_dict(bare_model.state_dict())
    bare_model, fit_model = bare_model.to(device), fit_model.to(device)
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=0.01, momentum=0.9)
    fit_opt = torch.optim.SGD(fit_model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    bare_epoch(bare_model, batches[:2], bare_opt, criterion)  # warm-up (allocator, kernels)
    fit_epoch(fit_model, batches[:2], fit_opt, cfg)
    bare_times, fit_times = [], []
    for repeat in range(repeats):
        # Alternate which loop goes first so neither always runs on a warmer (or busier) machine.
        for which in ("bare", "fit") if repeat % 2 == 0 else ("fit", "bare"):
            synchronize(device)
            start = time.perf_counter()
            if which == "bare":
                bare_epoch(bare_model, batches, bare_opt, criterion)
                synchronize(device)
                bare_times.append(time.perf_counter() - start)
            else:
                fit_epoch(fit_model, batches, fit_opt, cfg)
                synchronize(device)
                fit_times.append(time.perf_counter() - start)
    images = steps * batch_size
    bare_rate, fit_rate = images / min(bare_times), images / min(fit_times)
    return {"case": name, "bare": bare_rate, "fit": fit_rate, "ratio": fit_rate / bare_rate}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few steps and repeats (smoke test)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (on a GPU the seed's per-step .item() syncs)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    steps, repeats = (8, 2) if args.quick else (30, 9)
    # Small steps make the loop's own cost visible: digits_cnn on 8x8 digits is ~2 ms a step on 2 cores.
    cases = [
        ("digits_cnn 1x8x8 b64", "digits_cnn", (1, 8, 8), 64),
        ("digits_cnn 3x16x16 b64", "digits_cnn", (3, 16, 16), 64),
    ]
    print(f"torch {torch.__version__}, {platform.machine()}, {device}, threads {torch.get_num_threads()}, "
          f"{steps} steps x {repeats} repeats (min), shared machine")  # fmt: skip
    print(f"{'case':28s} {'bare img/s':>11s} {'fit img/s':>11s} {'fit/bare':>9s}")
    for name, model_name, shape, batch_size in cases:
        row = measure(name, model_name, shape, batch_size, steps, repeats, device)
        print(f"{row['case']:28s} {row['bare']:11.0f} {row['fit']:11.0f} {row['ratio']:9.3f}")


if __name__ == "__main__":
    main()
