"""Recipes shipped in the package: listing, lookup by name or path, `trickbag recipes`, `trickbag train NAME`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trickbag.cli import main
from trickbag.config import load_config
from trickbag.recipe_files import DEFAULT_RECIPE, RECIPES_DIR, list_recipes, recipe_path

REPO = Path(__file__).resolve().parents[1]
TINY = ["epochs=1", "batch_size=64", "threads=1", "model.options={width: 8}"]
NAMES = sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def test_list_recipes_names_and_first_comment_lines():
    recipes = list_recipes()
    assert list(recipes) == NAMES and {"digits", "cifar10_fast", "imbalanced_folder"} <= set(NAMES)
    for name, line in recipes.items():
        first = next(t for t in (RECIPES_DIR / f"{name}.yaml").read_text().splitlines() if t.startswith("#"))
        assert line == first.lstrip("# ") and line  # every recipe says what it is for
    assert recipes["digits"].startswith("The embedded default")


@pytest.mark.parametrize("name", NAMES)
def test_packaged_recipes_load(name):
    cfg = load_config(recipe_path(name))
    assert cfg.name == yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())["name"]


def test_repository_recipes_folder_is_the_packaged_one():
    # The README's `trickbag train recipes/digits.yaml` reads the same bytes as `trickbag train digits`.
    assert (REPO / "recipes").resolve() == RECIPES_DIR
    assert sorted(p.name for p in (REPO / "recipes").glob("*.yaml")) == [f"{n}.yaml" for n in NAMES]


def test_recipe_path_by_name_by_path_and_unknown(tmp_path, monkeypatch):
    assert recipe_path("digits") == RECIPES_DIR / "digits.yaml"
    assert recipe_path("digits.yaml") == RECIPES_DIR / "digits.yaml"
    given = REPO / "recipes" / "digits.yaml"
    assert (
        recipe_path(given) == given
    )  # a path is returned as given (error messages name what the user typed)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits.yaml").write_text("name: mine\n")
    assert recipe_path("digits.yaml") == Path("digits.yaml")  # an existing file wins over a packaged name
    with pytest.raises(ValueError, match="no packaged recipe") as error:
        recipe_path("digitz")
    assert all(name in str(error.value) for name in NAMES)


def test_recipes_command_prints_one_line_each(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, description in list_recipes().items():
        rows = [line for line in lines if f" {name} " in line]
        assert len(rows) == 1 and description in rows[0], name
    assert any(f"{DEFAULT_RECIPE} (default)" in line for line in lines)


def _run_dirs(output: Path) -> list[Path]:
    return sorted(p for p in output.iterdir() if p.is_dir())


def test_train_by_name_and_default(tmp_path, capsys):
    assert main(["train", "digits", *TINY, f"output_dir={tmp_path / 'named'}", "--quiet"]) == 0
    (named,) = _run_dirs(tmp_path / "named")
    assert "default" not in capsys.readouterr().err
    # No CONFIG, the first override in its place: the embedded default, said in one line.
    assert main(["train", *TINY, f"output_dir={tmp_path / 'default'}", "--quiet"]) == 0
    (default,) = _run_dirs(tmp_path / "default")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "embedded default recipe 'digits'" in err
    assert named.name == default.name == "digits-001"
    assert (named / "config.yaml").read_text() == (default / "config.yaml").read_text().replace(
        str(tmp_path / "default"), str(tmp_path / "named")
    )


def test_train_unknown_name_lists_the_recipes(tmp_path, capsys):
    assert main(["train", "digitz", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trickbag train: error: config 'digitz'") and all(name in err for name in NAMES)
    assert not any(tmp_path.iterdir())  # nothing started
