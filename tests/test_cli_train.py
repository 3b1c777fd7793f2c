"""End to end through the CLI: train / resume / eval / predict / report on tiny digits runs."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trickbag.cli import main

DIGITS = str(Path(__file__).resolve().parents[1] / "recipes" / "digits.yaml")  # works from any folder

# Small and fast: digits (1,437 train images), 2 epochs, tiny CNN, one thread, deterministic kernels.
TINY = [
    "epochs=2",
    "batch_size=64",
    "threads=1",
    "deterministic=true",
    "model.options={width: 8}",
    "train.log_every=5",
]
# Everything random or stateful on: crop/flip order, mixing generator, dropout, EMA, warmup+cosine.
STATEFUL = [
    "data.crop_padding=1",
    "data.flip=true",
    "mixing.mixup_alpha=0.4",
    "mixing.cutmix_alpha=1.0",
    "train.ema_decay=0.9",
    "schedule.warmup_epochs=1",
]


def run_cli(*argv: str) -> int:
    return main(list(argv))


def only_run(output_dir: Path) -> Path:
    runs = [p for p in output_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_train_produces_all_files_and_eval_predict_report(tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    assert run_cli("train", DIGITS, *TINY, f"output_dir={out}", "name=tiny", "--quiet") == 0
    run_dir = only_run(out)
    assert run_dir.name == "tiny-001"
    for name in ("config.yaml", "train.log", "metrics.csv"):
        assert (run_dir / name).is_file(), name
    for kind in ("last", "best_loss", "best_metric"):
        link = run_dir / kind
        assert link.is_symlink()
        target = os.readlink(link)
        assert target.startswith(f"{kind}-epoch00"), target
        assert {p.name for p in link.iterdir()} == {"model.safetensors", "state.pt", "meta.json"}
    assert "accuracy=" in os.readlink(run_dir / "best_metric")  # named with the metric, not "_loss_"
    assert "val_loss=" in os.readlink(run_dir / "best_loss")
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    for column in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "time_s"):
        assert column in rows[0]
    summary = capsys.readouterr().out
    assert "best_metric" in summary and "best_loss" in summary

    assert run_cli("eval", str(run_dir), "--split", "val") == 0
    eval_out = capsys.readouterr().out
    meta = json.loads((run_dir / "best_metric" / "meta.json").read_text())
    assert f"{meta['scores']['val_accuracy']:.4f}" in eval_out  # same weights, same val set, same number
    import trickbag.train

    seen, real_evaluate = [], trickbag.train.evaluate
    monkeypatch.setattr(trickbag.train, "evaluate", lambda *a, **k: seen.append(k) or real_evaluate(*a, **k))
    assert run_cli("eval", str(run_dir), "--split", "val", "--flip-tta", "--translate-tta") == 0
    assert seen[-1]["flip_tta"] and seen[-1]["translate_tta"]  # the flags reach the evaluation
    capsys.readouterr()

    images = tmp_path / "images"
    for label in ("3", "7"):
        (images / label).mkdir(parents=True)
    from PIL import Image

    from trickbag.data import load_digits

    _, test = load_digits()
    picks = {"3": 0, "7": 0}
    for image, label in zip(test.images, test.labels.tolist()):
        name = str(label)
        if name in picks and picks[name] < 2:
            Image.fromarray(image[0].numpy()).save(images / name / f"{picks[name]}.png")
            picks[name] += 1
    predictions = tmp_path / "predictions.csv"
    assert run_cli("predict", str(run_dir / "best_metric"), str(images), "--out", str(predictions)) == 0
    shifted = tmp_path / "predictions_tta.csv"
    assert (
        run_cli(
            "predict", str(run_dir / "best_metric"), str(images), "--out", str(shifted), "--translate-tta"
        )
        == 0
    )
    assert open(shifted).read() != open(predictions).read()  # 3 views of 8x8 digits change the probabilities
    table = list(csv.DictReader(open(predictions)))
    assert len(table) == 4
    assert list(table[0])[:3] == ["path", "label", "predicted"]
    assert [key for key in table[0] if key.startswith("p_")] == [f"p_{c}" for c in range(10)]
    assert {row["label"] for row in table} == {"3", "7"}
    for row in table:
        assert abs(sum(float(row[f"p_{c}"]) for c in range(10)) - 1) < 1e-4

    student_out = tmp_path / "student"
    teacher = f"distill.teacher={run_dir / 'best_metric'}"
    assert run_cli("train", DIGITS, *TINY, "epochs=1", teacher, f"output_dir={student_out}", "--quiet") == 0
    assert (only_run(student_out) / "last").is_symlink()

    assert run_cli("report", str(run_dir)) == 0
    assert (run_dir / "report.png").stat().st_size > 1000
    page = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in page and "<img" in page
    from trickbag.report import read_lr_trace, read_metrics

    rows = read_metrics(run_dir)
    curve = read_lr_trace(run_dir)
    steps = meta["updates_per_epoch"]
    assert len(curve) == 2 * steps
    assert curve[steps] == pytest.approx(rows[0]["lr"])  # the LR after epoch 1 is the first of epoch 2


def drop_time(rows) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in ("time_s", "images_per_s")} for row in rows]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "last" / "model.safetensors"))


def test_resume_after_kill_is_bit_identical(tmp_path):
    """kill -9 after epoch 1's checkpoint, resume -> the same bytes as a run that never stopped."""
    argv = [*TINY, "epochs=5", *STATEFUL]  # 4 epochs left after the kill: time to kill under load
    reference_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    assert run_cli("train", DIGITS, *argv, f"output_dir={reference_out}", "--quiet") == 0
    reference = only_run(reference_out)

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trickbag",
            "train",
            DIGITS,
            *argv,
            f"output_dir={killed_out}",
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        runs = list(killed_out.glob("*/last")) if killed_out.exists() else []
        if runs and runs[0].is_symlink():
            break
        time.sleep(0.02)
    assert process.poll() is None, f"run ended before it could be killed: {process.stderr.read().decode()}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = only_run(killed_out)
    assert os.readlink(killed / "last").startswith("last-epoch00")
    assert run_cli("resume", str(killed), "--quiet") == 0

    expected, got = _final_weights(reference), _final_weights(killed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    for kind in ("best_loss", "best_metric"):
        # A kill between an epoch's best_* and last saves makes the replayed epoch save "<name>-1": same epoch.
        assert re.sub(r"-\d+$", "", os.readlink(killed / kind)) == os.readlink(reference / kind)
    expected_rows = drop_time(csv.DictReader(open(reference / "metrics.csv")))
    assert drop_time(csv.DictReader(open(killed / "metrics.csv"))) == expected_rows
    ema_expected = torch.load(reference / "last" / "state.pt", weights_only=True)["ema"]
    ema_got = torch.load(killed / "last" / "state.pt", weights_only=True)["ema"]
    assert all(torch.equal(ema_expected[k], ema_got[k]) for k in ema_expected)


def test_train_errors_are_clear(tmp_path, capsys):
    assert run_cli("train", str(tmp_path / "missing.yaml")) == 2
    err = capsys.readouterr().err
    assert "missing.yaml': no such file, and no packaged recipe" in err and "digits" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\noptimiser:\n  lr: 0.1\n")
    assert run_cli("train", str(bad)) == 2
    assert "unknown key 'optimiser' (did you mean 'optimizer'?)" in capsys.readouterr().err
    assert run_cli("train", DIGITS, "schedule.kind=cosin") == 2
    err = capsys.readouterr().err
    assert "schedule.kind='cosin' not in" in err and DIGITS in err
    assert run_cli("resume", str(tmp_path)) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert run_cli("predict", str(tmp_path), "x.png", "--out", str(tmp_path / "p.csv")) == 2
    assert "not a checkpoint" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:skipped 1 image")
def test_image_folder_corrupt_image_named_then_skipped(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "folder"
    for split in ("train", "test"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(6):
                colour = (200, 30 * i, 0) if label == "a" else (0, 30 * i, 200)
                Image.new("RGB", (8, 8), colour).save(root / split / label / f"{i}.png")
    broken = root / "train" / "b" / "broken.png"
    broken.write_bytes(b"not an image at all")
    argv = ["train", DIGITS, *TINY, "data.kind=image_folder", f"data.root={root}",
            f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=1", "batch_size=4"]  # fmt: skip
    assert run_cli(*argv, f"output_dir={tmp_path / 'r1'}", "--quiet") == 2
    assert "broken.png" in capsys.readouterr().err
    assert run_cli(*argv, "data.skip_bad_images=true", f"output_dir={tmp_path / 'r2'}", "--quiet") == 0
    run_dir = only_run(tmp_path / "r2")
    assert "broken.png" in (run_dir / "train.log").read_text()  # listed, never silently dropped
    capsys.readouterr()
    assert run_cli("eval", str(run_dir), "--data", str(root / "test")) == 0
    assert "12 images" in capsys.readouterr().out


def test_imbalanced_folder_picks_macro_f1_and_recommends_weights(tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    for label, count in (("common", 30), ("rare", 3)):
        (root / "train" / label).mkdir(parents=True)
        for i in range(count):
            colour = (200, 5 * i, 0) if label == "common" else (0, 5 * i, 200)
            Image.new("RGB", (8, 8), colour).save(root / "train" / label / f"{i}.png")
    argv = ["train", DIGITS, *TINY, "epochs=1", "data.kind=image_folder", f"data.root={root}",
            "data.val_fraction=0.3", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=1", "batch_size=8",
            f"output_dir={tmp_path / 'runs'}", "--quiet"]  # fmt: skip
    assert run_cli(*argv) == 0
    run_dir = only_run(tmp_path / "runs")
    assert "macro_f1=" in os.readlink(run_dir / "best_metric")  # "auto" chose macro-F1 for 10:1 data
    assert (
        "class imbalance" in (log := (run_dir / "train.log").read_text())
        and "loss.class_weights=effective_number" in log
    )
    assert (
        run_cli(
            *argv[:-2],
            "loss.class_weights=effective_number",
            "loss.kind=focal",
            f"output_dir={tmp_path / 'w'}",
            "--quiet",
        )
        == 0
    )


def test_options_may_follow_overrides(tmp_path, capsys):
    assert run_cli("train", DIGITS, "epochs=3", "--bogus") == 2
    assert "unknown option '--bogus'" in capsys.readouterr().err
    assert run_cli("train", DIGITS, "epochs=3", "--help") == 0
    assert "examples:" in capsys.readouterr().out
    argv = ["train", DIGITS, *TINY, "epochs=1", f"output_dir={tmp_path}", "--quiet"]
    assert run_cli(*argv) == 0
    assert (
        "[" not in capsys.readouterr().out.split("trickbag run")[0]
    )  # --quiet: no log lines before the summary


def test_help_has_examples(capsys):
    for command in ("train", "eval", "predict", "resume", "report"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and f"trickbag {command}" in out


@pytest.mark.parametrize("name", ["train", "resume", "evaluate", "predict", "report", "recipes"])
def test_command_module_imports_nothing_heavy(name):
    code = f"import sys, trickbag.commands.{name}; print(sorted({{'torch', 'pydantic', 'matplotlib'}} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"  # `trickbag --help` stays fast


def test_checkpoint_that_does_not_fit_its_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    assert run_cli("train", DIGITS, *TINY, "epochs=1", f"output_dir={out}", "--quiet") == 0
    run_dir = only_run(out)
    import trickbag.models

    original = trickbag.models.build_model

    def changed_default(name, num_classes, **options):  # as if a model default had changed since the save
        return original(name, num_classes, **{**options, "width": 16})

    monkeypatch.setattr(trickbag.models, "build_model", changed_default)
    capsys.readouterr()
    assert run_cli("eval", str(run_dir)) == 2
    err = capsys.readouterr().err
    assert "do not fit model 'digits_cnn'" in err and "size mismatch" in err


def test_progressive_resizing_trains_and_times_the_test_pass(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "folder"
    for split in ("train", "test"):
        for label, colour in (("red", (200, 20, 20)), ("blue", (20, 20, 200))):
            (root / split / label).mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (16, 16), (colour[0], 10 * i, colour[2])).save(
                    root / split / label / f"{i}.png"
                )
    argv = ["train", DIGITS, *TINY, "data.kind=image_folder", f"data.root={root}", "data.val_fraction=0",
            "model.name=cifar_fast", "model.options={widths: [8, 16], stem_width: 8}", "batch_size=4",
            f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", f"output_dir={tmp_path / 'runs'}"]  # fmt: skip
    assert run_cli(*argv, "data.train_sizes=[8, 16]", "--quiet") == 0
    results = json.loads((only_run(tmp_path / "runs") / "results.json").read_text())
    assert results["epochs"] == 2 and results["checkpoints"]["last"]["test_s"] > 0
    # Sizes above the images' own size are named with the key to change.
    assert run_cli(*argv, "data.train_sizes=[8, 32]", "--quiet") == 2
    assert "data.train_sizes" in capsys.readouterr().err


def test_progressive_resizing_is_rejected_for_streamed_crops():
    from trickbag.config import load_config

    with pytest.raises(ValueError, match="data.train_sizes"):
        load_config(None, ["data.kind=image_folder", "data.root=x", "data.image_size=32",
                           "data.random_resized_crop=true", "data.train_sizes=[16, 32]"])  # fmt: skip
