"""Every quantization method on every tiny preset at W8A8, W6A6, W4A8 and W4A4.

For each preset the evaluation matrix (``qvd_bench.evaluate.matrix.evaluate``, fidelity
metrics only) runs once per (method, bit-width) on reduced sampling settings, and the
teacher-forced SQNR of the CFG output in x0-space against the FP model goes into one
Markdown table per preset: over all steps, and per step. A configuration that fails is
reported in the table with its error instead of stopping the matrix.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/method_matrix.py [--presets tiny-unet3d,tiny-wan]
        [--methods minmax,qvd] [--bits W8A8,W4A4] [--steps 4] [--frames 2] [--size 8]

Statistics, reference videos and generations are cached under ``--work`` (a rerun with the
same settings regenerates nothing); the table goes to ``--markdown``.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from qvd_bench.errors import UserError
from qvd_bench.evaluate.config import EvalConfig, normalise_bits_specs
from qvd_bench.evaluate.generate import GenerationSettings
from qvd_bench.evaluate.matrix import evaluate
from qvd_bench.evaluate.metrics import FIDELITY_METRICS
from qvd_bench.evaluate.results import ALL_STEPS
from qvd_bench.models import zoo
from qvd_bench.prompts import select_prompts
from qvd_bench.quant.methods import METHODS

HERE = Path(__file__).resolve().parent
DEFAULT_BITS = ("W8A8", "W6A6", "W4A8", "W4A4")


@dataclass
class Outcome:
    """One (preset, method, bits) cell.

    Attributes:
        all_steps: teacher-forced SQNR (dB) over all steps, CFG branch; None on failure.
        per_step: teacher-forced SQNR (dB) per step, CFG branch.
        error: the failure's one-line description, or "".
        seconds: wall time of the evaluation call.
    """

    all_steps: float | None
    per_step: list[float]
    error: str
    seconds: float


def tiny_presets() -> list[str]:
    """The names of every tiny preset of the zoo, in registration order."""
    return [name for name in zoo.MODELS if name.startswith("tiny-")]


def run_cell(
    preset: str,
    method: str,
    bits: str,
    prompts: tuple[str, ...],
    settings: GenerationSettings,
    weight_seed: int,
    work_dir: Path,
) -> Outcome:
    """Evaluates one (preset, method, bits) configuration and extracts its SQNR figures."""
    config = EvalConfig(
        model=preset,
        weight_seeds=(weight_seed,),
        methods=(method,),
        bits=(bits,),
        metrics=FIDELITY_METRICS,
        prompts=prompts,
        settings=settings,
    )
    started = time.perf_counter()
    try:
        result = evaluate(config, work_dir, progress=False)
    except Exception as error:  # a failing cell is a finding; the matrix goes on
        frame = traceback.extract_tb(error.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        message = " ".join(str(error).split())[:160]
        return Outcome(None, [], f"{type(error).__name__} at {where}: {message}", 0.0)
    seconds = time.perf_counter() - started
    if result is None:  # only a non-zero rank of a torchrun job gets no results
        return Outcome(None, [], "no results (run it in a single process)", seconds)
    rows = result.results
    sqnr = rows[
        (rows["metric"] == "sqnr") & (rows["mode"] == "teacher-forced") & (rows["branch"] == "cfg")
    ]
    overall = sqnr[sqnr["step"] == ALL_STEPS]["value"]
    per_step = sqnr[sqnr["step"] != ALL_STEPS].sort_values("step")["value"]
    return Outcome(float(overall.iloc[0]), [float(v) for v in per_step], "", seconds)


def fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.1f}"


def preset_table(cells: dict[tuple[str, str], Outcome], methods, bits) -> list[str]:
    """A Markdown table: one row per method, per bit-width the all-steps SQNR and the
    per-step SQNRs (first → last step)."""
    header = ["method", *(f"{b} all" for b in bits), *(f"{b} per step" for b in bits)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        overall, steps = [], []
        for b in bits:
            cell = cells[(method, b)]
            overall.append("**FAILED**" if cell.error else fmt(cell.all_steps))
            steps.append(" / ".join(fmt(v) for v in cell.per_step) if not cell.error else "–")
        lines.append("| " + " | ".join([method, *overall, *steps]) + " |")
    return lines


def write_markdown(
    path: Path,
    results: dict[str, dict[tuple[str, str], Outcome]],
    methods,
    bits,
    settings: GenerationSettings,
    prompts: tuple[str, ...],
    weight_seed: int,
) -> None:
    """Writes the whole matrix (presets done so far) to ``path`` atomically."""
    lines = [
        "# Method × preset × bit-width matrix (tiny presets)",
        "",
        "Teacher-forced SQNR (dB) of the CFG-combined output in x0-space against the FP model "
        "(the quantized model is fed the FP trajectory's inputs): `all` over all steps "
        "(from the total energies), `per step` from the first to the last denoising step.",
        "`fp` quantizes nothing, so its SQNR is +inf.",
        "",
        f"Settings: {len(prompts)} prompt(s), {settings.frames} frames, "
        f"{settings.height}×{settings.width} latents, {settings.steps} steps "
        f"({settings.scheduler}; flow models use flow-euler), guidance {settings.guidance_scale}, "
        f"sampling seed {settings.seed}, weight seed {weight_seed}, preset outlier defaults. "
        f"Generated by `benchmarks/method_matrix.py` (torch {torch.__version__}, "
        f"Python {platform.python_version()}).",
        "",
        "The tiny presets have random weights: these numbers check that every method runs and "
        "behaves sensibly, they are not findings about video diffusion models.",
        "",
    ]
    failures = []
    for preset, cells in results.items():
        lines += [f"## {preset}", "", *preset_table(cells, methods, bits), ""]
        failures += [
            f"- {preset} {method} {b}: {cell.error}"
            for (method, b), cell in cells.items()
            if cell.error
        ]
    lines += ["## Failures", "", *(failures or ["none"]), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.write_text("\n".join(lines))
    temp.replace(path)


def parse_list(text: str | None, default, known=None, what: str = "") -> list[str]:
    if not text:
        return list(default)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if known is not None and name not in known:
            raise UserError(f"unknown {what} {name!r} (known: {', '.join(known)})")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", help="comma-separated tiny presets (default: all)")
    parser.add_argument("--methods", help="comma-separated methods (default: all registered)")
    parser.add_argument("--bits", help="comma-separated bit-widths (default: W8A8,W6A6,W4A8,W4A4)")
    parser.add_argument("--prompts", type=int, default=1, help="number of prompts (default 1)")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--size", type=int, default=8, help="latent height and width")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--weight-seed", type=int, default=0)
    parser.add_argument(
        "--work", type=Path, default=HERE.parent / "results" / "method_matrix", help="cache root"
    )
    parser.add_argument("--markdown", type=Path, default=HERE / "results" / "method_matrix.md")
    args = parser.parse_args(argv)
    try:
        presets = parse_list(args.presets, tiny_presets(), tiny_presets(), "preset")
        methods = parse_list(args.methods, list(METHODS), list(METHODS), "method")
        bits = list(normalise_bits_specs(parse_list(args.bits, DEFAULT_BITS)))
        prompts = tuple(select_prompts(None, args.prompts))
        settings = GenerationSettings(
            steps=args.steps, frames=args.frames, height=args.size, width=args.size
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results: dict[str, dict[tuple[str, str], Outcome]] = {}
    for preset in presets:
        cells = results.setdefault(preset, {})
        for method in methods:
            for b in bits:
                cell = run_cell(preset, method, b, prompts, settings, args.weight_seed, args.work)
                cells[(method, b)] = cell
                status = f"FAILED {cell.error}" if cell.error else f"{fmt(cell.all_steps)} dB"
                print(f"{preset} {method} {b}: {status} ({cell.seconds:.0f} s)", flush=True)
        write_markdown(args.markdown, results, methods, bits, settings, prompts, args.weight_seed)
    minutes = (time.perf_counter() - started) / 60
    print(f"matrix written to {args.markdown} ({minutes:.1f} min; cached videos are reused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
