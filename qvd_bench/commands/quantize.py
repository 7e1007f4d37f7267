"""``qvd-bench quantize``: quantize a model from its statistics and save the record."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qvd_bench.commands._args import add_device_args, csv, device_and_dtype, int_list, working


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize", help="quantize a model from its statistics and save the quantizer record"
    )
    parser.add_argument("--stats", required=True, help="the statistics run (stats/NAME)")
    parser.add_argument(
        "--model", default=None, help="the model (default: the one the statistics come from)"
    )
    parser.add_argument("--method", default="qvd", help="quantization method (default: qvd)")
    parser.add_argument("--bits", default="W8A8", help="WxAy, e.g. W4A8 (default: W8A8)")
    parser.add_argument("--plan", default=None, help="plan.json (default: decided from the stats)")
    parser.add_argument(
        "--out", required=True, help="directory for record.safetensors + record.json"
    )
    parser.add_argument(
        "--attention-bits",
        type=csv,
        default=(),
        metavar="BITS",
        help="also quantize the attention matmuls: bits of q, k, v and the softmax output, "
        "one value (e.g. 8) or four (e.g. 8,8,8,6); needs statistics collected with "
        "--attention (default: attention in float)",
    )
    parser.add_argument(
        "--granularity",
        default=None,
        metavar="{tensor,timestep_group,token}",
        help="activation quantizers: static per tensor, per timestep group, or dynamic per "
        "token (default: the method's own)",
    )
    parser.add_argument(
        "--split-skip",
        action="store_true",
        help="one activation range per part of skip-connection concatenations in UNet up "
        "blocks (Q-Diffusion's shortcut splitting; weights split too)",
    )
    parser.add_argument(
        "--mixed",
        default=None,
        metavar="BUDGET",
        help="mixed precision: a mean bit budget over layers, e.g. A6 (activations) or W5 "
        "(weights); bits per layer assigned from measured sensitivity, the decisions "
        "written to mixed.json (default: uniform bits)",
    )
    parser.add_argument(
        "--mixed-bits",
        type=csv,
        default=("4", "6", "8"),
        metavar="BITS",
        help="candidate bit-widths of --mixed (default: 4,6,8)",
    )
    parser.add_argument(
        "--probe-seed",
        type=int,
        default=None,
        help="sampling seed of the sensitivity probe (default: the statistics' seed + 1)",
    )
    add_device_args(parser, dtype_default=None, dtype_help="the statistics' dtype")


def run(args: argparse.Namespace) -> int:
    from qvd_bench.resources import describe_stages

    device, dtype = device_and_dtype(args)
    with working(f"quantizing with {args.method} at {args.bits} (calibration from the statistics)"):
        summary = quantize_from_stats(
            args.model,
            args.stats,
            args.method,
            args.bits,
            args.out,
            args.plan,
            attention_bits=int_list(args.attention_bits, "--attention-bits"),
            split_skip=args.split_skip,
            granularity=args.granularity,
            mixed=args.mixed,
            mixed_bits=int_list(args.mixed_bits, "--mixed-bits"),
            probe_seed=args.probe_seed,
            device=device,
            dtype=dtype,
        )
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(summary["activation_quantizers"].items()))
    print(
        f"{summary['method']} {args.bits.upper()}: {summary['quantized']} of {summary['layers']} layers quantized"
    )
    print(f"  activation quantizers: {kinds}")
    coverage = summary["coverage"]
    if coverage["layers"]:
        print(
            f"  mean level coverage of the calibrated ranges: {coverage['mean']:.1%} ({coverage['layers']} layers)"
        )
    for row in summary["temporal"]:
        print(
            f"  {row['layer']}: TDScore {row['tdscore']:.3f}, relative MSE {row['relative_mse']:.2e}, "
            f"collisions {row['collisions']} ({row['act']})"
        )
    attention = summary["attention"]
    if attention["modules"]:
        bits = ", ".join(f"{t} {b}" for t, b in attention["bits"].items())
        print(f"  attention: {attention['modules']} modules quantized ({bits} bits)")
    split = summary.get("split_skip")
    if split is not None:
        print(f"  split skip concatenations: {split['layers']} layers split")
        for layer, reason in split["skipped"].items():
            print(f"    {layer} not split: {reason}")
        if "note" in split:
            print(f"    {split['note']}")
    mixed = summary.get("mixed")
    if mixed is not None:
        counts = ", ".join(
            f"{n} layers at {b}" for b, n in sorted(mixed["layers_per_bits"].items())
        )
        print(
            f"  mixed precision {mixed['budget']}: mean {mixed['mean_bits']:.2f} bits ({counts}); "
            "decisions in mixed.json"
        )
    print(f"  cost: {describe_stages(summary['cost'])}")
    print(f"record written to {summary['out_dir']}")
    return 0


def quantize_from_stats(
    model: str | None,
    stats: str | Path,
    method: str,
    bits_spec: str,
    out_dir: str | Path,
    plan_path: str | Path | None = None,
    attention_bits: Sequence[int] = (),
    *,
    split_skip: bool = False,
    granularity: str | None = None,
    mixed: str | None = None,
    mixed_bits: Sequence[int] = (4, 6, 8),
    probe_seed: int | None = None,
    device: str = "cpu",
    dtype: str | None = None,
) -> dict[str, Any]:
    """Quantizes a model from its statistics and saves the record.

    Args:
        model: a zoo name or path; None takes the model the statistics were collected on
            (with the same weights and knobs).
        stats: the statistics run directory.
        method: a registered method name.
        bits_spec: e.g. "W4A8".
        out_dir: where ``record.safetensors`` and ``record.json`` go.
        plan_path: a plan JSON (``qvd-bench analyze``); decided from the statistics if None.
        attention_bits: bits of the attention matmul inputs (``QuantConfig.attention_bits``:
            one value, or four for q, k, v and softmax); () keeps attention in float.
        split_skip: split quantization of skip concatenations (``QuantConfig.split_skip``).
        granularity: activation granularity, "tensor", "timestep_group" or "token"; None
            takes the method's default.
        mixed: a mean bit budget ("A6", "W5"): bits per layer assigned from measured
            sensitivity (``evaluate.sensitivity``); the decisions go to ``mixed.json`` and
            ``mixed.parquet`` beside the record.
        mixed_bits: the candidate bit-widths of a mixed assignment.
        probe_seed: sampling seed of the sensitivity probe (default: the statistics'
            seed + 1, noise not seen in calibration).
        device: where the model runs ("cpu", "cuda", ...).
        dtype: the model's dtype (``config.DTYPES``); None takes the statistics' dtype.
            Fake quantization runs in it, its scale arithmetic in float32.

    Returns:
        A summary: the record's counts, the output directory, level coverage of the
        calibrated ranges, per temporal-feature layer the quantizer's TDScore, the
        attention quantizers (``summary["attention"]``) and, with ``split_skip``, what
        was split (``summary["split_skip"]``).
    """
    from qvd_bench.analysis.plan import QuantPlan
    from qvd_bench.models.device import check_device
    from qvd_bench.models.roles import leaf_layers
    from qvd_bench.models.zoo import load_model, load_run_model
    from qvd_bench.quant.apply import check_config_names, quantize_
    from qvd_bench.quant.config import QuantConfig, parse_bits
    from qvd_bench.quant.measure import coverage_report, temporal_report
    from qvd_bench.quant.methods import get_method
    from qvd_bench.resources import measure_stage
    from qvd_bench.store import StatsRun, check_output_directory

    w_bits, a_bits = parse_bits(bits_spec)
    get_method(method)  # an unknown name fails before any loading
    config = QuantConfig(
        method,
        w_bits,
        a_bits,
        granularity=granularity,
        attention_bits=tuple(attention_bits),
        split_skip=split_skip,
    )
    run = StatsRun(stats)
    dtype = run.manifest["config"]["dtype"] if dtype is None else dtype
    check_device(device, dtype)
    plan = QuantPlan.load(plan_path) if plan_path is not None else None
    check_output_directory(out_dir)
    stages = []
    with measure_stage("load", device) as stage:
        loaded = (
            load_run_model(run, device=device, dtype=dtype)
            if model is None
            else load_model(model, device=device, dtype=dtype)
        )
    stages.append(stage)
    layers = dict(leaf_layers(loaded.denoiser))
    decisions = None
    if mixed is not None:
        from qvd_bench.evaluate.sensitivity import Budget, mixed_config, probe_for_run

        budget = Budget.parse(mixed)
        check_config_names(config, {n: run.roles.get(n, "") for n in layers})
        with measure_stage("sensitivity", device) as stage:
            probe = probe_for_run(loaded, run, seed=probe_seed)
            config, decisions = mixed_config(
                loaded, run, config, budget, probe, candidates=mixed_bits, plan=plan, progress=True
            )
        stages.append(stage)
    with measure_stage("quantize", device) as stage:
        record = quantize_(loaded, config, stats=run, plan=plan)
    stages.append(stage)
    record.cost = [cost.to_dict() for cost in stages]
    record.save(out_dir)
    summary = record.summary()
    if decisions is not None:
        from qvd_bench.evaluate.sensitivity import write_mixed

        summary["mixed"] = write_mixed(out_dir, budget, config, decisions, probe)
    summary["out_dir"] = str(out_dir)
    summary["cost"] = record.cost
    summary["coverage"] = coverage_report(run, record)
    summary["temporal"] = temporal_report(run, record, layers)
    return summary
