"""trickbag.runlog (train.log, metrics.csv) and trickbag.progress (a bar only on a terminal)."""

from __future__ import annotations

import csv

from trickbag.progress import Progress
from trickbag.runlog import LOG_FILE, METRICS_FILE, RunLogger, format_value, history_to_csv


def test_history_to_csv_has_every_column_in_first_seen_order():
    history = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25, "lr": 0.1}]
    rows = list(csv.reader(history_to_csv(history).splitlines()))
    assert rows == [["epoch", "loss", "lr"], ["1", "0.5", ""], ["2", "0.25", "0.1"]]
    assert history_to_csv([]) == "\n"  # no rows: an empty header line, not an error


def test_run_logger_writes_log_and_rewrites_metrics(tmp_path, capsys):
    logger = RunLogger(tmp_path, quiet=True)
    logger.info("hello")
    history = [{"epoch": 1, "train_loss": 1.0}]
    logger.epoch(history[0], history)
    history.append({"epoch": 2, "train_loss": 0.5})
    logger.epoch(history[1], history)
    logger.close()
    assert capsys.readouterr().out == ""  # quiet: files only
    lines = (tmp_path / LOG_FILE).read_text().splitlines()
    assert lines[0].endswith("] hello") and "epoch 2: train_loss 0.5" in lines[2]
    rows = list(csv.DictReader(open(tmp_path / METRICS_FILE)))
    assert [(row["epoch"], float(row["train_loss"])) for row in rows] == [("1", 1.0), ("2", 0.5)]


def test_format_value():
    assert format_value(0.123456) == "0.1235" and format_value(3) == "3" and format_value("x") == "x"


def test_progress_is_a_no_op_off_a_terminal():
    logger = RunLogger(quiet=True)  # quiet, and pytest's stdout is not a terminal: not interactive
    progress = Progress(logger, total=10)
    assert progress.bar is None
    progress.describe(loss=0.5, lr=0.1)
    progress.advance(64, started=0.0)
    assert progress.lr == "0.1"
    progress.close()
