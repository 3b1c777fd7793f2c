"""What an ablation found: results.csv, the per-arm summary (terminal, Markdown, HTML) and its plots.

``summarize(ablation, outcomes)`` computes, per arm, on the chosen *test* metric of each run's ``best_metric``
checkpoint (chosen on validation): mean ± Student-t 95% CI over seeds, the paired difference with the arm it is
compared with (bootstrap 95% CI over seeds), the exact sign-flip permutation p-value, Holm-adjusted across arms,
the train-time ratio and a verdict on the trick; plus one line on how many seeds would resolve the smallest
effect of interest. Plots use matplotlib's object API on the Agg canvas (no pyplot global state).
"""

from __future__ import annotations

import csv
import html
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trickbag.ablation import Ablation, expand
from trickbag.ablation_runner import RunOutcome
from trickbag.stats import bootstrap_ci, holm, mean_ci, seeds_needed, sign_flip_p_value, verdict


@dataclass
class ArmSummary:
    name: str
    trick: str | None
    reference: str | None
    n: int  # seeds with a score
    failed: int
    mean: float
    low: float
    high: float
    delta: float = math.nan  # mean of (arm - reference) over the seeds both have
    delta_low: float = math.nan
    delta_high: float = math.nan
    p: float = math.nan
    p_holm: float = math.nan
    time_ratio: float = math.nan
    verdict: str = ""
    differences: tuple[float, ...] = ()


@dataclass
class Summary:
    metric: str
    higher_is_better: bool
    scale: float  # 100 for scores shown in percent / points, 1 for losses
    arms: list[ArmSummary]
    notes: list[str]


def chosen_metric(ablation: Ablation, outcomes: list[RunOutcome]) -> str:
    """The metric to compare: the file's, or with "auto" the runs' own best_metric (the advice's choice)."""
    if ablation.metric != "auto":
        return ablation.metric
    names = Counter(o.result.get("best_metric", "accuracy") for o in outcomes if o.result)
    return names.most_common(1)[0][0] if names else "accuracy"


def reported_checkpoint(result: dict | None) -> dict:
    """The checkpoint a run reports: best_metric (chosen on val), or `last` when the run chose nothing
    (``data.val_fraction=0`` and no val folder: a fixed schedule whose final weights are the result)."""
    checkpoints = (result or {}).get("checkpoints", {})
    return checkpoints.get("best_metric") or checkpoints.get("last") or {}


