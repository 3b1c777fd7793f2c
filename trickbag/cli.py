"""The ``trickbag`` command line.

Each subcommand lives in ``trickbag/commands/<name>.py`` and exposes ``register(subparsers)``; those modules
import nothing heavy at module level, so ``trickbag --help`` stays fast. Errors a user can fix (bad config,
missing file, full disk) are raised as ``UserError`` subclasses / ``ValueError`` / ``TypeError`` / ``OSError`` and
printed as one line without a traceback, exit code 2; ``--debug`` shows the traceback. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from trickbag import __version__

# Order here is the order shown in --help.
COMMAND_MODULES = (
    "trickbag.commands.train",
    "trickbag.commands.resume",
    "trickbag.commands.evaluate",
    "trickbag.commands.predict",
    "trickbag.commands.report",
    "trickbag.commands.ablate",
    "trickbag.commands.inspect",
    "trickbag.commands.schedule",
    "trickbag.commands.mix",
    "trickbag.commands.recipes",
    "trickbag.commands.cache",
    "trickbag.commands.hardware",
)

EPILOG = """examples:
  trickbag train                                     train the embedded default, digits (no download)
  trickbag recipes                                   the packaged recipes, one line each
  trickbag train cifar10_fast data.root=/data/cifar10 epochs=10
  trickbag train my_recipe.yaml                      any YAML config file
  trickbag resume runs/digits-001                    continue a stopped run
  trickbag predict runs/digits-001/best_metric IMAGES --out predictions.csv
  trickbag inspect /data/cifar10/train               class balance and which metric to trust
  trickbag hardware                                  this CPU, and the precision a recipe gets on it
  trickbag <command> --help                          options and examples of one command
"""


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trickbag",
        description="Train, evaluate and predict with PyTorch image classifiers using the bag of tricks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trickbag {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:  # a command not built yet; the others still work
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("trickbag: interrupted", file=sys.stderr)
        return 130
    # OSError covers a missing file or folder, a permission problem and a full disk ("No space left on device"
    # while a checkpoint is written): all things the user fixes outside trickbag, so one line, not a traceback.
    except (UserError, ValueError, TypeError, OSError) as error:
        if args.debug:
            raise
        print(f"trickbag {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
