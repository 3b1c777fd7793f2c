"""``trickbag predict CHECKPOINT IMAGES... --out predictions.csv``: class probabilities for image files."""

from __future__ import annotations

import argparse
from pathlib import Path

from trickbag.commands._common import precision_runs
from trickbag.run import load_model, match_channels, resolve_device

EPILOG = """examples:
  trickbag predict runs/digits-001/best_metric images/ --out predictions.csv
  trickbag predict runs/cifar-003/best_loss a.jpg b.png --out p.csv --flip-tta

CSV columns: path,label,predicted,p_<class>... (label: the class subfolder name when it is a known class).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="write class probabilities for images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Predict classes of images (files or folders, searched recursively) into a CSV file.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder or run folder (uses its best_metric)")
    parser.add_argument("images", nargs="+", help="image files and/or folders")
    parser.add_argument("--out", required=True, help="CSV file to write")
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
    parser.add_argument("--batch-size", type=int, default=256)
    parser.set_defaults(func=handle_predict)


def handle_predict(args) -> int:
    import csv

    from trickbag import data
    from trickbag.config import config_from_dict
    from trickbag.precision import Precision
    from trickbag.streaming import fit_args
    from trickbag.train import predict_probabilities

    device = resolve_device("auto")
    model, ckpt = load_model(args.checkpoint, device)
    classes, channels = ckpt.meta["classes"], ckpt.meta["image_shape"][0]
    paths, labels = [], []
    for item in args.images:
        for file in map(Path, data.list_images(item)):
            paths.append(file)
            # The true class is known when the image sits in a folder named after a class (root/<class>/x.jpg).
            labels.append(file.parent.name if Path(item).is_dir() and file.parent.name in classes else "")
    # Any photo is fitted as the run's evaluation fitted its images (size, aspect, centre crop), from the checkpoint.
    images = match_channels(data.load_images([str(p) for p in paths], **fit_args(ckpt.meta)), channels)
    cfg = config_from_dict(ckpt.meta["config"], str(ckpt.path / "meta.json"))
    loader = data.BatchLoader.for_eval(
        images, None, batch_size=args.batch_size, device=device, mean=ckpt.meta["mean"], std=ckpt.meta["std"],
        channels_last=cfg.data.channels_last,
    )  # fmt: skip
    precision = Precision(cfg.precision, device) if precision_runs(cfg.precision, device) else None
    probs = predict_probabilities(
        model,
        loader,
        precision=precision,
        flip_tta=args.flip_tta or cfg.eval.flip_tta,
        translate_tta=args.translate_tta or cfg.eval.translate_tta,
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
