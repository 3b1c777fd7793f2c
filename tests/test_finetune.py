"""Fine-tuning from local weights: head replaced, backbone loaded, frozen then slower; the CLI end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trickbag.cli import main
from trickbag.finetune import BackboneFreezer, Renormalized, load_pretrained, read_weights, save_weights
from trickbag.models import build_model
from trickbag.optim import build_optimizer, head_parameter_names, param_groups
from trickbag.schedules import Scheduler

SMALL = {"widths": [8, 16], "stem_width": 8, "depth": 1}


def small_net(classes: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("cifar_fast", classes, **SMALL)


@pytest.mark.parametrize("form", ["safetensors", "state_dict", "wrapped", "checkpoint_folder"])
def test_load_pretrained_replaces_the_head_and_keeps_the_backbone(tmp_path, form):
    source, target = small_net(10, seed=1), small_net(3, seed=2)
    fresh_head = target.linear.weight.detach().clone()
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    if form == "safetensors":
        path = tmp_path / "w.safetensors"
        save_weights(source, path, mean=mean, std=std)
    elif form == "state_dict":
        path, mean, std = tmp_path / "w.pt", None, None
        torch.save(source.state_dict(), path)
    elif form == "wrapped":
        path = tmp_path / "w.pt"
        torch.save({"state_dict": source.state_dict(), "mean": mean, "std": std}, path)
    else:
        path = tmp_path / "ckpt"
        path.mkdir()
        save_weights(source, path / "model.safetensors")
        (path / "meta.json").write_text(json.dumps({"mean": mean, "std": std}))
    report = load_pretrained(target, path)
    assert report["new_head"] == ["linear.weight"]
    assert report["normalization"] == (None if mean is None else {"mean": mean, "std": std})
    for name, value in target.state_dict().items():
        if name == "linear.weight":
            assert torch.equal(value, fresh_head)  # the run's own head, initialised, 3 outputs
        else:
            assert torch.equal(value, source.state_dict()[name]), name
    assert target(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_load_pretrained_errors_list_the_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(build_model("resnet18_cifar", 10, width=4, blocks=(1, 1)), path)
    with pytest.raises(
        ValueError, match=r"missing keys \['features.0.weight'.*unexpected keys \['head.2.bias'"
    ):
        load_pretrained(small_net(3), path)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_pretrained(small_net(3), tmp_path / "missing.safetensors")
    pickled = tmp_path / "model.pt"
    torch.save(small_net(3), pickled)  # a whole pickled module: refused, never unpickled
    with pytest.raises(ValueError, match="weights-only state dict"):
        read_weights(pickled)


def test_timm_and_torchvision_need_their_extra():
    pytest.importorskip("trickbag")
    for name, extra in (("timm:resnet18", "timm"), ("torchvision:resnet18", "torchvision")):
        try:
            __import__(extra)
        except ImportError:
            with pytest.raises(ValueError, match=rf"pip install trickbag\[{extra}\]"):
                build_model(name, 3)


def test_head_names_and_backbone_lr_groups():
    model = small_net(3)
    assert head_parameter_names(model) == ["linear.weight"]
    assert head_parameter_names(build_model("resnet18_cifar", 3, width=4)) == ["head.2.weight", "head.2.bias"]
    groups = param_groups(model, 5e-4, backbone_lr_factor=0.1)
    names = {g["name"]: g for g in groups}
    assert set(names) == {"head_decay", "backbone_decay", "backbone_no_decay"}
    assert [id(p) for p in names["head_decay"]["params"]] == [id(model.linear.weight)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = build_optimizer("sgd", groups, lr=0.4, weight_decay=5e-4)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"head_decay": 0.4, "backbone_decay": 0.04, "backbone_no_decay": 0.04})
    scheduler = Scheduler(optimizer, "cosine", steps_per_epoch=10, epochs=2)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    now = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert now["backbone_decay"] == pytest.approx(0.1 * now["head_decay"])  # the schedule keeps the ratio
    with pytest.raises(ValueError, match="backbone_lr_factor"):
        param_groups(model, 0.0, backbone_lr_factor=0)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("implementation", ["fused", "for_loop"])
def test_backbone_freezer_trains_the_head_first(name, implementation):
    model = small_net(3)
    optimizer = build_optimizer(name, param_groups(model, 5e-4), lr=0.1, implementation=implementation)
    freezer = BackboneFreezer(model, epochs=1, optimizer=optimizer)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))

    def step():
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        return {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}

    freezer.set_epoch(0)
    assert step() == {"linear.weight"}  # weight decay and momentum do not move a frozen parameter either
    freezer.set_epoch(1)
    assert step() == {name for name, _ in model.named_parameters()}
    assert step() == {name for name, _ in model.named_parameters()}


def test_renormalized_feeds_the_model_its_own_normalisation():
    model = small_net(3).eval()
    raw = torch.rand(4, 3, 16, 16)
    mean, std, own_mean, own_std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25], [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
    view = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    wrapped = Renormalized(model, mean, std, own_mean, own_std)
    with torch.no_grad():
        got = wrapped((raw - view(mean)) / view(std))
        expected = model((raw - view(own_mean)) / view(own_std))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ end to end (CLI)


def write_photos(root: Path, per_class: int = 6, levels=(("bright", 200), ("dark", 50))) -> None:
    """train/ and test/ folders of easy classes (bright vs dark), in mixed sizes, modes and formats."""
    rng = np.random.default_rng(0)
    kinds = [
        ((40, 30), "RGB", "jpg"),
        ((24, 48), "L", "png"),
        ((33, 33), "RGBA", "png"),
        ((50, 64), "RGB", "png"),
    ]
    for split, count in (("train", per_class), ("test", 3)):
        for label, level in levels:
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                (height, width), mode, suffix = kinds[i % len(kinds)]
                array = np.clip(rng.normal(level, 20, (height, width, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(array).convert(mode).save(root / split / label / f"{i}.{suffix}")


BASE = ["data.image_size=16", "data.val_fraction=0", "epochs=2", "batch_size=4", "threads=1",
        "model.options={widths: [8, 16], stem_width: 8, depth: 1}", "data.num_workers=0", "--quiet"]  # fmt: skip


def test_streamed_finetune_from_a_run_then_predict_a_single_photo(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRICKBAG_CACHE_DIR", str(tmp_path / "cache"))
    write_photos(tmp_path / "data")
    write_photos(tmp_path / "other", levels=(("a", 0), ("b", 100), ("c", 250)))
    out = tmp_path / "runs"
    common = ["train", "finetune_folder", *BASE, f"data.root={tmp_path / 'data'}", f"output_dir={out}"]
    # 1. A "pretrained" run on 3 other classes, in memory (mixed sizes fitted to 16x16, crop aspect), from scratch.
    assert main([*common, "name=base", f"data.root={tmp_path / 'other'}", "data.in_memory=true",
                 "data.random_resized_crop=false",
                 "model.freeze_backbone_epochs=0", "optimizer.backbone_lr_factor=1"]) == 0  # fmt: skip
    base = out / "base-001"
    base_meta = json.loads((base / "last" / "meta.json").read_text())
    assert base_meta["preprocess"] == {"image_size": 16, "aspect": "crop", "crop_fraction": 0.875,
                                       "image_shape": [3, 16, 16]}  # fmt: skip
    # 2. The recipe: fine-tune from that checkpoint, streamed RRC, head first, slower backbone.
    assert main([*common, "name=tuned", f"model.pretrained={base / 'last'}"]) == 0
    tuned = out / "tuned-001"
    meta = json.loads((tuned / "last" / "meta.json").read_text())
    assert (
        meta["mean"] == base_meta["mean"] and meta["std"] == base_meta["std"]
    )  # the pretrained normalisation
    log = (tuned / "train.log").read_text()
    assert "tensors loaded, head ['linear.weight'] new for 2 classes" in log
    assert (
        "decoded per batch by 0 worker" in log and "JPEG decoder: " in log
    )  # data.num_workers=0; the decoder
    results = json.loads((tuned / "results.json").read_text())
    test_accuracy = results["checkpoints"]["last"]["test"]["accuracy"]
    # 3. eval on the run's own (streamed) test split gives the test accuracy the run reported.
    capsys.readouterr()
    assert main(["eval", str(tuned / "last")]) == 0
    assert f"accuracy          │ {test_accuracy:.4f}" in capsys.readouterr().out.replace("┃", "│")
    # 4. One phone-sized photo (another size than any training image) predicts as eval fitted the test images:
    #    the same probabilities as a test image with the same pixels after fitting.
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.full((120, 90, 3), 210, np.uint8)).save(photo)
    assert main(["predict", str(tuned / "last"), str(photo), str(tmp_path / "data" / "test"),
                 "--out", str(tmp_path / "p.csv")]) == 0  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 1 + 6 and rows[0]["path"] == str(photo)
    predicted = [row["predicted"] == row["label"] for row in rows[1:]]
    assert sum(predicted) / len(predicted) == pytest.approx(test_accuracy)  # predict sees what eval saw


def test_config_rejects_contradictory_image_options(tmp_path):
    from trickbag.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="random_resized_crop needs data.image_size"):
        load_config(None, ["data.random_resized_crop=true"])
    with pytest.raises(ConfigError, match="two crops"):
        load_config(None, ["data.image_size=8", "data.random_resized_crop=true", "data.crop_padding=2"])
    with pytest.raises(ConfigError, match="in_memory"):
        load_config(None, ["data.image_size=8", "data.random_resized_crop=true", "data.in_memory=true"])
    with pytest.raises(ConfigError, match="rrc_scale"):
        load_config(None, ["data.rrc_scale=[0.5, 0.1]"])
    cfg = load_config(
        None, ["data.in_memory=auto", "optimizer.backbone_lr_factor=0.1", "model.pretrained=w.pt"]
    )
    assert cfg.data.in_memory == "auto" and cfg.optimizer.backbone_lr_factor == 0.1
