"""``trickbag resume RUN_DIR``: continue a stopped run from its ``last`` checkpoint with the run's own config."""

from __future__ import annotations

import argparse
from pathlib import Path

from trickbag.commands._common import fit_and_summarize
from trickbag.run import build_run

EPILOG = """examples:
  trickbag resume runs/digits-001            continue from runs/digits-001/last (bit-exact on CPU)
  trickbag resume runs/digits-001 epochs=30  extend a finished (or early-stopped) run to 30 epochs

Extending: the schedule becomes the one the run would have had with the new epochs from the start (a cosine or
linear decay is stretched to the new end, so the LR rises from its final value to that curve's value at the
current update); a run that stopped early forgets its patience count and trains on. Only `epochs` may change.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "resume",
        help="continue a stopped run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Continue a run from its last checkpoint with the run's saved config.",
    )
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", help="epochs=N to extend the run (nothing else may change)")
    parser.add_argument("--quiet", action="store_true", help="no console output except the final summary")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine (torchrun); a run resumes with any number",
    )
    parser.set_defaults(func=handle_resume)


def handle_resume(args) -> int:
    from trickbag import distributed

    if args.nproc > 1 and distributed.env_world_size() == 1:  # relaunch through torch's own launcher
        from trickbag.commands.train import launch_torchrun

        return launch_torchrun(
            args.nproc, ["--resume", args.run_dir, *args.overrides, *(["--quiet"] * args.quiet)]
        )
    if distributed.env_world_size() == 1:
        return resume_run(args.run_dir, quiet=args.quiet, overrides=args.overrides)
    from trickbag.commands.train import _join
    from trickbag.config import load_config

    try:  # under torchrun: join the job's process group first
        _join(load_config(Path(args.run_dir) / "config.yaml").device)
        return resume_run(args.run_dir, quiet=args.quiet, overrides=args.overrides)
    finally:
        distributed.close()


def resume_run(run_dir: str | Path, quiet: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> int:
    """Rebuild the run in ``run_dir`` from its config.yaml, restore ``last`` (if any) and train to the end.

    ``overrides`` may only set ``epochs`` (to extend the run; see the command's help for the schedule).
    """
    from trickbag.checkpoint import load_checkpoint
    from trickbag.config import load_config
    from trickbag.train import restore_training_state

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    for override in overrides:
        if override.partition("=")[0].strip() != "epochs":
            raise ValueError(
                f"resume takes only epochs=N (to extend the run), got {override!r}; "
                "other settings belong to a new run: trickbag train CONFIG ..."
            )
    cfg = load_config(run_dir / "config.yaml", overrides)
    run = build_run(cfg, run_dir, quiet=quiet)
    last = _good_last_checkpoint(run_dir, run.parts.checkpointer.latest("last"), run.parts.logger.info)
    state = None
    if last is None:
        run.parts.logger.info("no `last` checkpoint yet: starting the run from the beginning")
    else:
        ckpt = load_checkpoint(last, default_kind="last")
        run.model.load_state_dict(ckpt.weights)
        state = restore_training_state(ckpt.state, run.loaders, run.parts)
        if state.epoch > cfg.epochs:
            raise ValueError(
                f"epochs={cfg.epochs} is less than the {state.epoch} epochs {run_dir} already trained"
            )
        if overrides and cfg.epochs > state.epoch and state.stopped_early:
            state.stopped_early, state.stale_evaluations = False, 0
            run.parts.logger.info(
                f"extending a run that stopped early at epoch {state.epoch}: patience reset"
            )
        if state.stopped_early or state.epoch == cfg.epochs:
            run.parts.logger.info(
                f"{run_dir} is already complete (epoch {state.epoch}{', stopped early' if state.stopped_early else ''}); "
                "nothing to train (extend it with: trickbag resume RUN_DIR epochs=N)"
            )
        else:
            run.parts.logger.info(f"resumed from {last.name} (epoch {state.epoch} of {cfg.epochs})")
    return fit_and_summarize(run, state)


def _good_last_checkpoint(run_dir: Path, pointer: Path | None, log) -> Path | None:
    """The newest `last` checkpoint that verifies (sha256), the pointer's target first; None if there is none.

    A corrupt or unreadable newest `last` falls back to an older `last` folder (still bit-identical from its
    epoch); when only best_* checkpoints are left, which hold no training state, resume refuses and names them.
    """
    from trickbag.checkpoint import find_good_checkpoint

    if pointer is None and not any(run_dir.glob("last-*")):
        return None
    good, problems = find_good_checkpoint(run_dir, "last")
    for problem in problems:
        log(f"resume: skipped {problem}")
    if good is not None and good.name.startswith("last-"):
        if pointer is None or good.resolve() != pointer.resolve():
            log(f"resume: the newest `last` checkpoint is unusable; continuing from the older {good.name}")
        return good
    found = (
        f"the newest good checkpoint is {good} (no training state: it cannot be resumed exactly)"
        if good
        else ("no checkpoint of this run verifies")
    )
    raise ValueError(
        f"{run_dir}: no usable `last` checkpoint ({'; '.join(problems) or 'none found'}); {found}. "
        "Start a new run (trickbag train ...) or restore the files from a backup."
    )