def test_score(outcome: RunOutcome, metric: str) -> float | None:
    """The test score of ``metric`` at the run's reported checkpoint (None when the run has none)."""
    if not outcome.result:
        return None
    scores = reported_checkpoint(outcome.result).get("test") or {}
    value = scores.get("loss" if metric == "val_loss" else metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def summarize(ablation: Ablation, outcomes: list[RunOutcome], resamples: int = 10_000) -> Summary:
    metric = chosen_metric(ablation, outcomes)
    higher = not metric.endswith("loss")
    by_arm: dict[str, dict[int, RunOutcome]] = {}
    for outcome in outcomes:
        by_arm.setdefault(outcome.spec.arm.name, {})[outcome.spec.seed] = outcome
    scores = {
        arm: {seed: s for seed, o in runs.items() if (s := test_score(o, metric)) is not None}
        for arm, runs in by_arm.items()
    }
    times = {
        arm: {seed: float(o.result.get("train_time_s", math.nan)) for seed, o in runs.items() if o.result}
        for arm, runs in by_arm.items()
    }
    rows = []
    for arm in expand(ablation):
        values = scores.get(arm.name, {})
        ci = mean_ci(list(values.values())) if values else None
        row = ArmSummary(
            arm.name, arm.trick, arm.reference, len(values), len(by_arm.get(arm.name, {})) - len(values),
            ci.mean if ci else math.nan, ci.low if ci else math.nan, ci.high if ci else math.nan,
        )  # fmt: skip
        reference = scores.get(arm.reference or "", {})
        seeds = sorted(set(values) & set(reference))
        if arm.reference and seeds:
            d = np.array([values[s] - reference[s] for s in seeds])
            row.differences = tuple(d.tolist())
            row.delta = float(d.mean())
            row.delta_low, row.delta_high = bootstrap_ci(d, resamples=resamples, seed=0)
            row.p = sign_flip_p_value(d)
            # Paired, as the accuracy: the runs of one seed start back to back (``run_ablation``), so a slow spell
            # of the machine falls on both sides of a ratio; a ratio of the arms' mean times would read it as
            # an effect of the trick.
            ratios = [times[arm.name][s] / times[arm.reference][s] for s in seeds]
            finite = [r for r in ratios if math.isfinite(r)]
            row.time_ratio = float(np.median(finite)) if finite else math.nan
        rows.append(row)
    compared = [row for row in rows if row.reference]
    for row, adjusted in zip(compared, holm([row.p for row in compared])):
        row.p_holm = adjusted
        sign = next(a.sign for a in expand(ablation) if a.name == row.name)
        # The verdict is on the trick: sign flips leave-one-out's "all minus trick" into "trick".
        low, high = (row.delta_low, row.delta_high) if sign > 0 else (-row.delta_high, -row.delta_low)
        row.verdict = verdict(low, high, adjusted, len(row.differences), ablation.alpha, higher)
    scale = 100.0 if higher else 1.0
    return Summary(metric, higher, scale, rows, _notes(ablation, compared, scale, metric))


def _notes(ablation: Ablation, compared: list[ArmSummary], scale: float, metric: str) -> list[str]:
    notes = []
    if any(not math.isnan(row.time_ratio) for row in compared):
        notes.append(
            "time ×: the median over seeds of the arm's training time over its reference's in the same seed "
            "(the runs of a seed start back to back)."
        )
    m = max(1, len(compared))
    n = min((len(row.differences) for row in compared), default=0)
    if n and 2 / 2**n >= ablation.alpha / m:
        notes.append(
            f"With {n} seeds the exact sign-flip test cannot go below p = 2/2^{n} = {2 / 2**n:.3g} "
            f"(≥ alpha/{m} = {ablation.alpha / m:.3g} for Holm's first step): no arm can be called helps/hurts; "
            "add seeds."
        )
    variances = [np.var(row.differences, ddof=1) for row in compared if len(row.differences) >= 2]
    if variances:
        sd = float(math.sqrt(np.mean(variances)))
        effect = ablation.smallest_effect
        needed = seeds_needed(effect, sd, alpha=ablation.alpha, comparisons=m)
        unit = "points" if scale == 100 else metric
        notes.append(
            f"Seeds needed: to resolve an effect of {effect * scale:g} {unit} with the observed spread of paired "
            f"differences (sd {sd * scale:.3g} {unit}, pooled over arms), n = {needed} seeds per arm — the "
            f"smallest n with n ≥ ((t(1-a/2, n-1) + t(0.8, n-1)) · sd / effect)² (paired t test, power 0.8, "
            f"a = {ablation.alpha}/{m}) and 2/2^n < a."
        )
    return notes


# ---------------------------------------------------------------------------------------------------------------
# Files


def write_results_csv(outcomes: list[RunOutcome], path: Path) -> None:
    """One row per run: arm, seed, status, every val_/test_ metric of best_metric, train time, images/s."""
    keys: list[str] = []
    for outcome in outcomes:
        best = reported_checkpoint(outcome.result)
        for split in ("val", "test"):
            keys += [f"{split}_{k}" for k in (best.get(split) or {}) if f"{split}_{k}" not in keys]
    header = [
        "arm",
        "trick",
        "seed",
        "status",
        "best_epoch",
        *keys,
        "train_time_s",
        "images_per_s",
        "run_dir",
        "error",
    ]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for o in outcomes:
            result = o.result or {}
            best = reported_checkpoint(result)
            flat = {
                f"{split}_{k}": v for split in ("val", "test") for k, v in (best.get(split) or {}).items()
            }
            writer.writerow(
                [o.spec.arm.name, o.spec.arm.trick or "", o.spec.seed, o.status, best.get("epoch", "")]
                + [flat.get(k, "") for k in keys]
                + [result.get("train_time_s", ""), result.get("images_per_s", ""), o.run_dir or "", o.error]
            )


COLUMNS = (
    "arm",
    "vs",
    "n",
    "mean ± 95% CI",
    "Δ [95% bootstrap CI]",
    "p",
    "p (Holm)",
    "time ×",
    "verdict on trick",
)


def table_rows(summary: Summary) -> list[list[str]]:
    def number(value: float, digits: int = 2, sign: bool = False) -> str:
        return "–" if math.isnan(value) else f"{value * summary.scale:{'+' if sign else ''}.{digits}f}"

    rows = []
    for row in summary.arms:
        ci = (
            f"{number(row.mean)} ± {number(row.high - row.mean)}"
            if not math.isnan(row.low)
            else number(row.mean)
        )
        delta = f"{number(row.delta, sign=True)} [{number(row.delta_low, sign=True)}, {number(row.delta_high, sign=True)}]"
        rows.append(
            [
                row.name, row.reference or "(reference)", f"{row.n}" + (f" ({row.failed} failed)" if row.failed else ""),
                ci, delta if row.reference else "", "" if math.isnan(row.p) else f"{row.p:.3f}",
                "" if math.isnan(row.p_holm) else f"{row.p_holm:.3f}",
                "" if math.isnan(row.time_ratio) else f"{row.time_ratio:.2f}", row.verdict,
            ]
        )  # fmt: skip
    return rows


def _title(summary: Summary) -> str:
    unit = " (%, Δ in points)" if summary.scale == 100 else ""
    better = "higher" if summary.higher_is_better else "lower"
    return f"test {summary.metric}{unit} of the reported checkpoint (best_metric, or last if nothing was chosen); {better} is better"


def render_markdown(summary: Summary, command: str = "") -> str:
    lines = [f"# Ablation: {_title(summary)}", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [
        "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table_rows(summary)
    ]
    return "\n".join(lines + [""] + [f"- {note}" for note in summary.notes]) + "\n"


def render_html(summary: Summary, command: str = "", images: tuple[str, ...] = ()) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in table_rows(summary)
    )
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in summary.notes)
    pictures = "".join(f'<p><img src="{html.escape(name)}" style="max-width:100%"></p>' for name in images)
    code = f"<pre>{html.escape(command)}</pre>" if command else ""
    return (
        "<!doctype html><meta charset='utf-8'><title>trickbag ablation</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd;"
        "text-align:right}td:first-child,th:first-child,td:last-child{text-align:left}</style>"
        f"<h1>{html.escape(_title(summary))}</h1>{code}<table><tr>{head}</tr>{body}</table>"
        f"<ul>{notes}</ul>{pictures}\n"
    )


