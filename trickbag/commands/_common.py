"""Helpers shared by the command modules: run ``fit`` and print the end-of-run table; pick a usable precision.

Nothing heavy at module level (``trickbag --help`` imports the command modules); torch and rich load inside.
"""

from __future__ import annotations

import sys

from trickbag.run import Run


def fit_and_summarize(run: Run, state=None) -> int:
    """Train ``run`` (from ``state`` when resuming), close its logger, print the summary; the command's exit code.

    A loss that turns NaN/inf stops the run with exit code 3 and one line on stderr (the log says the same).
    """
    from trickbag.train import NonFiniteLossError, fit

    try:
        state = fit(run.model, run.loaders, run.parts, run.cfg, state)
    except NonFiniteLossError as error:
        run.parts.logger.info(f"stopped: {error}")
        print(f"trickbag train: stopped: {error}", file=sys.stderr)
        return 3
    finally:
        run.parts.logger.close()
    print_summary(run, state)
    return 0


def print_summary(run: Run, state) -> None:
    """The end-of-run table: the epochs and scores of the best and last checkpoints, then where they are."""
    from rich.console import Console
    from rich.table import Table

    metric = run.cfg.eval.best_metric
    keys = list(dict.fromkeys(["val_loss", metric, "accuracy", "macro_f1"]))
    table = Table(title=f"trickbag run {run.run_dir}", title_justify="left")
    table.add_column("checkpoint", no_wrap=True)
    table.add_column("epoch", justify="right", no_wrap=True)
    for key in keys:
        table.add_column(key, justify="right", no_wrap=True)
    for kind in ("best_metric", "best_loss", "last"):
        if run.parts.checkpointer.latest(kind) is None:
            continue
        epoch = {"best_metric": state.best_metric_epoch, "best_loss": state.best_loss_epoch}.get(
            kind, state.epoch
        )
        row = state.history[epoch - 1] if 0 < epoch <= len(state.history) else {}
        cells = [f"{row[key]:.4f}" if isinstance(row.get(key), float) else "-" for key in keys]
        table.add_row(f"{run.run_dir}/{kind}", str(epoch), *cells)
    # Not a terminal (CI, a pipe): wide enough that nothing is cut.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)
    if state.stopped_early:
        console.print(f"stopped early after epoch {state.epoch} (early_stopping.patience)")
    console.print(
        f"logs: {run.run_dir}/metrics.csv, {run.run_dir}/train.log; plots: trickbag report {run.run_dir}",
        soft_wrap=True,
    )


def precision_runs(policy: str, device) -> bool:
    """Whether ``policy`` works on ``device`` (a bf16 GPU run evaluated on a CPU-only machine falls back)."""
    from trickbag.precision import check_precision

    try:
        check_precision(policy, device)
    except ValueError:
        return False
    return True
