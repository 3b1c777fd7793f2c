"""Confusion-matrix picture: counts and row-normalised recall side by side (matplotlib, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_confusion_matrix"]

ANNOTATE_MAX_CLASSES = 20  # beyond this, numbers in cells are unreadable


def plot_confusion_matrix(cm, class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Write a PNG with two panels: raw counts, and counts divided by each row's total (per-class recall).

    Args:
        cm: (C, C) counts, rows = true class, columns = predicted (torch tensor, numpy array or nested lists).
        class_names: C names, in row order.
        path: PNG file to write; parent folders are created.
    Returns:
        The path written.
    """
    import numpy as np
    from matplotlib.figure import Figure  # a bare Figure uses Agg: no GUI backend, no pyplot global state

    matrix = np.asarray(cm.tolist() if hasattr(cm, "tolist") else cm, dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"cm must be a square (C, C) matrix, got shape {matrix.shape}")
    if len(class_names) != matrix.shape[0]:
        raise ValueError(
            f"class_names has {len(class_names)} names but cm is {matrix.shape[0]}x{matrix.shape[1]}"
        )
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    size = matrix.shape[0]
    side = min(max(4.0, 0.45 * size + 2.0), 16.0)
    figure = Figure(figsize=(2 * side + 1.5, side), layout="constrained")
    panels = figure.subplots(1, 2)
    for axes, values, title, fmt, top in (
        (panels[0], matrix, "counts", "d", max(int(matrix.max(initial=0)), 1)),
        (panels[1], normalised, "row-normalised (recall on the diagonal)", ".2f", 1.0),
    ):
        image = axes.imshow(values, cmap="Blues", vmin=0, vmax=top)
        figure.colorbar(image, ax=axes, shrink=0.8)
        axes.set_title(title)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        axes.set_xticks(range(size), [str(name) for name in class_names], rotation=90 if size > 6 else 0)
        axes.set_yticks(range(size), [str(name) for name in class_names])
        if size <= ANNOTATE_MAX_CLASSES:
            threshold = 0.5 * top
            for i in range(size):
                for j in range(size):
                    colour = "white" if values[i, j] > threshold else "black"
                    axes.text(
                        j, i, format(values[i, j], fmt), ha="center", va="center", color=colour, fontsize=8
                    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
