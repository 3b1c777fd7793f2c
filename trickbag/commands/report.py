"""``trickbag report RUN_DIR``: report.png and a self-contained report.html from a run folder."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  trickbag report runs/digits-001        writes runs/digits-001/report.png and report.html
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="plot curves, confusion matrix, per-class F1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Write report.png and a self-contained report.html into a run folder.",
    )
    parser.add_argument("run_dir", help="a run folder (runs/<name>-NNN) with metrics.csv and checkpoints")
    parser.set_defaults(func=handle_report)


def handle_report(args) -> int:
    from trickbag.report import write_report

    png, page = write_report(args.run_dir)
    print(f"wrote {png} and {page}")
    return 0
