"""``qvd-bench regress``: the regression figures of a baseline's configuration against the
baseline, with tolerances from measured spread; ``--new`` / ``--regenerate`` write
baselines."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from qvd_bench.errors import UserError

BASELINES_DIR = Path("stats") / "baselines"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "regress",
        help="compare regression figures with a stored baseline, or write a baseline",
    )
    parser.add_argument(
        "--baseline", default=None, help="baseline JSON (stats/baselines/NAME.json)"
    )
    parser.add_argument(
        "--results",
        default=None,
        help="figures written by qvd-bench run --config-of BASELINE (a figures.json or an "
        "output root); without it the baseline's configuration runs now",
    )
    parser.add_argument(
        "--new",
        metavar="MODEL",
        default=None,
        help="write the first baseline of MODEL (the baseline configuration on it, with "
        "the prompts, latent size and CFG a trained model such as shapes-wan was trained "
        "for, measured as stated and under each rounding change) to --baseline "
        "(default: stats/baselines/MODEL.json)",
    )
    parser.add_argument(
        "--regenerate",
        metavar="BASELINE",
        default=None,
        help="measure BASELINE's configuration again and rewrite it",
    )
    parser.add_argument("--out", default=None, help="working directory (default: a temporary one)")


def run(args: argparse.Namespace) -> int:
    """Prints the diff table, or writes a baseline.

    Returns:
        0 when every figure is within tolerance (or after writing a baseline), 1 on a
        regression.
    """
    from qvd_bench.evaluate import regress

    if args.new is not None and args.regenerate is not None:
        raise UserError("--new and --regenerate exclude each other")
    if args.new is not None or args.regenerate is not None:
        if args.results is not None:
            raise UserError("--results compares; it does not go with --new or --regenerate")
        if args.regenerate is not None:
            path = Path(args.regenerate)
            config = regress.load_baseline_configuration(path)
        else:
            config = regress.configuration(model=args.new)
            name = Path(args.new).name or "model"
            path = Path(args.baseline) if args.baseline else BASELINES_DIR / f"{name}.json"
        return write_baseline(path, config, args.out)
    if args.baseline is None:
        raise UserError("--baseline is required (or --new MODEL / --regenerate BASELINE)")
    if not Path(args.baseline).exists():
        raise UserError(
            f"no baseline at {args.baseline}; write one with --new MODEL --baseline {args.baseline}"
        )
    results = args.results
    with _work_dir(args.out) as work:
        if results is None:
            baseline = regress.load_baseline(args.baseline)
            config = regress.configuration(**baseline["configuration"])
            print(f"measuring the configuration of {args.baseline} in {work}", flush=True)
            results, _ = regress.run_configuration(config, work)
        try:
            table, ok = regress.compare_with_baseline(results, args.baseline)
        except regress.OtherConfiguration as error:
            raise UserError(other_configuration(error)) from None
    return print_comparison(table, ok)


def other_configuration(error) -> str:
    """The one line for results of another configuration, with the command that runs the
    baseline's."""
    what = (
        f"are of another configuration than {error.baseline}: {'; '.join(error.differences)}"
        if error.differences
        else "hold no regression figures"
    )
    return (
        f"the results {what}; run the baseline's configuration with "
        f"qvd-bench run --config-of {error.baseline} --out DIR"
    )


def print_comparison(table, ok: bool) -> int:
    """Prints the diff table and the verdict line; returns the exit code (0 or 1)."""
    from qvd_bench.commands.evaluate import format_table

    print(format_table(table))
    if ok:
        compared = len(table) - int((table["status"] == "new").sum())
        print(f"no regression: {compared} figures within tolerance")
        return 0
    failed = table[table["status"].isin(["REGRESSION", "MISSING"])]
    print(f"{len(failed)} figure(s) out of tolerance: {', '.join(failed['figure'])}")
    return 1


def write_baseline(path: Path, config: dict, out: str | None) -> int:
    from qvd_bench.evaluate import regress
    from qvd_bench.store import check_output_directory

    check_output_directory(path.parent)
    changes = len(regress.ROUNDING_CHANGES)
    with _work_dir(out) as work:
        data = regress.write_baseline(
            path,
            config,
            work,
            on_change=lambda name: print(
                f"measuring {config['model']} ({name}; {changes + 1} measurements)", flush=True
            ),
            regenerate_with=f"qvd-bench regress --regenerate {path}",
        )
    pairs = data["distinct_pairs"]
    if pairs:
        print(
            f"methods told apart (difference > {regress.DISTINCT_MULTIPLE:g} x spread; "
            "tolerance at most half the difference):"
        )
        for pair in pairs:
            print(
                f"  {pair['kind']} {pair['bits']} {' vs '.join(pair['methods'])}: difference "
                f"{pair['difference']:.4g}, spread {pair['spread']:.3g}, tolerance "
                f"{pair['tolerance']:.3g}"
            )
    print(
        f"baseline written to {path} ({len(data['figures'])} figures, tolerances from the "
        f"spread over {', '.join(data['rounding_changes'])}); regenerate it with "
        f"qvd-bench regress --regenerate {path}"
    )
    return 0


# ``run`` flags that would change the configuration (their defaults: not given).
_RUN_SETTINGS = ("model", "num_prompts", "steps", "frames", "height", "width", "methods", "bits")


def run_config_of(
    baseline: str, out: str, progress: bool = True, args: argparse.Namespace | None = None
) -> int:
    """``qvd-bench run --config-of BASELINE``: measures the baseline's configuration and
    writes its figures under ``out`` (``regress --results OUT --baseline BASELINE``
    compares them).

    Raises:
        UserError: ``run`` flags that would change the configuration are given too.
    """
    from qvd_bench.evaluate import regress
    from qvd_bench.store import check_output_directory

    given = [
        "--" + name.replace("_", "-")
        for name in _RUN_SETTINGS
        if args is not None and getattr(args, name, None) is not None
    ]
    if args is not None and getattr(args, "seeds", 1) != 1:
        given.append("--seeds")
    if given:
        raise UserError(
            f"--config-of takes the whole configuration from {baseline}; drop {', '.join(given)}"
        )

    config = regress.load_baseline_configuration(baseline)
    out_dir = check_output_directory(out)
    path, figures = regress.run_configuration(config, out_dir, progress=progress)
    print(
        f"{len(figures)} regression figures of the configuration of {baseline} written to "
        f"{path}; compare them with qvd-bench regress --results {out_dir} --baseline {baseline}"
    )
    return 0


class _work_dir:
    """The given directory, or a temporary one removed afterwards."""

    def __init__(self, out: str | None):
        self.out, self.temp = out, None

    def __enter__(self) -> Path:
        if self.out is not None:
            from qvd_bench.store import check_output_directory

            return check_output_directory(self.out)
        self.temp = tempfile.TemporaryDirectory(prefix="qvd-regress-")
        return Path(self.temp.name)

    def __exit__(self, *exc) -> None:
        if self.temp is not None:
            self.temp.cleanup()
