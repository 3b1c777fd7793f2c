"""inspect, mix and the loaders list the same image files (one listing: trickbag.images.list_images)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from trickbag.cli import main
from trickbag.commands.inspect import count_image_folder
from trickbag.commands.mix import image_files
from trickbag.images import list_image_folder, list_images, load_image_folder


def _save(path: Path, colour, size=(8, 8), fmt="PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def _tree(root: Path, trap: str | None = None) -> int:
    """A class-folder tree with the usual traps; returns how many files are real, visible class images."""
    _save(root / "a" / "0.png", (255, 0, 0))
    _save(root / "a" / "1.PNG", (0, 255, 0))  # upper-case extension: an image
    _save(root / "a" / ".hidden.png", (0, 0, 255))  # hidden file (e.g. macOS ._ files): not an image
    (root / "a" / "notes.txt").write_text("not an image")
    _save(root / "b" / "0.jpg", (10, 20, 30), fmt="JPEG")
    _save(root / "b" / "1.webp", (30, 20, 10), fmt="WEBP")
    if trap == "nested":
        _save(root / "b" / "sub" / "2.png", (9, 9, 9))  # a folder inside a class folder: its images count
        return 5
    if trap == "hidden_folders":
        _save(root / ".trash" / "x.png", (1, 2, 3))  # a hidden folder in root: no class
        _save(root / "b" / ".thumbs" / "2.png", (9, 9, 9))  # a hidden folder inside a class folder: skipped
    return 4


@pytest.mark.parametrize("trap", [None, "nested", "hidden_folders"])
def test_inspect_mix_and_loader_count_the_same_files(tmp_path, trap, capsys):
    root = tmp_path / "data"
    expected = _tree(root, trap)
    counts, _ = count_image_folder(root)
    assert counts == {"a": 2, "b": expected - 2}
    assert main(["inspect", str(root)]) == 0
    assert f"class balance ({expected} examples)" in capsys.readouterr().out
    assert len(image_files([str(root)])) == expected  # mix
    assert len(list_images(root)) == expected  # predict
    loaded = load_image_folder(root, cache_dir=tmp_path / "cache", num_workers=0, progress=False)
    assert loaded.classes == ["a", "b"]
    assert len(loaded) == expected  # train / eval
    paths, labels, classes = list_image_folder(root)  # the streaming loader's listing
    assert sorted(paths) == sorted(loaded.paths) and classes == ["a", "b"]
    assert labels == loaded.labels.tolist()


def test_mix_grid_decodes_like_the_loader(tmp_path):
    root = tmp_path / "data"
    _tree(root)
    _save(root / "b" / "big.png", (200, 100, 0), size=(16, 12))  # another size: resized to the first's
    out = tmp_path / "mix.png"
    assert main(["mix", "grid", str(root), "--out", str(out), "--n", "3"]) == 0
    assert out.stat().st_size > 0


def test_mix_errors_name_the_input(tmp_path, capsys):
    assert main(["mix", "grid", str(tmp_path / "missing"), "--out", str(tmp_path / "m.png")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["mix", "grid", str(tmp_path / "empty"), "--out", str(tmp_path / "m.png")]) == 2
    assert "no images" in capsys.readouterr().err
