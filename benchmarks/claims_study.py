"""The paper's claims measured on the trained reference model ``shapes-wan``.

Over several *sampling* seeds (``shapes-wan`` has trained weights, so the spread comes
from the noise, not from the weights), on held-out dataset captions of combinations seen
in training:

(a) temporal features (the timestep embedding, role ``time_emb``, across timesteps) against
    the spatial activations: median |skewness| and coverage per role, from the analysis
    table (``analysis.summary.role_summary``) of the statistics run each evaluation collects;
(b) whether W8A8 is near-lossless: ground-truth metrics of the quantized videos next to the
    FP model's, and teacher-forced fidelity (SQNR of the x0 predictions) against FP;
(c) every method at every bit-width on the ground-truth metrics and fidelity, mean ± sd
    over seeds.

One evaluation (``qvd_bench.evaluate.matrix.evaluate``) runs per (bit-width, seed), all
methods together, into ``<work>/seed<N>``; its results table is kept as
``<work>/seed<N>/cells/<bits>.parquet``, so a rerun skips finished cells (and evaluate's
own caches of statistics and FP generations are reused). The Markdown report is rewritten
after every cell, so an interrupted run still leaves the finished part.

Usage::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/claims_study.py \
        [--captions 24] [--steps 20] [--guidance-scale 3] [--seeds 0,1,2] \
        [--bits W8A8,W4A8,W6A6,W4A4] [--work claims-work] \
        [--markdown benchmarks/results/claims_shapes_wan.md]

``--report-only`` rewrites the Markdown from the cells already computed.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from qvd_bench.analysis.summary import TEMPORAL_ROLE_LABEL, role_summary
from qvd_bench.datasets.shapes import heldout_captions
from qvd_bench.evaluate.config import EvalConfig
from qvd_bench.evaluate.generate import GenerationSettings
from qvd_bench.evaluate.groundtruth import FD_METRIC
from qvd_bench.evaluate.groundtruth import METRICS as GT_METRICS
from qvd_bench.evaluate.matrix import evaluate
from qvd_bench.evaluate.results import ALL_STEPS

HERE = Path(__file__).resolve().parent
MODEL = "shapes-wan"
METHODS = ("fp", "minmax", "mse", "smoothquant", "os+", "qvd", "qvd-htdq", "qvd-scri")
# W8A8 and W4A8 first: the claims' main cells finish first when time is short.
BITS = ("W8A8", "W4A8", "W6A6", "W4A4")
GT_LABELS = {
    "gt_color_acc": "colour",
    "gt_shape_acc": "shape",
    "gt_motion_acc": "motion",
    "gt_persistence": "persistence",
    "gt_all_acc": "all four",
    FD_METRIC: "gt_fd ↓",
}


def study_captions(count: int) -> tuple[str, ...]:
    """``count`` held-out seen captions spread evenly over the 144 (every k-th)."""
    captions = heldout_captions("seen")
    if not 1 <= count <= len(captions):
        raise SystemExit(f"captions must be in 1..{len(captions)}, got {count}")
    stride = len(captions) // count
    return captions[::stride][:count]


def cell_path(work: Path, seed: int, bits: str) -> Path:
    return work / f"seed{seed}" / "cells" / f"{bits}.parquet"


def run_cell(work: Path, seed: int, bits: str, captions, args) -> float:
    """Evaluates every method at one bit-width for one sampling seed; returns seconds."""
    config = EvalConfig(
        model=MODEL,
        methods=METHODS,
        bits=(bits,),
        metrics=("groundtruth",),
        prompts=captions,
        # Same settings object as ``qvd-bench evaluate`` builds; the model's own flow
        # scheduler is used by the sampler for flow-matching presets.
        settings=GenerationSettings(
            steps=args.steps, guidance_scale=args.guidance_scale, seed=seed, scheduler="ddim"
        ),
    )
    started = time.perf_counter()
    result = evaluate(config, work / f"seed{seed}", progress=False)
    seconds = time.perf_counter() - started
    path = cell_path(work, seed, bits)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = result.results.assign(sampling_seed=seed, seconds=seconds)
    rows.to_parquet(path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return seconds


def load_cells(work: Path) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted(work.glob("seed*/cells/*.parquet"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def mean_sd(values) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    series = pd.Series(values, dtype=float)
    if len(values) == 1:
        return f"{series.iloc[0]:.2f}"
    if math.isinf(series.mean()):
        return "inf"
    return f"{series.mean():.2f} ± {series.std(ddof=1):.2f}"


def metric_values(rows: pd.DataFrame, method: str, bits: str, metric: str) -> list[float]:
    """One value per sampling seed of a ground-truth or teacher-forced fidelity metric."""
    picked = rows[(rows["method"] == method) & (rows["metric"] == metric)]
    if method != "fp":
        picked = picked[picked["bits"] == bits]
    if metric == "sqnr":
        picked = picked[
            (picked["mode"] == "teacher-forced")
            & (picked["branch"] == "cfg")
            & (picked["step"] == ALL_STEPS)
        ]
    per_seed = picked.groupby("sampling_seed")["value"].first()
    return [float(v) for v in per_seed]


def claims_tables(rows: pd.DataFrame, work: Path) -> list[str]:
    """The Markdown body: (a) temporal vs spatial, (b) W8A8, (c) the matrix."""
    lines: list[str] = []
    seeds = sorted(rows["sampling_seed"].unique()) if len(rows) else []
    bits_done = [b for b in BITS if len(rows) and (rows["bits"] == b).any()]

    lines += ["## (a) Temporal features vs spatial activations", ""]
    role_tables = []
    for run in sorted(work.glob("seed*/stats/*/analysis.parquet")):
        roles = role_summary(pd.read_parquet(run))
        roles["seed"] = run.parent.parent.parent.name
        role_tables.append(roles)
    if role_tables:
        roles = pd.concat(role_tables, ignore_index=True)
        cov = [c for c in roles.columns if c.startswith("median_coverage_mean_a")]
        header = ["role", "layers", "median \\|skew\\|", *(f"coverage A{c[-1]}" for c in cov)]
        lines += [
            "Per role, over the statistics runs of "
            f"{roles['seed'].nunique()} sampling seeds (mean ± sd of the per-run median over "
            "layers). Skewness of spatial roles is of the sampling-time tensors (median "
            "over timesteps); the temporal row is the skewness of each timestep-embedding "
            "feature across the timesteps of the grid. Coverage A<b>: mean over channels of "
            "the share of a per-tensor b-bit quantizer's levels that a channel's range "
            "spans (``analysis.channels.coverage``); not defined for the temporal row.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for role, group in roles.groupby("role", sort=False):
            cells = [
                role if role != TEMPORAL_ROLE_LABEL else f"**{role}**",
                str(int(group["layers"].iloc[0])),
                mean_sd(group["median_abs_skew"]),
                *(mean_sd(group[c]) for c in cov),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines += ["(no analysis table yet)", ""]

    if not len(rows):
        return lines
    lines += [
        "## (b) Is W8A8 near-lossless?",
        "",
        "Teacher-forced SQNR (dB, CFG output in x0 space, all steps) and free-running SQNR "
        "of the final videos against FP, and the change of each ground-truth score against "
        "the FP videos of the same seed (paired; one caption is "
        f"{1 / max(captions_per_seed(rows), 1):.3f}); mean ± sd over {len(seeds)} sampling "
        "seeds.",
        "",
    ]
    if "W8A8" in bits_done:
        lines += lossless_table(rows, "W8A8")
    lines += [
        "## (c) Every method at every bit-width",
        "",
        "SQNR: teacher-forced, dB, against FP. Scores: fraction of the captions' objects "
        "right. `gt_fd`: Frechet distance of the videos' analytic features to 1,024 dataset "
        f"clips, from {captions_per_seed(rows)} videos per seed against 39-d features, so "
        "its small-sample bias dominates; compare it only within this table.",
        "",
    ]
    for bits in bits_done:
        lines += [f"### {bits}", ""]
        lines += matrix_table(rows, [bits], include_fp=True)
        lines += [qvd_against_baselines(rows, bits), ""]
    missing = [b for b in BITS if b not in bits_done]
    if missing:
        lines += [f"Not measured yet: {', '.join(missing)}.", ""]
    return lines


def captions_per_seed(rows: pd.DataFrame) -> int:
    """The sample count of the ground-truth accuracies (captions per seed)."""
    n = rows[rows["metric"] == "gt_color_acc"]["n"]
    return int(n.iloc[0]) if len(n) else 0


def free_running_sqnr(rows: pd.DataFrame, method: str, bits: str) -> list[float]:
    picked = rows[
        (rows["method"] == method)
        & (rows["bits"] == bits)
        & (rows["metric"] == "sqnr")
        & (rows["mode"] == "free-running")
    ]
    return [float(v) for v in picked.groupby("sampling_seed")["value"].first()]


def paired_change(rows: pd.DataFrame, method: str, bits: str, metric: str) -> list[float]:
    """Per seed, the method's score minus the FP score of the same seed."""
    quantized = rows[(rows["method"] == method) & (rows["bits"] == bits)]
    fp = rows[rows["method"] == "fp"]
    q = quantized[quantized["metric"] == metric].groupby("sampling_seed")["value"].first()
    f = fp[fp["metric"] == metric].groupby("sampling_seed")["value"].first()
    both = q.index.intersection(f.index)
    return [float(q[s] - f[s]) for s in both]


