"""``trickbag recipes``: the recipes shipped with trickbag, one line each."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  trickbag recipes                       list the packaged recipes
  trickbag train digits                  train one by name (the same as recipes/digits.yaml in a checkout)
  trickbag train cifar10_fast data.root=/data/cifar10 epochs=10
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "recipes",
        help="list the packaged recipes (trickbag train NAME)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="List the recipes shipped inside trickbag, with the first line of each.",
    )
    parser.set_defaults(func=handle_recipes)


def handle_recipes(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from trickbag.recipe_files import DEFAULT_RECIPE, RECIPES_DIR, list_recipes

    table = Table(title=f"recipes in {RECIPES_DIR} (trickbag train NAME)", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("what it is", no_wrap=True, overflow="ellipsis")
    for name, line in list_recipes().items():
        table.add_row(name + (" (default)" if name == DEFAULT_RECIPE else ""), line)
    # Not a terminal (a pipe, CI): wide enough that each recipe stays on one line.
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0
