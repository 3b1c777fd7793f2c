import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from trickbag import cache
from trickbag.images import list_images, load_csv, load_image_folder, load_images


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Every test gets its own user cache folder (never the real ~/.cache)."""
    folder = tmp_path / "user-cache"
    monkeypatch.setenv("TRICKBAG_CACHE_DIR", str(folder))
    return folder


def tree(root):
    """Every path under ``root`` with its size and mtime: to show nothing was written there."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*")}


# ------------------------------------------------------------------------------------------------ image folders


def write_folder(root, counts=None, size=(6, 5), fmt="png"):
    """root/<class>/<i>.<fmt> with deterministic random RGB images; returns {path: (H, W, 3) array}."""
    from PIL import Image

    counts = counts or {"cat": 3, "dog": 2}
    rng = np.random.default_rng(0)
    arrays = {}
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            array = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
            path = root / name / f"{i}.{fmt}"
            Image.fromarray(array).save(path)
            arrays[str(path)] = array
    return arrays


def test_load_image_folder_decodes_pngs_exactly(tmp_path):
    arrays = write_folder(tmp_path / "data")
    (tmp_path / "data" / "cat" / "notes.txt").write_text("not an image")
    imageset = load_image_folder(tmp_path / "data", num_workers=0, progress=False)
    assert imageset.classes == ["cat", "dog"]
    assert imageset.labels.tolist() == [0, 0, 0, 1, 1]
    assert imageset.images.shape == (5, 3, 6, 5) and imageset.images.dtype == torch.uint8
    for image, path in zip(imageset.images, imageset.paths):
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), arrays[path])
    assert imageset.skipped == []


def test_load_image_folder_parallel_equals_serial(tmp_path):
    write_folder(tmp_path / "data", {"a": 40, "b": 30}, size=(4, 4), fmt="jpg")
    serial = load_image_folder(tmp_path / "data", num_workers=0, cache_dir=tmp_path / "c1", progress=False)
    parallel = load_image_folder(tmp_path / "data", num_workers=2, cache_dir=tmp_path / "c2", progress=False)
    assert torch.equal(serial.images, parallel.images) and serial.paths == parallel.paths


def test_greyscale_and_rgba_become_rgb(tmp_path):
    from PIL import Image

    (tmp_path / "x").mkdir()
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey, mode="L").save(tmp_path / "x" / "grey.png")
    rgba = np.full((3, 4, 4), 7, dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "x" / "rgba.png")
    imageset = load_image_folder(tmp_path, num_workers=0, progress=False)
    names = [Path(p).name for p in imageset.paths]
    grey_image = imageset.images[names.index("grey.png")]
    assert all(torch.equal(grey_image[c], torch.from_numpy(grey)) for c in range(3))
    assert torch.equal(imageset.images[names.index("rgba.png")], torch.full((3, 3, 4), 7, dtype=torch.uint8))


