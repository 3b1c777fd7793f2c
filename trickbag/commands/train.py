"""``trickbag train | eval | predict | resume | report``: the product's commands.

Nothing heavy is imported at module level (``trickbag --help`` stays fast); the handlers import torch and the
rest of trickbag when they run. The wiring from a config to the trainer's parts lives in ``trickbag.run``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trickbag.run import (
    Run,
    align_classes,
    build_run,
    load_datasets,
    load_model,
    loss_from_config,
    match_channels,
    new_run_dir,
    resolve_device,
)

TRAIN_EPILOG = """examples:
  trickbag train recipes/digits.yaml                         the embedded default (sklearn digits, ~10 s on CPU)
  trickbag train recipes/digits.yaml epochs=3 optimizer.lr=0.2 name=quick
  trickbag train recipes/cifar10_fast.yaml data.root=/data/cifar10 precision=bf16
  trickbag train --resume runs/digits-001                    same as `trickbag resume runs/digits-001`

A run folder runs/<name>-NNN/ gets config.yaml, train.log, metrics.csv and the checkpoints
last/, best_loss/ and best_metric/ (symlinks to folders named with epoch and value).
"""
EVAL_EPILOG = """examples:
  trickbag eval runs/digits-001/best_metric                  the run's own evaluation set
  trickbag eval runs/digits-001 --data /data/cifar10/test    an image folder with one subfolder per class
"""
PREDICT_EPILOG = """examples:
  trickbag predict runs/digits-001/best_metric images/ --out predictions.csv
  trickbag predict runs/cifar-003/best_loss a.jpg b.png --out p.csv --flip-tta

CSV columns: path,label,predicted,p_<class>... (label: the class subfolder name when it is a known class).
"""
RESUME_EPILOG = """examples:
  trickbag resume runs/digits-001        continue from runs/digits-001/last (bit-exact on CPU when deterministic)
"""
REPORT_EPILOG = """examples:
  trickbag report runs/digits-001        writes runs/digits-001/report.png and report.html
