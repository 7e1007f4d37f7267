"""``qvd-bench collect``: per-timestep, per-channel statistics of a model's layer inputs."""

from __future__ import annotations

import argparse
from pathlib import Path

from qvd_bench.commands._args import (
    add_model_args,
    add_sampling_args,
    csv,
    device_and_dtype,
    sampling_values,
    selected_prompts,
)
from qvd_bench.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("collect", help="collect per-timestep, per-channel statistics")
    add_model_args(parser)
    add_sampling_args(parser, steps=20)
    parser.add_argument(
        "--sampler",
        default="auto",
        choices=("auto", "pipeline", "denoiser"),
        help="the model's pipeline or the minimal DDIM loop (default: auto)",
    )
    parser.add_argument(
        "--roles", type=csv, default=(), help="comma-separated roles to hook (default: all)"
    )
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="REGEX",
        help="hook only layers whose name matches (repeatable)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="do not hook layers whose name matches (repeatable)",
    )
    parser.add_argument("--outputs", action="store_true", help="also collect output moments")
    parser.add_argument("--no-histograms", action="store_true", help="skip per-tensor histograms")
    parser.add_argument(
        "--histogram-stride",
        type=int,
        default=1,
        help="count every k-th element in histograms (default: 1)",
    )
    parser.add_argument(
        "--reservoir",
        type=int,
        default=256,
        help="input rows sampled per layer; 0 disables (default: 256)",
    )
    parser.add_argument(
        "--temporal-stride",
        type=int,
        default=1,
        help="stride of the timestep grid for temporal features; 0 disables (default: 1)",
    )
    parser.add_argument(
        "--timestep-groups",
        type=int,
        default=None,
        metavar="N",
        help="statistics per N contiguous groups of steps; 0: per timestep (default: per "
        "timestep, or 8 groups when that state would exceed 8 GiB)",
    )
    parser.add_argument(
        "--attention",
        action="store_true",
        help="also collect q, k, v and softmax statistics of every attention module "
        "(needed by quantize --attention-bits)",
    )
    parser.add_argument(
        "--out", default=None, help="run directory (default: stats/<model>-w<weight-seed>)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run")
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="checkpoint after a finished prompt at most this often; 0: after every prompt (default: 60)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from qvd_bench.collect.collector import collect
    from qvd_bench.collect.cost import format_bytes
    from qvd_bench.config import CollectConfig
    from qvd_bench.resources import describe_stages

    device_and_dtype(args)  # a missing device or kernel fails before any work
    if args.num_prompts is not None and args.num_prompts < 1:
        raise UserError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    config = CollectConfig(
        model=args.model,
        weight_seed=args.weight_seed,
        disparity=args.disparity,
        asymmetry=args.asymmetry,
        prompts=selected_prompts(args),
        **sampling_values(args),
        sampler=args.sampler,
        roles=args.roles,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        outputs=args.outputs,
        histograms=not args.no_histograms,
        histogram_stride=args.histogram_stride,
        reservoir_capacity=args.reservoir,
        temporal_stride=args.temporal_stride,
        attention=args.attention,
        timestep_groups=args.timestep_groups,
        device=args.device,
        dtype=args.dtype,
    )
    safe_name = Path(args.model).name or "model"
    out = Path(args.out) if args.out else Path("stats") / f"{safe_name}-w{args.weight_seed}"
    summary = collect(
        config,
        out,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every,
        on_estimate=print_estimate,
    )
    if summary is None:  # a non-zero rank of a distributed run
        return 0
    print(f"statistics written to {summary.run_dir}")
    print(
        f"  model       {summary.model}"
        + (
            f" (random weights: {summary.weights_note})"
            if summary.weights_note
            else " (trained weights)"
        )
    )
    print(
        f"  layers      {summary.layers}: "
        + ", ".join(f"{r} {n}" for r, n in sorted(summary.roles.items()))
    )
    print(f"  timesteps   {summary.timesteps}")
    print(
        f"  samples     {summary.samples}"
        + (f" ({summary.resumed} resumed from a checkpoint)" if summary.resumed else "")
    )
    ratio = summary.raw_activation_bytes / max(summary.bytes_on_disk, 1)
    print(
        f"  on disk     {format_bytes(summary.bytes_on_disk)} "
        f"(raw inputs would take {format_bytes(summary.raw_activation_bytes)}, {ratio:,.0f}x more)"
    )
    print(f"  cost        {describe_stages(summary.stages)}")
    return 0


def print_estimate(estimate) -> None:
    """The cost of the collection about to run (``collect.cost``), and advice when large."""
    from qvd_bench.collect.cost import advice, format_bytes
    from qvd_bench.commands._args import with_flags

    print(
        f"estimate: {estimate.keys:,} (layer, timestep, branch) keys over "
        f"{estimate.channels:,} input channels; accumulators "
        f"{format_bytes(estimate.accumulator_bytes)}, store about "
        f"{format_bytes(estimate.store_bytes)}",
        flush=True,
    )
    line = with_flags(advice(estimate))
    if line:
        print(f"{'note' if estimate.grouped_by_default else 'warning'}: {line}", flush=True)
