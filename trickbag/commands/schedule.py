"""``trickbag schedule``: see the learning-rate curve a config will produce, before training with it."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

EPILOG = """examples:
  trickbag schedule plot digits --steps-per-epoch 23 --out lr.png
  trickbag schedule plot run.yaml --num-train 50000 --epochs 30 --out lr.png
  trickbag schedule show run.yaml --steps-per-epoch 391
  trickbag schedule show plateau.yaml --steps-per-epoch 10 --metrics 0.9,0.8,0.8,0.8,0.7

Only the YAML's `schedule:` and `optimizer:` sections and the top-level `epochs`, `batch_size` and
`accumulate` are read; other sections are ignored. The plotted LR is the optimizer's lr scaled to the
effective batch (batch_size x accumulate) when optimizer.scale_lr is true. Updates per epoch come from
--steps-per-epoch, or from --num-train as the trainer counts them: full micro-batches only (drop_last), then
ceil(micro-batches / accumulate).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "schedule",
        help="plot or print the learning-rate schedule of a config",
        description="Plot or print the learning rate of every optimizer update that a config's schedule gives.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="schedule_command", metavar="ACTION", required=True)
    plot = actions.add_parser(
        "plot",
        help="write the LR curve as a PNG",
        description="Write the LR curve of CONFIG as a PNG (x axis in epochs).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show = actions.add_parser(
        "show",
        help="print the LR at epoch boundaries",
        description="Print a table of the LR at the start of each epoch (at most --rows rows).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for action in (plot, show):
        action.add_argument("config", type=Path, metavar="CONFIG.yaml", help="run config (YAML)")
        action.add_argument("--steps-per-epoch", type=int, help="optimizer updates per epoch")
        action.add_argument("--num-train", type=int, help="training images, to derive --steps-per-epoch")
        action.add_argument("--epochs", type=int, help="override the config's epochs")
        action.add_argument("--metrics", help="plateau only: comma-separated metric per epoch, e.g. 0.9,0.8")
    plot.add_argument("--out", type=Path, default=Path("lr.png"), help="PNG to write (default: lr.png)")
    show.add_argument("--rows", type=int, default=20, help="maximum table rows (default: 20)")
    plot.set_defaults(func=run_plot)
    show.set_defaults(func=run_show)


def load_schedule_setup(args: argparse.Namespace) -> dict[str, Any]:
    """Read and validate what the curve needs; every problem names the file and the key."""
    import yaml
    from pydantic import ValidationError

    from trickbag.config import Config, OptimizerConfig, ScheduleConfig
    from trickbag.optim import scale_lr
    from trickbag.recipe_files import recipe_path

    if not Path(args.config).is_file() and Path(args.config).suffix in (".yaml", ".yml"):
        raise FileNotFoundError(f"config file not found: {args.config}")
    path = recipe_path(args.config)  # a file, or a packaged recipe by name
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")

    problems, models = [], {}
    for section, model in (("schedule", ScheduleConfig), ("optimizer", OptimizerConfig)):
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            problems.append(f"{path}: {section} must be a mapping of keys, got {type(values).__name__}")
            continue
        try:
            models[section] = model(**values)
        except ValidationError as error:
            problems.extend(_describe(path, section, error))

    # Defaults of the top-level keys live once, in trickbag.config.
    defaults = {name: Config.model_fields[name].default for name in ("epochs", "batch_size", "accumulate")}
    top = {name: raw.get(name, default) for name, default in defaults.items()}
    if args.epochs is not None:
        top["epochs"] = args.epochs
    for name, value in top.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{path}: {name}={value!r}: must be an int >= 1")
    if problems:
        raise ValueError("\n".join(problems))

    steps_per_epoch = args.steps_per_epoch
    if steps_per_epoch is None:
        if args.num_train is None:
            raise ValueError(
                f"{path}: the number of optimizer updates per epoch depends on the data set size; "
                "give --steps-per-epoch N or --num-train N"
            )
        if args.num_train < 1:
            raise ValueError(f"--num-train must be >= 1, got {args.num_train}")
        # As trickbag train: the last partial micro-batch is dropped, a partial accumulation group is flushed.
        micro_batches = max(1, args.num_train // top["batch_size"])
        steps_per_epoch = math.ceil(micro_batches / top["accumulate"])
    if steps_per_epoch < 1:
        raise ValueError(f"--steps-per-epoch must be >= 1, got {steps_per_epoch}")

    optimizer = models["optimizer"]
    effective_batch = top["batch_size"] * top["accumulate"]
    base_lr = scale_lr(optimizer.lr, effective_batch, base_batch_size=optimizer.ref_batch_size)
    return {
        "schedule": models["schedule"],
        "base_lr": base_lr if optimizer.scale_lr else optimizer.lr,
        "steps_per_epoch": steps_per_epoch,
        "epochs": top["epochs"],
        "metrics": _parse_metrics(args.metrics),
    }


def _describe(path: Path, section: str, error: Any) -> list[str]:
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        key = ".".join(str(part) for part in item["loc"])
        if key:
            lines.append(f"{path}: {section}.{key}={item['input']!r}: {message}")
        else:
            lines.append(f"{path}: {section}: {message}")
    return lines


def _parse_metrics(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise ValueError(f"--metrics must be comma-separated numbers, got {text!r}") from None


def _curve(setup: dict[str, Any]) -> list[float]:
    from trickbag.schedules import lr_curve

    # The section's fields are the Scheduler's keyword arguments (as trickbag.config.build_scheduler maps them).
    return lr_curve(
        **setup["schedule"].model_dump(),
        base_lr=setup["base_lr"],
        steps_per_epoch=setup["steps_per_epoch"],
        epochs=setup["epochs"],
        metrics=setup["metrics"],
    )


def run_plot(args: argparse.Namespace) -> int:
    from trickbag.schedules import plot_lr_curve

    setup = load_schedule_setup(args)
    lrs = _curve(setup)
    cfg = setup["schedule"]
    title = f"{cfg.kind} ({cfg.interval}), peak lr {max(lrs):.4g}, {setup['steps_per_epoch']} updates/epoch"
    path = plot_lr_curve(lrs, args.out, steps_per_epoch=setup["steps_per_epoch"], title=title)
    print(f"wrote {path} ({len(lrs)} updates, {setup['epochs']} epochs)")
    return 0


def run_show(args: argparse.Namespace) -> int:
    if args.rows < 2:
        raise ValueError(f"--rows must be >= 2, got {args.rows}")
    setup = load_schedule_setup(args)
    lrs = _curve(setup)
    steps, epochs = setup["steps_per_epoch"], setup["epochs"]
    every = math.ceil(epochs / (args.rows - 1))
    shown = sorted(set(range(0, epochs, every)) | {epochs - 1})
    cfg = setup["schedule"]
    print(
        f"schedule {cfg.kind}, interval {cfg.interval}, base lr {setup['base_lr']:.6g}, {steps} updates/epoch"
    )
    print(f"{'epoch':>6} {'update':>8} {'lr':>12}")
    for epoch in shown:
        print(f"{epoch:>6} {epoch * steps:>8} {lrs[epoch * steps]:>12.6g}")
    print(f"{'last':>6} {len(lrs) - 1:>8} {lrs[-1]:>12.6g}")
    return 0
