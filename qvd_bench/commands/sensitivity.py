"""``qvd-bench sensitivity``: end-to-end SQNR with one layer (or role) quantized at a time."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from qvd_bench.commands._args import add_device_args, csv, device_and_dtype
from qvd_bench.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sensitivity",
        help="end-to-end SQNR with one layer (or role) quantized at a time: ranked table",
    )
    parser.add_argument("--stats", required=True, help="the statistics run (stats/NAME)")
    parser.add_argument(
        "--model", default=None, help="the model (default: the one the statistics come from)"
    )
    parser.add_argument("--method", default="mse", help="quantization method (default: mse)")
    parser.add_argument("--bits", default="W4A4", help="WxAy (default: W4A4)")
    parser.add_argument(
        "--by",
        type=csv,
        default=("layer", "role"),
        help="units: layer, role or layer,role (default: layer,role)",
    )
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="probe prompts (default: the run's)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="probe sampling steps (default: the run's)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="probe sampling seed (default: the statistics' seed + 1)",
    )
    parser.add_argument("--top", type=int, default=20, help="rows shown (default: 20)")
    parser.add_argument(
        "--out", default=None, help="report directory (default: reports/<run>-sensitivity-<bits>)"
    )
    add_device_args(parser, dtype_default=None, dtype_help="the statistics' dtype")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    device, dtype = device_and_dtype(args)
    table, index = sensitivity_report(
        args.stats,
        model=args.model,
        method=args.method,
        bits_spec=args.bits,
        by=args.by,
        num_prompts=args.num_prompts,
        steps=args.steps,
        seed=args.seed,
        out_dir=args.out,
        top=args.top,
        progress=not args.no_progress,
        device=device,
        dtype=dtype,
    )
    shown = table[["kind", "rank", "unit", "role", "sqnr_db"]]
    print(shown[shown["rank"] <= args.top].to_string(index=False, float_format="%.2f"))
    print(f"report written to {index}")
    return 0


def sensitivity_report(
    stats: str | Path,
    *,
    model: str | None = None,
    method: str = "mse",
    bits_spec: str = "W4A4",
    by: Sequence[str] | None = None,
    num_prompts: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    out_dir: str | Path | None = None,
    top: int = 20,
    progress: bool = True,
    device: str = "cpu",
    dtype: str | None = None,
):
    """The ranked sensitivity table of a statistics run, written with a report.

    Args:
        stats: the statistics run directory.
        model: a zoo name or path; None takes the model the statistics were collected on.
        method: a registered method name.
        bits_spec: e.g. "W4A4".
        by: units, "layer" and/or "role" (None: both).
        num_prompts, steps, seed: probe sampling (``probe_for_run``).
        out_dir: report directory; ``reports/<run>-sensitivity-<bits>`` when None.
        top: layers shown in the figure and the printed table.
        progress: progress bar.
        device: where the model runs ("cpu", "cuda", ...).
        dtype: the model's dtype (``config.DTYPES``); None takes the statistics' dtype.

    Returns:
        (the table, the report's index.html).
    """
    from qvd_bench.evaluate.sensitivity import UNITS, probe_for_run, sensitivity
    from qvd_bench.models.device import check_device
    from qvd_bench.models.zoo import load_model, load_run_model
    from qvd_bench.quant.config import QuantConfig, parse_bits
    from qvd_bench.quant.methods import get_method
    from qvd_bench.report.sensitivity import write_sensitivity_report
    from qvd_bench.resources import measure_stage
    from qvd_bench.store import StatsRun, check_output_directory

    w_bits, a_bits = parse_bits(bits_spec)
    get_method(method)  # an unknown name fails before any loading
    by = UNITS if by is None else tuple(by)
    for unit in by:
        if unit not in UNITS:
            raise UserError(f"--by takes {' and/or '.join(UNITS)}, not {unit!r}")
    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    run = StatsRun(stats)
    dtype = run.manifest["config"]["dtype"] if dtype is None else dtype
    check_device(device, dtype)
    config = QuantConfig(method, w_bits, a_bits)
    if out_dir is None:
        out_dir = Path("reports") / f"{run.path.name}-sensitivity-{config.bits}"
    check_output_directory(out_dir)
    with measure_stage("load", device) as load:
        loaded = (
            load_run_model(run, device=device, dtype=dtype)
            if model is None
            else load_model(model, device=device, dtype=dtype)
        )
    with measure_stage("sensitivity", device) as measure:
        probe = probe_for_run(loaded, run, seed=seed, num_prompts=num_prompts, steps=steps)
        table = sensitivity(loaded, run, config, probe, by=by, progress=progress)
    title = f"Sensitivity of {run.path.name}: {method} {config.bits}"
    random_weights = bool((run.manifest.get("model") or {}).get("random_weights"))
    cost = [load.to_dict(), measure.to_dict()]
    return table, write_sensitivity_report(
        table, out_dir, title, top, random_weights=random_weights, cost=cost
    )
