"""``trickbag ablate``: which trick helped, measured over seeds with confidence intervals."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

EPILOG = """examples:
  trickbag ablate digits_demo                          a shipped ablation (2 tricks x 3 seeds, ~2 min on 2 cores)
  trickbag ablate cifar10_fast_tricks data.root=/data/cifar10   a base override added to a shipped file
  trickbag ablate my_ablation.yaml --jobs 2            two runs at a time (the cores are divided between them)
  trickbag ablate digits epochs=5 --arm ls loss.label_smoothing=0.1 --arm mixup mixing.mixup_alpha=0.2 --seeds 5
  trickbag ablate --resume ablations/digits_demo       finish an interrupted ablation (same as rerunning it)

Designs: one_at_a_time (base vs base + each trick), leave_one_out (all tricks vs all minus each one),
cumulative (tricks stacked in order, each row vs the row before). Every arm runs the same seeds (paired).
Each run is an ordinary run folder under OUT/runs/ (trickbag report/eval/predict work on it). Rerunning keeps
finished runs, resumes interrupted ones from their last checkpoint and starts the rest.
OUT gets results.csv, summary.md, summary.html, forest.png and curves.png.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ablate",
        help="measure which tricks help, over seeds, with confidence intervals",
        description="Run an ablation (an ablation YAML, or a recipe plus --arm options) and summarize it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "target", nargs="?", help="ablation YAML (path or shipped name), or a recipe with --arm"
    )
    parser.add_argument("overrides", nargs="*", help="base overrides key.sub=value (e.g. data.root=DIR)")
    parser.add_argument(
        "--arm", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"), help="quick form: a trick to test"
    )
    parser.add_argument("--seeds", type=int, help="number of seeds 0..N-1 (default: the file's, or 3)")
    parser.add_argument(
        "--design", choices=("one_at_a_time", "leave_one_out", "cumulative"), help="quick form"
    )
    parser.add_argument("--epochs", type=int, help="epochs of every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--out", type=Path, help="ablation folder (default: ablations/<name>)")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue the ablation in DIR")
    parser.set_defaults(func=handle_ablate)


def load_target(args):
    """(Ablation, recipe path, out dir) from the arguments."""
    from trickbag.ablation import ablation_from_dict, load_ablation, resolve_ablation_file, resolve_recipe

    if args.resume is not None:
        if args.target or args.arm:
            raise ValueError("--resume DIR takes no ablation file or --arm: DIR/ablation.yaml is used")
        if not (args.resume / "ablation.yaml").is_file():
            raise FileNotFoundError(f"{args.resume} is not an ablation folder (no ablation.yaml)")
        ablation = load_ablation(args.resume / "ablation.yaml")
        return ablation, resolve_recipe(ablation.base.recipe), args.resume
    if not args.target:
        raise ValueError(
            "trickbag ablate needs an ablation file (e.g. digits_demo), a recipe with --arm, or --resume"
        )
    arms = {name: overrides for name, *overrides in (args.arm or [])}
    path = _ablation_file_or_none(args.target)
    if path is None:  # the quick form: a recipe plus --arm options
        if not arms:
            resolve_ablation_file(args.target)  # raises, naming the shipped ablations
        raw = {"base": {"recipe": args.target, "overrides": args.overrides}, "arms": arms}
        raw["name"] = "-".join([Path(args.target).stem, *arms])
        source, relative_to = "command line", None
    else:
        ablation = load_ablation(path)
        raw, source, relative_to = ablation.model_dump(), str(path), path.parent
        raw["base"]["overrides"] += args.overrides  # e.g. data.root=/data/cifar10 for a shipped file
        if arms:  # --arm adds arms to a file's (e.g. distillation with your own teacher)
            raw["arms"] = {**raw["arms"], **arms}
            raw["name"] = "-".join([raw["name"], *arms])
    for key in ("seeds", "design", "epochs"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    ablation = ablation_from_dict(raw, source)
    recipe = resolve_recipe(ablation.base.recipe, relative_to)
    return ablation, recipe, args.out or Path("ablations") / ablation.name


def _ablation_file_or_none(target: str) -> Path | None:
    import yaml

    from trickbag.ablation import resolve_ablation_file

    try:
        path = resolve_ablation_file(target)
    except FileNotFoundError:
        return None
    try:  # a recipe YAML given by path is the quick form's base, not an ablation file
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return path  # load_ablation reports the syntax error with its line
    return path if isinstance(raw, dict) and ("arms" in raw or "base" in raw) else None


def threads_per_run(recipe: Path, overrides: tuple[str, ...], jobs: int) -> int:
    """cores // jobs, or the recipe's own thread count when smaller (tiny models run best on one thread)."""
    from trickbag.ablation_runner import default_threads
    from trickbag.config import load_config

    share = default_threads(jobs)
    own = load_config(recipe, list(overrides)).threads
    return min(share, own) if own else share


def cuda_devices() -> list[str]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(index) for index in range(count)] if count > 1 else []


def handle_ablate(args) -> int:
    from trickbag.ablation import expand
    from trickbag.ablation_runner import run_ablation, save_spec
    from trickbag.ablation_summary import print_summary, write_outputs

    ablation, recipe, out_dir = load_target(args)
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: must be >= 1")
    save_spec(ablation, recipe, out_dir)
    threads = threads_per_run(recipe, expand(ablation)[0].overrides, args.jobs)
    devices = cuda_devices()
    print(f"ablation {ablation.name}: base {recipe}, folder {out_dir}")
    outcomes = run_ablation(ablation, recipe, out_dir, args.jobs, threads, devices)
    command = (
        "trickbag ablate " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if sys.argv[1:2] == ["ablate"]
        else ""
    )
    summary = write_outputs(ablation, outcomes, out_dir, command)
    print_summary(summary)
    failed = [o for o in outcomes if o.status == "failed"]
    print(f"wrote {out_dir}/results.csv, summary.md, summary.html, forest.png, curves.png")
    if failed:
        print(
            f"{len(failed)} of {len(outcomes)} runs failed (see results.csv and {out_dir}/logs/)",
            file=sys.stderr,
        )
    return 1 if failed else 0
