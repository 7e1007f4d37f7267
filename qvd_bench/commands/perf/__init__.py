"""``qvd-bench perf``: the performance benchmarks (``benchmarks``), one table per model.

The benchmarks import torch and every layer of the library; they are imported when the
command runs, so that ``--help`` and bad input answer at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qvd_bench.commands._args import csv, int_list
from qvd_bench.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "perf", help="performance benchmarks (ratios measured in one run)"
    )
    parser.add_argument(
        "benchmark",
        choices=("collect", "frechet", "quant", "run"),
        help="which benchmark (run: the main job's phases in units of the FP forward)",
    )
    parser.add_argument(
        "--models",
        type=csv,
        default=None,
        help="what to measure: models for collect and quant (default: tiny-unet3d,modelscope-t2v-arch), "
        "feature dimensions for frechet (default: 400,1024,2048), the model of the main job "
        "for run (default: shapes-wan)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="interleaved repeats; medians are reported (run: FP forwards timed before the "
        "job and again after it)",
    )
    parser.add_argument(
        "--latent",
        type=csv,
        default=None,
        help="collect only: latent size FRAMES,HEIGHT,WIDTH (default: 4,16,16 for "
        "modelscope-t2v-arch, 8,32,32 otherwise)",
    )
    parser.add_argument(
        "--variants",
        type=csv,
        default=None,
        help="collect only: variants to time beside the plain forward (default: all of "
        "moments,histogram,reservoir,all,all-stride,raw,torch.ao)",
    )
    parser.add_argument("--out", default=None, help="also write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    """Runs one benchmark on each model on one thread, prints the tables and, with
    ``--out``, writes them as JSON."""
    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    options = {}
    if args.latent is not None:
        if args.benchmark != "collect":
            raise UserError("--latent applies to perf collect only")
        latent = int_list(args.latent, "--latent")
        if len(latent) != 3 or min(latent) < 1:
            raise UserError(
                f"--latent takes three positive sizes FRAMES,HEIGHT,WIDTH, got {','.join(args.latent)}"
            )
        options["latent"] = latent
    if args.variants is not None:
        if args.benchmark != "collect":
            raise UserError("--variants applies to perf collect only")
        options["variants"] = args.variants
    import torch

    from qvd_bench.commands.perf import benchmarks
    from qvd_bench.store import check_output_directory

    if args.benchmark not in benchmarks.BENCHMARKS:
        raise UserError(
            f"unknown benchmark {args.benchmark!r}; known: {', '.join(benchmarks.BENCHMARKS)}"
        )
    models = args.models or benchmarks.BENCHMARK_DEFAULT_MODELS[args.benchmark]
    if args.out:
        check_output_directory(Path(args.out).parent)
    torch.set_num_threads(1)
    tables = []
    for model in models:
        table = benchmarks.BENCHMARKS[args.benchmark](model, args.repeats, **options)
        print(table.render(), flush=True)
        print()
        tables.append(table)
    if args.out:
        data = [{"title": t.title, "rows": [r.__dict__ for r in t.rows]} for t in tables]
        Path(args.out).write_text(json.dumps(data, indent=2))
    return 0
