import os
from pathlib import Path

import numpy as np
import pytest
import torch

from trickbag.images import list_images, load_csv, load_image_folder, load_images

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


def test_cache_hit_and_miss_on_mtime_change(tmp_path, monkeypatch):
    import trickbag.images as images

    write_folder(tmp_path / "data")
    calls = []
    real = images._decode_files
    monkeypatch.setattr(images, "_decode_files", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_image_folder(tmp_path / "data", num_workers=0, progress=False)
    cache_files = list((tmp_path / "data" / ".trickbag-cache").glob("*.npz"))
    assert len(calls) == 1 and len(cache_files) == 1
    second = load_image_folder(tmp_path / "data", num_workers=0, progress=False)
    assert len(calls) == 1 and torch.equal(first.images, second.images)  # hit
    target = tmp_path / "data" / "dog" / "0.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    load_image_folder(tmp_path / "data", num_workers=0, progress=False)
    assert len(calls) == 2  # miss after an mtime change
    assert not list((tmp_path / "data" / ".trickbag-cache").glob("*.tmp"))  # atomic write left no temp


def test_corrupt_image_is_named_or_skipped_and_listed(tmp_path):
    write_folder(tmp_path / "data")
    bad = tmp_path / "data" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ValueError, match=r"1 image\(s\) could not be decoded: .*broken\.jpg"):
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


def test_unwritable_root_falls_back_to_home_cache(tmp_path, monkeypatch):
    write_folder(tmp_path / "data")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m: False if ".trickbag-cache" in str(p) else real_access(p, m)
    )
    load_image_folder(tmp_path / "data", num_workers=0, progress=False)
    assert list((tmp_path / "home" / ".cache" / "trickbag").glob("*.npz"))


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
