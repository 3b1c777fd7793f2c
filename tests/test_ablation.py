"""trickbag ablate: file validation, design expansion, the runner's states, the summary against scipy, end to end."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sp

from trickbag import ablation_runner
from trickbag.ablation import ablation_from_dict, arm_folder, expand, load_ablation, resolve_recipe
from trickbag.ablation_runner import (
    RunOutcome,
    RunSpec,
    find_run_dir,
    plan_runs,
    results_from_metrics,
    run_ablation,
)
from trickbag.ablation_summary import summarize, write_outputs
from trickbag.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def make(**changes):
    raw = {"base": {"recipe": "digits", "overrides": ["epochs=2"]}, "arms": {"a": ["x.y=1"], "b": {"z": 0.5}}}
    raw.update(changes)
    return ablation_from_dict(raw, "t.yaml")


# ---------------------------------------------------------------------------------------------------------------
# the file


def test_errors_name_file_key_and_value_all_at_once(tmp_path):
    path = tmp_path / "abl.yaml"
    path.write_text(
        "base: {recipe: digits, overide: [epochs=1]}\narms: {'a b': [x=1]}\ndesign: cumul\nseeds: 0\nmetrik: auto\n"
    )
    with pytest.raises(ConfigError) as error:
        load_ablation(path)
    lines = str(error.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines)
    text = str(error.value)
    assert "unknown key 'base.overide' (did you mean 'overrides'?)" in text
    assert "unknown key 'metrik' (did you mean 'metric'?)" in text
    assert "design='cumul' not in {'one_at_a_time', 'leave_one_out', 'cumulative'}" in text
    assert "seeds=0" in text and "arm name 'a b'" in text
    assert len(lines) == 5


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"arms": {}}, "arms"),
        ({"arms": {"a": ["no_equals_sign"]}}, "not of the form key.sub=value"),
        ({"arms": {"base": ["x=1"]}}, "arm name 'base'"),
        ({"seeds": [1, 1]}, "distinct"),
        ({"reference": "+zz"}, "reference='+zz' is not an arm"),
        ({"epochs": 0}, "epochs=0"),
        ({"base": {"overrides": []}}, "base.recipe: required key is missing"),
    ],
)
def test_each_validator_rejects(changes, message):
    with pytest.raises(ConfigError, match="t.yaml: .*" + message.replace("(", r"\(").replace("+", r"\+")):
        make(**changes)


def test_dict_arms_become_overrides_and_seed_count_becomes_a_list():
    ablation = make(seeds=4)
    assert ablation.arms == {"a": ["x.y=1"], "b": ["z=0.5"]}
    assert ablation.seed_list == [0, 1, 2, 3]
    assert make(seeds=[7, 3]).seed_list == [7, 3]


def test_designs_expand_by_hand():
    one = expand(make(design="one_at_a_time", epochs=5))
    assert [(a.name, a.overrides, a.trick, a.reference) for a in one] == [
        ("base", ("epochs=2", "epochs=5"), None, None),
        ("+a", ("epochs=2", "epochs=5", "x.y=1"), "a", "base"),
        ("+b", ("epochs=2", "epochs=5", "z=0.5"), "b", "base"),
    ]
    loo = expand(make(design="leave_one_out"))
    assert [(a.name, a.overrides, a.reference, a.sign) for a in loo] == [
        ("all", ("epochs=2", "x.y=1", "z=0.5"), None, 1),
        ("-a", ("epochs=2", "z=0.5"), "all", -1),
        ("-b", ("epochs=2", "x.y=1"), "all", -1),
    ]
    cumulative = expand(make(design="cumulative"))
    assert [(a.name, a.overrides, a.reference) for a in cumulative] == [
        ("base", ("epochs=2",), None),
        ("+a", ("epochs=2", "x.y=1"), "base"),
        ("+a+b", ("epochs=2", "x.y=1", "z=0.5"), "+a"),
    ]
    fixed = expand(make(design="cumulative", reference="base"))
    assert [a.reference for a in fixed] == [None, "base", "base"]
    assert [arm_folder(a.name) for a in cumulative + loo] == [
        "base", "plus_a", "plus_a_plus_b", "all", "minus_a", "minus_b",
    ]  # fmt: skip


def test_shipped_ablations_load_and_their_arms_are_valid_configs():
    folder = ROOT / "trickbag" / "ablations"
    files = sorted(folder.glob("*.yaml"))
    assert {p.stem for p in files} >= {"digits_demo", "cifar10_fast_tricks"}
    for path in files:
        ablation = load_ablation(path)
        recipe = resolve_recipe(ablation.base.recipe, path.parent)
        for arm in expand(ablation):
            load_config(recipe, list(arm.overrides))  # raises ConfigError on a bad override


def test_resolve_recipe_by_name_or_path(tmp_path):
    assert resolve_recipe("digits").name == "digits.yaml"
    assert resolve_recipe(str(ROOT / "recipes" / "digits.yaml")).is_file()
    with pytest.raises(ValueError, match="neither a file nor a recipe name; recipes: .*digits"):
        resolve_recipe("digitz")


def test_quick_form_builds_the_same_ablation(tmp_path):
    from trickbag.commands.ablate import load_target

    args = argparse.Namespace(
        target="digits", overrides=["epochs=2"], arm=[["ls", "loss.label_smoothing=0.1"]], seeds=2,
        design=None, epochs=None, out=None, resume=None,
    )  # fmt: skip
    ablation, recipe, out = load_target(args)
    assert ablation.arms == {"ls": ["loss.label_smoothing=0.1"]} and ablation.seed_list == [0, 1]
    assert ablation.base.overrides == ["epochs=2"] and recipe.name == "digits.yaml"
    assert out == Path("ablations") / "digits-ls"


# ---------------------------------------------------------------------------------------------------------------
# run folders and the runner (with a fake train command: no torch in the child, fast)


def write_run(folder: Path, seed: int, number: int = 1, result: dict | None = None) -> Path:
    run_dir = folder / f"seed{seed}-{number:03d}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("epochs: 2\n")
    if result is not None:
        (run_dir / "results.json").write_text(json.dumps(result))
    return run_dir


def result(value: float, time_s: float = 10.0, metric: str = "accuracy") -> dict:
    scores = {"loss": 1 - value, metric: value}
    return {
        "status": "finished", "best_metric": metric, "train_time_s": time_s, "images_per_s": 100.0,
        "checkpoints": {"best_metric": {"epoch": 2, "val": scores, "test": dict(scores)}},
    }  # fmt: skip


def test_find_run_dir_prefers_finished_then_newest_started(tmp_path):
    spec = RunSpec(expand(make())[0], 3, tmp_path / "base")
    assert find_run_dir(spec) is None
    first = write_run(spec.folder, 3, 1, result(0.9))
    write_run(spec.folder, 3, 2)  # a later attempt that did not finish
    assert find_run_dir(spec) == first
    (first / "results.json").unlink()
    assert find_run_dir(spec).name == "seed3-002"


def test_results_from_metrics_picks_the_best_metric_epoch(tmp_path):
    run_dir = tmp_path / "seed0-001"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("epochs: 3\neval: {best_metric: accuracy}\n")
    (run_dir / "metrics.csv").write_text(
        "epoch,train_loss,val_loss,accuracy,lr,time_s,images_per_s\n"
        "1,1.0,0.9,0.5,0.1,2.0,100\n2,0.8,0.7,0.8,0.1,3.0,200\n3,0.7,0.75,0.7,0.1,1.0,300\n"
    )
    (run_dir / "best_metric-epoch002-accuracy=0.8").mkdir()
    (run_dir / "best_metric").symlink_to("best_metric-epoch002-accuracy=0.8")
    got = results_from_metrics(run_dir)
    assert got["checkpoints"]["best_metric"] == {
        "epoch": 2, "val": {"loss": 0.7, "accuracy": 0.8}, "test": {"loss": 0.7, "accuracy": 0.8},
    }  # fmt: skip
    assert got["train_time_s"] == 6.0 and got["images_per_s"] == 200.0 and got["best_metric"] == "accuracy"


FAKE_TRAIN = textwrap.dedent(
    """
    import json, os, sys, time
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    if "bad" in args:
        sys.exit(print("config error: unknown key 'bad'", file=sys.stderr) or 2)
    run_dir = os.path.join(args["output_dir"], args["name"] + "-001")
    os.makedirs(run_dir)
    open(os.path.join(run_dir, "config.yaml"), "w").write("epochs: 1\\n")
    time.sleep(0.2)
    s = {"accuracy": 0.5 + int(args["seed"]) / 100 + float(args.get("bonus", 0)), "loss": 1.0}
    r = {"status": "finished", "best_metric": "accuracy", "train_time_s": 1.0, "images_per_s": 1.0,
         "checkpoints": {"best_metric": {"epoch": 1, "val": s, "test": s}}}
    json.dump(r, open(os.path.join(run_dir, "results.json"), "w"))
    """
)


def test_runner_runs_in_parallel_records_failures_and_keeps_finished_runs(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    calls = []

    def fake_command(spec, recipe, run_dir, threads):
        calls.append((spec.arm.name, spec.seed, run_dir))
        return [sys.executable, str(script), *spec.arm.overrides, f"seed={spec.seed}",
                f"output_dir={spec.folder}", f"name=seed{spec.seed}"]  # fmt: skip

    monkeypatch.setattr(ablation_runner, "command_for", fake_command)
    ablation = ablation_from_dict(
        {"base": {"recipe": "digits"}, "arms": {"good": ["bonus=0.1"], "broken": ["bad=1"]}, "seeds": 3}
    )
    out = tmp_path / "abl"
    messages = []
    started = time.monotonic()
    outcomes = run_ablation(ablation, Path("r.yaml"), out, jobs=3, log=messages.append)
    assert time.monotonic() - started < 5
    status = {(o.spec.arm.name, o.spec.seed): o.status for o in outcomes}
    assert status == {(arm, s): ("failed" if arm == "+broken" else "finished") for arm in ("base", "+good", "+broken")
                      for s in (0, 1, 2)}  # fmt: skip
    broken = [o for o in outcomes if o.status == "failed"]
    assert all("exit code 2: config error: unknown key 'bad'" == o.error for o in broken)
    assert any(m.startswith("plan: 9 runs (3 arms x 3 seeds") for m in messages)
    # Rerun: finished runs are kept (not started again), the failed ones are tried again.
    calls.clear()
    again = run_ablation(ablation, Path("r.yaml"), out, jobs=2, log=messages.append)
    assert sorted((arm, seed) for arm, seed, _ in calls) == [("+broken", s) for s in (0, 1, 2)]
    assert [o.run_dir for o in again if o.status == "finished"] == [
        o.run_dir for o in outcomes if o.status == "finished"
    ]
    summary = summarize(ablation, again)
    good = summary.arms[1]
    assert good.delta == pytest.approx(0.1) and good.n == 3 and summary.arms[2].n == 0
    assert summary.arms[2].failed == 3


def test_interrupted_run_is_resumed_not_restarted(tmp_path, monkeypatch):
    ablation = make(seeds=1)
    specs = plan_runs(ablation, tmp_path)
    write_run(specs[0].folder, 0, 1, result(0.9))
    interrupted = write_run(specs[1].folder, 0, 1)  # config.yaml, no results.json: killed mid-run
    seen = []
    monkeypatch.setattr(
        ablation_runner,
        "command_for",
        lambda spec, recipe, run_dir, threads: seen.append(run_dir) or ["false"],
    )
    run_ablation(ablation, Path("r.yaml"), tmp_path, log=lambda _: None)
    assert seen == [interrupted, None]
    monkeypatch.undo()  # the real command resumes that folder, or trains a new one
    command = ablation_runner.command_for(specs[1], Path("r.yaml"), interrupted, 2)
    assert command[1:] == ["-m", "trickbag", "resume", str(interrupted), "--quiet"]
    command = ablation_runner.command_for(specs[1], Path("r.yaml"), None, 2)
    assert command[3:] == ["train", "r.yaml", "epochs=2", "x.y=1", "seed=0",
                           f"output_dir={specs[1].folder}", "name=seed0", "threads=2", "--quiet"]  # fmt: skip


def test_runs_start_seed_by_seed_across_arms_and_come_back_in_table_order(tmp_path, monkeypatch):
    ablation = make(seeds=2)
    started = []
    monkeypatch.setattr(
        ablation_runner,
        "command_for",
        lambda spec, recipe, run_dir, threads: started.append((spec.arm.name, spec.seed)) or ["false"],
    )
    outcomes = run_ablation(ablation, Path("r.yaml"), tmp_path, log=lambda _: None)
    arms = [arm.name for arm in expand(ablation)]
    assert len(arms) >= 2
    assert started == [(arm, seed) for seed in (0, 1) for arm in arms]  # a slow spell hits every arm alike
    assert [(o.spec.arm.name, o.spec.seed) for o in outcomes] == [
        (arm, seed) for arm in arms for seed in (0, 1)
    ]


# ---------------------------------------------------------------------------------------------------------------
# the summary against scipy


def outcomes_from(
    ablation, table: dict[str, list[float]], times: dict[str, float | list[float]]
) -> list[RunOutcome]:
    """Outcomes with ``table``'s scores; ``times``: one training time per arm, or one per seed."""
    outcomes = []
    for spec in plan_runs(ablation, Path("/nowhere")):
        index = ablation.seed_list.index(spec.seed)
        value = table[spec.arm.name][index]
        time = times[spec.arm.name]
        if math.isnan(value):
            outcomes.append(RunOutcome(spec, "failed", error="boom"))
        else:
            outcomes.append(
                RunOutcome(
                    spec, "finished", None, result(value, time if isinstance(time, float) else time[index])
                )
            )
    return outcomes