"""


def register(subparsers) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    train = subparsers.add_parser(
        "train",
        help="train a classifier from a YAML config",
        formatter_class=formatter,
        epilog=TRAIN_EPILOG,
        description="Train a classifier from a YAML config, with key.sub=value overrides.",
    )
    train.add_argument("config", nargs="?", help="YAML config (e.g. recipes/digits.yaml)")
    # REMAINDER so that options may also follow the overrides (`train cfg.yaml epochs=3 --quiet`).
    train.add_argument(
        "overrides", nargs=argparse.REMAINDER, help="key.sub=value overrides, e.g. epochs=5 optimizer.lr=0.2"
    )
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    train.add_argument("--quiet", action="store_true", help="no console output except the final summary")
    train.set_defaults(func=handle_train, print_help=train.print_help)

    evaluate = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint",
        formatter_class=formatter,
        epilog=EVAL_EPILOG,
        description="Evaluate a checkpoint (folder, run_dir/best_metric, or a run folder) and print its metrics.",
    )
    evaluate.add_argument("checkpoint", help="checkpoint folder or run folder (uses its best_metric)")
    evaluate.add_argument("--data", help="image folder with class subfolders (default: the run's eval set)")
    evaluate.add_argument(
        "--flip-tta",
        action="store_true",
        help="average with mirrored images (default: as the run's eval.flip_tta)",
    )
    evaluate.set_defaults(func=handle_eval)

    predict = subparsers.add_parser(
        "predict",
        help="write class probabilities for images",
        formatter_class=formatter,
        epilog=PREDICT_EPILOG,
        description="Predict classes of images (files or folders, searched recursively) into a CSV file.",
    )
    predict.add_argument("checkpoint", help="checkpoint folder or run folder (uses its best_metric)")
    predict.add_argument("images", nargs="+", help="image files and/or folders")
    predict.add_argument("--out", required=True, help="CSV file to write")
    predict.add_argument(
        "--flip-tta",
        action="store_true",
        help="average with mirrored images (default: as the run's eval.flip_tta)",
    )
    predict.add_argument("--batch-size", type=int, default=256)
    predict.set_defaults(func=handle_predict)

    resume = subparsers.add_parser(
        "resume",
        help="continue a stopped run",
        formatter_class=formatter,
        epilog=RESUME_EPILOG,
        description="Continue a run from its last checkpoint with the run's saved config.",
    )
    resume.add_argument("run_dir")
    resume.add_argument("--quiet", action="store_true")
    resume.set_defaults(
        func=lambda args: handle_train(
            argparse.Namespace(config=None, overrides=[], resume=args.run_dir, quiet=args.quiet)
        )
    )

    report = subparsers.add_parser(
        "report",
        help="plot curves, confusion matrix, per-class F1",
        formatter_class=formatter,
        epilog=REPORT_EPILOG,
        description="Write report.png and a self-contained report.html into a run folder.",
    )
    report.add_argument("run_dir")
    report.set_defaults(func=handle_report)


# ---------------------------------------------------------------------------------------------------------------
# Handlers


def _options_among_overrides(args) -> None:
    """Move --quiet / --resume X that followed the overrides back to ``args``; other dashes are an error."""
    rest, overrides = list(args.overrides), []
    while rest:
        item = rest.pop(0)
        if item == "--quiet":
            args.quiet = True
        elif item == "--resume" and rest:
            args.resume = rest.pop(0)
        elif item in ("-h", "--help"):
            args.help_requested = True
        elif item.startswith("-"):
            raise ValueError(
                f"unknown option {item!r} for trickbag train (options: --resume RUN_DIR, --quiet)"
            )
        else:
            overrides.append(item)
    args.overrides = overrides


def handle_train(args) -> int:
    from trickbag.checkpoint import load_checkpoint
    from trickbag.config import load_config
    from trickbag.train import NonFiniteLossError, fit, restore_training_state

    _options_among_overrides(args)
    if getattr(args, "help_requested", False):
        args.print_help()
        return 0
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
        if args.config or args.overrides:
            raise ValueError("--resume takes no CONFIG or overrides: the run's own config.yaml is used")
        cfg = load_config(run_dir / "config.yaml")
        run = build_run(cfg, run_dir, quiet=args.quiet)
        last = run.parts.checkpointer.latest("last")
        state = None
        if last is None:
            run.parts.logger.info("no `last` checkpoint yet: starting the run from the beginning")
        else:
            ckpt = load_checkpoint(last, default_kind="last")
            run.model.load_state_dict(ckpt.weights)
            state = restore_training_state(ckpt.state, run.loaders, run.parts)
            run.parts.logger.info(f"resumed from {last.name} (epoch {state.epoch} of {cfg.epochs})")
    else:
        if not args.config:
            raise ValueError(
                "trickbag train needs a CONFIG file (e.g. recipes/digits.yaml) or --resume RUN_DIR"
            )
        cfg = load_config(args.config, args.overrides)
        run_dir = new_run_dir(cfg.output_dir, cfg.name)
        run = build_run(cfg, run_dir, quiet=args.quiet)
        state = None
    try:
        state = fit(run.model, run.loaders, run.parts, run.cfg, state)
    except NonFiniteLossError as error:
        run.parts.logger.info(f"stopped: {error}")
        print(f"trickbag train: stopped: {error}", file=sys.stderr)
        return 3
    finally:
        run.parts.logger.close()
    print_summary(run, state)
    return 0


def print_summary(run: Run, state) -> None:
    """The end-of-run table: the epochs and scores of the best and last checkpoints, then where they are."""
    from rich.console import Console
    from rich.table import Table

    metric = run.cfg.eval.best_metric
    keys = list(dict.fromkeys(["val_loss", metric, "accuracy", "macro_f1"]))
    table = Table(title=f"trickbag run {run.run_dir}", title_justify="left")
    table.add_column("checkpoint", no_wrap=True)
    table.add_column("epoch", justify="right", no_wrap=True)
    for key in keys:
        table.add_column(key, justify="right", no_wrap=True)
    for kind in ("best_metric", "best_loss", "last"):
        if run.parts.checkpointer.latest(kind) is None:
            continue
        epoch = {"best_metric": state.best_metric_epoch, "best_loss": state.best_loss_epoch}.get(
            kind, state.epoch
        )
        row = state.history[epoch - 1] if 0 < epoch <= len(state.history) else {}
        cells = [f"{row[key]:.4f}" if isinstance(row.get(key), float) else "-" for key in keys]
        table.add_row(f"{run.run_dir}/{kind}", str(epoch), *cells)
    # Not a terminal (CI, a pipe): wide enough that nothing is cut.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)
    if state.stopped_early:
        console.print(f"stopped early after epoch {state.epoch} (early_stopping.patience)")
    console.print(
        f"logs: {run.run_dir}/metrics.csv, {run.run_dir}/train.log; plots: trickbag report {run.run_dir}",
        soft_wrap=True,
    )


def handle_eval(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from trickbag import data
    from trickbag.config import config_from_dict
    from trickbag.metrics import ClassificationMetrics
    from trickbag.precision import Precision
    from trickbag.train import evaluate

    device = resolve_device("auto")
    model, ckpt = load_model(args.checkpoint, device)
    classes, (channels, height, width) = ckpt.meta["classes"], ckpt.meta["image_shape"]
    cfg = config_from_dict(ckpt.meta["config"], str(ckpt.path / "meta.json"))
    if args.data:
        imageset = align_classes(data.load_image_folder(args.data, size=(height, width)), classes)
    else:  # the evaluation set the run itself used (same seed, same split)
        _, imageset = load_datasets(cfg)
    images = match_channels(imageset.images, channels)
    # Evaluate as the run did: its precision, memory format, loss (smoothing, class weights) and flip TTA.
    loader = data.BatchLoader.for_eval(
        images, imageset.labels, batch_size=256, device=device, mean=ckpt.meta["mean"], std=ckpt.meta["std"],
        channels_last=cfg.data.channels_last,
    )  # fmt: skip
    metrics = ClassificationMetrics(len(classes), class_names=classes, zero_division=0.0)
    loss_fn = loss_from_config(cfg, len(classes), ckpt.meta.get("class_weights"))
    precision = Precision(cfg.precision, device) if _precision_runs(cfg.precision, device) else None
    scores = evaluate(
        model, loader, loss_fn, metrics, precision=precision, flip_tta=args.flip_tta or cfg.eval.flip_tta
    )
    print(f"{ckpt.path} on {args.data or 'its evaluation set'} ({len(images)} images)")
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in scores.items():
        table.add_row(key, f"{value:.4f}")
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0


def _precision_runs(policy: str, device) -> bool:
    """Whether ``policy`` works on ``device`` (a bf16 GPU run evaluated on a CPU-only machine falls back)."""
    from trickbag.precision import check_precision

    try:
        check_precision(policy, device)
    except ValueError:
        return False
    return True


def handle_predict(args) -> int:
    import csv

    from trickbag import data
    from trickbag.config import config_from_dict
    from trickbag.precision import Precision
    from trickbag.train import predict_probabilities

    device = resolve_device("auto")
    model, ckpt = load_model(args.checkpoint, device)
    classes, (channels, height, width) = ckpt.meta["classes"], ckpt.meta["image_shape"]
    paths, labels = [], []
    for item in args.images:
        for file in map(Path, data.list_images(item)):
            paths.append(file)
            # The true class is known when the image sits in a folder named after a class (root/<class>/x.jpg).
            labels.append(file.parent.name if Path(item).is_dir() and file.parent.name in classes else "")
    images = match_channels(data.load_images([str(p) for p in paths], size=(height, width)), channels)
    cfg = config_from_dict(ckpt.meta["config"], str(ckpt.path / "meta.json"))
    loader = data.BatchLoader.for_eval(
        images, None, batch_size=args.batch_size, device=device, mean=ckpt.meta["mean"], std=ckpt.meta["std"],
        channels_last=cfg.data.channels_last,
    )  # fmt: skip
    precision = Precision(cfg.precision, device) if _precision_runs(cfg.precision, device) else None
    probs = predict_probabilities(
        model, loader, precision=precision, flip_tta=args.flip_tta or cfg.eval.flip_tta
    )
    predicted = probs.argmax(1).tolist()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "predicted", *(f"p_{name}" for name in classes)])
        for path, label, index, row in zip(paths, labels, predicted, probs.tolist()):
            writer.writerow([str(path), label, classes[index], *(f"{p:.6f}" for p in row)])
    print(f"wrote {len(paths)} predictions to {out}")
    return 0


def handle_report(args) -> int:
    from trickbag.report import write_report

    png, page = write_report(args.run_dir)
    print(f"wrote {png} and {page}")
    return 0
