import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trickbag.data import (
    BatchLoader,
    ImageSet,
    channel_stats,
    epoch_generator,
    list_images,
    load_csv,
    load_digits,
    load_image_folder,
    load_images,
    random_crop,
    random_flip,
    split_validation,
)


def make_images(n=10, c=3, h=6, w=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=generator, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------ ImageSet


def test_imageset_rejects_wrong_dtype_and_lengths():
    with pytest.raises(TypeError, match="uint8"):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), ["a"])
    with pytest.raises(TypeError, match="int64"):
        ImageSet(make_images(2), torch.zeros(2, dtype=torch.int32), ["a"])
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        ImageSet(make_images(2), torch.zeros(3, dtype=torch.int64), ["a"])
    with pytest.raises(ValueError, match="2 images but 1 paths"):
        ImageSet(make_images(2), torch.zeros(2, dtype=torch.int64), ["a"], paths=["x"])


# ------------------------------------------------------------------------------------------------ digits


def test_load_digits_shapes_scale_and_stratification():
    from sklearn.datasets import load_digits as sklearn_digits

    train, test = load_digits(test_fraction=0.2, seed=0)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert len(train) + len(test) == 1797
    assert train.classes == [str(i) for i in range(10)]
    assert int(train.images.max()) == 255
    # Every class keeps ~20% in test.
    counts = np.bincount(sklearn_digits().target)
    test_counts = torch.bincount(test.labels, minlength=10).numpy()
    np.testing.assert_array_equal(test_counts, np.round(counts * 0.2).astype(int))
    # Same seed -> same split; another seed -> another split.
    again, _ = load_digits(seed=0)
    other, _ = load_digits(seed=1)
    assert torch.equal(train.images, again.images)
    assert not torch.equal(train.images, other.images)


def test_load_digits_values_match_sklearn_scaled():
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    train, test = load_digits(seed=3)
    reference = {tuple(np.round(img * 255 / 16).astype(np.uint8).ravel()) for img in bunch.images}
    for image in train.images[:20]:
        assert tuple(image.numpy().ravel()) in reference


# ------------------------------------------------------------------------------------------------ split, stats


def test_split_validation_is_stratified_and_disjoint():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2, dtype=torch.int64)
    images = torch.arange(17, dtype=torch.uint8).view(17, 1, 1, 1).expand(17, 1, 2, 2).clone()
    full = ImageSet(images, labels, ["a", "b", "c"], paths=[f"p{i}" for i in range(17)])
    train, val = split_validation(full, 0.2, seed=0)
    assert torch.bincount(val.labels, minlength=3).tolist() == [2, 1, 1]
    ids_train = set(train.images[:, 0, 0, 0].tolist())
    ids_val = set(val.images[:, 0, 0, 0].tolist())
    assert not ids_train & ids_val and len(ids_train | ids_val) == 17
    assert val.paths == [f"p{i}" for i in val.images[:, 0, 0, 0].tolist()]
    train2, val2 = split_validation(full, 0.2, seed=0)
    assert torch.equal(val.images, val2.images)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, "0.2", True])
