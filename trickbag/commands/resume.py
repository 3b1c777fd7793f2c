"""``trickbag resume RUN_DIR``: continue a stopped run from its ``last`` checkpoint with the run's own config."""

from __future__ import annotations

import argparse
from pathlib import Path

from trickbag.commands._common import fit_and_summarize
from trickbag.run import build_run

EPILOG = """examples:
  trickbag resume runs/digits-001        continue from runs/digits-001/last (bit-exact on CPU when deterministic)
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
    parser.add_argument("--quiet", action="store_true", help="no console output except the final summary")
    parser.set_defaults(func=handle_resume)


def handle_resume(args) -> int:
    return resume_run(args.run_dir, quiet=args.quiet)


def resume_run(run_dir: str | Path, quiet: bool = False) -> int:
    """Rebuild the run in ``run_dir`` from its config.yaml, restore ``last`` (if any) and train to the end."""
    from trickbag.checkpoint import load_checkpoint
    from trickbag.config import load_config
    from trickbag.train import restore_training_state

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    run = build_run(cfg, run_dir, quiet=quiet)
    last = run.parts.checkpointer.latest("last")
    state = None
    if last is None:
        run.parts.logger.info("no `last` checkpoint yet: starting the run from the beginning")
    else:
        ckpt = load_checkpoint(last, default_kind="last")
        run.model.load_state_dict(ckpt.weights)
        state = restore_training_state(ckpt.state, run.loaders, run.parts)
        run.parts.logger.info(f"resumed from {last.name} (epoch {state.epoch} of {cfg.epochs})")
    return fit_and_summarize(run, state)
