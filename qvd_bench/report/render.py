"""Statistics reports: one run in full, or several runs side by side, as HTML and Markdown.

``build_report`` writes two files with the same content into the output directory:

- ``index.html``: self-contained (figures embedded as base64 PNG, inline CSS, no script,
  no external reference), so it can be mailed, archived or opened offline;
- ``report.md``: a Markdown twin, its figures as PNG files in ``figures/`` referenced by
  relative paths.

A report is a list of blocks (headings, paragraphs, notices, figures, tables) built once
and written by two small renderers, so both files always carry the same figures and
tables.

Inputs and what happens with bad ones:

- a missing or unreadable run is a ``UserError`` naming it (comparison runs are named as
  such); so is a run listed twice, or an output path that exists and is not a report
  (an earlier report there is replaced);
- a run without temporal features still renders: the temporal-feature figures are
  replaced by a notice saying how to collect them, and the skewness figure has no
  temporal group;
- measurements are ``analysis.summary.layer_summary``'s (coverage at 8 and 4 bits), the
  table ``qvd-bench analyze`` stores as ``analysis.parquet``: read from there when it
  holds them, else recomputed from the statistics;
- the plan is ``plan.json`` beside the statistics when ``qvd-bench analyze`` wrote one;
  otherwise it is decided for the report in memory with the default thresholds at W8A8,
  and the report says which. Nothing is written into the statistics run.
"""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from qvd_bench.analysis.plan import QuantPlan, make_plan
from qvd_bench.analysis.summary import PLAN_FILE, role_summary, stored_layer_summary
from qvd_bench.errors import UserError
from qvd_bench.report import cost
from qvd_bench.report import figures as F
from qvd_bench.store import StatsRun, replace_directory, split_layer_name, umask_mode

COVERAGE_BITS = (8, 4)
FIGURE_DPI = 100
TINY_NOTE = (
    "Numbers from tiny random-weight presets test the machinery, not trained models: "
    "random weights lack the outlier channels of trained ones (the presets inject some on "
    "request; each run's weights line states with which knobs)."
)
NO_TEMPORAL_NOTICE = (
    "This run stores no temporal features, so the temporal-feature distributions and the "
    "TDScore figure are left out; recollect with temporal_stride=1 (or any stride > 0) "
    "to include them."
)
REPORT_FILES = ("index.html", "report.md")


# ----------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Notice:
    """A highlighted paragraph: a caveat or something left out."""

    text: str


@dataclass(frozen=True)
class Table:
    """A titled table; ``collapsed`` tables are folded away in HTML (long per-layer lists)."""

    title: str
    frame: pd.DataFrame
    caption: str = ""
    collapsed: bool = False


@dataclass(frozen=True)
class FigureBlock:
    """A rendered figure: its PNG bytes and the file name it gets in ``figures/``."""

    file: str
    png: bytes
    caption: str


Block = Heading | Paragraph | Notice | Table | FigureBlock


# ----------------------------------------------------------------------------- loading


@dataclass
class RunData:
    """One loaded run and everything the report shows of it."""

    run: StatsRun
    label: str
    layer_table: pd.DataFrame
    plan: QuantPlan
    plan_source: str


def _load_runs(run_dirs: Sequence[str | Path]) -> list[StatsRun]:
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise UserError("no statistics run given; pass stats/<run>")
    seen: set[Path] = set()
    runs = []
    for i, path in enumerate(run_dirs):
        resolved = Path(path).resolve()
        if resolved in seen:
            raise UserError(f"{path} is listed twice; compare distinct runs")
        seen.add(resolved)
        try:
            runs.append(StatsRun(path))
        except UserError as error:
            if i == 0:
                raise
            raise UserError(f"comparison run {path}: {error}") from None
    return runs


def _load_plan(run: StatsRun, layer_table: pd.DataFrame) -> tuple[QuantPlan, str]:
    """The stored plan if there is one, else one decided in memory with the defaults."""
    path = run.path / PLAN_FILE
    if path.exists():
        return QuantPlan.load(path), f"{PLAN_FILE} (written by qvd-bench analyze)"
    plan = make_plan(run, layer_table, w_bits=8, a_bits=8)
    return plan, "decided for this report with the default thresholds at W8A8 (no plan.json)"


def _labels(runs: Sequence[StatsRun]) -> list[str]:
    """Run directory names, made unique with their parent where two share a name."""
    names = [run.path.name for run in runs]
    return [
        f"{run.path.parent.name}/{name}" if names.count(name) > 1 else name
        for run, name in zip(runs, names)
    ]


