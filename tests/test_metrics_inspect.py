"""``trickbag inspect`` on image folders, label CSVs, digits and predictions CSVs."""

import csv
import subprocess
import sys

import pytest
import sklearn.metrics as skm
from PIL import Image

from trickbag.cli import main


def _folder(root, counts):
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.jpg").write_bytes(b"not decoded")
    (root / "cat" / "notes.txt").write_text("ignored")


def test_image_folder_with_train_subfolder(tmp_path, capsys):
    _folder(tmp_path / "train", {"cat": 30, "dog": 3, "emu": 10})
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "10.0:1" in out and "macro-F1" in out and "effective_number" in out
    assert "best metric: macro_f1" in out


def test_label_csv_and_digits(tmp_path, capsys):
    path = tmp_path / "labels.csv"
    path.write_text("path,label\na.jpg,2\nb.jpg,10\nc.jpg,2\n")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.index("2 ") < out.index("10 ") and "2.0:1" in out
    assert main(["inspect", "digits"]) == 0
    assert "best metric: accuracy" in capsys.readouterr().out


def _predictions(path, rows, classes=("a", "b", "c")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "predicted", *(f"p_{c}" for c in classes)])
        writer.writerows(rows)


def test_predictions_csv_table_metrics_and_png(tmp_path, capsys):
    rows = [
        ["1.jpg", "a", "a", 0.8, 0.1, 0.1],
        ["2.jpg", "a", "b", 0.3, 0.6, 0.1],
        ["3.jpg", "b", "b", 0.2, 0.7, 0.1],
        ["4.jpg", "c", "a", 0.5, 0.1, 0.4],
        ["5.jpg", "", "c", 0.1, 0.1, 0.8],  # unknown label: not scored
    ]
    path = tmp_path / "predictions.csv"
    _predictions(path, rows)
    assert main(["inspect", str(path), "--out-dir", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    y, p = ["a", "a", "b", "c"], ["a", "b", "b", "a"]
    assert "5 predictions, 4 with a label" in out
    assert f"{skm.f1_score(y, p, average='macro', zero_division=0):.4f}" in out
    assert f"{skm.accuracy_score(y, p):.4f}" in out
    for column in ("precision", "recall", "f1", "support", "auroc"):
        assert column in out
    with Image.open(tmp_path / "eval" / "confusion_matrix.png") as image:
        assert image.format == "PNG"


def test_predictions_without_labels(tmp_path, capsys):
    path = tmp_path / "p.csv"
    _predictions(path, [["1.jpg", "", "a", 0.9, 0.05, 0.05], ["2.jpg", "", "b", 0.1, 0.8, 0.1]])
    assert main(["inspect", str(path)]) == 0
    assert "only the predicted class distribution" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "has no class folders" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    _predictions(bad, [["1.jpg", "zebra", "a", 0.9, 0.05, 0.05]])
    assert main(["inspect", str(bad)]) == 2
    assert "label 'zebra' is not one of" in capsys.readouterr().err
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("path,target\na.jpg,1\n")
    assert main(["inspect", str(nolabel)]) == 2
    assert "needs a 'label' column" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("x")
    assert main(["inspect", str(text)]) == 2
    assert "neither a folder nor a .csv" in capsys.readouterr().err
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    assert main(["inspect", str(tmp_path / "imgs"), "--out-dir", str(tmp_path)]) == 2
    assert "--out-dir is for a predictions CSV" in capsys.readouterr().err


def test_help_has_examples():
    result = subprocess.run(
        [sys.executable, "-m", "trickbag", "inspect", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "examples:" in result.stdout and "digits" in result.stdout


@pytest.mark.parametrize("module", ["torch", "matplotlib", "sklearn"])
def test_command_module_imports_nothing_heavy(module):
    code = f"import sys, trickbag.commands.inspect; print('{module}' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