def test_summary_statistics_match_scipy():
    ablation = make(seeds=5)
    table = {
        "base": [0.90, 0.91, 0.89, 0.92, 0.90],
        "+a": [0.93, 0.94, 0.91, 0.95, 0.935],
        "+b": [0.905, 0.90, 0.895, 0.925, 0.89],
    }
    summary = summarize(ablation, outcomes_from(ablation, table, {"base": 10.0, "+a": 15.0, "+b": 10.0}))
    assert summary.metric == "accuracy" and summary.higher_is_better and summary.scale == 100
    ps = []
    for row in summary.arms:
        values = np.array(table[row.name])
        low, high = sp.t.interval(0.95, 4, loc=values.mean(), scale=sp.sem(values))
        assert (row.mean, row.low, row.high) == pytest.approx((values.mean(), low, high))
        if row.reference:
            d = values - np.array(table["base"])
            assert row.delta == pytest.approx(d.mean())
            assert row.differences == pytest.approx(tuple(d))
            expected = sp.permutation_test(
                (d,), np.mean, permutation_type="samples", n_resamples=np.inf
            ).pvalue
            assert row.p == pytest.approx(expected)
            assert row.delta_low <= row.delta <= row.delta_high
            ps.append(expected)
    # Holm by hand for two p-values: the smaller times 2, the larger max(itself, that), capped at 1
    small, large = sorted(ps)
    expected_holm = sorted([min(1, 2 * small), min(1, max(2 * small, large))])
    assert sorted(row.p_holm for row in summary.arms[1:]) == pytest.approx(expected_holm)
    assert summary.arms[1].time_ratio == pytest.approx(1.5)
    assert any(note.startswith("time ×: the median over seeds") for note in summary.notes)
    # 5 seeds: min p = 2/32 = 0.0625 > 0.025, so nothing can be called helps: the table says why
    assert summary.arms[1].verdict == "cannot tell with 5 seeds"
    assert any("cannot go below p = 2/2^5" in note for note in summary.notes)
    assert any(note.startswith("Seeds needed") for note in summary.notes)


