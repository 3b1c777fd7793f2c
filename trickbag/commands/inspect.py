"""``trickbag inspect``: class balance of a dataset and which metric to trust; or score a predictions CSV."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

EPILOG = """examples:
  trickbag inspect /data/cifar10/train        image folder: root/<class>/*.jpg
  trickbag inspect /data/cifar10              a root with train/ (and test/) inside
  trickbag inspect labels.csv                 a CSV with columns path,label
  trickbag inspect digits                     sklearn's bundled digits (no download)
  trickbag inspect predictions.csv --out-dir eval/
                                              a CSV written by `trickbag predict`: per-class table,
                                              overall metrics and eval/confusion_matrix.png

Files are listed as `trickbag train` lists them (trickbag.images.list_images) and counted, not decoded. Imbalance >= 3:1 -> lead with macro-F1 and per-class recall (accuracy is
shown next to the majority-class baseline); >= 10:1 -> try loss.class_weights: effective_number.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="class balance and which metric to trust; or score a predictions CSV",
        description=(
            "Count examples per class in DATA (image folder, CSV path,label, or 'digits') and say which "
            "metric to lead with. Given a predictions CSV (path,label,predicted,p_<class>...), print "
            "per-class precision/recall/F1 and overall metrics."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", metavar="DATA", help="image folder, CSV file, or the word 'digits'")
    parser.add_argument("--out-dir", type=Path, help="predictions CSV only: write confusion_matrix.png here")
    parser.set_defaults(func=handle_inspect)


def handle_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(soft_wrap=True)  # long paths stay on one line (and greppable)
    if args.data == "digits":
        from sklearn.datasets import load_digits

        target = load_digits().target.tolist()
        return _print_advice(console, "sklearn digits", target, [str(i) for i in range(10)])
    path = Path(args.data).expanduser()
    if path.is_dir():
        if args.out_dir is not None:
            raise ValueError("--out-dir is for a predictions CSV; DATA is a folder")
        counts, where = count_image_folder(path)
        return _print_advice(console, where, counts, None)
    if path.is_file() and path.suffix.lower() == ".csv":
        header = _read_header(path)
        if "predicted" in header:
            return _inspect_predictions(console, path, args.out_dir)
        if args.out_dir is not None:
            raise ValueError(
                f"--out-dir needs a predictions CSV (with a 'predicted' column); {path} has {header}"
            )
        return _print_advice(console, str(path), _count_csv_labels(path, header), None)
    if not path.exists():
        raise FileNotFoundError(
            f"DATA {args.data!r} does not exist (expected a folder, a .csv file or 'digits')"
        )
    raise ValueError(f"DATA {args.data!r} is neither a folder nor a .csv file (or the word 'digits')")


# ----------------------------------------------------------------------------------------------------------
# datasets


def count_image_folder(root: Path) -> tuple[dict[str, int], str]:
    """Image files per class folder under ``root`` (or ``root/train``); counted, not decoded.

    Uses ``trickbag.images.list_image_folder``, the listing the loader trains on, so these counts are those of
    ``trickbag train`` (and of ``trickbag mix``, which lists with the same rules).
    """
    from trickbag.images import list_image_folder

    if (root / "train").is_dir():
        root = root / "train"
    if not root.is_dir() or not any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        raise ValueError(f"{root} has no class folders: expected root/<class>/<image> or root/train/<class>/")
    paths, labels, classes = list_image_folder(root)
    counts = dict.fromkeys(classes, 0)
    for label in labels:
        counts[classes[label]] += 1
    return counts, str(root)


def _read_header(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        header = next(csv.reader(handle), [])
    return [name.strip() for name in header]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        return [
            {key: (value or "").strip() for key, value in row.items() if key is not None} for row in reader
        ]


def _count_csv_labels(path: Path, header: list[str]) -> dict[str, int]:
    if "label" not in header:
        raise ValueError(f"{path}: needs a 'label' column (path,label), got {header}")
    labels = [row["label"] for row in _rows(path)]
    missing = sum(1 for label in labels if not label)
    if missing:
        raise ValueError(f"{path}: {missing} rows have an empty label")
    if labels and all(label.lstrip("-").isdigit() for label in labels):
        names = sorted(set(labels), key=int)  # numeric order: "2" before "10"
    else:
        names = sorted(set(labels))
    counts = dict.fromkeys(names, 0)
    for label in labels:
        counts[label] += 1
    return counts


def _print_advice(console, source: str, labels_or_counts, class_names) -> int:
    from trickbag.metrics.advice import advise

    advice = advise(labels_or_counts, class_names=class_names)
    console.print(f"[bold]{source}[/bold]")
    console.print(advice.table())
    for line in advice.lines:
        console.print(line, markup=False, highlight=False)
    console.print(f"best metric: {advice.best_metric}", markup=False, highlight=False)
    return 0


# ----------------------------------------------------------------------------------------------------------
# predictions


def _inspect_predictions(console, path: Path, out_dir: Path | None) -> int:
    import torch
    from rich.table import Table

    from trickbag.metrics.advice import advise
    from trickbag.metrics.classification import ClassificationMetrics
    from trickbag.metrics.plots import plot_confusion_matrix

    header = _read_header(path)
    if "label" not in header:
        raise ValueError(
            f"{path}: a predictions CSV needs columns path,label,predicted,p_<class>..., got {header}"
        )
    rows = _rows(path)
    prob_columns = [name for name in header if name.startswith("p_")]
    if prob_columns:
        classes = [name[2:] for name in prob_columns]
    else:
        classes = sorted({row["label"] for row in rows if row["label"]} | {row["predicted"] for row in rows})
    index = {name: i for i, name in enumerate(classes)}
    labelled = [row for row in rows if row["label"]]
    console.print(f"[bold]{path}[/bold]: {len(rows)} predictions, {len(labelled)} with a label")
    if not labelled:
        predicted = [row["predicted"] for row in rows]
        console.print(
            "No labels (the label column is empty): only the predicted class distribution is shown."
        )
        return _print_advice(console, "predicted classes", predicted, classes)
    for row_number, row in enumerate(labelled, start=2):
        for column in ("label", "predicted"):
            if row[column] not in index:
                raise ValueError(f"{path} row {row_number}: {column} {row[column]!r} is not one of {classes}")
    target = torch.tensor([index[row["label"]] for row in labelled])
    if prob_columns:
        try:
            preds = torch.tensor([[float(row[name]) for name in prob_columns] for row in labelled])
        except ValueError as error:
            raise ValueError(f"{path}: p_<class> columns must hold numbers ({error})") from None
    else:
        preds = torch.tensor([index[row["predicted"]] for row in labelled])
    metrics = ClassificationMetrics(len(classes), class_names=classes, top_k=(1, 5), zero_division=0)
    metrics.update(preds, target)
    result = metrics.compute()
    advice = advise(target.tolist(), class_names=classes)

    from trickbag.longtail import rarest_classes

    # The CSV knows only the labels it holds: on imbalanced labels the rarest of them are marked.
    per_class = metrics.per_class()
    rare = set(rarest_classes([row["support"] for row in per_class])) if advice.is_imbalanced else set()
    title = "per class (recall first; rarest classes marked)" if advice.is_imbalanced else "per class"
    table = Table(title=title, title_justify="left")
    columns = ("recall", "precision", "f1") if advice.is_imbalanced else ("precision", "recall", "f1")
    for column in ("class", "support", *columns, ""):
        table.add_column(column, justify="left" if column in ("class", "") else "right")
    for c, row in enumerate(per_class):
        mark = "rare" if c in rare else ""
        table.add_row(row["class"], str(row["support"]), *(f"{row[m]:.3f}" for m in columns), mark)
    console.print(table)

    overall = Table(title="overall", title_justify="left")
    overall.add_column("metric")
    overall.add_column("value", justify="right")
    overall.add_column("note")
    lead = [advice.best_metric] if advice.best_metric in result else []  # macro_f1 on imbalanced labels
    for name, value in {key: result[key] for key in dict.fromkeys([*lead, *result])}.items():
        note = ""
        if name == advice.best_metric:
            note = "lead with this"
        elif name == "accuracy" and advice.is_imbalanced:
            note = f"misleading: majority baseline {advice.majority_baseline_accuracy:.3f}"
        overall.add_row(name, f"{value:.4f}", note)
    console.print(overall)
    for line in advice.lines:
        console.print(line, markup=False, highlight=False)
    if out_dir is not None:
        written = plot_confusion_matrix(
            metrics.confusion_matrix(), classes, Path(out_dir) / "confusion_matrix.png"
        )
        console.print(f"wrote {written}", markup=False, highlight=False)
    return 0
