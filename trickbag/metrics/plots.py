"""Confusion-matrix pictures (matplotlib, no display needed).

``draw_confusion_matrix`` draws one panel on a given Axes, so every picture of a confusion matrix in trickbag
(the ``trickbag report`` subplot, the PNG of ``trickbag inspect predictions.csv``) looks the same;
``plot_confusion_matrix`` writes counts and row-normalised recall side by side to a PNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["draw_confusion_matrix", "plot_confusion_matrix"]

ANNOTATE_MAX_CLASSES = 20  # beyond this, numbers in cells are unreadable


def _square_counts(cm, class_names: Sequence[str]):
    """(C, C) int64 NumPy counts from a tensor, array or nested lists; ValueError if not square or names differ."""
    import numpy as np

    matrix = np.asarray(cm.tolist() if hasattr(cm, "tolist") else cm, dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"cm must be a square (C, C) matrix, got shape {matrix.shape}")
    if len(class_names) != matrix.shape[0]:
        raise ValueError(
            f"class_names has {len(class_names)} names but cm is {matrix.shape[0]}x{matrix.shape[1]}"
        )
    return matrix


def draw_confusion_matrix(
    axes, cm, class_names: Sequence[str], *, normalize: bool = False, title: str | None = None
):
    """Draw a confusion matrix on a matplotlib Axes: cells shaded from 0, numbered up to 20 classes.

    Args:
        axes: a matplotlib ``Axes`` (a subplot of any figure).
        cm: (C, C) counts, rows = true class, columns = predicted (torch tensor, numpy array or nested lists).
        class_names: C names, in row order.
        normalize: divide each row by its total (per-class recall on the diagonal; an empty row stays 0).
        title: the panel title; default "counts" or "row-normalised (recall on the diagonal)".
    Returns:
        The ``AxesImage``, e.g. for ``figure.colorbar(image, ax=axes)``.
    """
    import numpy as np

    matrix = _square_counts(cm, class_names)
    if normalize:
        rows = matrix.sum(axis=1, keepdims=True)
        values = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
        fmt, top = ".2f", 1.0
    else:
        values, fmt, top = matrix, "d", max(int(matrix.max(initial=0)), 1)
    size = matrix.shape[0]
    image = axes.imshow(values, cmap="Blues", vmin=0, vmax=top)
    default_title = "row-normalised (recall on the diagonal)" if normalize else "counts"
    axes.set_title(default_title if title is None else title)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_xticks(range(size), [str(name) for name in class_names], rotation=90 if size > 6 else 0)
    axes.set_yticks(range(size), [str(name) for name in class_names])
    if size <= ANNOTATE_MAX_CLASSES:
        threshold = 0.5 * top  # white text on dark cells
        for i in range(size):
            for j in range(size):
                colour = "white" if values[i, j] > threshold else "black"
                axes.text(j, i, format(values[i, j], fmt), ha="center", va="center", color=colour, fontsize=8)
    return image


def plot_confusion_matrix(cm, class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Write a PNG with two panels: raw counts, and counts divided by each row's total (per-class recall).

    Args:
        cm: (C, C) counts, rows = true class, columns = predicted (torch tensor, numpy array or nested lists).
        class_names: C names, in row order.
        path: PNG file to write; parent folders are created.
    Returns:
        The path written.
    """
    from matplotlib.figure import Figure  # a bare Figure uses Agg: no GUI backend, no pyplot global state

    size = _square_counts(cm, class_names).shape[0]  # fail before drawing anything
    side = min(max(4.0, 0.45 * size + 2.0), 16.0)
    figure = Figure(figsize=(2 * side + 1.5, side), layout="constrained")
    for axes, normalize in zip(figure.subplots(1, 2), (False, True)):
        image = draw_confusion_matrix(axes, cm, class_names, normalize=normalize)
        figure.colorbar(image, ax=axes, shrink=0.8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
