"""``trickbag hardware``: what this machine is, and which precision and layout a recipe's model gets on it."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  trickbag hardware                          this machine, and cifar10_fast's model probed on it
  trickbag hardware digits                   a recipe's model, probed on this machine
  trickbag hardware my.yaml model.options.widths=[96,192] --image-size 32

Nothing is trained and no data is read: the model is built with random weights from the config's model:
section, for inputs of --channels x --image-size x --image-size (defaults: 1 x 8 x 8 for data.kind digits,
else 3 x data.image_size, or 32). The probe is the one `trickbag train` runs with precision: auto and
data.channels_last: auto (one forward+backward of a small batch per candidate), measured afresh here rather
than read from the cache.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "hardware",
        help="this machine's CPU (or GPU) and the precision and layout a recipe would run with here",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Show the CPU model and its relevant instruction sets (or the GPU), then probe a recipe's "
        "model as `trickbag train` does and show each candidate's time and the choice.",
    )
    parser.add_argument("recipe", nargs="?", default="cifar10_fast", help="recipe name or YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for trickbag train")
    parser.add_argument("--image-size", type=int, default=None, help="side of the probe's input images")
    parser.add_argument("--channels", type=int, default=None, help="channels of the probe's input images")
    parser.add_argument("--classes", type=int, default=10, help="outputs of the model's head (default 10)")
    parser.set_defaults(func=handle_hardware)


def probe_input_shape(cfg, channels: int | None, image_size: int | None) -> tuple[int, int, int]:
    """(C, H, W) of the probe's inputs: the options when given, else what the config's data would give."""
    digits = cfg.data.kind == "digits"
    if channels is None:
        channels = 1 if digits else 3
    side = image_size if image_size is not None else cfg.data.image_size or (8 if digits else 32)
    if channels < 1 or side < 1:
        raise ValueError(f"--channels and --image-size must be >= 1, got {channels} and {side}")
    return channels, side, side


def handle_hardware(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from trickbag import hardware
    from trickbag.config import load_config
    from trickbag.parts import apply_runtime_settings, build_model_for
    from trickbag.recipe_files import recipe_path
    from trickbag.run import resolve_device

    cfg = load_config(recipe_path(args.recipe), args.overrides)
    shape = probe_input_shape(cfg, args.channels, args.image_size)  # a bad size fails before any output
    apply_runtime_settings(cfg)  # the recipe's threads, as train has set them when it probes
    device = resolve_device(cfg.device)
    # The run's model, initialisation and layout; built first, so a bad model option fails before any output.
    model = build_model_for(cfg, args.classes, shape[0], device)
    # Not a terminal (a pipe, CI): a fixed width, so the table is not wrapped to 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 120, markup=False, highlight=False)
    info = hardware.device_info(device)
    if device.type == "cuda":
        console.print(f"GPU: {info['model']} (compute capability {info['capability']}, bf16: {info['bf16']})")
    else:
        console.print(f"CPU: {info['model']}")
        console.print(
            f"  flags that decide precision: {', '.join(info['flags']) or 'none of them (or unknown)'}"
        )
        console.print(f"  torch kernels: {info['capability']}; torch threads: {info['threads']}")
    batch = min(cfg.batch_size, hardware.PROBE_BATCH)
    choice = hardware.choose(model, shape, device, precision=cfg.precision,
                             channels_last=cfg.data.channels_last, batch_size=batch)  # fmt: skip
    timings = choice["probe_ms"]
    if timings:
        fastest = min(timings.values())
        chosen = hardware.timing_key(choice["precision"], choice["channels_last"])
        table = Table(
            title=f"model {cfg.model.name} of {args.recipe}, fwd+bwd of {batch} x {'x'.join(map(str, shape))}",
            title_justify="left",
        )
        for column in ("precision/layout", "ms per step", "vs fastest", ""):
            table.add_column(column, justify="left" if not column.startswith(("ms", "vs")) else "right")
        for key, ms in sorted(timings.items(), key=lambda item: item[1]):
            table.add_row(key, f"{ms:.1f}", f"{ms / fastest:.2f}x", "chosen" if key == chosen else "")
        console.print(table)
    else:
        console.print("nothing to probe: precision and layout are fixed by the config")
    console.print(
        f"trickbag train would run precision={choice['precision']}, "
        f"data.channels_last={str(choice['channels_last']).lower()} (asked {cfg.precision}, "
        f"{str(cfg.data.channels_last).lower()}; probe {choice['probe_s']:.2f} s)"
    )
    if choice["warning"]:
        console.print(choice["warning"])
    return 0
