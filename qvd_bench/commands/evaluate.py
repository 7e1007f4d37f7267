"""``qvd-bench evaluate``: the methods x bit-widths x metrics matrix, its results table and
report; the terminal summary of an evaluation (shared with ``qvd-bench run``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qvd_bench.commands._args import (
    add_model_args,
    add_sampling_args,
    csv,
    device_and_dtype,
    output_root,
    sampling_values,
    selected_prompts,
    with_flags,
)
from qvd_bench.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="the methods x bit-widths x metrics matrix -> results.parquet + report"
    )
    add_model_args(parser, dtype_default=None, dtype_help="--stats' dtype; float32 when collecting")
    parser.add_argument(
        "--methods",
        type=csv,
        default=("fp", "minmax", "mse", "qvd"),
        help="comma-separated methods (default: fp,minmax,mse,qvd)",
    )
    parser.add_argument(
        "--bits",
        type=csv,
        default=("W8A8", "W6A6", "W4A8"),
        help="comma-separated WxAy (default: W8A8,W6A6,W4A8)",
    )
    parser.add_argument(
        "--metrics",
        type=csv,
        default=("fidelity",),
        help="fidelity (always), fvd, fvd-cd, fid, clipsim, groundtruth (shapes-wan with "
        "dataset captions as prompts) (default: fidelity)",
    )
    add_sampling_args(parser, steps=10)
    parser.add_argument(
        "--reference",
        default="fp",
        help="Frechet reference: fp (FP generations paired by seed) or a directory of real "
        "videos (videos.safetensors: 'videos', uint8 N x T x H x W x 3)",
    )
    parser.add_argument(
        "--stats", default=None, help="statistics run to calibrate from (default: collect one)"
    )
    parser.add_argument("--seeds", type=int, default=1, help="number of weight seeds (default: 1)")
    parser.add_argument("--fvd-weights", help="i3d_torchscript.pt (StyleGAN-V FVD)")
    parser.add_argument("--fvd-cd-weights", help="i3d_pretrained_400.pt (cd-fvd FVD)")
    parser.add_argument("--fid-weights", help="weights-inception-2015-12-05-6726825d.pth (FID)")
    parser.add_argument(
        "--clip-model", help="local CLIP directory, e.g. clip-vit-base-patch32 (CLIPSIM)"
    )
    parser.add_argument(
        "--out", default=".", help="output root for stats/, results/, reports/ (default: .)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Runs the matrix and prints where its outputs went.

    Under ``torchrun --nproc_per_node=N`` the prompts are sharded across the processes
    and rank 0 writes and prints (``evaluate.matrix.evaluate``).
    """
    from qvd_bench import store
    from qvd_bench.evaluate.config import EvalConfig
    from qvd_bench.evaluate.generate import GenerationSettings
    from qvd_bench.evaluate.matrix import evaluate

    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    device, dtype = device_and_dtype(args)
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
    config = EvalConfig(
        model=args.model,
        weight_seeds=tuple(range(args.weight_seed, args.weight_seed + args.seeds)),
        methods=tuple(args.methods),
        bits=tuple(args.bits),
        metrics=tuple(m for m in args.metrics if m != "fidelity"),
        prompts=selected_prompts(args),
        settings=GenerationSettings(**sampling_values(args), scheduler="ddim"),
        disparity=args.disparity,
        asymmetry=args.asymmetry,
        stats=args.stats,
        reference=args.reference,
        weights=weights,
        device=device,
        dtype=dtype,
        # The pipeline call's own arguments (a Python-level option) of the statistics run.
        pipeline_kwargs=store.StatsRun(args.stats).pipeline_kwargs if args.stats else {},
    )
    out = store.check_output_directory(output_root(args.out))
    result = evaluate(config, out, progress=not args.no_progress)
    if result is not None:  # rank 0 reports; the other processes of a torchrun stay quiet
        name = Path(config.model).name or "model"
        write_report(result, config, out, name, progress=not args.no_progress)
        print_summary(result, out, name)
    return 0


def write_report(
    result, config, out: Path, name: str, *, progress: bool = False, report_dir=None
) -> Path:
    """Writes the HTML + Markdown report of an evaluation to ``<out>/reports/<name>/``.

    Args:
        result: the ``evaluate.matrix.EvalResult``.
        config: its ``EvalConfig``.
        out: the output root of the evaluation.
        name: the model's directory name.
        progress: show a progress bar over the report's figures.
        report_dir: where the report goes instead of ``<out>/reports/<name>/``.

    Returns:
        The path of ``index.html``.
    """
    import pandas as pd

    from qvd_bench.evaluate.matrix import TRANSFORMS_FILE
    from qvd_bench.report.results import build_results_report

    transforms_path = result.results_dir / TRANSFORMS_FILE
    transforms = pd.read_parquet(transforms_path) if transforms_path.exists() else None
    return build_results_report(
        Path(report_dir) if report_dir is not None else out / "reports" / name,
        result.results,
        result.timings,
        config=config.to_dict(),
        stats_dirs=result.stats_dirs,
        notices=result.notices,
        transforms=transforms,
        progress=progress,
    )


def print_summary(result, out: Path, name: str, report_dir=None) -> None:
    """The notices, the headline table and where the outputs of an evaluation went.

    Args:
        result: the ``evaluate.matrix.EvalResult``.
        out: the output root of the evaluation.
        name: the model's directory name under ``reports/``.
        report_dir: where the report went when not ``<out>/reports/<name>/``.
    """
    from qvd_bench.evaluate import generate as gen
    from qvd_bench.evaluate.results import RESULTS_FILE
    from qvd_bench.report.results import headline_table

    for notice in result.notices:
        print(f"note: {with_flags(notice)}")
    if result.sampler:
        print(f"sampler: {result.sampler}")
    if result.frames:
        print(f"frames (PSNR, SSIM, FVD, FID, CLIPSIM): {result.frames}")
    print(format_table(headline_table(result.results)))
    for weight_seed, values in result.fp_against_float32.items():
        shown = ", ".join(f"{metric} {value:.4g}" for metric, value in values.items())
        print(f"FP against float32 FP (weight seed {weight_seed}, final latents): {shown}")
    print(
        f"videos: {result.generated} generated, {result.cached} from the cache "
        f"({result.results_dir / gen.GENERATIONS_DIR})"
    )
    print(f"results written to {result.results_dir / RESULTS_FILE}")
    report = Path(report_dir) if report_dir is not None else out / "reports" / name
    print(f"report written to {report / 'index.html'}")


def format_table(frame) -> str:
    """A plain-text table of a DataFrame (for the terminal)."""
    import numpy as np

    if frame.empty:
        return "(no results)"

    def cell(value: Any) -> str:
        if isinstance(value, (float, np.floating)):
            if np.isnan(value):
                return "–"
            if np.isinf(value):
                return "inf" if value > 0 else "-inf"
            return f"{value:.4g}"
        return str(value)

    cells = [[cell(v) for v in row] for row in frame.itertuples(index=False)]
    widths = [max(len(str(c)), *(len(r[i]) for r in cells)) for i, c in enumerate(frame.columns)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(frame.columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