def signed(values) -> str:
    text = mean_sd(values)
    return text if text.startswith("-") or text in ("–", "inf") else f"+{text}"


def lossless_table(rows: pd.DataFrame, bits: str) -> list[str]:
    header = [
        "method",
        "TF SQNR dB",
        "final SQNR dB",
        *(f"Δ {GT_LABELS[m]}" for m in GT_METRICS),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in METHODS[1:]:
        cells = [
            f"{method} {bits}",
            mean_sd(metric_values(rows, method, bits, "sqnr")),
            mean_sd(free_running_sqnr(rows, method, bits)),
            *(signed(paired_change(rows, method, bits, m)) for m in GT_METRICS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


BASELINES = ("minmax", "mse", "smoothquant", "os+")


def qvd_against_baselines(rows: pd.DataFrame, bits: str) -> str:
    """One line: in how many seeds QVD beats the best baseline of that seed."""
    parts = []
    for metric, label in (("sqnr", "teacher-forced SQNR"), ("gt_all_acc", "all-four accuracy")):
        qvd = dict(zip(*_per_seed(rows, "qvd", bits, metric)))
        best = {}
        for method in BASELINES:
            for seed, value in zip(*_per_seed(rows, method, bits, metric)):
                best[seed] = max(best.get(seed, -math.inf), value)
        seeds = sorted(set(qvd) & set(best))
        if not seeds:
            continue
        wins = sum(qvd[s] > best[s] for s in seeds)
        ties = sum(qvd[s] == best[s] for s in seeds)
        margin = pd.Series([qvd[s] - best[s] for s in seeds])
        parts.append(
            f"{label}: QVD above the best baseline of the seed in {wins} of {len(seeds)} "
            f"seeds ({ties} ties), margin {margin.mean():+.2f}"
        )
    return "; ".join(parts) + "." if parts else ""


def _per_seed(rows: pd.DataFrame, method: str, bits: str, metric: str):
    picked = rows[(rows["method"] == method) & (rows["metric"] == metric) & (rows["bits"] == bits)]
    if metric == "sqnr":
        picked = picked[
            (picked["mode"] == "teacher-forced")
            & (picked["branch"] == "cfg")
            & (picked["step"] == ALL_STEPS)
        ]
    per_seed = picked.groupby("sampling_seed")["value"].first()
    return list(per_seed.index), [float(v) for v in per_seed]


def matrix_table(rows: pd.DataFrame, bits_list, *, include_fp: bool) -> list[str]:
    metrics = ("sqnr", *GT_METRICS, FD_METRIC)
    header = ["method", "SQNR dB", *(GT_LABELS[m] for m in metrics[1:]), "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for bits in bits_list:
        for method in METHODS:
            if method == "fp" and not include_fp:
                continue
            values = [metric_values(rows, method, bits, m) for m in metrics]
            if method == "fp":
                values[0] = []  # FP against itself
            seeds = max(len(v) for v in values)
            if not seeds:
                continue
            label = "fp" if method == "fp" else f"{method} {bits}"
            lines.append(
                "| " + " | ".join([label, *(mean_sd(v) for v in values), str(seeds)]) + " |"
            )
    lines.append("")
    return lines


def write_markdown(path: Path, work: Path, args, command: str, captions) -> None:
    rows = load_cells(work)
    seconds = (
        float(rows.groupby(["sampling_seed", "bits"])["seconds"].first().sum())
        if len(rows)
        else 0.0
    )
    lines = [
        "# The paper's claims on the trained reference model `shapes-wan`",
        "",
        "Made by:",
        "",
        "```",
        command,
        "```",
        "",
        f"Settings: {len(captions)} held-out seen captions (every "
        f"{144 // len(captions)}th of the 144), {args.steps} steps, guidance "
        f"{args.guidance_scale}, sampling seeds {args.seeds}, one video per caption and "
        "seed; statistics collected by each evaluation on its own seed's captions. "
        f"Methods: {', '.join(METHODS)}.",
        "",
        f"Machine: {platform.machine()}, {platform.system()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), a shared 2-core CPU; compute of the finished "
        f"cells {seconds / 60:.0f} min; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
    ]
    lines += claims_tables(rows, work)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--bits", default=",".join(BITS))
    parser.add_argument("--work", default="claims-work")
    parser.add_argument("--markdown", default=str(HERE / "results" / "claims_shapes_wan.md"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    bits_list = [b for b in BITS if b in args.bits.split(",")]
    captions = study_captions(args.captions)
    work = Path(args.work)
    markdown = Path(args.markdown)
    command = "OMP_NUM_THREADS=1 nice -n 5 python benchmarks/claims_study.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    command = command.replace(" --report-only", "")
    if not args.report_only:
        for bits in bits_list:
            for seed in seeds:
                if cell_path(work, seed, bits).exists():
                    continue
                seconds = run_cell(work, seed, bits, captions, args)
                print(f"{bits} seed {seed}: {seconds:.0f} s", flush=True)
                write_markdown(markdown, work, args, command, captions)
    write_markdown(markdown, work, args, command, captions)
    print(f"wrote {markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
