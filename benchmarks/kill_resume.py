"""kill -9 a real ``trickbag train`` at random moments, resume until done, compare with an uninterrupted run.

One uninterrupted run of the config gives the reference (its wall time T, start-up included). Then, seeded:
start ``python -m trickbag train CONFIG``, send SIGKILL after a delay drawn uniformly from (0, T), and
``python -m trickbag resume RUN_DIR`` (each resume killed the same way) until a process finishes on its own;
compare the final ``last`` checkpoint's weights and training state (optimizer, RNG, ...) tensor by tensor, bit
for bit, with the reference's; repeat with fresh runs until ``--kills`` kills have happened. A kill before the run
folder's config.yaml exists restarts with ``train`` (nothing to resume). Deterministic on CPU (digits: 1 thread).

    .venv/bin/python benchmarks/kill_resume.py [--config recipes/digits.yaml] [--kills 20] [--seed 0]
"""

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trickbag.checkpoint import load_checkpoint


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trickbag", *command, "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_dir_of(output_dir: Path) -> Path | None:
    runs = sorted(output_dir.glob("*-[0-9][0-9][0-9]"))
    return runs[-1] if runs else None


WALL_CLOCK = {"time_s", "images_per_s", "train_time_s"}  # differ by nature; every other field must match
# trickbag seeds torch only; numpy's and Python's global generators start from OS entropy in every process (two
# uninterrupted runs differ there too) and training draws nothing from them, so their saved states are skipped.
UNSEEDED = {"state.rng.numpy", "state.rng.python"}


def same_tensors(a, b, where: str, differences: list[str]) -> None:
    """Walk two nested state structures; record every place where they differ (dtype, shape or any bit)."""
    if where in UNSEEDED:
        return
    if isinstance(a, torch.Tensor):
        if not (
            isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        ):
            differences.append(where)
    elif isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            differences.append(f"{where} (keys)")
        else:
            for key in a:
                if key not in WALL_CLOCK:
                    same_tensors(a[key], b[key], f"{where}.{key}", differences)
    elif isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            differences.append(f"{where} (length)")
        else:
            for i, (x, y) in enumerate(zip(a, b)):
                same_tensors(x, y, f"{where}[{i}]", differences)
    elif a != b and not (a != a and b != b):  # NaN equals NaN here
        differences.append(where)


def compare(reference: Path, run_dir: Path) -> list[str]:
    ours = load_checkpoint(run_dir / "last", default_kind="last")
    ref = load_checkpoint(reference / "last", default_kind="last")
    differences: list[str] = []
    same_tensors(ref.weights, ours.weights, "weights", differences)
    same_tensors(ref.state, ours.state, "state", differences)
    return differences


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="recipes/digits.yaml")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="trickbag-kill-resume-"))

    started = time.perf_counter()
    reference_run = start(["train", args.config, f"output_dir={work / 'reference'}"])
    _, stderr = reference_run.communicate()
    full_s = time.perf_counter() - started
    if reference_run.returncode != 0:
        print(f"reference run failed ({reference_run.returncode}): {stderr[-2000:]}")
        return 1
    reference = run_dir_of(work / "reference")
    print(
        f"reference: {reference} in {full_s:.1f} s (kills drawn uniformly in 0..{full_s:.1f} s after each start)"
    )

    kills, runs, failures = 0, 0, []
    while kills < args.kills:
        runs += 1
        output_dir = work / f"killed-{runs:02d}"
        processes = 0
        while True:
            run_dir = run_dir_of(output_dir)
            resumable = run_dir is not None and (run_dir / "config.yaml").is_file()
            process = start(
                ["resume", str(run_dir)] if resumable else ["train", args.config, f"output_dir={output_dir}"]
            )
            processes += 1
            delay = rng.uniform(0, full_s) if kills < args.kills else None
            try:
                _, stderr = process.communicate(timeout=delay)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.communicate()
                kills += 1
                print(
                    f"  run {runs}: kill {kills} after {delay:.1f} s ({'resume' if resumable else 'train'})"
                )
                continue
            if process.returncode != 0:
                failures.append(f"run {runs}: exit {process.returncode}: {stderr.strip()[-1000:]}")
                print(f"  run {runs}: FAILED, exit {process.returncode}: {stderr.strip()[-500:]}")
                break
            differences = compare(reference, run_dir_of(output_dir))
            verdict = "bit-identical to the reference" if not differences else f"DIFFERS in {differences[:5]}"
            print(f"  run {runs}: finished after {processes} processes: {verdict}")
            if differences:
                failures.append(f"run {runs}: {len(differences)} differences, first {differences[:5]}")
            break
    print(f"result: {kills} kill -9s over {runs} runs; {runs - len(failures)} of {runs} final checkpoints bit-identical "
          f"to an uninterrupted run; {len(failures)} failures")  # fmt: skip
    for failure in failures:
        print(f"  {failure[:500]}")
    print(f"(files kept in {work})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
