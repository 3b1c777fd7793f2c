"""Honest numbers end to end: train/val/test roles, test scores of val-chosen checkpoints, exact losses in
`trickbag eval`, metric names checked before training, resume of finished and early-stopped runs."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from trickbag.cli import main
from trickbag.config import load_config
from trickbag.run import load_datasets, requested_top_k

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "recipes" / "digits.yaml")
TINY = ["epochs=2", "batch_size=64", "threads=1", "deterministic=true", "model.options={width: 8}"]


def train(tmp_path: Path, *overrides: str) -> Path:
    out = tmp_path / "runs"
    assert main(["train", DIGITS, *TINY, f"output_dir={out}", *overrides, "--quiet"]) == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def keys(imageset) -> set[bytes]:
    return {bytes(image.numpy().tobytes()) for image in imageset.images}


def test_digits_has_three_disjoint_roles_and_val_comes_from_train():
    train_set, val_set, test_set = load_datasets(load_config(DIGITS))
    assert (len(train_set), len(val_set), len(test_set)) == (1295, 143, 359)
    assert not keys(val_set) & keys(test_set)  # selection never sees a test image
    # the val split is stratified (every class present) and the same whatever the run seed
    assert set(val_set.labels.tolist()) == set(range(10))
    other_seed = load_datasets(load_config(DIGITS, ["seed=7"]))[1]
    assert torch.equal(other_seed.labels, val_set.labels) and torch.equal(other_seed.images, val_set.images)
    train_only, no_val, _ = load_datasets(load_config(DIGITS, ["data.val_fraction=0"]))
    assert no_val is None and len(train_only) == 1295 + 143


def test_image_folder_uses_its_val_folder(tmp_path):
    from PIL import Image

    for split, count in (("train", 6), ("val", 2), ("test", 3)):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                Image.new("RGB", (4, 4), (index * 20, 0, 0)).save(folder / f"{index}.png")
    cfg = load_config(None, ["data.kind=image_folder", f"data.root={tmp_path}", "data.num_workers=0",
                             f"data.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    train_set, val_set, test_set = load_datasets(cfg)
    assert (len(train_set), len(val_set), len(test_set)) == (12, 4, 6)


def test_results_hold_test_scores_of_the_val_chosen_checkpoints(tmp_path, capsys):
    run_dir = train(tmp_path, "epochs=3")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and results["selection"] == "val"
    metrics = (run_dir / "metrics.csv").read_text().splitlines()
    rows = [dict(zip(metrics[0].split(","), line.split(","))) for line in metrics[1:]]
    for kind in ("best_metric", "best_loss", "last"):
        entry = results["checkpoints"][kind]
        row = rows[entry["epoch"] - 1]
        assert entry["val"]["accuracy"] == pytest.approx(float(row["val_accuracy"]))
        assert set(entry["test"]) >= {"loss", "accuracy", "macro_f1"}
    # `trickbag eval` of the chosen checkpoint on test gives the same numbers, loss included
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "the run's test split: 359 images" in printed
    chosen = results["checkpoints"]["best_metric"]["test"]
    assert f"{chosen['loss']:.4f}" in printed and f"{chosen['accuracy']:.4f}" in printed
    # ... and on val, the numbers that chose it
    assert main(["eval", str(run_dir / "best_metric"), "--split", "val"]) == 0
    printed = capsys.readouterr().out
    assert "val split (it chose this checkpoint): 143 images" in printed
    assert f"{results['checkpoints']['best_metric']['val']['loss']:.4f}" in printed


def test_weighted_validation_loss_is_the_same_in_training_and_eval(tmp_path, capsys):
    run_dir = train(tmp_path, "loss.class_weights=inverse_frequency", "loss.label_smoothing=0.1")
    results = json.loads((run_dir / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run_dir / "last"), "--split", "val"]) == 0
    assert f"{results['checkpoints']['last']['val']['loss']:.4f}" in capsys.readouterr().out


def test_no_val_set_keeps_only_last_and_says_so(tmp_path):
    run_dir = train(tmp_path, "data.val_fraction=0")
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["checkpoints"]) == ["last"] and "test" in results["checkpoints"]["last"]
    assert not (run_dir / "best_metric").exists()
    assert "no validation set" in (run_dir / "train.log").read_text()


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.best_metric=top12_accuracy", r"eval.best_metric=top12_accuracy \(needs 1 < k < 10 classes\)"),
        ("early_stopping.monitor=top1_accuracy", r"early_stopping.monitor=top1_accuracy"),
    ],
)
def test_metrics_the_run_cannot_compute_are_rejected_before_training(tmp_path, capsys, override, message):
    extra = ["early_stopping.enabled=true"] if "early_stopping" in override else []
    out = tmp_path / "runs"
    assert main(["train", DIGITS, *TINY, f"output_dir={out}", override, *extra, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "available: val_loss, accuracy" in err
    import re

    assert re.search(message, err)
    assert not list(out.glob("*/last"))  # failed before the first epoch


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.options.widht=8",
            "model.options: model 'digits_cnn' has no option 'widht'; did you mean 'width'?",
        ),
        ("model.options.dropout=2", "model.options: model 'digits_cnn': dropout"),
    ],
)
def test_a_refused_model_option_is_named_with_its_config_path(tmp_path, capsys, override, message):
    out = tmp_path / "runs"
    assert main(["train", DIGITS, *TINY, f"output_dir={out}", override, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_top_k_that_fits_is_computed_and_chooses(tmp_path):
    assert requested_top_k(load_config(DIGITS, ["eval.best_metric=top3_accuracy"]), 10) == (3,)
    run_dir = train(tmp_path, "eval.best_metric=top3_accuracy")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["best_metric"] == "top3_accuracy"
    assert "top3_accuracy" in results["checkpoints"]["best_metric"]["test"]


def test_resume_of_a_finished_run_trains_nothing_and_can_extend_it(tmp_path, capsys):
    run_dir = train(tmp_path)
    before = (run_dir / "metrics.csv").read_text()
    assert main(["resume", str(run_dir), "--quiet"]) == 0
    assert (run_dir / "metrics.csv").read_text() == before  # no extra epoch
    assert "already complete" in (run_dir / "train.log").read_text()
    assert main(["resume", str(run_dir), "epochs=4", "--quiet"]) == 0
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 and lines[1:3] == before.splitlines()[1:3]
    assert "epochs: 4" in (run_dir / "config.yaml").read_text()
    lrs = [float(line.split(",")[1]) for line in (run_dir / "lr.csv").read_text().splitlines()[1:]]
    updates = len(lrs) // 4
    # the cosine is stretched to the new end: the LR rises again after the old end, then decays towards 0
    assert lrs[2 * updates] > lrs[2 * updates - 1] and lrs[-1] < lrs[2 * updates]
    assert json.loads((run_dir / "results.json").read_text())["epochs"] == 4
    with pytest.raises(ValueError, match="resume takes only epochs=N"):
        main(["--debug", "resume", str(run_dir), "optimizer.lr=1"])


def test_an_early_stopped_run_resumes_without_training_and_extends_with_patience_reset(tmp_path):
    run_dir = train(
        tmp_path,
        "epochs=6",
        "early_stopping.enabled=true",
        "early_stopping.patience=1",
        "early_stopping.min_delta=0.5",
    )  # fmt: skip  (nothing improves by 0.5: stops after 2)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stopped_early"] and results["epochs"] == 2
    assert main(["resume", str(run_dir), "--quiet"]) == 0
    assert json.loads((run_dir / "results.json").read_text())["epochs"] == 2
    assert main(["resume", str(run_dir), "epochs=6", "--quiet"]) == 0
    assert json.loads((run_dir / "results.json").read_text())["epochs"] == 3  # trained on, stopped again


# ---------------------------------------------------------------------------------------------------------------
# Import direction: library parts stand alone


LIBRARY = ["losses", "optim", "schedules", "init", "precision", "mixing", "mixing_beta", "mixing_masks", "ema",
           "data", "images", "models", "finetune", "stats", "metrics/__init__", "metrics/classification", "metrics/ranking",
           "metrics/regression", "metrics/advice", "metrics/plots", "metrics/_checks"]  # fmt: skip
APPLICATION = {"trickbag.train", "trickbag.cli", "trickbag.config", "trickbag.checkpoint", "trickbag.run"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("name", LIBRARY)
def test_library_parts_never_import_the_application(name):
    path = ROOT / "trickbag" / f"{name}.py"
    if not path.exists():
        pytest.skip(f"{path} does not exist")
    assert not imported_modules(path) & APPLICATION, f"{name} imports {imported_modules(path) & APPLICATION}"


def test_nothing_imports_the_cli():
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "trickbag").rglob("*.py")
        if path.name not in ("__main__.py", "cli.py") and "trickbag.cli" in imported_modules(path)
    ]
    assert offenders == []


def test_resume_falls_back_to_an_older_last_when_the_newest_is_corrupt(tmp_path):
    from safetensors.torch import load_file

    run_dir = train(tmp_path, "epochs=3")
    newest = (run_dir / "last").resolve()
    expected = {
        key: value.clone() for key, value in load_file(str(newest / "model.safetensors")).items()
    }  # not mmapped
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    assert main(["resume", str(run_dir), "--quiet"]) == 0
    log = (run_dir / "train.log").read_text()
    assert "skipped" in log and "older last-epoch002" in log
    got = load_file(str((run_dir / "last").resolve() / "model.safetensors"))
    differing = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert differing == []  # epoch 3 retrained bit for bit


def test_resume_refuses_when_only_best_checkpoints_verify(tmp_path, capsys):
    run_dir = train(tmp_path, "epochs=1")
    for folder in run_dir.glob("last-*"):
        (folder / "state.pt").write_bytes(b"corrupt")
    assert main(["resume", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no usable `last` checkpoint" in err and "best_" in err


def test_a_run_that_fails_before_training_leaves_no_empty_run_folder(tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["train", DIGITS, *TINY, f"output_dir={out}", "eval.best_metric=top12_accuracy", "--quiet"])
    assert code == 2 and "top12_accuracy" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []
