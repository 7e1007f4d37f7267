"""The ``qvd-bench`` command line.

Bad input (``UserError``, argument errors) prints one line on stderr and exits with
code 2; an interrupted run says how to resume and exits with 130.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from qvd_bench.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="tiny-unet3d",
        help="zoo name, local pipeline directory or hub id (default: tiny-unet3d)",
    )
    parser.add_argument(
        "--weight-seed",
        type=int,
        default=0,
        help="seed of the random weights of zoo presets (default: 0)",
    )
    parser.add_argument(
        "--disparity",
        type=float,
        default=None,
        help="log-normal sigma of injected per-channel gains (preset default)",
    )
    parser.add_argument(
        "--asymmetry",
        type=float,
        default=None,
        help="scale of injected per-channel offsets (preset default)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))


def _add_sampling_args(parser: argparse.ArgumentParser, *, steps: int) -> None:
    """Prompts and sampling settings, shared by collect and evaluate."""
    parser.add_argument(
        "--prompts", metavar="FILE", help="prompt file, one per line (default: built-in prompts)"
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="use the first N prompts (default: all of the file, 2 built-in)",
    )
    parser.add_argument(
        "--steps", type=int, default=steps, help=f"sampling steps (default: {steps})"
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=7.5,
        help="classifier-free guidance scale; <= 1 disables CFG (default: 7.5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--frames", type=int, default=8, help="latent frames (default: 8)")
    parser.add_argument("--height", type=int, default=16, help="latent height (default: 16)")
    parser.add_argument("--width", type=int, default=16, help="latent width (default: 16)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qvd-bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    models = commands.add_parser("models", help="list the model zoo, or the layer roles of a model")
    models.add_argument(
        "--roles", metavar="MODEL", help="print every layer's role and how it was decided"
    )
    models.add_argument(
        "--detect",
        action="store_true",
        help="with --roles: detect roles by probe forwards instead of the table",
    )

    collect = commands.add_parser("collect", help="collect per-timestep, per-channel statistics")
    _add_model_args(collect)
    _add_sampling_args(collect, steps=20)
    collect.add_argument(
        "--sampler",
        default="auto",
        choices=("auto", "pipeline", "denoiser"),
        help="the model's pipeline or the minimal DDIM loop (default: auto)",
    )
    collect.add_argument(
        "--roles", type=_csv, default=(), help="comma-separated roles to hook (default: all)"
    )
    collect.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="REGEX",
        help="hook only layers whose name matches (repeatable)",
    )
    collect.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="do not hook layers whose name matches (repeatable)",
    )
    collect.add_argument("--outputs", action="store_true", help="also collect output moments")
    collect.add_argument("--no-histograms", action="store_true", help="skip per-tensor histograms")
    collect.add_argument(
        "--histogram-stride",
        type=int,
        default=1,
        help="count every k-th element in histograms (default: 1)",
    )
    collect.add_argument(
        "--reservoir",
        type=int,
        default=256,
        help="input rows sampled per layer; 0 disables (default: 256)",
    )
    collect.add_argument(
        "--temporal-stride",
        type=int,
        default=1,
        help="stride of the timestep grid for temporal features; 0 disables (default: 1)",
    )
    collect.add_argument(
        "--attention",
        action="store_true",
        help="also collect q, k, v and softmax statistics of every attention module "
        "(needed by quantize --attention-bits)",
    )
    collect.add_argument(
        "--out", default=None, help="run directory (default: stats/<model>-w<weight-seed>)"
    )
    collect.add_argument("--overwrite", action="store_true", help="replace an existing run")
    collect.add_argument(
        "--checkpoint-every",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="checkpoint after a finished prompt at most this often; 0: after every prompt (default: 60)",
    )
    collect.add_argument("--no-progress", action="store_true", help="no progress bar")

    analyze = commands.add_parser(
        "analyze", help="measure a stats run and decide a quantization plan"
    )
    analyze.add_argument("run", help="the run directory (stats/NAME)")
    analyze.add_argument(
        "--w-bits", type=int, default=8, help="weight bits of the plan (default: 8)"
    )
    analyze.add_argument(
        "--a-bits", type=int, default=8, help="activation bits of the plan (default: 8)"
    )
    analyze.add_argument(
        "--no-temporal",
        action="store_true",
        help="analyze a run collected without temporal features (no HTDQ decisions)",
    )
    analyze.add_argument(
        "--coverage-bits",
        type=_csv,
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
        analyze.add_argument(
            f"--{name}", type=float, default=default, help=f"{text} (default: {default:g})"
        )

    quantize = commands.add_parser(
        "quantize", help="quantize a model from its statistics and save the quantizer record"
    )
    quantize.add_argument("--stats", required=True, help="the statistics run (stats/NAME)")
    quantize.add_argument(
        "--model", default=None, help="the model (default: the one the statistics come from)"
    )
    quantize.add_argument("--method", default="qvd", help="quantization method (default: qvd)")
    quantize.add_argument("--bits", default="W8A8", help="WxAy, e.g. W4A8 (default: W8A8)")
    quantize.add_argument(
        "--plan", default=None, help="plan.json (default: decided from the stats)"
    )
    quantize.add_argument(
        "--out", required=True, help="directory for record.safetensors + record.json"
    )
    quantize.add_argument(
        "--attention-bits",
        type=_csv,
        default=(),
        metavar="BITS",
        help="also quantize the attention matmuls: bits of q, k, v and the softmax output, "
        "one value (e.g. 8) or four (e.g. 8,8,8,6); needs statistics collected with "
        "--attention (default: attention in float)",
    )
    quantize.add_argument(
        "--granularity",
        default=None,
        metavar="{tensor,timestep_group,token}",
        help="activation quantizers: static per tensor, per timestep group, or dynamic per "
        "token (default: the method's own)",
    )
    quantize.add_argument(
        "--split-skip",
        action="store_true",
        help="one activation range per part of skip-connection concatenations in UNet up "
        "blocks (Q-Diffusion's shortcut splitting; weights split too)",
    )
    quantize.add_argument(
        "--mixed",
        default=None,
        metavar="BUDGET",
        help="mixed precision: a mean bit budget over layers, e.g. A6 (activations) or W5 "
        "(weights); bits per layer assigned from measured sensitivity, the decisions "
        "written to mixed.json (default: uniform bits)",
    )
    quantize.add_argument(
        "--mixed-bits",
        type=_csv,
        default=("4", "6", "8"),
        metavar="BITS",
        help="candidate bit-widths of --mixed (default: 4,6,8)",
    )
    quantize.add_argument(
        "--probe-seed",
        type=int,
        default=None,
        help="sampling seed of the sensitivity probe (default: the statistics' seed + 1)",
    )

    sensitivity = commands.add_parser(
        "sensitivity",
        help="end-to-end SQNR with one layer (or role) quantized at a time: ranked table",
    )
    sensitivity.add_argument("--stats", required=True, help="the statistics run (stats/NAME)")
    sensitivity.add_argument(
        "--model", default=None, help="the model (default: the one the statistics come from)"
    )
    sensitivity.add_argument("--method", default="mse", help="quantization method (default: mse)")
    sensitivity.add_argument("--bits", default="W4A4", help="WxAy (default: W4A4)")
    sensitivity.add_argument(
        "--by",
        type=_csv,
        default=("layer", "role"),
        help="units: layer, role or layer,role (default: layer,role)",
    )
    sensitivity.add_argument(
        "--num-prompts", type=int, default=None, help="probe prompts (default: the run's)"
    )
    sensitivity.add_argument(
        "--steps", type=int, default=None, help="probe sampling steps (default: the run's)"
    )
    sensitivity.add_argument(
        "--seed",
        type=int,
        default=None,
        help="probe sampling seed (default: the statistics' seed + 1)",
    )
    sensitivity.add_argument("--top", type=int, default=20, help="rows shown (default: 20)")
    sensitivity.add_argument(
        "--out", default=None, help="report directory (default: reports/<run>-sensitivity-<bits>)"
    )
    sensitivity.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = commands.add_parser(
        "evaluate", help="the methods x bit-widths x metrics matrix -> results.parquet + report"
    )
    _add_model_args(evaluate)
    evaluate.add_argument(
        "--methods",
        type=_csv,
        default=("fp", "minmax", "mse", "qvd"),
        help="comma-separated methods (default: fp,minmax,mse,qvd)",
    )
    evaluate.add_argument(
        "--bits",
        type=_csv,
        default=("W8A8", "W6A6", "W4A8"),
        help="comma-separated WxAy (default: W8A8,W6A6,W4A8)",
    )
    evaluate.add_argument(
        "--metrics",
        type=_csv,
        default=("fidelity",),
        help="fidelity (always), fvd, fvd-cd, fid, clipsim (default: fidelity)",
    )
    _add_sampling_args(evaluate, steps=10)
    evaluate.add_argument(
        "--reference",
        default="fp",
        help="Frechet reference: fp (FP generations paired by seed) or a directory of real "
        "videos (videos.safetensors: 'videos', uint8 N x T x H x W x 3)",
    )
    evaluate.add_argument(
        "--stats", default=None, help="statistics run to calibrate from (default: collect one)"
    )
    evaluate.add_argument(
        "--seeds", type=int, default=1, help="number of weight seeds (default: 1)"
    )
    evaluate.add_argument("--fvd-weights", help="i3d_torchscript.pt (StyleGAN-V FVD)")
    evaluate.add_argument("--fvd-cd-weights", help="i3d_pretrained_400.pt (cd-fvd FVD)")
    evaluate.add_argument("--fid-weights", help="weights-inception-2015-12-05-6726825d.pth (FID)")
    evaluate.add_argument(
        "--clip-model", help="local CLIP directory, e.g. clip-vit-base-patch32 (CLIPSIM)"
    )
    evaluate.add_argument("--out", default="results", help="output root (default: results)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")

    run = commands.add_parser("run", help="the default end-to-end job on the tiny model")
    run.add_argument(
        "--out", default=".", help="output root for stats/, results/, reports/ (default: .)"
    )
    run.add_argument(
        "--seeds", type=int, default=1, help="weight seeds; 3 adds the spread (default: 1)"
    )
    run.add_argument("--model", default=None, help="model (default: tiny-unet3d)")
    run.add_argument("--num-prompts", type=int, default=None, help="prompts (default: 2)")
    run.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 10)")
    run.add_argument("--frames", type=int, default=None, help="latent frames (default: 8)")
    run.add_argument("--height", type=int, default=None, help="latent height (default: 16)")
    run.add_argument("--width", type=int, default=None, help="latent width (default: 16)")
    run.add_argument(
        "--methods",
        type=_csv,
        default=None,
        help="methods (default: fp,minmax,mse,smoothquant,os+,qvd,qvd-htdq,qvd-scri)",
    )
    run.add_argument("--bits", type=_csv, default=None, help="bit-widths (default: W8A8,W4A8,W4A4)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    regress = commands.add_parser("regress", help="compare results with a stored baseline")
    regress.add_argument(
        "--results", required=True, help="a results directory (with results.parquet)"
    )
    regress.add_argument(
        "--baseline", required=True, help="baseline JSON (stats/baselines/NAME.json)"
    )
    regress.add_argument(
        "--update", action="store_true", help="write the results as the new baseline"
    )

    report = commands.add_parser("report", help="HTML + Markdown report of a stats run")
    report.add_argument("run", help="the run directory (stats/NAME)")
    report.add_argument("--out", default=None, help="report directory (default: reports/NAME)")
    report.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="RUN",
        help="more runs to put side by side with RUN (one table row per run)",
    )
    report.add_argument("--title", default=None, help="report title")

    info = commands.add_parser("info", help="summarise a stored statistics run")
    info.add_argument("run", help="the run directory (stats/NAME)")

    perf = commands.add_parser("perf", help="performance benchmarks (ratios measured in one run)")
    perf.add_argument(
        "benchmark",
        choices=("collect", "frechet", "quant", "run"),
        help="which benchmark (run: the main job's phases in units of the FP forward)",
    )
    perf.add_argument(
        "--models",
        type=_csv,
        default=None,
        help="what to measure: models for collect and quant (default: tiny-unet3d,modelscope-t2v-arch), "
        "feature dimensions for frechet (default: 400,1024,2048), the model of the main job "
        "for run (default: tiny-unet3d)",
    )
    perf.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="interleaved repeats; medians are reported (run: FP forwards timed before the "
        "job and again after it)",
    )
    perf.add_argument("--out", default=None, help="also write the results as JSON here")
    return parser


def cmd_models(args: argparse.Namespace) -> int:
    from qvd_bench.models import roles, zoo

    if args.roles:
        loaded = zoo.load_model(args.roles)
        print(roles.format_roles(roles.classify(loaded, detect=args.detect)))
        return 0
    rows = zoo.list_models()
    width = max(len(r.name) for r in rows)
    print(f"{'name':<{width}}  {'parameters':>14}  {'denoiser':<36}  description")
    for r in rows:
        print(f"{r.name:<{width}}  {r.parameters:>14,}  {r.denoiser_class:<36}  {r.description}")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from qvd_bench import prompts as prompts_module
    from qvd_bench.collect.collector import collect
    from qvd_bench.config import CollectConfig

    if args.num_prompts is not None and args.num_prompts < 1:
        raise UserError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    count = args.num_prompts if args.num_prompts is not None else (None if args.prompts else 2)
    prompt_list = prompts_module.select_prompts(args.prompts, count)
    config = CollectConfig(
        model=args.model,
        weight_seed=args.weight_seed,
        disparity=args.disparity,
        asymmetry=args.asymmetry,
        prompts=tuple(prompt_list),
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        frames=args.frames,
        height=args.height,
        width=args.width,
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
    )
    if summary is None:  # a non-zero rank of a distributed run
        return 0
    print(f"statistics written to {summary.run_dir}")
    print(
        f"  model       {summary.model}"
        + (f" (random weights: {summary.weights_note})" if summary.weights_note else "")
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
        f"  on disk     {_bytes(summary.bytes_on_disk)} "
        f"(raw inputs would take {_bytes(summary.raw_activation_bytes)}, {ratio:,.0f}x more)"
    )
    return 0


def _int_list(values: Sequence[str], flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise UserError(
            f"{flag} takes comma-separated integers, got {','.join(values)!r}"
        ) from None


def cmd_analyze(args: argparse.Namespace) -> int:
    from qvd_bench.analysis import PlanThresholds, analyze, headline, require_temporal
    from qvd_bench.store import StatsRun

    if not args.no_temporal:
        try:
            require_temporal(StatsRun(args.run))
        except UserError as error:
            raise UserError(f"{error} (or pass --no-temporal)") from None
    thresholds = PlanThresholds(
        temporal_skew=args.temporal_skew,
        coverage=args.coverage,
        disparity=args.disparity,
        asymmetry=args.asymmetry,
        kurtosis=args.kurtosis,
        drift=args.drift,
    )
    table, plan = analyze(
        args.run,
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        bits=_int_list(args.coverage_bits, "--coverage-bits"),
        thresholds=thresholds,
    )
    print(headline(table, plan))
    print(f"wrote {Path(args.run) / 'analysis.parquet'} and {Path(args.run) / 'plan.json'}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from qvd_bench.quant.api import quantize_command

    summary = quantize_command(
        args.model,
        args.stats,
        args.method,
        args.bits,
        args.out,
        args.plan,
        attention_bits=_int_list(args.attention_bits, "--attention-bits"),
        split_skip=args.split_skip,
        granularity=args.granularity,
        mixed=args.mixed,
        mixed_bits=_int_list(args.mixed_bits, "--mixed-bits"),
        probe_seed=args.probe_seed,
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
    print(f"record written to {summary['out_dir']}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from qvd_bench.evaluate.sensitivity import sensitivity_command

    table, index = sensitivity_command(
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
    )
    shown = table[["kind", "rank", "unit", "role", "sqnr_db"]]
    print(shown[shown["rank"] <= args.top].to_string(index=False, float_format="%.2f"))
    print(f"report written to {index}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from qvd_bench.evaluate.harness import evaluate_command

    weights = {
        name: path
        for name, path in (
            ("fvd", args.fvd_weights),
            ("fvd-cd", args.fvd_cd_weights),
            ("fid", args.fid_weights),
            ("clipsim", args.clip_model),
        )
        if path
    }
    metrics = tuple(m for m in args.metrics if m != "fidelity")
    return evaluate_command(
        args.model,
        args.methods,
        args.bits,
        metrics,
        args.prompts,
        args.reference,
        args.out,
        args.seeds,
        num_prompts=args.num_prompts,
        weight_seed=args.weight_seed,
        stats=args.stats,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        frames=args.frames,
        height=args.height,
        width=args.width,
        disparity=args.disparity,
        asymmetry=args.asymmetry,
        weights=weights,
        progress=not args.no_progress,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from qvd_bench.run import run_command

    return run_command(
        args.out,
        args.seeds,
        model=args.model,
        num_prompts=args.num_prompts,
        frames=args.frames,
        height=args.height,
        width=args.width,
        steps=args.steps,
        methods=args.methods,
        bits=args.bits,
        progress=not args.no_progress,
    )


def cmd_regress(args: argparse.Namespace) -> int:
    from qvd_bench.evaluate.regress import regress_command

    return regress_command(args.results, args.baseline, update=args.update)


def cmd_report(args: argparse.Namespace) -> int:
    from qvd_bench.report import build_report

    out = Path(args.out) if args.out else Path("reports") / Path(args.run).name
    index = build_report([args.run, *args.compare], out, title=args.title)
    print(f"report written to {index} (Markdown: {index.parent / 'report.md'})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from qvd_bench.store import StatsRun

    run = StatsRun(args.run)
    m = run.manifest
    model = m["model"]
    print(
        f"{run.path}: {model['name']} ({model['denoiser_class']}, {model['parameters']:,} parameters)"
    )
    if model["random_weights"]:
        knobs = ", ".join(f"{k} {v:g}" for k, v in sorted(model["knobs"].items()))
        print(f"  random weights: seed {model['weight_seed']}" + (f", {knobs}" if knobs else ""))
    config = m["config"]
    print(
        f"  sampling: {len(m['prompts'])} prompts, {config['steps']} steps, guidance "
        f"{config['guidance_scale']:g}, seed {config['seed']}, latent "
        f"{config['frames']}x{config['height']}x{config['width']}"
    )
    print(f"  timesteps: {len(m['schedule'])}, layers: {len(m['layers'])}, created {m['created']}")
    counts = run.layers.groupby("role").size()
    print("  roles: " + ", ".join(f"{role} {n}" for role, n in counts.items()))
    for name in ("channels", "histograms", "temporal", "weights"):
        print(f"  {name + '.parquet':<20} {len(getattr(run, name)):>10,} rows")
    print(f"  reservoir.safetensors {len(run.reservoir):>8,} layers")
    return 0


def cmd_perf(args: argparse.Namespace) -> int:
    from qvd_bench import perf

    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    models = args.models or perf.BENCHMARK_DEFAULT_MODELS[args.benchmark]
    return perf.main(args.benchmark, models=models, repeats=args.repeats, out=args.out)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


COMMANDS = {
    "models": cmd_models,
    "collect": cmd_collect,
    "analyze": cmd_analyze,
    "quantize": cmd_quantize,
    "sensitivity": cmd_sensitivity,
    "evaluate": cmd_evaluate,
    "run": cmd_run,
    "regress": cmd_regress,
    "report": cmd_report,
    "info": cmd_info,
    "perf": cmd_perf,
}


def command_flags(command: str) -> dict[str, str]:
    """The options of one subcommand, as argument name -> flag (``num_prompts`` ->
    ``--num-prompts``), read from ``build_parser`` (the one place they are declared)."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {
        action.dest: action.option_strings[0]
        for action in commands.choices[command]._actions
        if action.option_strings and action.dest != "help"
    }


