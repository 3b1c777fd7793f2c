"""``trickbag report RUN_DIR``: loss/metric/LR curves, the confusion matrix and per-class F1 of a run folder.

Reads ``metrics.csv`` and the best_metric checkpoint's ``meta.json``; writes ``report.png`` and a self-contained
``report.html`` (the PNG embedded as base64).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from trickbag.checkpoint import atomic_write_bytes

# Progress and RunLogger re-exported: compatibility: removed once train.py/run.py import the new modules.
from trickbag.progress import Progress  # noqa: F401
from trickbag.runlog import METRICS_FILE, RunLogger, format_value  # noqa: F401


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

    from trickbag.metrics.classification import per_class_scores
    from trickbag.metrics.plots import draw_confusion_matrix

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
        title = f"confusion matrix, best_metric epoch {meta.get('epoch')}"
        draw_confusion_matrix(ax, confusion, classes, title=title)
    else:
        ax.set_title("no best_metric checkpoint")
    ax = axes[1][1]
    if confusion:
        scores = per_class_scores(confusion, classes, zero_division=0.0)
        ax.barh([row["class"] for row in scores], [row["f1"] for row in scores])
        ax.set(title="per-class F1 (best_metric)", xlim=(0, 1))
        ax.invert_yaxis()
    axes[1][2].axis("off")
    summary = [f"{key}: {format_value(value)}" for key, value in (meta.get("scores") or {}).items()]
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
        "<tr>" + "".join(f"<td>{html.escape(format_value(row.get(key)))}</td>" for key in rows[0]) + "</tr>"
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