def test_split_validation_rejects_bad_fraction(fraction):
    full = ImageSet(make_images(4), torch.tensor([0, 0, 1, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="fraction must be a number in"):
        split_validation(full, fraction, 0)


def test_split_validation_single_image_leaves_empty_side():
    full = ImageSet(make_images(1), torch.tensor([0]), ["a"])
    with pytest.raises(ValueError, match="empty side"):
        split_validation(full, 0.5, 0)


def test_channel_stats_matches_numpy():
    images = make_images(7, c=3, h=5, w=4)
    mean, std = channel_stats(images, chunk=3)
    array = images.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, array.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(std, array.std(axis=(0, 2, 3)), rtol=1e-8)


def test_channel_stats_rejects_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        channel_stats(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="empty"):
        channel_stats(torch.zeros(0, 3, 4, 4, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------ augmentation


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_random_crop_matches_per_image_loop(mode):
    x = torch.randn(9, 3, 6, 5)
    padding = 2
    offsets = torch.randint(0, 2 * padding + 1, (9, 2), generator=torch.Generator().manual_seed(1))
    out = random_crop(x, padding, offsets, padding_mode=mode)
    torch_mode = "reflect" if mode == "reflect" else "constant"
    for i in range(9):
        padded = F.pad(x[i : i + 1], (padding,) * 4, mode=torch_mode)[0]
        top, left = offsets[i].tolist()
        torch.testing.assert_close(out[i], padded[:, top : top + 6, left : left + 5], rtol=0, atol=0)


def test_random_crop_center_offset_is_identity():
    x = torch.randn(4, 2, 5, 5)
    assert torch.equal(random_crop(x, 3, torch.full((4, 2), 3)), x)


def test_random_flip_matches_per_image_loop():
    x = torch.randn(5, 2, 3, 4)
    mask = torch.tensor([True, False, True, True, False])
    out = random_flip(x, mask)
    for i in range(5):
        expected = torch.flip(x[i], dims=[2]) if mask[i] else x[i]
        assert torch.equal(out[i], expected)


# ------------------------------------------------------------------------------------------------ BatchLoader


def reference_epoch(loader, images, labels, epoch):
    """Naive per-image loop reproducing the loader's epoch from the same generator draws."""
    n = len(images)
    generator = epoch_generator(loader.seed, epoch)
    order = torch.randperm(n, generator=generator) if loader.shuffle else torch.arange(n)
    offsets = torch.randint(0, 2 * loader.crop_padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    mean = torch.tensor(loader.mean).view(-1, 1, 1)
    std = torch.tensor(loader.std).view(-1, 1, 1)
    xs = []
    p = loader.crop_padding
    for position, i in enumerate(order.tolist()):
        image = (images[i].double() / 255 - mean.double()) / std.double()
        padded = F.pad(image[None], (p, p, p, p), mode="reflect")[0]
        top, left = offsets[position].tolist()
        image = padded[:, top : top + images.shape[2], left : left + images.shape[3]]
        if flips[position]:
            image = image.flip(2)
        xs.append(image.float())
    return torch.stack(xs), labels[order]


def test_batchloader_matches_naive_reference_and_odd_last_batch():
    images, labels = make_images(11), torch.arange(11) % 3
    loader = BatchLoader(
        images,
        labels,
        batch_size=4,
        shuffle=True,
        seed=5,
        crop_padding=2,
        flip=True,
        mean=[0.4, 0.5, 0.6],
        std=[0.2, 0.25, 0.3],
    )
    assert len(loader) == 3
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 3]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ref_x, ref_y = reference_epoch(loader, images, labels, 0)
    torch.testing.assert_close(x, ref_x, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, ref_y)
    assert x.dtype == torch.float32 and y.dtype == torch.int64


def test_batchloader_determinism_per_seed_and_epoch():
    images, labels = make_images(16), torch.arange(16)

    first = BatchLoader(images, labels, batch_size=5, shuffle=True, seed=0, crop_padding=1, flip=True)
    epoch0 = torch.cat([x for x, _ in first])
    assert first.epoch == 1  # a full pass advances the epoch
    epoch1 = torch.cat([x for x, _ in first])
    resumed = BatchLoader(images, labels, batch_size=5, shuffle=True, seed=0, crop_padding=1, flip=True)
    resumed.load_state_dict({"seed": 0, "epoch": 1})
    assert torch.equal(torch.cat([x for x, _ in resumed]), epoch1)
    assert not torch.equal(epoch0, epoch1)
    other_seed = BatchLoader(images, labels, batch_size=5, shuffle=True, seed=1, crop_padding=1, flip=True)
    assert not torch.equal(torch.cat([x for x, _ in other_seed]), epoch0)
    assert first.state_dict() == {"seed": 0, "epoch": 2}


def test_batchloader_interrupted_epoch_repeats_plan():
    images, labels = make_images(8), torch.arange(8)
    loader = BatchLoader(images, labels, batch_size=3, shuffle=True, flip=True)
    first_batch = next(iter(loader))[0]
    assert loader.epoch == 0
    assert torch.equal(next(iter(loader))[0], first_batch)


def test_batchloader_drop_last_eval_mode_and_channels_last():
    images, labels = make_images(10), torch.arange(10)
    loader = BatchLoader(images, labels, batch_size=4, shuffle=True, drop_last=True)
    assert len(loader) == 2 and sum(len(y) for _, y in loader) == 8
    evaluator = BatchLoader.for_eval(
        images, labels, batch_size=4, mean=[0.5] * 3, std=[0.5] * 3, channels_last=True
    )
    xs, ys = zip(*evaluator)
    assert torch.equal(torch.cat(ys), labels)
    x = torch.cat(xs)
    torch.testing.assert_close(x, (images.float() / 255 - 0.5) / 0.5)
    assert xs[0].is_contiguous(memory_format=torch.channels_last)


def test_batchloader_without_labels_and_default_stats():
    images = make_images(6)
    loader = BatchLoader(images, None, batch_size=6, shuffle=False)
    x, y = next(iter(loader))
    assert y is None
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_batchloader_validators():
    images, labels = make_images(4), torch.arange(4)
    with pytest.raises(TypeError, match="uint8"):
        BatchLoader(images.float(), labels, batch_size=2, shuffle=False)
    with pytest.raises(ValueError, match="labels must have shape"):
        BatchLoader(images, labels[:3], batch_size=2, shuffle=False)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        BatchLoader(images, labels, batch_size=0, shuffle=False)
    with pytest.raises(ValueError, match="crop_padding must be an int"):
        BatchLoader(images, labels, batch_size=2, shuffle=False, crop_padding=-1)
    with pytest.raises(ValueError, match="padding_mode"):
        BatchLoader(images, labels, batch_size=2, shuffle=False, padding_mode="edge")
    with pytest.raises(ValueError, match="smaller than the image size"):
        BatchLoader(images, labels, batch_size=2, shuffle=False, crop_padding=6)
    with pytest.raises(ValueError, match="one value per channel"):
        BatchLoader(images, labels, batch_size=2, shuffle=False, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match="std values must be > 0"):
        BatchLoader(images, labels, batch_size=2, shuffle=False, mean=[0.5] * 3, std=[0.5, 0, 0.5])
    loader = BatchLoader(images, labels, batch_size=2, shuffle=False)
    with pytest.raises(ValueError, match="epoch must be an int"):
        loader.set_epoch(-1)


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
    import trickbag.data as data

    write_folder(tmp_path / "data")
    calls = []
    real = data._decode_files
    monkeypatch.setattr(data, "_decode_files", lambda *a, **k: calls.append(1) or real(*a, **k))
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


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (
            torch.zeros(2, 4, 4, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int64),
            r"images .* uint8 .*\(N, C, H, W\)",
        ),
        (torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), r"images .* uint8"),
        (
            torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int32),
            r"labels .* int64 .*\(N,\)",
        ),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), [0, 1], r"labels .* int64"),
    ],
)
def test_imageset_rejects_wrong_tensor_types(images, labels, message):
    with pytest.raises(TypeError, match=message):
        ImageSet(images, labels, ["a", "b"])
