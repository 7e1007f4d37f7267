"""``qvd-bench regress``: results against a stored baseline, with tolerances."""

from __future__ import annotations

import argparse
from pathlib import Path

from qvd_bench.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("regress", help="compare results with a stored baseline")
    parser.add_argument(
        "--results", required=True, help="a results directory (with results.parquet)"
    )
    parser.add_argument(
        "--baseline", required=True, help="baseline JSON (stats/baselines/NAME.json)"
    )
    parser.add_argument(
        "--update", action="store_true", help="write the results as the new baseline"
    )


def run(args: argparse.Namespace) -> int:
    """Prints the diff table (or, with ``--update``, rewrites the baseline).

    Returns:
        0 when every figure is within tolerance (or after an update), 1 on a regression.
    """
    from qvd_bench.commands.evaluate import format_table
    from qvd_bench.evaluate import regress
    from qvd_bench.store import check_output_directory

    if args.update:
        check_output_directory(Path(args.baseline).parent)
        data = regress.write_baseline(args.baseline, args.results)
        print(f"baseline written to {args.baseline} ({len(data['figures'])} figures)")
        return 0
    if not Path(args.baseline).exists():
        raise UserError(f"no baseline at {args.baseline}; write one with --update")
    table, ok = regress.compare_with_baseline(args.results, args.baseline)
    print(format_table(table))
    if ok:
        print(
            f"no regression: {len(table) - (table['status'] == 'new').sum()} figures within tolerance"
        )
        return 0
    failed = table[table["status"].isin(["REGRESSION", "MISSING"])]
    print(f"{len(failed)} figure(s) out of tolerance: {', '.join(failed['figure'])}")
    return 1
