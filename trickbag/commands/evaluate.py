"""``trickbag eval CHECKPOINT [--data FOLDER]``: a checkpoint's metrics, evaluated as its run evaluated.

(The module is not named ``eval.py`` so that it never shadows the builtin in a reader's head or a tool's.)
"""

from __future__ import annotations

import argparse
import sys

from trickbag.commands._common import imbalanced_counts, precision_runs, recall_table
from trickbag.parts import loss_from_config
from trickbag.run import (
    align_classes,
    load_datasets,
    load_model,
    match_channels,
    requested_top_k,
    resolve_device,
)

EPILOG = """examples:
  trickbag eval runs/digits-001                              best_metric on the run's test split
  trickbag eval runs/digits-001/best_loss --split val        the validation split that chose the checkpoints
  trickbag eval runs/digits-001 --data /data/cifar10/test    an image folder with one subfolder per class

The loss is the dataset-level one (sum of w_i l_i over sum of w_i with the run's class weights), the same number
the run logged for that split, whatever the batch size.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Evaluate a checkpoint (folder, run_dir/best_metric, or a run folder) and print its metrics.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder or run folder (uses its best_metric)")
    parser.add_argument("--data", help="image folder with class subfolders (default: the run's own split)")
    parser.add_argument(
        "--split",
        choices=("test", "val", "train"),
        default="test",
        help="which split of the run's data to evaluate when --data is not given (default: test)",
    )
    parser.add_argument(
        "--flip-tta",
        action="store_true",
        help="average with mirrored images (default: as the run's eval.flip_tta)",
    )
    parser.add_argument(
        "--translate-tta",
        action="store_true",
        help="also average images shifted by one pixel (default: as the run's eval.translate_tta)",
    )
    parser.set_defaults(func=handle_eval)


def handle_eval(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from trickbag import data
    from trickbag.config import config_from_dict
    from trickbag.metrics import ClassificationMetrics
    from trickbag.precision import Precision
    from trickbag.streaming import fit_args, loader_for
    from trickbag.train import evaluate

    device = resolve_device("auto")
    model, ckpt = load_model(args.checkpoint, device)
    classes, channels = ckpt.meta["classes"], ckpt.meta["image_shape"][0]
    cfg = config_from_dict(ckpt.meta["config"], str(ckpt.path / "meta.json"))
    if args.data:  # fitted as the run's evaluation fitted its images (size, aspect, centre crop)
        imageset = align_classes(data.load_image_folder(args.data, **fit_args(ckpt.meta)), classes)
        described = f"the image folder {args.data}"
    else:  # the run's own split, drawn exactly as the run drew it (data.split_seed)
        splits = dict(zip(("train", "val", "test"), load_datasets(cfg)))
        imageset = splits[args.split]
        if imageset is None:
            available = [name for name, split in splits.items() if split is not None]
            raise ValueError(
                f"the run in {ckpt.path.parent} has no {args.split} split; use --split {' or '.join(available)}"
            )
        described = f"the run's {args.split} split" + (
            " (it chose this checkpoint)" if args.split == "val" else ""
        )
    # Evaluate as the run did: its precision, memory format, loss (smoothing, class weights) and flip TTA.
    common = {"batch_size": 256, "device": device, "mean": ckpt.meta["mean"], "std": ckpt.meta["std"],
              "channels_last": cfg.data.channels_last}  # fmt: skip
    if imageset.images is None:  # the run streamed its data: so does its evaluation
        loader = loader_for(cfg.data, imageset, train=False, **common)
    else:
        loader = data.BatchLoader.for_eval(
            match_channels(imageset.images, channels), imageset.labels, **common
        )
    top_k = requested_top_k(cfg, len(classes))
    metrics = ClassificationMetrics(len(classes), class_names=classes, top_k=top_k, zero_division=0.0)
    loss_fn = loss_from_config(
        cfg, len(classes), ckpt.meta.get("class_weights"), class_counts=ckpt.meta.get("class_counts")
    )
    if hasattr(loss_fn, "set_epoch"):  # deferred re-weighting: the weights of the checkpoint's last epoch
        loss_fn.set_epoch(max(int(ckpt.meta.get("epoch") or 1) - 1, 0))
    precision = Precision(cfg.precision, device) if precision_runs(cfg.precision, device) else None
    scores = evaluate(
        model,
        loader,
        loss_fn,
        metrics,
        precision=precision,
        flip_tta=args.flip_tta or cfg.eval.flip_tta,
        translate_tta=args.translate_tta or cfg.eval.translate_tta,
    )
    print(f"{ckpt.path} (epoch {ckpt.meta.get('epoch')}) on {described}: {len(imageset)} images")
    counts = ckpt.meta.get("class_counts")
    imbalanced = imbalanced_counts(counts)
    if imbalanced:  # trained on imbalanced labels: macro-F1 first, accuracy (which hides the tail) last
        lead = [key for key in ("macro_f1", "balanced_accuracy") if key in scores]
        order = [*lead, *(key for key in scores if key != "accuracy"), "accuracy"]
        scores = {key: scores[key] for key in order if key in scores}
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in scores.items():
        table.add_row(key, f"{value:.4f}")
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    if imbalanced:
        console.print(
            recall_table(metrics.per_class(), counts, "per-class recall (rarest in training marked)")
        )
    return 0