def test_verdicts_with_enough_seeds_and_leave_one_out_sign():
    seeds = 8
    base = [0.90 + 0.001 * i for i in range(seeds)]
    ablation = make(seeds=seeds)
    table = {"base": base, "+a": [v + 0.02 + 0.001 * (i % 2) for i, v in enumerate(base)],
             "+b": [v - 0.03 for v in base]}  # fmt: skip
    rows = summarize(ablation, outcomes_from(ablation, table, dict.fromkeys(table, 1.0))).arms
    assert [row.verdict for row in rows] == ["", "helps", "hurts"]
    # leave one out: "all minus a" is worse than "all", so trick a helps
    loo = make(seeds=seeds, design="leave_one_out")
    table = {
        "all": base,
        "-a": [v - 0.02 for v in base],
        "-b": [v + 0.0001 * (-1) ** i for i, v in enumerate(base)],
    }
    rows = summarize(loo, outcomes_from(loo, table, dict.fromkeys(table, 1.0))).arms
    assert rows[1].delta == pytest.approx(-0.02) and rows[1].verdict == "helps"
    assert rows[2].verdict == "cannot tell with 8 seeds"


def test_failed_runs_drop_out_of_the_pairing_and_outputs_are_written(tmp_path):
    ablation = make(seeds=3)
    table = {"base": [0.9, 0.8, 0.85], "+a": [0.95, math.nan, 0.9], "+b": [0.9, 0.8, 0.85]}
    outcomes = outcomes_from(ablation, table, dict.fromkeys(table, 2.0))
    summary = write_outputs(ablation, outcomes, tmp_path, "trickbag ablate x.yaml")
    row = summary.arms[1]
    assert row.n == 2 and row.failed == 1 and row.differences == pytest.approx((0.05, 0.05))
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9 and rows[4]["status"] == "failed" and rows[4]["error"] == "boom"
    assert (
        rows[0]["test_accuracy"] == "0.9" and rows[0]["val_loss"] != "" and rows[0]["train_time_s"] == "2.0"
    )
    markdown = (tmp_path / "summary.md").read_text()
    assert "| +a | base | 2 (1 failed) |" in markdown and "trickbag ablate x.yaml" in markdown
    assert "<table>" in (tmp_path / "summary.html").read_text()
    for name in ("forest.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# end to end: the real command on a tiny digits ablation, killed with -9 and rerun


TINY = ["epochs=1", "batch_size=128", "threads=1", "model.options={width: 8}", "train.log_every=100"]


@pytest.mark.slow
def test_ablate_end_to_end_survives_kill_9(tmp_path):
    spec = {
        "name": "tiny", "base": {"recipe": str(ROOT / "recipes" / "digits.yaml"), "overrides": TINY},
        "arms": {"label_smoothing": ["loss.label_smoothing=0.2"]}, "seeds": 2,
    }  # fmt: skip
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "abl"
    command = [
        sys.executable,
        "-m",
        "trickbag",
        "ablate",
        str(tmp_path / "tiny.yaml"),
        "--out",
        str(out),
        "--jobs",
        "2",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
    )
    deadline = time.monotonic() + 40
    while not list(out.glob("runs/*/*/results.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/results.json")}
    assert finished, "no run finished within 40 s"
    time.sleep(0.5)  # the children die with the parent (PR_SET_PDEATHSIG)
    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/results.json")}
    rerun = subprocess.run(
        [*command[:4], "--resume", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(finished)} done" in rerun.stdout
    for path, mtime in finished.items():  # not redone
        assert path.stat().st_mtime_ns == mtime
    # one finished run folder per (arm, seed); a run killed before writing anything may leave a number unused
    finished_dirs = sorted(
        p.parent.relative_to(out / "runs").as_posix()[:-4] for p in out.glob("runs/*/*/results.json")
    )
    assert finished_dirs == [
        "base/seed0",
        "base/seed1",
        "plus_label_smoothing/seed0",
        "plus_label_smoothing/seed1",
    ]
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["arm"], r["seed"], r["status"]) for r in rows] == [
        ("base", "0", "finished"), ("base", "1", "finished"),
        ("+label_smoothing", "0", "finished"), ("+label_smoothing", "1", "finished"),
    ]  # fmt: skip
    assert all(0.0 < float(r["test_accuracy"]) <= 1.0 for r in rows)
    assert "+label_smoothing" in (out / "summary.md").read_text()
    assert "cannot tell with 2 seeds" in rerun.stdout


