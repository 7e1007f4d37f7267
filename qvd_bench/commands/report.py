"""``qvd-bench report``: the HTML + Markdown report of statistics runs or of an evaluation.

Given a statistics run (``stats/NAME``) it reports the statistics, side by side with the
``--compare`` runs; given an evaluation's results directory (``results/MODEL``, as
``qvd-bench run`` and ``evaluate`` write it) it rebuilds the results report, verdict first,
from the stored tables alone (nothing is generated again).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qvd_bench.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="HTML + Markdown report of a stats run or of an evaluation's results"
    )
    parser.add_argument(
        "run", help="a statistics run (stats/NAME) or an evaluation's results (results/MODEL)"
    )
    parser.add_argument("--out", default=None, help="report directory (default: reports/NAME)")
    parser.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="RUN",
        help="more statistics runs to compare with RUN (shared figures, one table row per run)",
    )
    parser.add_argument("--title", default=None, help="report title")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from qvd_bench.evaluate.results import RESULTS_FILE
    from qvd_bench.report import build_report
    from qvd_bench.store import check_output_directory

    out = Path(args.out) if args.out else Path("reports") / Path(args.run).name
    check_output_directory(out)
    if (Path(args.run) / RESULTS_FILE).is_file():
        if args.compare:
            raise UserError("--compare takes statistics runs, not an evaluation's results")
        index = results_report(Path(args.run), out, title=args.title)
    else:
        index = build_report(
            [args.run, *args.compare], out, title=args.title, progress=not args.no_progress
        )
    print(f"report written to {index} (Markdown: {index.parent / 'report.md'})")
    return 0


def results_report(results_dir: Path, out: Path, *, title: str | None = None) -> Path:
    """Rebuilds the results report of an evaluation from its results directory.

    Args:
        results_dir: ``<root>/results/<model>`` with ``results.parquet``, ``timings.parquet``,
            ``settings.json`` and, when the evaluation kept them, ``transforms.parquet``.
        out: the report directory.
        title: the report title (default: names the model).

    Returns:
        The path of ``index.html``.

    Raises:
        UserError: a table or the settings missing or unreadable, or the statistics runs
            the settings name are gone.
    """
    import pandas as pd

    from qvd_bench.evaluate.matrix import TRANSFORMS_FILE
    from qvd_bench.evaluate.results import RESULTS_FILE, SETTINGS_FILE, TIMINGS_FILE
    from qvd_bench.report.results import build_results_report

    try:
        results = pd.read_parquet(results_dir / RESULTS_FILE)
        timings_path = results_dir / TIMINGS_FILE
        timings = pd.read_parquet(timings_path) if timings_path.exists() else pd.DataFrame()
        settings = json.loads((results_dir / SETTINGS_FILE).read_text())
        transforms_path = results_dir / TRANSFORMS_FILE
        transforms = pd.read_parquet(transforms_path) if transforms_path.exists() else None
    except (OSError, ValueError) as error:
        raise UserError(f"{results_dir} is not a readable results directory: {error}") from None
    root = results_dir.resolve().parent.parent  # the output root the paths are relative to
    stats_dirs = {}
    for seed, path in (settings.get("stats") or {}).items():
        path = Path(path) if Path(path).is_absolute() else root / path
        if not path.is_dir():
            raise UserError(f"the statistics run {path} of {results_dir} is gone")
        stats_dirs[int(seed)] = path
    if not stats_dirs:
        raise UserError(f"{results_dir / SETTINGS_FILE} names no statistics run")
    return build_results_report(
        out,
        results,
        timings,
        config=settings["config"],
        stats_dirs=stats_dirs,
        notices=settings.get("notices", []),
        title=title,
        transforms=transforms,
    )