def test_cache_hit_and_miss_on_mtime_change(tmp_path, monkeypatch, user_cache):
    import trickbag.images as images

    write_folder(tmp_path / "data")
    before = tree(tmp_path / "data")
    calls = []
    real = images._decode_files
    monkeypatch.setattr(images, "_decode_files", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_image_folder(tmp_path / "data", num_workers=0, progress=False)
    cache_files = list(user_cache.glob("*.npz"))
    assert len(calls) == 1 and len(cache_files) == 1
    assert tree(tmp_path / "data") == before  # nothing written into the dataset folder
    second = load_image_folder(tmp_path / "data", num_workers=0, progress=False)
    assert len(calls) == 1 and torch.equal(first.images, second.images)  # hit
    target = tmp_path / "data" / "dog" / "0.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    load_image_folder(tmp_path / "data", num_workers=0, progress=False)
    assert len(calls) == 2  # miss after an mtime change
    assert not list(user_cache.glob("*.tmp"))  # atomic write left no temp
    assert len(cache.list_entries(user_cache)) == 2


def test_corrupt_image_is_named_or_skipped_and_listed(tmp_path):
    write_folder(tmp_path / "data")
    bad = tmp_path / "data" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(
        ValueError, match=r"1 image\(s\) could not be decoded: .*broken\.jpg.*data\.skip_bad_images=true"
    ):
        load_image_folder(tmp_path / "data", num_workers=0, progress=False)
    with pytest.warns(UserWarning, match="broken.jpg"):
        imageset = load_image_folder(tmp_path / "data", num_workers=0, progress=False, skip_bad_images=True)
    assert imageset.skipped == [str(bad.resolve())]
    assert len(imageset) == 5 and str(bad.resolve()) not in imageset.paths
    # The cached result still refuses without skip_bad_images.
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image_folder(tmp_path / "data", num_workers=0, progress=False)


def test_mixed_sizes_error_and_resize(tmp_path):
    write_folder(tmp_path / "data", {"a": 2}, size=(6, 5))
    write_folder(tmp_path / "data", {"b": 1}, size=(7, 7))
    with pytest.raises(ValueError, match=r"images differ in size: .*0\.png' is 6x5 but .*b/0\.png' is 7x7"):
        load_image_folder(tmp_path / "data", num_workers=0, progress=False)
    resized = load_image_folder(tmp_path / "data", num_workers=0, progress=False, size=(4, 4))
    assert resized.images.shape == (3, 3, 4, 4)
    with pytest.raises(ValueError, match=r"size must be None or \(H, W\)"):
        load_image_folder(tmp_path / "data", size=(4, 0))


def test_folder_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; expected root/<class name>"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no class subfolders; expected root/<class name>"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(ValueError, match="no images in the class subfolders"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="num_workers must be an int >= 0"):
        write_folder(tmp_path / "ok")
        load_image_folder(tmp_path / "ok", num_workers=-1, cache_dir=tmp_path / "c")


def test_cache_location_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TRICKBAG_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.cache_folder() == tmp_path / "home" / ".cache" / "trickbag"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_folder() == tmp_path / "xdg" / "trickbag"
    monkeypatch.setenv("TRICKBAG_CACHE_DIR", str(tmp_path / "env"))
    assert cache.cache_folder() == tmp_path / "env"
    assert cache.cache_folder(tmp_path / "arg") == tmp_path / "arg"
    write_folder(tmp_path / "data")
    load_image_folder(tmp_path / "data", num_workers=0, progress=False)
    assert [p.suffix for p in (tmp_path / "env").iterdir() if p.suffix == ".npz"] == [".npz"]


def test_read_only_dataset_folder_works_and_is_not_written(tmp_path, user_cache):
    write_folder(tmp_path / "data")
    before = tree(tmp_path / "data")
    for path in [tmp_path / "data", *(tmp_path / "data").rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        first = load_image_folder(tmp_path / "data", num_workers=0, progress=False)
        second = load_image_folder(tmp_path / "data", num_workers=0, progress=False)
    finally:
        for path in [tmp_path / "data", *(tmp_path / "data").rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert torch.equal(first.images, second.images) and len(first) == 5
    # As root (CI) chmod does not stop writes, so check what matters: nothing was written there.
    assert tree(tmp_path / "data") == before and len(list(user_cache.glob("*.npz"))) == 1


def test_two_datasets_with_the_same_file_names_never_collide(tmp_path, user_cache):
    a = write_folder(tmp_path / "a", fmt="bmp")
    (tmp_path / "b").mkdir()
    for path in a:  # same names, sizes and mtimes; other pixels
        target = tmp_path / "b" / Path(path).relative_to(tmp_path / "a")
        target.parent.mkdir(exist_ok=True)
        data = bytearray(Path(path).read_bytes())
        data[-2] ^= 0xFF  # the last byte of a BMP row may be padding
        target.write_bytes(bytes(data))
        os.utime(target, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns))
    first = load_image_folder(tmp_path / "a", num_workers=0, progress=False)
    second = load_image_folder(tmp_path / "b", num_workers=0, progress=False)
    assert not torch.equal(first.images, second.images)
    assert sorted(e.source for e in cache.list_entries(user_cache)) == [
        str(tmp_path / "a"),
        str(tmp_path / "b"),
    ]


def test_unusable_cache_folder_warns_and_still_decodes(tmp_path, monkeypatch):
    write_folder(tmp_path / "data")
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.warns(UserWarning, match="cannot be used .*decoding without a cache"):
        imageset = load_image_folder(
            tmp_path / "data", num_workers=0, progress=False, cache_dir=tmp_path / "file" / "c"
        )
    assert len(imageset) == 5


# ------------------------------------------------------------------------------------------------ cache index


def make_entry(folder, name, size, last_used):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.npz"
    path.write_bytes(b"x" * size)
    cache.record_use(path, f"/data/{name}", now=last_used)
    return path


def test_index_records_use_and_prune_by_age_then_size(tmp_path):
    day, now = 24 * 3600.0, 1_000_000_000.0
    old = make_entry(tmp_path, "old", 10, now - 31 * day)
    mid = make_entry(tmp_path, "mid", 300, now - 5 * day)
    new = make_entry(tmp_path, "new", 300, now - 1 * day)
    entries = cache.list_entries(tmp_path)
    assert [(e.path.name, e.bytes, e.last_used, e.source) for e in entries] == [
        ("new.npz", 300, now - day, "/data/new"),
        ("mid.npz", 300, now - 5 * day, "/data/mid"),
        ("old.npz", 10, now - 31 * day, "/data/old"),
    ]
    # Age first (default 30 days): only "old" goes; 610 bytes left fit the cap.
    assert cache.prune(tmp_path, max_bytes=1000, now=now) == [old]
    # Size cap: least recently used first, until the rest fits; a kept entry is never removed.
    assert cache.prune(tmp_path, max_bytes=500, now=now, keep=(mid,)) == [new]
    assert [e.path for e in cache.list_entries(tmp_path)] == [mid] and mid.exists() and not new.exists()
    with pytest.raises(ValueError, match="max_age_days and max_bytes must be >= 0"):
        cache.prune(tmp_path, max_age_days=-1)


def test_prune_leaves_temp_files_being_written(tmp_path):
    now = 1_000_000_000.0
    fresh, stale = tmp_path / "tmpfresh.tmp", tmp_path / "tmpstale.tmp"
    for path, age in ((fresh, 60), (stale, 2 * 24 * 3600)):
        path.write_bytes(b"partial")
        os.utime(path, (now - age, now - age))
    cache.prune(tmp_path, max_bytes=0, now=now)
    assert fresh.exists() and not stale.exists()


def test_clear_all_or_older_than(tmp_path):
    day, now = 24 * 3600.0, 1_000_000_000.0
    old = make_entry(tmp_path, "old", 10, now - 8 * day)
    new = make_entry(tmp_path, "new", 10, now - 1 * day)
    assert cache.clear(tmp_path, older_than_days=7, now=now) == [old]
    assert cache.clear(tmp_path) == [new] and cache.list_entries(tmp_path) == []
    assert json.loads((tmp_path / "index.json").read_text()) == {}


# ------------------------------------------------------------------------------------------------ CSV, predict


def test_load_csv_names_ints_and_relative_paths(tmp_path):
    arrays = write_folder(tmp_path / "imgs", {"cat": 2, "dog": 1})
    (tmp_path / "list.csv").write_text(
        "path,label\nimgs/cat/0.png,cat\nimgs/dog/0.png,dog\nimgs/cat/1.png,cat\n"
    )
    imageset = load_csv(tmp_path / "list.csv", num_workers=0, progress=False)
    assert imageset.classes == ["cat", "dog"] and imageset.labels.tolist() == [0, 1, 0]
    np.testing.assert_array_equal(
        imageset.images[1].permute(1, 2, 0).numpy(), arrays[str(tmp_path / "imgs" / "dog" / "0.png")]
    )
    (tmp_path / "ints.csv").write_text("path, label\ncat/0.png,2\ndog/0.png,0\n")
    by_int = load_csv(tmp_path / "ints.csv", root=tmp_path / "imgs", num_workers=0, progress=False)
    assert by_int.classes == ["0", "1", "2"] and by_int.labels.tolist() == [2, 0]


def test_load_csv_errors(tmp_path):
    write_folder(tmp_path, {"cat": 1})
    (tmp_path / "missing.csv").write_text("path,label\ncat/0.png,cat\ncat/9.png,cat\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.csv line 3: image 'cat/9\.png' not found"):
        load_csv(tmp_path / "missing.csv")
    (tmp_path / "header.csv").write_text("file,class\ncat/0.png,cat\n")
    with pytest.raises(ValueError, match="columns 'path' and 'label'"):
        load_csv(tmp_path / "header.csv")
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(ValueError, match="no rows"):
        load_csv(tmp_path / "empty.csv")
    (tmp_path / "blank.csv").write_text("path,label\ncat/0.png,\n")
    with pytest.raises(ValueError, match="line 2: empty path or label"):
        load_csv(tmp_path / "blank.csv")
    (tmp_path / "neg.csv").write_text("path,label\ncat/0.png,-1\n")
    with pytest.raises(ValueError, match="line 2: integer labels must be >= 0"):
        load_csv(tmp_path / "neg.csv")
    with pytest.raises(FileNotFoundError, match="CSV file"):
        load_csv(tmp_path / "nope.csv")


def test_list_images_and_load_images(tmp_path):
    arrays = write_folder(tmp_path / "d", {"a": 2, "b": 1})
    (tmp_path / "d" / "readme.md").write_text("x")
    found = list_images(tmp_path / "d")
    assert found == sorted(arrays)
    assert list_images(found[0]) == [found[0]]
    images = load_images(found)
    assert images.shape == (3, 3, 6, 5)
    np.testing.assert_array_equal(images[2].permute(1, 2, 0).numpy(), arrays[found[2]])
    with pytest.raises(FileNotFoundError, match="no such image file or folder"):
        list_images(tmp_path / "nothing")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "none")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.png"):
        load_images([str(tmp_path / "bad.png")])
