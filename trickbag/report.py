"""Run logs (console, train.log, metrics.csv, optional TensorBoard), the progress bar, and ``trickbag report``.

The console gets a rich progress bar (loss, LR, throughput, ETA) only when it is a terminal; in CI logs it
stays quiet and the trainer's plain log lines (running loss every ``log_every`` updates, one line per epoch)
are the whole output.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from trickbag.checkpoint import atomic_write_bytes

METRICS_FILE = "metrics.csv"
LOG_FILE = "train.log"
CONSOLE_KEYS = ("train_loss", "val_loss", "accuracy", "macro_f1", "balanced_accuracy", "lr")


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
        shown = " ".join(f"{key} {_fmt(row[key])}" for key in CONSOLE_KEYS if key in row)
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def history_to_csv(history: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in history:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    return buffer.getvalue()


class Progress:
    """A rich progress bar refreshed at most 5 times a second; a no-op when stdout is not a terminal.

    ``advance`` is called once per micro-batch and costs a clock read; the loss shown is the last running loss
    the trainer logged, so the bar never forces a device sync.
    """

    def __init__(self, logger: RunLogger, total: int) -> None:
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


# ---------------------------------------------------------------------------------------------------------------
# trickbag report RUN_DIR


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a trickbag run folder?")
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{key: _number(value) for key, value in row.items()} for row in rows]


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def per_class_f1(confusion: list[list[int]]) -> list[float]:
    """F1 of each class from a confusion matrix (rows = true class, columns = predicted); 0 when undefined."""
    scores = []
    for k in range(len(confusion)):
        true_positive = confusion[k][k]
        predicted = sum(row[k] for row in confusion)
        actual = sum(confusion[k])
        denominator = predicted + actual
        scores.append(2 * true_positive / denominator if denominator else 0.0)
    return scores


def planned_lr_curve(meta: dict[str, Any], rows: list[dict[str, float]]) -> list[float]:
    """The LR of every update of the epochs in ``rows``, replayed from the run's schedule ([] if unknown).

    Plateau schedules replay the validation values the run observed; an update the fp16 scaler skipped is not
    known here, so the curve is the planned one.
    """
    if not rows or "updates_per_epoch" not in meta or "base_lr" not in meta:
        return []
    from trickbag.schedules import ScheduleConfig, lr_curve

    config = meta["config"]
    schedule = ScheduleConfig.model_validate(config.get("schedule", {}))
    observed = None
    if schedule.kind == "plateau":
        key = "val_loss" if schedule.mode == "min" else config["eval"]["best_metric"]
        observed = [row.get(key, math.nan) for row in rows]
    lrs = lr_curve(schedule, base_lr=meta["base_lr"], steps_per_epoch=meta["updates_per_epoch"],
                   epochs=config["epochs"], metrics=observed)  # fmt: skip
    return lrs[: len(rows) * meta["updates_per_epoch"]]


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Draw loss/metric/LR curves, the best checkpoint's confusion matrix and per-class F1.

    Returns:
        (report.png, report.html): the HTML page embeds the PNG (base64) and needs no other file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    meta_path = run_dir / "best_metric" / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    epochs = [row["epoch"] for row in rows]
    skip = {"epoch", "train_loss", "val_loss", "lr", "time_s", "images_per_s"}
    metric_keys = [key for key in (rows[0] if rows else {}) if key not in skip]

    figure, axes = plt.subplots(2, 3, figsize=(16, 9))
    ax = axes[0][0]
    for key in ("train_loss", "val_loss"):
        ax.plot(epochs, [row.get(key, math.nan) for row in rows], marker="o", label=key)
    ax.set(title="loss", xlabel="epoch")
    ax.legend()
    ax = axes[0][1]
    for key in metric_keys:
        ax.plot(epochs, [row[key] for row in rows], marker=".", label=key)
    ax.set(title="validation metrics", xlabel="epoch")
    if metric_keys:
        ax.legend(fontsize=7)
    ax = axes[0][2]
    per_update = planned_lr_curve(meta, rows)
    if per_update:
        steps = meta["updates_per_epoch"]
        ax.plot([(i + 1) / steps for i in range(len(per_update))], per_update)
        ax.set(title="learning rate per update (param group 0)", xlabel="epoch")
    else:
        ax.plot(epochs, [row.get("lr", math.nan) for row in rows], marker="o")
        ax.set(title="learning rate (end of epoch)", xlabel="epoch")

    classes = meta.get("classes", [])
    confusion = meta.get("confusion_matrix")
    ax = axes[1][0]
    if confusion:
        ax.imshow(confusion, cmap="Blues")
        ax.set(
            title=f"confusion matrix, best_metric epoch {meta.get('epoch')}",
            xlabel="predicted",
            ylabel="true",
        )
        ticks = list(range(len(classes)))
        ax.set_xticks(ticks, classes, rotation=90, fontsize=7)
        ax.set_yticks(ticks, classes, fontsize=7)
        if len(classes) <= 20:
            for i, row in enumerate(confusion):
                for j, value in enumerate(row):
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=6)
    else:
        ax.set_title("no best_metric checkpoint")
    ax = axes[1][1]
    if confusion:
        ax.barh(classes, per_class_f1(confusion))
        ax.set(title="per-class F1 (best_metric)", xlim=(0, 1))
        ax.invert_yaxis()
    axes[1][2].axis("off")
    summary = [f"{key}: {_fmt(value)}" for key, value in (meta.get("scores") or {}).items()]
    axes[1][2].text(
        0, 1, "\n".join(["best_metric checkpoint", *summary]), va="top", family="monospace", fontsize=9
    )
    figure.suptitle(f"trickbag run {run_dir.name}")
    figure.tight_layout()
    png_path = run_dir / "report.png"
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    atomic_write_bytes(png_path, buffer.getvalue())

    table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(row.get(key)))}</td>" for key in rows[0]) + "</tr>"
        for row in rows
    )
    header = "".join(f"<th>{html.escape(key)}</th>" for key in (rows[0] if rows else {}))
    image = base64.b64encode(buffer.getvalue()).decode("ascii")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>trickbag {html.escape(run_dir.name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}</style></head><body>"
        f"<h1>trickbag run {html.escape(run_dir.name)}</h1>"
        f"<img alt='report' style='max-width:100%' src='data:image/png;base64,{image}'>"
        f"<h2>metrics per epoch</h2><table><tr>{header}</tr>{table}</table></body></html>"
    )
    html_path = run_dir / "report.html"
    atomic_write_bytes(html_path, page.encode("utf-8"))
    return png_path, html_path
