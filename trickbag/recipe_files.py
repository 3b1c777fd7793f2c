"""The recipes shipped inside the package (``trickbag/recipes/*.yaml``): list them, find one by name or path.

``trickbag train digits`` and ``trickbag train recipes/digits.yaml`` name the same file; the repository's
``recipes/`` is a link to the packaged folder, so the README's paths keep working in a checkout, and an
installed trickbag finds its recipes by name from any folder.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_RECIPE", "RECIPES_DIR", "list_recipes", "recipe_path"]

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = "digits"  # sklearn's bundled 8x8 digits: trains in seconds, downloads nothing


def list_recipes() -> dict[str, str]:
    """{name: the first comment line of its YAML (what it is for)}, sorted by name."""
    recipes = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                first = line.lstrip("#").strip()
                break
        recipes[path.stem] = first
    return recipes


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """The YAML file of a recipe: an existing file path wins, else a packaged recipe name (".yaml" optional).

    Raises:
        ValueError: neither an existing file nor a packaged name; the message lists the names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path).removesuffix(".yaml")
    if name in list_recipes():
        return RECIPES_DIR / f"{name}.yaml"
    raise ValueError(
        f"config {str(name_or_path)!r}: no such file, and no packaged recipe of that name; "
        f"recipes: {', '.join(list_recipes())} (or give the path of a YAML file)"
    )
