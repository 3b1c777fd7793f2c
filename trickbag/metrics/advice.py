"""Which metric to trust for a dataset: accuracy when classes are balanced, macro-F1 when they are not.

``advise(labels)`` counts the classes and returns an :class:`Advice`: the imbalance ratio (largest / smallest
present class), the accuracy of always predicting the majority class, the metric to lead with (the Trainer
uses ``best_metric`` as its default model-selection metric), and whether class-weighted loss is worth trying.

Thresholds (rules of thumb, stated so they can be argued with):
  * ratio >= 3:1  -> imbalanced: lead with macro-F1 and per-class recall; accuracy is shown next to the
    majority baseline, because a model can score that much by ignoring every minority class.
  * ratio >= 10:1 -> also recommend ``loss.class_weights: effective_number`` (Cui et al. 2019,
    https://arxiv.org/abs/1901.05555).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Advice", "advise", "IMBALANCED_RATIO", "CLASS_WEIGHTS_RATIO"]

IMBALANCED_RATIO = 3.0
CLASS_WEIGHTS_RATIO = 10.0


@dataclass
class Advice:
    """Class balance of a dataset and the metric to trust on it.

    Attributes:
        counts: examples per class name, in class order (classes with 0 examples included).
        imbalance_ratio: largest / smallest count over classes that have examples (1.0 for one class).
        majority_baseline_accuracy: accuracy of always predicting the largest class.
        is_imbalanced: imbalance_ratio >= 3.
        best_metric: "macro_f1" when imbalanced, else "accuracy" (keys of ClassificationMetrics.compute()).
        recommend_class_weights: imbalance_ratio >= 10.
        lines: the explanation, one sentence per line.
    """

    counts: dict[str, int]
    imbalance_ratio: float
    majority_baseline_accuracy: float
    is_imbalanced: bool
    best_metric: str
    recommend_class_weights: bool
    lines: list[str] = field(default_factory=list)

    def table(self):
        """A rich Table of class counts, shares and a bar."""
        from rich.table import Table

        total = sum(self.counts.values())
        largest = max(self.counts.values())
        table = Table(title=f"class balance ({total} examples)", title_justify="left")
        table.add_column("class")
        table.add_column("count", justify="right")
        table.add_column("share", justify="right")
        table.add_column("", no_wrap=True)
        for name, count in self.counts.items():
            bar = "#" * round(20 * count / largest) if largest else ""
            table.add_row(name, str(count), f"{100 * count / total:.1f}%", bar)
        return table

    def render(self, width: int = 100) -> str:
        """Plain text: the count table, the ratio, the metric to lead with and why."""
        from rich.console import Console

        buffer = io.StringIO()
        console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
        console.print(self.table())
        for line in self.lines:
            console.print(line, markup=False, highlight=False)
        return buffer.getvalue()


def _count(labels_or_counts, class_names: Sequence[str] | None) -> dict[str, int]:
    """Counts per class name from a {name: count} mapping, integer labels, or string labels."""
    if isinstance(labels_or_counts, Mapping):
        counts = {str(name): count for name, count in labels_or_counts.items()}
        for name, count in counts.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"count for class {name!r} must be an int >= 0, got {count!r}")
        if class_names is not None:
            unknown = sorted(set(counts) - set(map(str, class_names)))
            if unknown:
                raise ValueError(f"counts name classes {unknown} that are not in class_names")
            counts = {str(name): counts.get(str(name), 0) for name in class_names}
        return counts
    if hasattr(labels_or_counts, "tolist"):  # torch tensor or numpy array
        if getattr(labels_or_counts, "ndim", 1) != 1:
            raise ValueError(f"labels must be 1-D, got shape {tuple(labels_or_counts.shape)}")
        labels_or_counts = labels_or_counts.tolist()
    if isinstance(labels_or_counts, (str, bytes)) or not isinstance(labels_or_counts, Sequence):
        raise TypeError(
            f"labels_or_counts must be a sequence of labels or a {{class: count}} mapping, "
            f"got {type(labels_or_counts).__name__}"
        )
    labels = list(labels_or_counts)
    if all(isinstance(label, int) and not isinstance(label, bool) for label in labels):
        if labels and min(labels) < 0:
            raise ValueError(f"integer labels must be >= 0, got {min(labels)}")
        size = max(labels, default=-1) + 1
        if class_names is not None:
            if size > len(class_names):
                raise ValueError(f"label {size - 1} has no name: class_names has {len(class_names)} entries")
            size = len(class_names)
        names = (
            [str(name) for name in class_names] if class_names is not None else [str(i) for i in range(size)]
        )
        counts = dict.fromkeys(names, 0)
        for label in labels:
            counts[names[label]] += 1
        return counts
    if all(isinstance(label, str) for label in labels):
        names = list(map(str, class_names)) if class_names is not None else sorted(set(labels))
        unknown = sorted(set(labels) - set(names))
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not in class_names")
        counts = dict.fromkeys(names, 0)
        for label in labels:
            counts[label] += 1
        return counts
    raise TypeError("labels must be all ints or all strings")


def advise(labels_or_counts, *, class_names: Sequence[str] | None = None) -> Advice:
    """Class balance and which metric to trust.

    Args:
        labels_or_counts: (N,) integer labels (list, tensor or array), string labels, or a {class: count}
            mapping (e.g. a ``collections.Counter``).
        class_names: names for integer labels (label i -> class_names[i]); also declares classes with no
            example, which are then reported.
    Returns:
        :class:`Advice`. Raises ValueError when there is no example at all.
    """
    counts = _count(labels_or_counts, class_names)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("no examples to advise on: the labels are empty (check the data path or CSV)")
    present = {name: count for name, count in counts.items() if count > 0}
    largest_name = max(present, key=present.get)
    smallest_name = min(present, key=present.get)
    largest, smallest = present[largest_name], present[smallest_name]
    ratio = largest / smallest
    baseline = largest / total
    imbalanced = ratio >= IMBALANCED_RATIO
    weights = ratio >= CLASS_WEIGHTS_RATIO
    lines = []
    if len(present) == 1:
        lines.append(
            f"Only one class ({largest_name!r}) has examples: every metric is trivial and a classifier cannot "
            "be evaluated. Check the labels or the data path."
        )
    elif largest == smallest:
        lines.append(f"{total} examples in {len(present)} classes, {largest} each: imbalance ratio 1.0:1.")
    else:
        lines.append(
            f"{total} examples in {len(present)} classes; largest {largest_name!r} ({largest}), "
            f"smallest {smallest_name!r} ({smallest}): imbalance ratio {ratio:.1f}:1."
        )
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        lines.append(f"Classes with no example: {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}.")
    if len(present) > 1 and imbalanced:
        lines.append(
            f"Imbalanced (>= {IMBALANCED_RATIO:.0f}:1): lead with macro-F1 and per-class recall "
            "(balanced accuracy)."
        )
        lines.append(
            f"Accuracy is misleading here: always predicting {largest_name!r} already scores "
            f"{100 * baseline:.1f}% (majority-class baseline)."
        )
    elif len(present) > 1:
        lines.append(
            f"Balanced enough (< {IMBALANCED_RATIO:.0f}:1): lead with accuracy (majority baseline "
            f"{100 * baseline:.1f}%); macro-F1 will tell the same story."
        )
    if weights and len(present) > 1:
        lines.append(
            f"Strongly imbalanced (>= {CLASS_WEIGHTS_RATIO:.0f}:1): try `loss.class_weights: effective_number` "
            "(Cui et al. 2019) and watch the smallest classes' recall."
        )
    return Advice(
        counts=counts,
        imbalance_ratio=ratio,
        majority_baseline_accuracy=baseline,
        is_imbalanced=imbalanced,
        best_metric="macro_f1" if imbalanced else "accuracy",
        recommend_class_weights=weights,
        lines=lines,
    )
