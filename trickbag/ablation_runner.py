"""Run an ablation: every (arm, seed) is an ordinary ``trickbag train`` run folder, N at a time, resumable.

Layout of an ablation folder ``ABL/``::

    ABL/ablation.yaml            the validated ablation (recipe as an absolute path): what --resume reads
    ABL/runs/<arm>/seed<S>-NNN/  ordinary run folders (trickbag report / eval / predict work on them)
    ABL/logs/<arm>-seed<S>.out   stdout and stderr of each run's process
                       .err

State of a run, decided from its folder alone, so a rerun after kill -9 at any moment does the right thing:
``results.json`` present -> done (kept); ``config.yaml`` but no results -> ``trickbag resume`` (from ``last``,
or from the start when no epoch finished); no folder -> ``trickbag train``. Child processes get SIGKILL when
the ablate process dies (Linux ``PR_SET_PDEATHSIG``), so a rerun never races an orphan in the same folder.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trickbag.ablation import Ablation, Arm, arm_folder, expand

# ---------------------------------------------------------------------------------------------------------------
# Plan and run folders


@dataclass
class RunSpec:
    """One (arm, seed) of the plan; ``folder`` holds its run folder(s) ``seed<S>-NNN``."""

    arm: Arm
    seed: int
    folder: Path

    @property
    def label(self) -> str:
        return f"{self.arm.name} seed {self.seed}"

    @property
    def log_stem(self) -> Path:
        return self.folder.parent.parent / "logs" / f"{self.folder.name}-seed{self.seed}"


@dataclass
class RunOutcome:
    spec: RunSpec
    status: str  # "finished" (or results.json's own status, e.g. "stopped_early") | "failed"
    run_dir: Path | None = None
    result: dict[str, Any] | None = None
    error: str = ""
    wall_s: float = 0.0


def plan_runs(ablation: Ablation, out_dir: Path) -> list[RunSpec]:
    """Every (arm, seed) in table order, seeds inner: each arm's runs stay together in the folder."""
    return [
        RunSpec(arm, seed, out_dir / "runs" / arm_folder(arm.name))
        for arm in expand(ablation)
        for seed in ablation.seed_list
    ]


def find_run_dir(spec: RunSpec) -> Path | None:
    """The run folder of ``spec``: the newest with results.json, else the newest with config.yaml, else None."""
    found = sorted(spec.folder.glob(f"seed{spec.seed}-[0-9][0-9][0-9]"))
    for wanted in ("results.json", "config.yaml"):
        for run_dir in reversed(found):
            if (run_dir / wanted).is_file():
                return run_dir
    return None


def read_result(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text(encoding="utf-8"))


def results_from_metrics(run_dir: Path) -> dict[str, Any]:
    """A ``results.json``-shaped dict from metrics.csv, for a trickbag whose train does not write one yet.

    Such a run has one evaluation set, so ``val`` and ``test`` hold the same scores (marked in ``note``).
    """
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{run_dir}/metrics.csv has no epochs")
    best = Path(os.readlink(run_dir / "best_metric")).name if (run_dir / "best_metric").is_symlink() else ""
    match = re.search(r"epoch(\d+)", best)
    epoch = int(match.group(1)) if match else len(rows)
    row = next((r for r in rows if int(r["epoch"]) == epoch), rows[-1])
    skip = {"epoch", "train_loss", "lr", "time_s", "images_per_s"}
    scores = {
        ("loss" if key == "val_loss" else key.removeprefix("val_")): float(value)
        for key, value in row.items()
        if key not in skip and value not in ("", None)
    }
    times = [float(r["time_s"]) for r in rows if r.get("time_s")]
    speeds = [float(r["images_per_s"]) for r in rows if r.get("images_per_s")]
    return {
        "status": "finished",
        "stopped_early": len(rows) < int(config["epochs"]),
        "epochs": len(rows),
        "best_metric": config["eval"]["best_metric"],
        "train_time_s": sum(times),
        "images_per_s": sum(speeds) / len(speeds) if speeds else 0.0,
        "checkpoints": {"best_metric": {"epoch": epoch, "val": scores, "test": scores}},
        "note": "written by trickbag ablate from metrics.csv: one evaluation set, val and test are the same scores",
    }


