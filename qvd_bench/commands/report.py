"""``qvd-bench report``: the HTML + Markdown report of one or more statistics runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("report", help="HTML + Markdown report of a stats run")
    parser.add_argument("run", help="the run directory (stats/NAME)")
    parser.add_argument("--out", default=None, help="report directory (default: reports/NAME)")
    parser.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="RUN",
        help="more runs to put side by side with RUN (one table row per run)",
    )
    parser.add_argument("--title", default=None, help="report title")


def run(args: argparse.Namespace) -> int:
    from qvd_bench.report import build_report
    from qvd_bench.store import check_output_directory

    out = Path(args.out) if args.out else Path("reports") / Path(args.run).name
    check_output_directory(out)
    index = build_report([args.run, *args.compare], out, title=args.title)
    print(f"report written to {index} (Markdown: {index.parent / 'report.md'})")
    return 0
