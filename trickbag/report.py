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
from trickbag.runlog import LR_FILE, METRICS_FILE, format_value

RESULTS_FILE = "results.json"  # written by trickbag.run.finish_run


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


def read_lr_trace(run_dir: str | Path) -> list[float]:
    """The LR (param group 0) each optimizer update used, as the run recorded it in ``lr.csv`` ([] if absent).

    Recorded, not replayed: a plateau schedule's reductions, an extended run and fp16 skips are all as they were.
    """
    path = Path(run_dir) / LR_FILE
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as handle:
        return [float(row["lr"]) for row in csv.DictReader(handle)]


def read_results(run_dir: str | Path) -> dict[str, Any]:
    """``results.json`` of a finished run ({} while the run is still going or if it failed)."""
    path = Path(run_dir) / RESULTS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def results_table_html(results: dict[str, Any]) -> str:
    """Each kept checkpoint's val scores (which chose it) beside its test scores (which chose nothing)."""
    checkpoints = results.get("checkpoints", {})
    if not checkpoints:
        return "<p>No results.json yet: the run has not finished.</p>"
    keys = list(dict.fromkeys(["loss", results.get("best_metric", "accuracy"), "accuracy", "macro_f1"]))
    splits = [split for split in ("val", "test") if any(split in entry for entry in checkpoints.values())]
    header = "<th>checkpoint</th><th>epoch</th>" + "".join(
        f"<th>{split} {html.escape(key)}</th>" for split in splits for key in keys
    )
    body = "".join(
        f"<tr><td>{html.escape(kind)}</td><td>{entry['epoch']}</td>"
        + "".join(
            f"<td>{format_value(entry.get(split, {}).get(key))}</td>" for split in splits for key in keys
        )
        + "</tr>"
        for kind, entry in checkpoints.items()
    )
    note = (
        "Checkpoints are chosen on val; test scores are computed once at the end and choose nothing."
        if "test" in splits
        else "No test set: these are validation scores, which chose the checkpoints."
    )
    return f"<h2>val and test</h2><p>{note}</p><table><tr>{header}</tr>{body}</table>"


def _imbalanced(class_counts) -> bool:
    if not class_counts:
        return False
    from trickbag.metrics.advice import advise

    return advise({str(c): int(n) for c, n in enumerate(class_counts)}).is_imbalanced


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
    results = read_results(run_dir)
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
    per_update = read_lr_trace(run_dir)
    if per_update:
        steps = max(1, round(len(per_update) / max(len(rows), 1)))  # updates per epoch, as recorded
        ax.plot([(i + 1) / steps for i in range(len(per_update))], per_update)
        ax.set(title="learning rate of each update (param group 0, as used)", xlabel="epoch")
    else:
        ax.plot(epochs, [row.get("lr", math.nan) for row in rows], marker="o")
        ax.set(title="learning rate (end of epoch)", xlabel="epoch")

    classes = meta.get("classes", [])
    confusion = meta.get("confusion_matrix")
    ax = axes[1][0]
    if confusion:
        title = f"val confusion matrix, best_metric epoch {meta.get('epoch')}"
        draw_confusion_matrix(ax, confusion, classes, title=title)
    else:
        ax.set_title("no best_metric checkpoint")
    ax = axes[1][1]
    counts = meta.get("class_counts")
    if confusion and _imbalanced(counts):
        # Imbalanced training labels: recall per class says which classes the model gave up on.
        from trickbag.longtail import rarest_classes

        scores = per_class_scores(confusion, classes, zero_division=0.0)
        rare = set(rarest_classes(counts))
        marks = [" rare" if c in rare else "" for c in range(len(scores))]
        names = [f"{row['class']} (n={n}){mark}" for row, n, mark in zip(scores, counts, marks)]
        colors = ["tab:red" if c in rare else "tab:blue" for c in range(len(scores))]
        ax.barh(names, [row["recall"] for row in scores], color=colors)
        ax.set(title="per-class recall on val (best_metric); rarest in training in red", xlim=(0, 1))
        ax.invert_yaxis()
    elif confusion:
        scores = per_class_scores(confusion, classes, zero_division=0.0)
        ax.barh([row["class"] for row in scores], [row["f1"] for row in scores])
        ax.set(title="per-class F1 on val (best_metric)", xlim=(0, 1))
        ax.invert_yaxis()
    axes[1][2].axis("off")
    chosen = results.get("checkpoints", {}).get("best_metric", {})
    lines = [f"best_metric checkpoint (epoch {chosen.get('epoch', meta.get('epoch'))}), chosen on val"]
    for split in ("val", "test"):
        scores = chosen.get(split, {})
        lead = ["macro_f1"] if _imbalanced(counts) and "macro_f1" in scores else []  # before accuracy
        for key in dict.fromkeys([*lead, *scores]):
            lines.append(f"{split} {key}: {format_value(scores[key])}")
    if not chosen:
        lines += [f"{key}: {format_value(value)}" for key, value in (meta.get("scores") or {}).items()]
    axes[1][2].text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=9)
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
        f"{results_table_html(results)}"
        f"<h2>metrics per epoch (validation)</h2><table><tr>{header}</tr>{table}</table></body></html>"
    )
    html_path = run_dir / "report.html"
    atomic_write_bytes(html_path, page.encode("utf-8"))
    return png_path, html_path
