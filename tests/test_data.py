import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trickbag.data import (
    BatchLoader,
    ImageSet,
    channel_stats,
    epoch_generator,
    load_digits,
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


def mirrored_images(loader, plain, epoch):
    """The image indices ``loader`` mirrors in ``epoch``, found from its output against ``plain`` (no flip)."""
    loader.set_epoch(epoch)
    plain.set_epoch(epoch)
    order = plain.epoch_plan(epoch)[0]
    x, x_plain = torch.cat([x for x, _ in loader]), torch.cat([x for x, _ in plain])
    mirrored = set()
    for position, i in enumerate(order.tolist()):
        if torch.equal(x[position], x_plain[position].flip(2)):
            mirrored.add(i)
        else:
            assert torch.equal(x[position], x_plain[position])
    return mirrored


@pytest.mark.parametrize("crop_padding", [0, 2])
def test_alternate_flip_mirrors_each_image_every_other_epoch(crop_padding):
    images, labels = make_images(200, h=6, w=6, seed=3), torch.arange(200)
    options = {"batch_size": 64, "shuffle": True, "seed": 4, "crop_padding": crop_padding}
    loader = BatchLoader(images, labels, flip="alternate", **options)
    plain = BatchLoader(images, labels, flip=False, **options)  # same order and crops: flips are drawn last
    per_epoch = [mirrored_images(loader, plain, epoch) for epoch in range(4)]
    assert 70 <= len(per_epoch[0]) <= 130  # a random half (binomial(200, 0.5): +-4.2 sd)
    everyone = set(range(200))
    assert per_epoch[1] == everyone - per_epoch[0]
    assert per_epoch[2] == per_epoch[0] and per_epoch[3] == per_epoch[1]
    # Random coins (flip=True) mirror a different random set each epoch: no such pattern.
    coins = BatchLoader(images, labels, flip=True, **options)
    random_sets = [mirrored_images(coins, plain, epoch) for epoch in range(2)]
    assert random_sets[1] != everyone - random_sets[0]
    other_seed = BatchLoader(images, labels, flip="alternate", **{**options, "seed": 5})
    assert not torch.equal(other_seed.epoch_plan(0)[2], loader.epoch_plan(0)[2])


def test_alternate_flip_gives_a_repeated_image_one_orientation_per_epoch():
    class Repeat:  # a sampler drawing every image twice
        def indices(self, epoch):
            return torch.arange(6).repeat(2)

        def __len__(self):
            return 12

    loader = BatchLoader(make_images(6), torch.arange(6), batch_size=4, shuffle=True, flip="alternate",
                         sampler=Repeat())  # fmt: skip
    for epoch in (0, 1):
        order, _, flips = loader.epoch_plan(epoch)
        assert torch.equal(flips[:6], flips[6:])
    assert torch.equal(loader.epoch_plan(1)[2], ~loader.epoch_plan(0)[2])


def test_flip_setting_is_checked():
    with pytest.raises(ValueError, match="flip must be true, false or 'alternate', got 'sometimes'"):
        BatchLoader(make_images(4), torch.arange(4), batch_size=2, shuffle=True, flip="sometimes")


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


# ---------------------------------------------------------------------------------------- progressive resizing


def test_downsample_is_area_averaging_by_hand():
    from trickbag.data import downsample

    x = torch.arange(16.0).view(1, 1, 4, 4)
    # 4 -> 2: each output pixel is the mean of a 2x2 block.
    assert torch.equal(downsample(x, 2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    # 3 -> 2 (no whole factor): area bins [0, 2) and [1, 3) on each axis.
    y = torch.tensor([[0.0, 3.0, 6.0], [9.0, 12.0, 15.0], [18.0, 21.0, 24.0]]).view(1, 1, 3, 3)
    assert torch.equal(downsample(y, 2), torch.tensor([[[[6.0, 9.0], [15.0, 18.0]]]]))
    assert downsample(x, 4) is x and downsample(x, None) is x
    assert downsample(torch.zeros(2, 3, 8, 4), 4).shape == (2, 3, 4, 2)  # keeps the aspect ratio


def test_batchloader_sizes_downsample_the_same_batches_per_epoch():
    images, labels = make_images(10, h=8, w=8), torch.arange(10)
    common = dict(
        batch_size=4, shuffle=True, seed=3, crop_padding=1, flip=True, mean=[0.5] * 3, std=[0.2] * 3
    )
    plain = BatchLoader(images, labels, **common)
    progressive = BatchLoader(images, labels, sizes=[4, 6, 8], **common)
    for epoch, side in enumerate([4, 6, 8, 8]):  # the last size repeats
        assert progressive.size_at(epoch) == side
        for (x, y), (full, full_y) in zip(progressive, plain, strict=True):
            assert torch.equal(y, full_y) and x.shape[2:] == (side, side)
            expected = F.adaptive_avg_pool2d(full, side)  # an independent area average of the same batch
            torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)
    assert progressive.epoch == 4
    assert BatchLoader(images, labels, **common).size_at(0) is None


@pytest.mark.parametrize(
    "sizes, message",
    [([], "non-empty"), ([0], "non-empty"), ([True], "non-empty"), ([4.5], "non-empty"), ([4, 9], "above")],
)
def test_batchloader_rejects_bad_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        BatchLoader(make_images(4, h=8, w=8), torch.arange(4), batch_size=2, shuffle=True, sizes=sizes)