def test_arm_on_the_command_line_adds_to_a_shipped_file_and_a_recipe_path_is_the_quick_form(tmp_path):
    import argparse

    from trickbag.commands.ablate import load_target

    def args(target, *arms, overrides=()):
        return argparse.Namespace(target=target, arm=[list(a) for a in arms] or None, overrides=list(overrides),
                                  resume=None, seeds=None, design=None, epochs=None, out=None)  # fmt: skip

    ablation, _, _ = load_target(args("cifar10_fast_tricks", ("distill", "distill.teacher=t/best_metric")))
    assert "distill" in ablation.arms and "ema" in ablation.arms  # added to the file's arms
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "digits.yaml"
    quick, recipe_path, _ = load_target(args(str(recipe), ("ls", "loss.label_smoothing=0.1")))
    assert list(quick.arms) == ["ls"] and recipe_path.name == "digits.yaml"
    with pytest.raises(FileNotFoundError, match="shipped ablations"):
        load_target(args("no_such_ablation"))


def test_time_ratio_is_paired_by_seed():
    """A slow spell that hit the reference's run of seed 2 but not +b's is not an effect of +b: the median of the
    per-seed ratios reads 1.0 where the ratio of mean times would read 0.71; +a, 1.2x slower in every seed,
    including the spell, reads 1.2."""
    ablation = make(seeds=5)
    table = {"base": [0.9] * 5, "+a": [0.91] * 5, "+b": [0.9] * 5}
    base = [10.0, 10.0, 30.0, 10.0, 10.0]
    plus_a = [12.0, 12.0, 36.0, 12.0, 12.0]
    plus_b = [10.0, 10.0, 10.0, 11.0, 9.0]  # ratios 1, 1, 1/3, 1.1, 0.9: median 1.0, ratio of means 50/70
    summary = summarize(ablation, outcomes_from(ablation, table, {"base": base, "+a": plus_a, "+b": plus_b}))
    by_name = {row.name: row for row in summary.arms}
    assert by_name["+a"].time_ratio == pytest.approx(1.2)
    assert by_name["+b"].time_ratio == pytest.approx(1.0)
    assert np.mean(plus_b) / np.mean(base) == pytest.approx(50 / 70)  # what the unpaired figure would say
