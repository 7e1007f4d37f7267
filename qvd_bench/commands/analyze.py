"""``qvd-bench analyze``: measurements of a statistics run and the quantization plan."""

from __future__ import annotations

import argparse
from pathlib import Path

from qvd_bench.commands._args import csv, int_list, with_flags, working
from qvd_bench.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze", help="measure a stats run and decide a quantization plan"
    )
    parser.add_argument("run", help="the run directory (stats/NAME)")
    parser.add_argument(
        "--w-bits", type=int, default=8, help="weight bits of the plan (default: 8)"
    )
    parser.add_argument(
        "--a-bits", type=int, default=8, help="activation bits of the plan (default: 8)"
    )
    parser.add_argument(
        "--no-temporal",
        action="store_true",
        help="analyze a run collected without temporal features (no HTDQ decisions)",
    )
    parser.add_argument(
        "--coverage-bits",
        type=csv,
        default=("8", "4"),
        help="bit-widths at which coverage is measured (default: 8,4)",
    )
    for name, default, text in (
        (
            "temporal-skew",
            1.0,
            "HTDQ where |skew| of temporal features across timesteps exceeds this",
        ),
        ("coverage", 0.5, "SCRI considered where mean coverage at --a-bits is below this"),
        ("disparity", 4.0, "... and max/median channel range exceeds this"),
        ("asymmetry", 0.3, "... or mean |asymmetry| exceeds this"),
        ("kurtosis", 3.0, "MSE clipping where excess kurtosis exceeds this"),
        ("drift", 2.0, "timestep groups where the range drifts by more than this factor"),
    ):
        parser.add_argument(
            f"--{name}", type=float, default=default, help=f"{text} (default: {default:g})"
        )


def run(args: argparse.Namespace) -> int:
    from qvd_bench.analysis import PlanThresholds, analyze, headline, require_temporal
    from qvd_bench.store import StatsRun, check_output_directory

    run_stats = StatsRun(args.run)
    check_output_directory(run_stats.path)  # analysis.parquet and plan.json go beside the run
    if not args.no_temporal:
        try:
            require_temporal(run_stats)
        except UserError:
            raise UserError(
                f"{run_stats.path} has no temporal features; recollect with "
                "--temporal-stride 1 (or pass --no-temporal)"
            ) from None
    thresholds = PlanThresholds(
        temporal_skew=args.temporal_skew,
        coverage=args.coverage,
        disparity=args.disparity,
        asymmetry=args.asymmetry,
        kurtosis=args.kurtosis,
        drift=args.drift,
    )
    with working(f"measuring {run_stats.path} and deciding a plan"):
        table, plan = analyze(
            args.run,
            w_bits=args.w_bits,
            a_bits=args.a_bits,
            bits=int_list(args.coverage_bits, "--coverage-bits"),
            thresholds=thresholds,
        )
    print(with_flags(headline(table, plan)))
    print(f"wrote {Path(args.run) / 'analysis.parquet'} and {Path(args.run) / 'plan.json'}")
    return 0