def _prepare(run: StatsRun, label: str) -> RunData:
    table = stored_layer_summary(run, COVERAGE_BITS)
    plan, source = _load_plan(run, table)
    return RunData(run, label, table, plan, source)


# ----------------------------------------------------------------------------- content


def _model(manifest: dict) -> dict:
    model = manifest.get("model")
    return model if isinstance(model, dict) else {"name": str(model or "?")}


def weights_text(manifest: dict) -> str:
    """How the run's weights came about, e.g. "random weights (seed 0; disparity 1, ...)"."""
    model = _model(manifest)
    if not model.get("random_weights"):
        return f"trained weights from {model.get('source', model.get('name', '?'))}"
    knobs = model.get("knobs") or {}
    shown = ", ".join(
        f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in knobs.items()
    )
    seed = model.get("weight_seed", (manifest.get("seeds") or {}).get("weights", "?"))
    return f"random weights (seed {seed}" + (f"; {shown})" if shown else ")")


def _has_random_weights(runs: Sequence[RunData]) -> bool:
    return any(_model(r.run.manifest).get("random_weights") for r in runs)


def header_table(run: StatsRun, plan_source: str) -> pd.DataFrame:
    """What the run is: model, weights, collection settings, versions, as (item, value)."""
    m = run.manifest
    model = _model(m)
    config = m.get("config", {})
    schedule = m.get("schedule", [])
    prompts = m.get("prompts", config.get("prompts", []))
    histogram = m.get("histogram") or {}
    edges = histogram.get("edges") or {}
    reservoir = m.get("reservoir") or {}
    packages = m.get("packages") or {}
    shown_prompts = "; ".join(prompts[:4]) + (
        f"; … ({len(prompts)} in all)" if len(prompts) > 4 else ""
    )
    rows = [
        ("statistics run", str(run.path)),
        ("model", f"{model.get('name', '?')} ({model.get('denoiser_class', '?')}, "
                  f"family {model.get('family', '?')})"),
        ("parameters", f"{model['parameters']:,}" if "parameters" in model else "?"),
        ("weights", weights_text(m)),
        ("layers hooked", str(len(m.get("layers", [])))),
        ("prompts", f"{len(prompts)}: {shown_prompts}"),
        ("sampling", f"{config.get('steps', '?')} steps, guidance {config.get('guidance_scale', '?')}, "
                     f"seed {m.get('seeds', {}).get('sampling', config.get('seed', '?'))}, "
                     f"sampler {config.get('sampler', '?')}"),
        ("timesteps", ", ".join(f"{t:g}" for t in schedule) if schedule else "?"),
        ("latent video", f"{config.get('frames', '?')} frames × {config.get('height', '?')} × "
                         f"{config.get('width', '?')}, {config.get('dtype', '?')} on "
                         f"{config.get('device', '?')}"),
        ("temporal features", (m.get("temporal") or {}).get("grid") or "none collected"),
        ("histograms", f"{edges.get('kind', 'none')} grid, relative error "
                       f"{edges.get('relative_error', '?')}, token stride "
                       f"{histogram.get('token_stride', '?')}, steps {histogram.get('steps', '?')}"
         if histogram else "none"),
        ("reservoir", f"{reservoir.get('capacity_per_layer', 0)} rows per layer"),
        ("processes", str(m.get("world_size", 1))),
        ("collected", f"{m.get('created', '?')}, git {str(m.get('git_revision') or '?')[:12]}"),
        ("packages", ", ".join(f"{k} {v}" for k, v in packages.items()) or "?"),
        ("plan", plan_source),
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["item", "value"])


def role_table(layer_table: pd.DataFrame) -> pd.DataFrame:
    """``role_summary`` with readable column names."""
    roles = role_summary(layer_table)
    names = {
        "role": "role",
        "level": "level",
        "layers": "layers",
        "median_abs_skew": "|skew|",
        "median_abs_kurtosis": "|excess kurtosis|",
        "median_abs_bowley": "|Bowley skew|",
        "median_disparity": "disparity (max/median range)",
        "median_asymmetry": "mean |asymmetry|",
        "median_drift": "range drift",
    }
    for b in COVERAGE_BITS:
        names[f"median_coverage_mean_a{b}"] = f"coverage A{b}"
        names[f"median_coverage_below10_a{b}"] = f"channels < 10 % A{b}"
    return roles[[c for c in names if c in roles]].rename(columns=names)


