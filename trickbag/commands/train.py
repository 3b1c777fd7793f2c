"""``trickbag train [CONFIG] [key.sub=value ...]``: train a classifier from a recipe name or a YAML file.

CONFIG is a packaged recipe name (``trickbag recipes`` lists them) or a YAML path; without it the embedded
default (digits) runs, and the command says so.

Nothing heavy is imported at module level (``trickbag --help`` stays fast); the handler imports torch and the
rest of trickbag when it runs. The wiring from a config to the trainer's parts lives in ``trickbag.run``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trickbag.commands._common import fit_and_summarize
from trickbag.recipe_files import DEFAULT_RECIPE, recipe_path
from trickbag.run import build_run, new_run_dir

EPILOG = """examples:
  trickbag train                                             the embedded default, digits (~10 s on CPU)
  trickbag train digits epochs=3 optimizer.lr=0.2 name=quick a packaged recipe by name (trickbag recipes)
  trickbag train recipes/digits.yaml                         a YAML file (a path that exists wins over a name)
  trickbag train cifar10_fast data.root=/data/cifar10 precision=bf16
  trickbag train epochs=3                                    the default recipe with overrides
  trickbag train --resume runs/digits-001                    same as `trickbag resume runs/digits-001`
  trickbag train cifar10_fast --nproc 4                      4 processes on this machine (torchrun, DDP)
  torchrun --nproc-per-node 4 -m trickbag train cifar10_fast the same, launched by torchrun yourself

With several processes batch_size is per process: an update sees batch_size x accumulate x processes images,
and the linear LR scaling rule uses that global batch. Rank 0 alone writes the run folder.

A run folder runs/<name>-NNN/ gets config.yaml, train.log, metrics.csv and the checkpoints
last/, best_loss/ and best_metric/ (symlinks to folders named with epoch and value).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a classifier from a YAML config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Train a classifier from a packaged recipe or a YAML config, with key.sub=value overrides.",
    )
    parser.add_argument(
        "config",
        nargs="?",
        help=f"recipe name (e.g. digits; see trickbag recipes) or YAML file; default: {DEFAULT_RECIPE}",
    )
    # REMAINDER so that options may also follow the overrides (`train cfg.yaml epochs=3 --quiet`).
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER, help="key.sub=value overrides, e.g. epochs=5 optimizer.lr=0.2"
    )
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    parser.add_argument("--quiet", action="store_true", help="no console output except the final summary")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train with N processes on this machine (DistributedDataParallel through torchrun; "
        "one per GPU, or gloo on the CPU)",
    )
    parser.set_defaults(func=handle_train, print_help=parser.print_help)


def _options_among_overrides(args) -> None:
    """Move --quiet / --resume X that followed the overrides back to ``args``; other dashes are an error."""
    rest, overrides = list(args.overrides), []
    while rest:
        item = rest.pop(0)
        if item == "--quiet":
            args.quiet = True
        elif item == "--resume" and rest:
            args.resume = rest.pop(0)
        elif item == "--nproc" and rest:
            args.nproc = _positive_int(rest.pop(0), "--nproc")
        elif item.startswith("--nproc="):
            args.nproc = _positive_int(item.partition("=")[2], "--nproc")
        elif item in ("-h", "--help"):
            args.help_requested = True
        elif item.startswith("-"):
            raise ValueError(
                f"unknown option {item!r} for trickbag train (options: --resume RUN_DIR, --quiet, --nproc N)"
            )
        else:
            overrides.append(item)
    args.overrides = overrides


def _positive_int(text: str, name: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name}={text!r} must be an int >= 1")
    return int(text)


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``trickbag train ARGV`` in ``nproc`` processes through torch's own launcher; its exit code.

    torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous on this machine, and stops every process
    as soon as one fails (printing the failing rank's error).
    """
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "trickbag", "train", *argv]  # fmt: skip
    return subprocess.call(command)


def _relaunch_argv(args) -> list[str]:
    argv = [args.config] if args.config else []
    argv += list(args.overrides)
    if args.resume:
        argv += ["--resume", args.resume]
    if args.quiet:
        argv.append("--quiet")
    return argv


def handle_train(args) -> int:
    from trickbag import distributed

    _options_among_overrides(args)
    if getattr(args, "help_requested", False):
        args.print_help()
        return 0
    if args.nproc > 1 and distributed.env_world_size() == 1:
        return launch_torchrun(args.nproc, _relaunch_argv(args))
    if distributed.env_world_size() == 1:
        return _train(args)
    try:
        return _train(args, several=True)
    finally:
        distributed.close()


def _train(args, several: bool = False) -> int:
    """One process of the run (several: under torchrun, joining its process group once the device is known)."""
    from trickbag import distributed
    from trickbag.config import load_config

    if args.resume:
        from trickbag.commands.resume import resume_run

        if args.config and "=" in args.config and not Path(args.config).exists():
            args.overrides.insert(0, args.config)  # `train --resume RUN epochs=N`: an override, not a CONFIG
            args.config = None
        if args.config:
            raise ValueError(
                "--resume takes no CONFIG: the run's own config.yaml is used (epochs=N may extend it)"
            )
        if several:
            _join(load_config(Path(args.resume) / "config.yaml").device)
        return resume_run(args.resume, quiet=args.quiet, overrides=args.overrides)
    if args.config and "=" in args.config and not Path(args.config).exists():
        args.overrides.insert(0, args.config)  # `trickbag train epochs=3`: an override, not a CONFIG
        args.config = None
    if not args.config:
        print(
            f"trickbag train: no CONFIG given: training the embedded default recipe {DEFAULT_RECIPE!r}",
            file=sys.stderr,
        )
        args.config = DEFAULT_RECIPE
    cfg = load_config(recipe_path(args.config), args.overrides)
    if several:
        _join(cfg.device)
    # Rank 0 numbers and creates the run folder; the other processes of a torchrun job are told its path.
    run_dir = distributed.broadcast_object(
        new_run_dir(cfg.output_dir, cfg.name) if distributed.is_main() else None
    )
    try:
        run = build_run(cfg, Path(run_dir), quiet=args.quiet)
    except BaseException:
        # Nothing was trained (bad data path, unknown metric, ...): do not leave an empty runs/NAME-NNN behind.
        if distributed.is_main():
            _remove_unused_run_dir(Path(run_dir))
        raise
    return fit_and_summarize(run)


def _remove_unused_run_dir(run_dir: Path) -> None:
    """Delete a run folder that holds no checkpoint (only what build_run writes before training)."""
    import shutil

    if run_dir.is_dir() and not any(run_dir.glob("last*")):
        shutil.rmtree(run_dir, ignore_errors=True)


def _join(device: str) -> None:
    """Join torchrun's process group; ranks other than 0 print nothing to stdout (errors still reach stderr)."""
    import os

    from trickbag import distributed

    distributed.init_from_env(device)
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this process
