"""The evaluation report: results tables and plots, then the statistics they came from.

Built from the blocks and renderers of ``report.render`` (the same HTML and Markdown as
statistics reports): the headline table (one row per method and bit-width, mean ± sd over
weight seeds), fidelity against bits per method, teacher-forced SQNR per step, the time
each configuration took, the settings, and the statistics section of the first weight
seed's run.

Everything here reads plain data: the results table (``results.parquet``'s rows), the
timings table, the evaluation's settings as a dict, and statistics run directories.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from qvd_bench.report import cost as report_cost
from qvd_bench.report import render
from qvd_bench.report.render import FigureBlock, Heading, Notice, Paragraph, Table
from qvd_bench.report.verdict import (
    VERDICT_LABEL,
    identical_groups,
    verdict_table,
    why_sentences,
)

# The ``step`` of results rows measured over all steps (``results.parquet``).
ALL_STEPS = -1
INF_SUBSTITUTE_NOTE = (
    "Configurations identical to FP (the fp method) have SQNR and PSNR = +inf; the plots "
    "leave them out."
)


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=render.FIGURE_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _finite(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[np.isfinite(frame["value"].to_numpy(dtype=np.float64))]


# Distinct markers and dash patterns per method, so that no line hides another: a method
# identical to an earlier one is drawn dashed, with hollow markers, over it.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
DASHES = ((), (5, 2), (1, 1.5), (6, 2, 1, 2), (3, 1), (8, 3))


def _styles(methods: Sequence[str], identical: Mapping[str, str]) -> dict[str, dict]:
    palette = sns.color_palette("tab10", max(len(methods), 1))
    styles = {}
    for i, method in enumerate(methods):
        twin = identical.get(method)
        styles[method] = {
            "color": palette[i % len(palette)],
            "marker": MARKERS[i % len(MARKERS)],
            "dashes": DASHES[1 + i % (len(DASHES) - 1)] if twin else DASHES[i % len(DASHES)],
            "hollow": twin is not None,
        }
    return styles


def _draw_lines(ax, data: pd.DataFrame, x: str, order: Sequence, styles: dict) -> None:
    """Mean over weight seeds per method against ``x``, with an sd band over seeds."""
    position = {value: i for i, value in enumerate(order)}
    for method, style in styles.items():
        rows = data[data["method"] == method]
        if rows.empty:
            continue
        stats = rows.groupby(x, observed=True)["value"].agg(["mean", "std", "count"])
        stats = stats.loc[[v for v in order if v in stats.index]]
        xs = [position[v] for v in stats.index]
        (line,) = ax.plot(
            xs, stats["mean"], color=style["color"], marker=style["marker"], label=method,
            markerfacecolor="none" if style["hollow"] else style["color"], markersize=6,
            linewidth=1.6, zorder=3 if style["hollow"] else 2,
        )  # fmt: skip
        if style["dashes"]:
            line.set_dashes(style["dashes"])
        if (stats["count"] > 1).any():
            sd = stats["std"].fillna(0.0)
            ax.fill_between(xs, stats["mean"] - sd, stats["mean"] + sd,
                            color=style["color"], alpha=0.15, linewidth=0)  # fmt: skip


def _legend_outside(fig: Figure, ax, identical: Mapping[str, str]) -> None:
    handles, labels = ax.get_legend_handles_labels()
    labels = [f"{m} (= {identical[m]})" if m in identical else m for m in labels]
    if handles:
        fig.legend(handles, labels, loc="outside right upper", title="method", frameon=False)


def fidelity_vs_bits(results: pd.DataFrame) -> Figure:
    """Teacher-forced SQNR (all steps, CFG output) and final PSNR against bits, per method.

    Lines are means over weight seeds, bands their standard deviation (with several
    seeds); identical methods are drawn dashed over each other and named in the legend;
    the legend sits outside the axes.
    """
    sel = results[(results["step"] == ALL_STEPS) & (results["branch"] == "cfg")]
    panels = [
        ("sqnr", "teacher-forced", "SQNR teacher-forced (dB)"),
        ("psnr", "free-running", "PSNR final (dB)"),
    ]
    bits_order = list(dict.fromkeys(results["bits"]))
    methods = list(dict.fromkeys(results["method"]))
    identical = identical_groups(results, methods)
    styles = _styles(methods, identical)
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    with sns.axes_style("whitegrid"):
        for ax, (metric, mode, label) in zip(axes, panels):
            data = _finite(sel[(sel["metric"] == metric) & (sel["mode"] == mode)])
            _draw_lines(ax, data, "bits", bits_order, styles)
            ax.set_xticks(range(len(bits_order)), bits_order)
            ax.set_xlabel("bits")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
    _legend_outside(fig, axes[0], identical)
    return fig


def sqnr_per_step(results: pd.DataFrame) -> Figure:
    """Teacher-forced SQNR of the CFG output per step, per method, one panel per bit-width."""
    sel = results[
        (results["metric"] == "sqnr")
        & (results["mode"] == "teacher-forced")
        & (results["branch"] == "cfg")
        & (results["step"] >= 0)
    ]
    sel = _finite(sel)
    bits_order = list(dict.fromkeys(results["bits"]))
    methods = list(dict.fromkeys(results["method"]))
    identical = identical_groups(results, methods)
    styles = _styles(methods, identical)
    steps = sorted(set(sel["step"]))
    fig = Figure(figsize=(3.4 * len(bits_order) + 1.8, 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(bits_order), sharey=True))
    for ax, bits in zip(axes, bits_order):
        _draw_lines(ax, sel[sel["bits"] == bits], "step", steps, styles)
        ax.set_xticks(range(len(steps)), [str(s) for s in steps])
        ax.set_title(bits)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("SQNR (dB)")
    _legend_outside(fig, axes[0], identical)
    return fig


def _spread_caption(results: pd.DataFrame) -> str:
    seeds = results["weight_seed"].nunique()
    if seeds > 1:
        return f"lines: mean over {seeds} weight seeds, bands: sd over them"
    return "1 weight seed: no spread shown"


def _identical_caption(results: pd.DataFrame) -> str:
    identical = identical_groups(results, list(dict.fromkeys(results["method"])))
    if not identical:
        return ""
    pairs = ", ".join(f"{m} is identical to {twin}" for m, twin in identical.items())
    return f" {pairs} (drawn dashed with hollow markers over it)."


def headline_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, bits): the headline fidelity figures, mean (± std) over seeds.

    Columns: method, bits, seeds, then per figure its mean and, with several seeds, its
    sample standard deviation (``<figure> sd``): teacher-forced SQNR and cosine over all
    steps (CFG output), free-running final SQNR, PSNR and SSIM.
    """
    figures = {
        "SQNR tf (dB)": ("sqnr", "teacher-forced"),
        "cos tf": ("cosine", "teacher-forced"),
        "SQNR final (dB)": ("sqnr", "free-running"),
        "PSNR final (dB)": ("psnr", "free-running"),
        "SSIM final": ("ssim", "free-running"),
    }
    sel = results[(results["step"] == ALL_STEPS) & (results["branch"] == "cfg")]
    masks = {
        label: lambda group, metric=metric, mode=mode: (
            (group["metric"] == metric) & (group["mode"] == mode)
        )
        for label, (metric, mode) in figures.items()
    }
    return _per_configuration(sel, results, masks)