def print_summary(summary: Summary, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=_title(summary), title_justify="left")
    for index, column in enumerate(COLUMNS):
        table.add_column(column, justify="left" if index in (0, 1, len(COLUMNS) - 1) else "right")
    for row in table_rows(summary):
        table.add_row(*row)
    console = console or Console(width=200)
    console.print(table)
    for note in summary.notes:
        console.print(note, soft_wrap=True)


# ---------------------------------------------------------------------------------------------------------------
# Plots


def plot_forest(summary: Summary, path: Path) -> None:
    """Δ vs reference with its bootstrap CI per arm (left) and the train-time ratio (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [row for row in summary.arms if row.reference]
    figure = Figure(figsize=(9, 0.6 * len(rows) + 1.6))
    FigureCanvasAgg(figure)
    delta_axes, time_axes = figure.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    y = np.arange(len(rows))[::-1]
    for position, row in zip(y, rows):
        color = {"helps": "tab:green", "hurts": "tab:red"}.get(row.verdict, "tab:gray")
        if not math.isnan(row.delta):
            delta_axes.plot(
                [row.delta_low * summary.scale, row.delta_high * summary.scale],
                [position] * 2,
                color=color,
                lw=2,
            )
            delta_axes.plot(row.delta * summary.scale, position, "o", color=color)
            delta_axes.plot(np.array(row.differences) * summary.scale, [position] * len(row.differences), "x",
                            color="black", alpha=0.4, ms=4)  # fmt: skip
        time_axes.barh(
            position, 0 if math.isnan(row.time_ratio) else row.time_ratio, color="tab:blue", alpha=0.6
        )
    delta_axes.axvline(0, color="black", lw=0.8)
    delta_axes.set_yticks(y, [f"{row.name} vs {row.reference}" for row in rows])
    unit = "points" if summary.scale == 100 else ""
    delta_axes.set_xlabel(f"Δ test {summary.metric} {unit} (mean, 95% bootstrap CI; x: seeds)")
    time_axes.axvline(1, color="black", lw=0.8)
    time_axes.set_xlabel("train time ×")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_curves(outcomes: list[RunOutcome], metric: str, path: Path) -> None:
    """Validation ``metric`` per epoch from each run's metrics.csv, mean over seeds, one line per arm."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves: dict[str, list[list[float]]] = {}
    for outcome in outcomes:
        if outcome.run_dir is None or not (outcome.run_dir / "metrics.csv").is_file():
            continue
        with open(outcome.run_dir / "metrics.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        column = next((c for c in (f"val_{metric}", metric) if rows and c in rows[0]), None)
        if column:
            curves.setdefault(outcome.spec.arm.name, []).append([float(r[column]) for r in rows if r[column]])
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for name, runs in curves.items():
        length = min(len(run) for run in runs)
        mean = np.mean([run[:length] for run in runs], axis=0)
        axes.plot(np.arange(1, length + 1), mean, marker=".", label=f"{name} (n={len(runs)})")
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"validation {metric} (mean over seeds)")
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_outputs(
    ablation: Ablation, outcomes: list[RunOutcome], out_dir: Path, command: str = ""
) -> Summary:
    """results.csv, summary.md, summary.html, forest.png and curves.png in ``out_dir``; returns the summary."""
    write_results_csv(outcomes, out_dir / "results.csv")
    summary = summarize(ablation, outcomes)
    plot_forest(summary, out_dir / "forest.png")
    plot_curves(outcomes, summary.metric, out_dir / "curves.png")
    (out_dir / "summary.md").write_text(render_markdown(summary, command), encoding="utf-8")
    (out_dir / "summary.html").write_text(
        render_html(summary, command, ("forest.png", "curves.png")), encoding="utf-8"
    )
    return summary