def experts_side_by_side(parts: Mapping[str, pd.DataFrame], key: Sequence[str]) -> pd.DataFrame:
    """Tables of the same columns, one per expert, as one table with the experts side by side.

    Args:
        parts: expert name -> its table (the same columns, ``key`` among them).
        key: the columns that identify a row (e.g. ``["role", "level"]``).

    Returns:
        The key columns, then every other column once per expert (``"<column> ·
        <expert>"``), the experts' columns next to each other; one row per key in order of
        first appearance, empty (NaN) where an expert has no such row.
    """
    key = list(key)
    indexed = {expert: frame.set_index(key) for expert, frame in parts.items()}
    rows = list(dict.fromkeys(k for frame in indexed.values() for k in frame.index))
    columns = list(dict.fromkeys(c for frame in indexed.values() for c in frame.columns))
    index = (
        pd.MultiIndex.from_tuples(rows, names=key) if len(key) > 1 else pd.Index(rows, name=key[0])
    )
    wide = pd.DataFrame(index=index)
    for column in columns:
        for expert, frame in indexed.items():
            if column in frame.columns:
                wide[f"{column} · {expert}"] = frame[column].reindex(index)
    return wide.reset_index()


def expert_parts(
    frame: pd.DataFrame, column: str, experts: Sequence[str]
) -> dict[str, pd.DataFrame]:
    """Rows of ``frame`` per expert, by the layer names in ``column``; each part's names
    are the names inside its expert (``transformer_2.blocks.0`` -> ``blocks.0``)."""
    split = [split_layer_name(name, experts) for name in frame[column]]
    owners = pd.Series([owner for owner, _ in split], index=frame.index)
    inner = pd.Series([name for _, name in split], index=frame.index)
    return {
        expert: frame[owners == expert].assign(**{column: inner[owners == expert]})
        for expert in experts
    }


def plan_tables(plan: QuantPlan) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The plan per role (counts) and per layer (every choice with its reasons)."""
    layers = pd.DataFrame(
        {
            "layer": [p.layer for p in plan.layers],
            "role": [p.role for p in plan.layers],
            "family": [p.family for p in plan.layers],
            "clipping": [p.clipping for p in plan.layers],
            "granularity": [p.granularity for p in plan.layers],
            "bits": [p.bits for p in plan.layers],
            "HTDQ": [p.htdq.apply for p in plan.layers],
            "SCRI": [p.scri.apply for p in plan.layers],
            "why HTDQ": [p.htdq.reason for p in plan.layers],
            "why SCRI": [p.scri.reason for p in plan.layers],
            "why clipping": [p.clipping_reason.reason for p in plan.layers],
        }
    )
    return plan_by_role(layers), layers


def plan_by_role(layers: pd.DataFrame) -> pd.DataFrame:
    """Counts per role of the choices in a per-layer plan table (``plan_tables``)."""
    flags = layers.assign(
        mse=layers["clipping"] == "mse", groups=layers["granularity"] == "timestep_group"
    )
    by_role = (
        flags.groupby("role", sort=False)
        .agg(
            layers=("layer", "size"),
            HTDQ=("HTDQ", "sum"),
            SCRI=("SCRI", "sum"),
            mse_clipping=("mse", "sum"),
            timestep_groups=("groups", "sum"),
        )
        .reset_index()
        .rename(columns={"mse_clipping": "mse clipping", "timestep_groups": "timestep groups"})
    )
    return by_role


def _median_abs(values: pd.Series) -> float:
    values = values.abs().dropna()
    return float(values.median()) if len(values) else float("nan")


def comparison_row(data: RunData) -> dict:
    """One row of the cross-run table: the run's model, weights and headline figures."""
    table = data.layer_table
    plan = data.plan
    n = len(plan.layers)
    row = {
        "run": data.label,
        "model": _model(data.run.manifest).get("name", "?"),
        "weights": weights_text(data.run.manifest),
        "layers": len(table),
        "|skew| temporal features": _median_abs(table.loc[table["has_temporal"], "temporal_skew"]),
        "|skew| other activations": _median_abs(
            table.loc[table["role"] != "time_emb", "skew_median"]
        ),
    }
    for b in COVERAGE_BITS:
        row[f"coverage A{b}"] = float(table[f"coverage_mean_a{b}"].median())
    row["HTDQ layers"] = sum(p.htdq.apply for p in plan.layers) / n if n else float("nan")
    row["SCRI layers"] = sum(p.scri.apply for p in plan.layers) / n if n else float("nan")
    row["plan"] = "plan.json" if data.plan_source.startswith(PLAN_FILE) else "default W8A8"
    return row