# Labels of the ground-truth metrics (``evaluate.groundtruth``; the report reads them from
# the results table by name); a ``gt_`` metric not listed keeps its own name.
GROUNDTRUTH_LABELS = {
    "gt_color_acc": "colour",
    "gt_shape_acc": "shape",
    "gt_motion_acc": "motion",
    "gt_persistence": "persistence",
    "gt_all_acc": "all four",
    "gt_fd": "gt_fd",
}


def groundtruth_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, bits): the ground-truth metrics, mean (± sd) over seeds.

    Columns: method, bits, seeds, then per metric (``gt_*`` rows of the results, labelled
    by ``GROUNDTRUTH_LABELS``) its mean and, with several seeds, ``<label> sd``. Empty
    when the results hold no ground-truth metric.
    """
    sel = results[results["metric"].str.startswith("gt_")]
    if sel.empty:
        return pd.DataFrame()
    metrics = [m for m in GROUNDTRUTH_LABELS if m in set(sel["metric"])]
    metrics += [m for m in dict.fromkeys(sel["metric"]) if m not in GROUNDTRUTH_LABELS]
    masks = {
        GROUNDTRUTH_LABELS.get(metric, metric): lambda group, metric=metric: (
            group["metric"] == metric
        )
        for metric in metrics
    }
    return _per_configuration(sel, results, masks)


def _per_configuration(
    sel: pd.DataFrame, results: pd.DataFrame, masks: dict[str, Any]
) -> pd.DataFrame:
    """One row per (method, bits) of ``sel``: seeds, then per label the mean (and, with
    several seeds, ``<label> sd``) of the values its mask picks from the group; ordered by
    bits, then method, as they first appear in ``results``."""
    bit_order = {b: i for i, b in enumerate(dict.fromkeys(results["bits"]))}
    method_order = {m: i for i, m in enumerate(dict.fromkeys(results["method"]))}
    out = []
    for (method, bits), group in sel.groupby(["method", "bits"], sort=False):
        row: dict[str, Any] = {
            "method": method,
            "bits": bits,
            "seeds": group["weight_seed"].nunique(),
        }
        for label, mask in masks.items():
            values = group.loc[mask(group), "value"]
            row[label] = _mean(values)
            if row["seeds"] > 1:
                row[f"{label} sd"] = _sd(values)
        out.append(row)
    frame = pd.DataFrame(out)
    if frame.empty:
        return frame
    frame["_b"] = frame["bits"].map(bit_order)
    frame["_m"] = frame["method"].map(method_order)
    return frame.sort_values(["_b", "_m"]).drop(columns=["_b", "_m"]).reset_index(drop=True)


def _mean(values: pd.Series) -> float:
    values = values.to_numpy(dtype=np.float64)
    if len(values) == 0:
        return float("nan")
    if np.isposinf(values).all():
        return float("inf")
    return float(values.mean())


def _sd(values: pd.Series) -> float:
    values = values.to_numpy(dtype=np.float64)
    if len(values) < 2 or not np.isfinite(values).all():
        return float("nan")
    return float(values.std(ddof=1))


# What the free-running PSNR and SSIM rows compare, by their protocol id
# (``evaluate.latents``: decoded by the pipeline's VAE, or latents standing for frames).
FRAMES_BY_PROTOCOL = {
    "fidelity/frames-pipeline-vae": "the frames decoded by the pipeline's own VAE",
    "fidelity/latents-minmax": "the final latents mapped by the FP latents' range to [0, 1] "
    "(no VAE to decode with)",
}


def frames_text(results: pd.DataFrame) -> str:
    """What the free-running PSNR / SSIM of a results table compare, in words."""
    protocols = results.loc[results["metric"] == "psnr", "protocol"].unique()
    return " and ".join(FRAMES_BY_PROTOCOL.get(p, p) for p in sorted(protocols)) or "frames"


def results_blocks(
    results: pd.DataFrame, timings: pd.DataFrame, config: Mapping[str, Any], notices=()
) -> list:
    """The blocks of the results section.

    Args:
        results: the results table.
        timings: seconds per (weight_seed, method, bits), as in ``timings.parquet``.
        config: the evaluation's settings (``EvalConfig.to_dict()``).
        notices: one line each, shown as notices.
    """
    blocks: list = [
        Heading("Fidelity against FP", 2),
        Paragraph(
            f"{len(config['methods'])} methods × {len(config['bits'])} bit-widths on "
            f"{config['model']}, {len(config['prompts'])} prompts, weight seeds "
            f"{', '.join(str(s) for s in config['weight_seeds'])}. SQNR and cosine compare the "
            "denoiser's CFG-combined prediction in x0-space with the FP model's, fed the FP "
            "trajectory's inputs (teacher-forced); the final latents of each model's own "
            f"trajectory are compared free-running (SQNR), and PSNR / SSIM compare "
            f"{frames_text(results)}."
        ),
    ]
    for notice in notices:
        blocks.append(Notice(notice))
    headline = headline_table(results)
    blocks.append(
        Table(
            "Headline figures",
            headline,
            "Mean over weight seeds (sd: sample standard deviation across them); tf: "
            "teacher-forced over all steps; final: free-running final latents (SQNR) and "
            "their frames (PSNR, SSIM).",
        )
    )
    groundtruth = groundtruth_table(results)
    if not groundtruth.empty:
        blocks.append(
            Table(
                "Ground truth against the captions",
                groundtruth,
                "Free-running videos scored against their prompts (dataset captions) by "
                "analytic detectors: fraction of caption objects of the right colour, shape "
                "and motion, present in every frame, and right on all four; gt_fd: Frechet "
                "distance of the videos' analytic features to dataset clips (lower is "
                "better). fp is the full-precision model's own score. Mean over weight "
                "seeds (sd across them).",
            )
        )
    blocks += [Table(*table) for table in report_cost.evaluation_tables(timings, headline)]
    spread, same = _spread_caption(results), _identical_caption(results)
    figures = [
        ("fidelity_vs_bits.png", fidelity_vs_bits(results),
         f"Teacher-forced SQNR and final PSNR against bit-width per method ({spread}).{same}"),
        ("sqnr_per_step.png", sqnr_per_step(results),
         f"Teacher-forced SQNR of the CFG output at each sampling step, per method ({spread})."
         f"{same}"),
    ]  # fmt: skip
    for file, fig, caption in figures:
        blocks.append(FigureBlock(file, figure_png(fig), caption))
    if np.isinf(results["value"].to_numpy(dtype=np.float64)).any():
        blocks.append(Notice(INF_SUBSTITUTE_NOTE))
    timings = timings.copy()
    if not timings.empty:
        blocks.append(
            Table(
                "Time per configuration",
                timings,
                "Seconds spent quantizing (calibration from the statistics) and generating "
                "(teacher-forced and free-running videos; 0 when cached).",
                collapsed=True,
            )
        )
    settings = pd.DataFrame(
        [(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in _flat(config)],
        columns=["setting", "value"],
    )
    blocks.append(Table("Settings", settings, collapsed=True))
    return blocks


def verdict_blocks(results: pd.DataFrame, transforms: pd.DataFrame | None, plan=None) -> list:
    """The first screen: the verdict table and its generated "why"."""
    table = verdict_table(results)
    if table.empty:
        return [Notice("No quantized configuration has finite SQNR: there is no verdict.")]
    seeds = results["weight_seed"].nunique()
    blocks: list = [
        Heading("Verdict", 2),
        Table(
            "Best method per bit-width",
            table,
            f"{VERDICT_LABEL}: teacher-forced SQNR of the CFG output over all steps against "
            f"FP, mean over {seeds} weight seed{'s' if seeds > 1 else ''}; margin: over the "
            "runner-up (the best method that is not identical to the winner); fp, the "
            "reference, is not a candidate.",
        ),
        Heading("Why", 3),
    ]
    blocks += [Paragraph(sentence) for sentence in why_sentences(results, transforms, plan)]
    return blocks


def _flat(data: dict[str, Any], prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def build_results_report(
    out_dir: str | Path,
    results: pd.DataFrame,
    timings: pd.DataFrame,
    *,
    config: Mapping[str, Any],
    stats_dirs: Mapping[int, str | Path],
    notices: Sequence[str] = (),
    title: str | None = None,
    transforms: pd.DataFrame | None = None,
    progress: bool = False,
) -> Path:
    """Writes ``index.html`` and ``report.md`` (figures in ``figures/``) of an evaluation.

    Args:
        out_dir: the report directory (created, or replaced when it holds a report).
        results: the results table (``results.parquet``).
        timings: the timings table (``timings.parquet``).
        config: the evaluation's settings (``EvalConfig.to_dict()``).
        stats_dirs: weight seed -> its statistics run directory.
        notices: one line each (metrics skipped and other caveats).
        title: the title; by default names the model.
        transforms: ``transforms.parquet``'s rows (before → after figures of each
            configuration's transforms), which the verdict's "why" cites.
        progress: show a progress bar over the statistics figures (on stderr).

    Returns:
        The path of ``index.html``.
    """
    out_dir = Path(out_dir)
    render._check_out_dir(out_dir)
    title = title or f"qvd-bench evaluation: {config['model']}"
    first = min(stats_dirs)
    stats = render._prepare(render.StatsRun(stats_dirs[first]), f"weight seed {first}")
    blocks: list = [Heading(title, 1)]
    blocks += verdict_blocks(results, transforms, stats.plan)
    if render._has_random_weights([stats]):
        blocks.append(Notice(render.TINY_NOTE))
    blocks += results_blocks(results, timings, config, notices)
    blocks.append(Heading(f"Statistics (weight seed {first}, {stats.run.path})", 2))
    blocks += render.run_blocks(stats, level=2, prefix="stats-", progress=progress)
    return render.write_report(blocks, title, out_dir)
