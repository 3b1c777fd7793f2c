"""Helpers shared by the command modules: run ``fit`` and print the end-of-run table; pick a usable precision.

Nothing heavy at module level (``trickbag --help`` imports the command modules); torch and rich load inside.
"""

from __future__ import annotations

import sys

from trickbag.run import Run


def fit_and_summarize(run: Run, state=None) -> int:
    """Train ``run`` (from ``state`` when resuming), test its kept checkpoints, print the summary; the exit code.

    A loss that turns NaN/inf stops the run with exit code 3 and one line on stderr (the log says the same).
    """
    from trickbag.run import finish_run, fit_options
    from trickbag.train import NonFiniteLossError, fit

    try:
        state = fit(run.model, run.loaders, run.parts, fit_options(run.cfg), state)
        results = finish_run(run, state)
    except NonFiniteLossError as error:
        run.parts.logger.info(f"stopped: {error}")
        print(f"trickbag train: stopped: {error}", file=sys.stderr)
        return 3
    finally:
        run.parts.logger.close()
    print_summary(run, results)
    return 0


def print_summary(run: Run, results: dict) -> None:
    """The end-of-run table: each kept checkpoint's epoch, its val scores (which chose it) and its test scores."""
    from rich.console import Console
    from rich.table import Table

    metric = results["best_metric"]
    counts = results.get("class_counts")
    imbalanced = imbalanced_counts(counts)
    keys = list(dict.fromkeys(["loss", metric, "accuracy", "macro_f1"]))
    if imbalanced:  # accuracy rewards ignoring the rare classes: macro-F1 first, accuracy last
        keys = list(dict.fromkeys(["macro_f1", metric, "balanced_accuracy", "loss", "accuracy"]))
    table = Table(title=f"trickbag run {run.run_dir}", title_justify="left")
    table.add_column("checkpoint (chosen on val)", no_wrap=True)
    table.add_column("epoch", justify="right", no_wrap=True)
    splits = [split for split in ("val", "test") if any(split in c for c in results["checkpoints"].values())]
    for split in splits:
        for key in keys:
            table.add_column(f"{split} {key}", justify="right", no_wrap=True)
    for kind, entry in results["checkpoints"].items():
        cells = [
            f"{entry[split][key]:.4f}" if isinstance(entry.get(split, {}).get(key), float) else "-"
            for split in splits
            for key in keys
        ]
        table.add_row(f"{run.run_dir}/{kind}", str(entry["epoch"]), *cells)
    # Not a terminal (CI, a pipe): wide enough that nothing is cut.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)
    chosen = results["checkpoints"].get("best_metric") or results["checkpoints"].get("last")
    if imbalanced and chosen is not None and chosen.get("test_per_class"):
        console.print(
            recall_table(chosen["test_per_class"], counts, f"per-class test recall (epoch {chosen['epoch']})")
        )
    chosen = results["checkpoints"].get("best_metric")
    if chosen is not None and "test" in chosen:
        console.print(
            f"report this: test {metric} {chosen['test'][metric]:.4f} of best_metric (epoch {chosen['epoch']}, "
            f"chosen by val {metric} {chosen['val'].get(metric, float('nan')):.4f})"
        )
    elif "last" in results["checkpoints"] and "test" in results["checkpoints"]["last"]:
        last = results["checkpoints"]["last"]
        console.print(
            f"report this: test {metric} {last['test'][metric]:.4f} of last (epoch {last['epoch']}; no validation "
            "set, so nothing was chosen)"
        )
    elif "test" not in splits:
        console.print("no test set: the scores above are validation scores, which chose the checkpoints")
    if results["stopped_early"]:
        console.print(f"stopped early after epoch {results['epochs']} (early_stopping.patience)")
    console.print(
        f"logs: {run.run_dir}/metrics.csv, {run.run_dir}/results.json, {run.run_dir}/train.log; "
        f"plots: trickbag report {run.run_dir}",
        soft_wrap=True,
    )


def imbalanced_counts(class_counts) -> bool:
    """Whether training counts (C,) are imbalanced by ``trickbag.metrics.advise``'s rule (False when unknown)."""
    if not class_counts:
        return False
    from trickbag.metrics.advice import advise

    return advise({str(c): int(n) for c, n in enumerate(class_counts)}).is_imbalanced


def recall_table(per_class: list[dict], class_counts, title: str):
    """A rich Table of each class's recall with its training count, the rarest classes marked "rare"."""
    from rich.table import Table

    from trickbag.longtail import recall_rows

    table = Table(title=title, title_justify="left")
    table.add_column("class")
    table.add_column("train count" if class_counts is not None else "support", justify="right")
    table.add_column("recall", justify="right")
    table.add_column("")
    for row in recall_rows(per_class, class_counts):
        table.add_row(*row)
    return table


def precision_runs(policy: str, device) -> bool:
    """Whether ``policy`` works on ``device`` (a bf16 GPU run evaluated on a CPU-only machine falls back)."""
    from trickbag.precision import check_precision

    try:
        check_precision(policy, device)
    except ValueError:
        return False
    return True
