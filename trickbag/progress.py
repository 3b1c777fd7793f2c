"""The training progress bar (loss, LR, throughput, ETA) on a terminal; a no-op anywhere else."""

from __future__ import annotations

import time
from typing import Any


class Progress:
    """A rich progress bar refreshed at most 5 times a second; a no-op when stdout is not a terminal.

    ``advance`` is called once per micro-batch and costs a clock read; the loss shown is the last running loss
    the trainer logged, so the bar never forces a device sync.

    Args:
        logger: a ``trickbag.runlog.RunLogger`` (only its ``interactive`` flag is read: a bar on a terminal only).
        total: micro-batches still to run; 0 or less shows no bar.
    """

    def __init__(self, logger: Any, total: int) -> None:
        self.bar = None
        self.pending = 0
        self.last_refresh = 0.0
        self.fields = {"loss": "-", "lr": "-", "speed": "-"}
        if not logger.interactive or total <= 0:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[speed]} img/s"),
            TimeRemainingColumn(),
            transient=True,
            auto_refresh=False,  # no refresh thread: the bar redraws only in advance(), at most 5 times a second
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, **self.fields)

    @property
    def lr(self) -> str:
        return self.fields["lr"]

    def describe(self, *, loss: float, lr: float) -> None:
        self.fields.update(loss=f"{loss:.4f}", lr=f"{lr:.4g}")

    def advance(self, images: int, started: float) -> None:
        """One micro-batch done; ``images`` seen since ``started`` (perf_counter) give the throughput."""
        if self.bar is None:
            return
        self.pending += 1
        now = time.perf_counter()
        if now - self.last_refresh >= 0.2:
            self.fields["speed"] = f"{images / max(now - started, 1e-9):.0f}"
            self.bar.update(self.task, advance=self.pending, **self.fields)
            self.bar.refresh()
            self.pending, self.last_refresh = 0, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