def save_spec(ablation: Ablation, recipe: Path, out_dir: Path) -> None:
    """Write ABL/ablation.yaml, or check that the one there describes the same ablation.

    Raises:
        ValueError: the folder holds a different ablation (rerunning into it would mix two experiments).
    """
    data = ablation.model_dump(mode="json")
    data["base"]["recipe"] = str(Path(recipe).resolve())
    path = out_dir / "ablation.yaml"
    if path.is_file():
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
        recipe_then = Path(old.get("base", {}).get("recipe", ""))
        if recipe_then.is_file():  # the same file reached through a moved folder or a symlink is the same
            old["base"]["recipe"] = str(recipe_then.resolve())
        changed = sorted(key for key in set(old) | set(data) if old.get(key) != data.get(key))
        if changed:
            raise ValueError(
                f"{out_dir} holds a different ablation (keys {', '.join(changed)} differ from {path}); "
                "choose another --out, or delete the folder to start over"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------------------------
# Processes


def default_threads(jobs: int) -> int:
    """Cores available to this process divided between ``jobs`` runs (at least 1 each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // jobs)


def command_for(spec: RunSpec, recipe: Path, run_dir: Path | None, threads: int | None) -> list[str]:
    """The command line of one run: ``trickbag resume RUN_DIR`` or ``trickbag train RECIPE overrides...``."""
    if run_dir is not None:
        return [sys.executable, "-m", "trickbag", "resume", str(run_dir), "--quiet"]
    extra = [f"threads={threads}"] if threads else []
    return [
        sys.executable, "-m", "trickbag", "train", str(recipe), *spec.arm.overrides, f"seed={spec.seed}",
        f"output_dir={spec.folder}", f"name=seed{spec.seed}", *extra, "--quiet",
    ]  # fmt: skip


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent dies (Linux); elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _last_line(*paths: Path) -> str:
    for path in paths:
        if path.is_file():
            lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if lines:
                return lines[-1]
    return ""


@dataclass
class _Slot:
    spec: RunSpec
    process: subprocess.Popen
    started: float
    handles: list = field(default_factory=list)


def run_ablation(
    ablation: Ablation,
    recipe: Path,
    out_dir: Path,
    jobs: int = 1,
    threads: int | None = None,
    devices: list[str] | None = None,
    log=print,
) -> list[RunOutcome]:
    """Run (or finish) every run of the plan, ``jobs`` at a time, seed by seed across the arms; returns one outcome
    per (arm, seed), in table order (``plan_runs``).

    Args:
        recipe: resolved base recipe file.
        threads: torch threads per run (None: the recipe's own); ``--jobs`` divides the cores.
        devices: CUDA device ids to spread runs over (one per run at a time, via CUDA_VISIBLE_DEVICES).
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs!r} must be >= 1")
    specs = plan_runs(ablation, out_dir)
    outcomes: dict[int, RunOutcome] = {}
    todo: list[tuple[int, Path | None]] = []
    for index, spec in enumerate(specs):
        run_dir = find_run_dir(spec)
        if run_dir is not None and (run_dir / "results.json").is_file():
            outcomes[index] = _finished(spec, run_dir, 0.0)
        else:
            todo.append((index, run_dir))
    resumed = sum(1 for _, run_dir in todo if run_dir is not None)
    log(
        f"plan: {len(specs)} runs ({len(expand(ablation))} arms x {len(ablation.seed_list)} seeds, "
        f"design {ablation.design}); {len(outcomes)} done, {resumed} to resume, {len(todo) - resumed} to start; "
        f"{jobs} at a time" + (f", {threads} threads each" if threads else "")
    )
    done_times = [o.result.get("train_time_s", 0.0) for o in outcomes.values() if o.result]
    if todo and done_times:
        log(f"estimated time: {_estimate(done_times, len(todo), jobs)} (from the finished runs' train time)")
    elif todo:
        log("estimated time: printed once the first run finishes")

    running: list[_Slot] = []
    free_devices = list(devices or [])
    # Seed by seed across the arms (all arms of seed 0, then of seed 1, ...): a machine's slow spell or an
    # interruption then falls on every arm alike, so the time column and a partial table stay paired.
    seed_rank = {seed: rank for rank, seed in enumerate(ablation.seed_list)}
    queue = sorted(todo, key=lambda item: (seed_rank[specs[item[0]].seed], item[0]))
    wall_times: list[float] = []
    try:
        while queue or running:
            while queue and len(running) < jobs:
                index, run_dir = queue.pop(0)
                running.append(_start(specs[index], index, recipe, run_dir, threads, free_devices))
                log(f"{'resume' if run_dir else 'start'}: {specs[index].label}")
            time.sleep(0.1)
            for slot in [s for s in running if s.process.poll() is not None]:
                running.remove(slot)
                for handle in slot.handles[:-1]:
                    handle.close()
                if slot.handles[-1] is not None:
                    free_devices.append(slot.handles[-1])
                outcome = _collect(slot, time.monotonic() - slot.started)
                outcomes[slot.process.index] = outcome
                wall_times.append(outcome.wall_s)
                log(f"{outcome.status}: {slot.spec.label}" + (f" ({outcome.error})" if outcome.error else ""))
                if len(wall_times) == 1 and queue:
                    log(f"estimated time left: {_estimate(wall_times, len(queue) + len(running), jobs)}")
    finally:
        for slot in running:  # interrupted (Ctrl-C): leave no orphan writing into the folder
            slot.process.kill()
            slot.process.wait()
    return [outcomes[index] for index in range(len(specs))]


def _estimate(seconds: list[float], runs: int, jobs: int) -> str:
    total = sum(seconds) / len(seconds) * runs / jobs
    return f"~{total / 60:.1f} min" if total >= 90 else f"~{total:.0f} s"


def _start(spec, index, recipe, run_dir, threads, free_devices) -> _Slot:
    spec.log_stem.parent.mkdir(parents=True, exist_ok=True)
    spec.folder.mkdir(parents=True, exist_ok=True)
    if run_dir is None:  # a folder killed before its config.yaml was written holds nothing: reuse its number
        for leftover in spec.folder.glob(f"seed{spec.seed}-[0-9][0-9][0-9]"):
            if leftover.is_dir() and not any(leftover.iterdir()):
                leftover.rmdir()
    out = open(spec.log_stem.with_suffix(".out"), "a", encoding="utf-8")
    err = open(spec.log_stem.with_suffix(".err"), "w", encoding="utf-8")
    env = dict(os.environ)
    device = free_devices.pop(0) if free_devices else None
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    process = subprocess.Popen(
        command_for(spec, recipe, run_dir, threads),
        stdout=out,
        stderr=err,
        stdin=subprocess.DEVNULL,
        env=env,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    process.index = index  # type: ignore[attr-defined]
    return _Slot(spec, process, time.monotonic(), [out, err, device])


def _finished(spec: RunSpec, run_dir: Path, wall_s: float) -> RunOutcome:
    result = read_result(run_dir)
    return RunOutcome(spec, str(result.get("status", "finished")), run_dir, result, "", wall_s)


def _collect(slot: _Slot, wall_s: float) -> RunOutcome:
    spec, code = slot.spec, slot.process.returncode
    run_dir = find_run_dir(spec)
    error = _last_line(spec.log_stem.with_suffix(".err"), spec.log_stem.with_suffix(".out"))
    if run_dir is not None and code == 0 and not (run_dir / "results.json").is_file():
        try:  # a trickbag whose train writes no results.json yet: derive it from metrics.csv
            result = results_from_metrics(run_dir)
        except (OSError, ValueError, KeyError) as problem:
            return RunOutcome(spec, "failed", run_dir, None, f"no results.json and {problem}", wall_s)
        temporary = run_dir / "results.json.tmp"
        temporary.write_text(json.dumps(result, indent=1), encoding="utf-8")
        os.replace(temporary, run_dir / "results.json")
    if run_dir is not None and (run_dir / "results.json").is_file():
        outcome = _finished(spec, run_dir, wall_s)
        if code != 0:  # e.g. stopped on a non-finite loss: the run ended, say how
            outcome.error = f"exit code {code}: {error}"
        return outcome
    return RunOutcome(spec, "failed", run_dir, None, f"exit code {code}: {error}", wall_s)
