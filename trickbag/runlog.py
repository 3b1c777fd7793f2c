"""Run logs: console lines, ``train.log``, ``metrics.csv`` (one row per epoch) and optional TensorBoard scalars.

In CI logs (stdout not a terminal) the trainer's plain log lines (running loss every ``log_every`` updates, one
line per epoch) are the whole output; ``trickbag.progress`` adds a progress bar only on a terminal.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import Any

from trickbag.checkpoint import atomic_write_bytes

METRICS_FILE = "metrics.csv"
LOG_FILE = "train.log"
LR_FILE = "lr.csv"
CONSOLE_KEYS = ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_balanced_accuracy", "lr")


class RunLogger:
    """Log lines to stdout and ``run_dir/train.log``; per-epoch rows to ``metrics.csv`` (and TensorBoard).

    Args:
        run_dir: folder for the files; None logs to the console only.
        tensorboard: also write TensorBoard scalars (needs the ``tensorboard`` package).
        quiet: no console output (files are still written).
    """

    def __init__(
        self, run_dir: str | Path | None = None, *, tensorboard: bool = False, quiet: bool = False
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.quiet = quiet
        self.interactive = sys.stdout.isatty() and not quiet
        self.writer = None
        if tensorboard and self.run_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(
                    "logging.tensorboard=true needs the tensorboard package: pip install 'trickbag[tensorboard]'"
                ) from None
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def info(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        if not self.quiet:
            print(f"[{stamp}] {message}", flush=True)
        if self.run_dir is not None:
            with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as handle:
                handle.write(f"[{stamp}] {message}\n")

    def epoch(self, row: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Log one epoch's row; rewrite metrics.csv from the whole history (so a resumed run has no dupes)."""
        # The console gets the headline numbers; metrics.csv has every column.
        shown = " ".join(f"{key} {format_value(row[key])}" for key in CONSOLE_KEYS if key in row)
        self.info(
            f"epoch {row['epoch']}: {shown} ({row.get('time_s', 0):.1f} s, {row.get('images_per_s', 0):.0f} img/s)"
        )
        if self.run_dir is not None:
            atomic_write_bytes(self.run_dir / METRICS_FILE, history_to_csv(history).encode("utf-8"))
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def lr_trace(self, lrs: list[float]) -> None:
        """Rewrite ``lr.csv``: the LR (param group 0) each optimizer update really used, for `trickbag report`."""
        if self.run_dir is not None:
            text = "update,lr\n" + "".join(f"{index + 1},{lr!r}\n" for index, lr in enumerate(lrs))
            atomic_write_bytes(self.run_dir / LR_FILE, text.encode("utf-8"))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_value(value: Any) -> str:
    """A float with 4 significant digits (as the console and report.html show it); anything else as str."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def history_to_csv(history: list[dict[str, Any]]) -> str:
    """Rows of per-epoch values as CSV text; the columns are every key seen, in order of first appearance."""
    columns: list[str] = []
    for row in history:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    return buffer.getvalue()