# The libraries whose advice-level warnings are kept out of our output, and the environment
# variable each reads its verbosity from when it is imported.
QUIET_LIBRARIES = {"diffusers": "DIFFUSERS_VERBOSITY", "transformers": "TRANSFORMERS_VERBOSITY"}


def _quiet_libraries() -> None:
    """Keeps diffusers' and transformers' advice-level warnings out of our output.

    Through their verbosity variables (unless the user set them), so that neither is
    imported before a command needs it: importing them takes seconds, which ``--help``
    and a one-line error on bad input need not wait for, and the main job never needs
    transformers. A library already imported is set directly.
    """
    for library, variable in QUIET_LIBRARIES.items():
        level = os.environ.setdefault(variable, "error")
        if library in sys.modules:
            logging_module = importlib.import_module(f"{library}.utils.logging")
            logging_module.set_verbosity(logging_module.log_levels.get(level, logging.ERROR))


# glibc's mallopt parameters (malloc.h) and the values ``tune_allocator`` sets: blocks up
# to 32 MiB (glibc's largest mmap threshold) come from the heap, and up to 1 GiB of freed
# heap stays mapped for the next allocations.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 2**30
MALLOC_ENV = "QVD_BENCH_MALLOC"


def tune_allocator() -> bool:
    """Lets glibc's malloc reuse freed memory instead of returning it to the system.

    torch's CPU allocator takes every tensor from malloc and frees it when it dies. With
    glibc's defaults the memory of a forward's activations goes back to the system and
    comes back as fresh pages on the next forward: about 13,000 page faults per
    batch-2 forward of tiny-unet3d, some 10 % of its time spent in the kernel. Keeping
    the freed heap removes them (about 20 faults per forward); the cost is that the
    process keeps its peak memory until it exits, which suits a command-line run.

    Only glibc (Linux) is tuned; ``QVD_BENCH_MALLOC=default`` keeps its defaults.

    Returns:
        True when the settings were applied.
    """
    if os.environ.get(MALLOC_ENV) == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qvd-bench``; returns the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tune_allocator()
    try:
        _quiet_libraries()
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as error:
        print(f"qvd-bench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qvd-bench: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