COMPARISON_CAPTION = (
    "|skew| temporal features: median over timestep-embedding layers of |skewness| of "
    "their temporal features across the timestep grid; |skew| other activations: median "
    "over the other layers of the median over timesteps of each input tensor's skewness; "
    "coverage: median over layers of the mean share of a per-tensor min-max quantizer's "
    "levels a channel reaches; HTDQ / SCRI layers: share of layers the plan gives them."
)


def _png(fig: F.ReportFigure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" entry: the PNG then carries no URL and the same figure gives the same bytes.
    fig.figure.savefig(buffer, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    return buffer.getvalue()


def run_figures(run: StatsRun, *, progress: bool = False) -> tuple[list[F.ReportFigure], list[str]]:
    """Every figure of one run, and the notices for figures that could not be drawn.

    Args:
        run: the statistics run.
        progress: show a progress bar over the figures (on stderr).
    """
    from tqdm.auto import tqdm

    channels, temporal = run.channels, run.temporal
    roles = dict(zip(run.layers["name"].astype(str), run.layers["role"].astype(str)))
    makers = [lambda: F.skew_by_role(F.skew_data(channels, temporal))]
    notices = []
    if temporal.empty:
        notices.append(NO_TEMPORAL_NOTICE)
    else:
        makers.append(lambda: F.temporal_distributions(F.temporal_values_data(temporal)))
        makers.append(lambda: F.tdscore_vs_bits(F.tdscore_data(temporal)))
    makers += [
        lambda: F.worst_channel_ranges(F.worst_ranges_data(channels)),
        lambda: F.coverage_ecdf(F.coverage_data(channels, COVERAGE_BITS)),
        lambda: F.range_heatmap(F.range_heatmap_data(channels, list(roles)), roles),
        lambda: F.weight_ranges(F.weight_data(run.weights)),
    ]
    bar = tqdm(makers, desc="report: figures", unit="figure", disable=not progress)
    return [make() for make in bar], notices


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def run_blocks(data: RunData, *, level: int, prefix: str, progress: bool = False) -> list[Block]:
    """The blocks of one run's section.

    Args:
        data: the run.
        level: heading level of the section.
        prefix: file-name prefix of its figures (unique per run in a comparison).
        progress: show a progress bar over the figures (on stderr).
    """
    run = data.run
    blocks: list[Block] = [
        Table("Run", header_table(run, data.plan_source)),
        Table(
            "Measurements by role",
            role_table(data.layer_table),
            "Medians over the layers of each role: skewness and kurtosis of each input tensor "
            "per timestep (median over timesteps), channel ranges merged over the run, "
            "coverage of a per-tensor min-max quantizer; the temporal-features row is "
            "measured across the timestep grid.",
        ),
    ]
    experts = run.experts
    if experts:
        per_expert = expert_parts(data.layer_table, "layer", experts)
        blocks.append(
            Table(
                "Measurements by role, experts side by side",
                experts_side_by_side(
                    {e: role_table(part) for e, part in per_expert.items()}, ["role", "level"]
                ),
                f"The same medians over each expert's own layers ({', '.join(experts)}); "
                "each expert ran its own timesteps.",
            )
        )
    blocks += [
        *(Table(*table) for table in cost.collection_tables(run.manifest)),
        Heading("Figures", level + 1),
    ]
    figures, notices = run_figures(run, progress=progress)
    blocks += [Notice(text) for text in notices]
    for fig in figures:
        blocks.append(FigureBlock(f"{prefix}{fig.name}.png", _png(fig), fig.caption))
        fig.figure.clear()  # frees the canvas memory early on deep models
    by_role, layers = plan_tables(data.plan)
    blocks += [
        Heading(f"Quantization plan (W{data.plan.w_bits}A{data.plan.a_bits})", level + 1),
        Paragraph(f"Plan: {data.plan_source}."),
        Table("Plan by role", by_role, "Number of layers per role that get each choice."),
        *(
            [
                Table(
                    "Plan by role, experts side by side",
                    experts_side_by_side(
                        {
                            e: plan_by_role(part)
                            for e, part in expert_parts(layers, "layer", experts).items()
                        },
                        ["role"],
                    ),
                    "The counts over each expert's own layers.",
                )
            ]
            if experts
            else []
        ),
        Table(
            "Plan per layer",
            layers,
            "Every layer's activation quantizer with the measurements that decided it.",
            collapsed=True,
        ),
    ]
    return blocks


def report_blocks(runs: Sequence[RunData], title: str, *, progress: bool = False) -> list[Block]:
    """All blocks of a report: one run in full, or a comparison: the table, the shared
    figures (one colour per run) and each run's plan."""
    blocks: list[Block] = [Heading(title, 1)]
    if len(runs) == 1:
        data = runs[0]
        manifest = data.run.manifest
        blocks.append(
            Paragraph(
                f"Statistics of {_model(manifest).get('name', '?')}, "
                f"{weights_text(manifest)}, from {data.run.path}."
            )
        )
        if _has_random_weights(runs):
            blocks.append(Notice(TINY_NOTE))
        return blocks + run_blocks(data, level=1, prefix="", progress=progress)
    blocks.append(
        Paragraph(
            f"Comparison of {len(runs)} statistics runs: one table row per run, then shared "
            "figures with one colour per run, then each run's plan by role."
        )
    )
    if _has_random_weights(runs):
        blocks.append(Notice(TINY_NOTE))
    table = pd.DataFrame([comparison_row(r) for r in runs])
    shares = [f"coverage A{b}" for b in COVERAGE_BITS] + ["HTDQ layers", "SCRI layers"]
    table[shares] = table[shares].map(lambda v: "–" if pd.isna(v) else f"{100 * v:.1f} %")
    blocks.append(Table("Comparison", table, COMPARISON_CAPTION))
    blocks.append(Heading("Figures", 2))
    for fig in comparison_figures(runs, progress=progress):
        blocks.append(FigureBlock(f"{fig.name}.png", _png(fig), fig.caption))
        fig.figure.clear()
    for i, data in enumerate(runs, start=1):
        blocks.append(Heading(f"Run {i}: {data.label}", 2))
        by_role, layers = plan_tables(data.plan)
        blocks += [
            Table("Run", header_table(data.run, data.plan_source), collapsed=True),
            Table(
                f"Plan by role (W{data.plan.w_bits}A{data.plan.a_bits})",
                by_role,
                f"Number of layers per role that get each choice; plan: {data.plan_source}.",
            ),
            Table("Plan per layer", layers, collapsed=True),
        ]
    return blocks


def comparison_figures(runs: Sequence[RunData], *, progress: bool = False) -> list:
    """The shared figures of a comparison: each run's data in one figure, a colour each."""
    from tqdm.auto import tqdm

    skew, cover, weights = [], [], []
    for data in tqdm(runs, desc="report: reading runs", unit="run", disable=not progress):
        channels, label = data.run.channels, data.label
        skew.append(F.skew_data(channels, data.run.temporal).assign(run=label))
        cover.append(F.coverage_data(channels, COVERAGE_BITS).assign(run=label))
        weights.append(F.weight_data(data.run.weights).assign(run=label))
    return [
        F.skew_by_role_compare(pd.concat(skew, ignore_index=True)),
        F.coverage_ecdf_compare(pd.concat(cover, ignore_index=True)),
        F.weight_ranges_compare(pd.concat(weights, ignore_index=True)),
    ]


# ----------------------------------------------------------------------------- rendering


def _cell(value) -> str:
    """One table cell as text: 3 significant digits, yes/no, "–" for missing."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return "–"
        return f"{value:.3g}"
    return "" if value is None else str(value)


def _cells(frame: pd.DataFrame) -> list[list[str]]:
    return [[_cell(v) for v in row] for row in frame.itertuples(index=False, name=None)]


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1150px; padding: 1.5em 2em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #e5e5e5; }
h3 { font-size: 1.1em; margin-top: 1.6em; }
.notice { background: #fff6e0; border-left: 4px solid #e0a800; padding: .6em 1em; }
.table-wrap { overflow-x: auto; margin: .4em 0 1.2em; }
table { border-collapse: collapse; font-size: .82em; }
th, td { border: 1px solid #d8d8d8; padding: .25em .55em; text-align: left;
         vertical-align: top; }
th { background: #f3f4f6; }
td:first-child { white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafafa; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: .95em;
          padding-top: .3em; }
figure { margin: 1.2em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #333; font-size: .92em; margin-top: .3em; }
details summary { cursor: pointer; font-weight: 600; margin: .5em 0; }
footer { margin-top: 3em; color: #666; font-size: .85em; }
"""


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in _cells(table.frame)
    )
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    inner = (
        f'<div class="table-wrap"><table>{caption}<thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )
    title = html.escape(table.title)
    if table.collapsed:
        return f"<details><summary>{title} ({len(table.frame)} rows)</summary>{inner}</details>"
    return f"<h4>{title}</h4>{inner}"


def render_html(blocks: Sequence[Block], title: str, footer: str) -> str:
    """The self-contained HTML page of ``blocks``."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Notice):
            parts.append(f'<p class="notice">{html.escape(block.text)}</p>')
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
        elif isinstance(block, FigureBlock):
            data = base64.b64encode(block.png).decode("ascii")
            caption = html.escape(block.caption)
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"{body}\n<footer>{html.escape(footer)}</footer>\n</body>\n</html>\n"
    )


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    columns = [_md_escape(str(c)) for c in table.frame.columns]
    lines = [
        f"#### {_md_escape(table.title)}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in _cells(table.frame)]
    if table.caption:
        lines += ["", f"*{_md_escape(table.caption)}*"]
    return "\n".join(lines)


def render_markdown(blocks: Sequence[Block], footer: str) -> str:
    """The Markdown twin of ``blocks``; figures point to ``figures/<file>``."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + block.text)
        elif isinstance(block, Notice):
            parts.append("> **Note:** " + block.text)
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Table):
            parts.append(_md_table(block))
        elif isinstance(block, FigureBlock):
            alt = block.caption.replace("[", "(").replace("]", ")")
            parts.append(f"![{alt}](figures/{block.file})\n\n*{block.caption}*")
    parts.append(f"---\n\n{footer}")
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- writing


def _check_out_dir(out_dir: Path) -> None:
    """Fails before any work if ``out_dir`` cannot take a report."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory; choose another out_dir")
    entries = {p.name for p in out_dir.iterdir()}
    if entries and not entries & set(REPORT_FILES):
        raise UserError(f"{out_dir} exists and holds no report; choose an empty or new out_dir")


def _versions() -> str:
    names = ("qvd-bench", "pandas", "matplotlib", "seaborn")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def build_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    title: str | None = None,
    progress: bool = False,
) -> Path:
    """Writes a statistics report of one run, or a comparison report of several.

    One run gives its header (model, weights and their knobs, collection settings,
    package versions), measurements by role, every figure and the plan. Several runs give
    a comparison table with one row per run, shared figures with one colour per run, and
    each run's plan by role (header and per-layer plan folded away).

    Args:
        run_dirs: statistics run directories (``stats/<run>``); the first is the main
            run, the others are compared with it.
        out_dir: the report directory; created, or replaced if it holds an earlier report.
        title: the report title; a default names the model or the number of runs.
        progress: show progress bars over the figures (on stderr).

    Returns:
        The path of ``out_dir/index.html`` (``report.md`` and ``figures/`` beside it).

    Raises:
        UserError: no run given, a run missing or unreadable (comparison runs named as
            such), a run listed twice, or ``out_dir`` unusable.
    """
    out_dir = Path(out_dir)
    runs = _load_runs(run_dirs)
    _check_out_dir(out_dir)
    data = [_prepare(run, label) for run, label in zip(runs, _labels(runs))]
    if title is None:
        model = _model(runs[0].manifest).get("name", "?")
        title = (
            f"qvd-bench statistics report: {model} ({data[0].label})"
            if len(data) == 1
            else f"qvd-bench comparison of {len(data)} statistics runs"
        )
    blocks = report_blocks(data, title, progress=progress)
    return write_report(blocks, title, out_dir)


def write_report(blocks: list, title: str, out_dir: Path) -> Path:
    """Writes ``index.html``, ``report.md`` and ``figures/`` of ``blocks`` into ``out_dir``.

    Everything is written into a sibling temporary directory, then renamed into place, so
    a reader never sees a half-written report.

    Returns:
        The path of ``index.html``.
    """
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    footer = f"Generated {now} by {_versions()}."
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        figures_dir = built / "figures"
        figures_dir.mkdir()
        for block in blocks:
            if isinstance(block, FigureBlock):
                (figures_dir / block.file).write_bytes(block.png)
        (built / "index.html").write_text(render_html(blocks, title, footer), encoding="utf-8")
        (built / "report.md").write_text(render_markdown(blocks, footer), encoding="utf-8")
        built.chmod(umask_mode(0o777))  # mkdtemp makes it private; mkdir would not
        replace_directory(built, out_dir)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    return out_dir / "index.html"
