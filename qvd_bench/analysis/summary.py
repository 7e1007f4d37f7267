"""One table per run: every measurement of every hooked layer, per role, and the plan.

``layer_summary`` gathers the measurements of ``distribution`` and ``channels`` into one
row per hooked layer (what ``qvd-bench analyze`` writes to ``analysis.parquet``);
``role_summary`` aggregates that table per role; ``headline`` prints the one-screen view;
``analyze`` does all of it for a run directory and writes the table and the plan.

Levels are kept apart as in ``distribution``: ``skew_*`` / ``kurtosis_*`` / ``bowley_*``
describe whole input tensors per timestep (during sampling, CFG branches merged), and
``temporal_*`` describe temporal features across the timesteps of the temporal grid. Range
measurements (asymmetry, disparity, coverage) use per-channel ranges merged over all
timesteps and branches, i.e. what one static per-tensor quantizer calibrated over the
whole run sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from qvd_bench import store
from qvd_bench.analysis.channels import (
    channel_ranges,
    coverage_columns,
    disparity,
    layer_coverage,
    temporal_drift,
    weight_summary,
)
from qvd_bench.analysis.distribution import (
    quartile_skew,
    temporal_channel_skew,
    temporal_layer_skew,
    tensor_skew,
)
from qvd_bench.analysis.plan import DEFAULT_THRESHOLDS, PlanThresholds, QuantPlan, make_plan
from qvd_bench.errors import UserError
from qvd_bench.numerics.grid import check_bits
from qvd_bench.store import StatsRun

ANALYSIS_FILE = "analysis.parquet"
PLAN_FILE = "plan.json"
# Temporal-feature values below this fraction of the layer's maximum count as "low": after
# SiLU most of the mass sits near zero (or on the negative floor), far below the tail.
LOW_FRACTION = 0.05
TEMPORAL_ROLE_LABEL = "time_emb (temporal features)"


def _by_layer(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` indexed by layer name (plain strings, not categories)."""
    frame = frame.copy()
    frame["layer"] = frame["layer"].astype(str)
    return frame.set_index("layer")


def _tensor_figures(channels: pd.DataFrame) -> pd.DataFrame:
    """Median and max |.| over timesteps of tensor skewness and excess kurtosis."""
    per_step = tensor_skew(channels, merge_branches=True)
    per_step["layer"] = per_step["layer"].astype(str)
    per_step["abs_skew"] = per_step["skewness"].abs()
    per_step["abs_kurtosis"] = per_step["kurtosis"].abs()
    return per_step.groupby("layer", sort=False).agg(
        timesteps=("timestep", "size"),
        skew_median=("skewness", "median"),
        skew_abs_max=("abs_skew", "max"),
        kurtosis_median=("kurtosis", "median"),
        kurtosis_abs_max=("abs_kurtosis", "max"),
    )


def _bowley(run: StatsRun) -> pd.Series:
    """Median over timesteps of the quartile skew per layer (empty without histograms)."""
    edges = (run.manifest.get("histogram") or {}).get("edges")
    histograms = run.histograms
    if edges is None or histograms.empty:
        return pd.Series(dtype=np.float64, name="bowley_median")
    per_step = quartile_skew(histograms, edges, merge_branches=True)
    per_step["layer"] = per_step["layer"].astype(str)
    return per_step.groupby("layer", sort=False)["bowley_skew"].median().rename("bowley_median")


def _range_figures(ranges: pd.DataFrame) -> pd.DataFrame:
    """Mean |asymmetry| (each |a_c| clipped at 1) and the three disparity figures per layer."""
    # |a_c| > 1 means the channel does not straddle zero: it is wholly one-sided, and the
    # raw value grows without bound as its range shrinks (1e6 on near-constant channels),
    # which would let a few channels decide the mean.
    ranges = ranges.assign(abs_asymmetry=ranges["asymmetry"].abs().clip(upper=1.0))
    asym = _by_layer(ranges).groupby("layer", sort=False)["abs_asymmetry"].mean()
    spread = _by_layer(disparity(ranges))[["max_median_ratio", "gini_range", "std_log_range"]]
    spread = spread.rename(columns={"max_median_ratio": "disparity", "gini_range": "gini"})
    return spread.assign(asymmetry_abs_mean=asym)


def _temporal_figures(run: StatsRun) -> pd.DataFrame:
    """Figures of each layer's temporal features across the timesteps of the grid."""
    temporal = run.temporal
    if temporal.empty:
        return pd.DataFrame(
            columns=[
                "temporal_timesteps",
                "temporal_skew",
                "temporal_kurtosis",
                "temporal_channel_skew_median",
                "temporal_min",
                "temporal_max",
                "temporal_low_share",
            ],
            dtype=np.float64,
        )
    layer_level = _by_layer(temporal_layer_skew(temporal))
    per_dim = temporal_channel_skew(temporal)
    per_dim["layer"] = per_dim["layer"].astype(str)
    dim_median = per_dim.groupby("layer", sort=False)["skewness"].median()
    # All T·D values per layer, to count the low ones against the layer's maximum.
    values = temporal[["layer", "vector"]].explode("vector")
    values["layer"] = values["layer"].astype(str)
    values["vector"] = values["vector"].astype(np.float64)
    values["top"] = values.groupby("layer", sort=False)["vector"].transform("max")
    values["low"] = values["vector"] < LOW_FRACTION * values["top"]
    counts = temporal.assign(layer=temporal["layer"].astype(str)).groupby("layer", sort=False)
    return pd.DataFrame(
        {
            "temporal_timesteps": counts.size().astype(np.float64),
            "temporal_skew": layer_level["skewness"],
            "temporal_kurtosis": layer_level["kurtosis"],
            "temporal_channel_skew_median": dim_median,
            "temporal_min": layer_level["min"],
            "temporal_max": layer_level["max"],
            "temporal_low_share": values.groupby("layer", sort=False)["low"].mean(),
        }
    )


def layer_summary(run: StatsRun, bits: Sequence[int] = (8, 4)) -> pd.DataFrame:
    """One row per hooked layer with every per-layer measurement of the run.

    Args:
        run: a stored statistics run.
        bits: activation bit-widths to report coverage at (each 2..16).

    Returns:
        One row per hooked layer, in module order, with columns:

        - layer, role, kind, in_channels: from the manifest;
        - has_temporal: whether the run stores temporal features for the layer;
        - timesteps: sampling timesteps with statistics;
        - skew_median, skew_abs_max, kurtosis_median, kurtosis_abs_max: tensor-level
          skewness and excess kurtosis of the input per timestep (CFG branches merged):
          signed median and max |.| over timesteps;
        - bowley_median: median over timesteps of the quartile skew (NaN without
          histograms);
        - asymmetry_abs_mean (mean over channels of min(|a_c|, 1): a channel that does
          not straddle zero counts as wholly one-sided), disparity (max/median range),
          gini, std_log_range: on the per-channel ranges merged over all timesteps and
          branches (NaN when every channel is constant);
        - coverage_mean_a<b>, coverage_median_a<b>, coverage_below10_a<b> for each b in
          ``bits``: level coverage of a per-tensor min-max b-bit quantizer over the run,
          and the share of channels below 10 %;
        - drift: max/min of the layer's per-timestep ranges;
        - weight_absmax_ratio: max/median of the per-output-channel weight absmax;
        - temporal_timesteps, temporal_skew, temporal_kurtosis (all T·D values of the
          temporal features across the grid), temporal_channel_skew_median (median over
          dimensions of the per-dimension skew across timesteps), temporal_min,
          temporal_max, temporal_low_share (share of values below 0.05·max): NaN for
          layers without temporal features.

        Figures are NaN where they do not apply (constant data, no histograms, no
        temporal features).

    Raises:
        UserError: a bit-width is out of range, or a file of the run is unreadable.
    """
    bits = [check_bits(b) for b in bits]
    layers = run.layers
    table = pd.DataFrame(
        {
            "layer": layers["name"].astype(str),
            "role": layers["role"].astype(str),
            "kind": layers["kind"].astype(str),
            "in_channels": layers["in_channels"].astype(np.int64),
        }
    )
    channels = run.channels
    channels = channels[channels["tensor"] == "input"]
    ranges = channel_ranges(channels)
    drift = _by_layer(temporal_drift(channels))["drift"]
    weights = _by_layer(weight_summary(run.weights))["absmax_max_median_ratio"]
    temporal = _temporal_figures(run)
    parts = [
        _tensor_figures(channels),
        _bowley(run),
        _range_figures(ranges),
        *(layer_coverage(ranges, b) for b in bits),
        drift,
        weights.rename("weight_absmax_ratio"),
        temporal,
    ]
    figures = pd.concat(parts, axis=1)
    table = table.join(figures, on="layer")
    table.insert(4, "has_temporal", table["layer"].isin(temporal.index))
    table["timesteps"] = table["timesteps"].fillna(0).astype(np.int64)
    order = [
        "layer",
        "role",
        "kind",
        "in_channels",
        "has_temporal",
        "timesteps",
        "skew_median",
        "skew_abs_max",
        "kurtosis_median",
        "kurtosis_abs_max",
        "bowley_median",
        "asymmetry_abs_mean",
        "disparity",
        "gini",
        "std_log_range",
        *(c for b in bits for c in coverage_columns(b)),
        "drift",
        "weight_absmax_ratio",
        *temporal.columns,
    ]
    return table[order].astype({c: np.float64 for c in order[6:]}).reset_index(drop=True)


def _coverage_bits(table: pd.DataFrame) -> list[int]:
    """The bit-widths a layer table reports coverage at, in column order."""
    prefix = "coverage_mean_a"
    return [int(c[len(prefix) :]) for c in table.columns if c.startswith(prefix)]


def role_summary(layer_table: pd.DataFrame) -> pd.DataFrame:
    """Per-role aggregates of a ``layer_summary`` table, temporal features as their own group.

    Roles describe input tensors during sampling (level ``"tensor"``): median over layers
    of |skew_median|, |kurtosis_median|, |bowley_median|, disparity, mean |asymmetry|,
    drift and each coverage column. The layers with temporal features get one more row,
    role ``"time_emb (temporal features)"``, level ``"temporal"``, from their skewness
    and kurtosis across the timesteps of the temporal grid (coverage and range figures
    are NaN there: they describe sampling-time tensors).

    Args:
        layer_table: the output of ``layer_summary``.

    Returns:
        One row per role (in the table's order of first appearance), then the temporal
        group: role, level, layers, median_abs_skew, median_abs_kurtosis,
        median_abs_bowley, median_disparity, median_asymmetry, median_drift, and
        ``median_coverage_mean_a<b>`` / ``median_coverage_below10_a<b>`` per bit-width.
    """
    bits = _coverage_bits(layer_table)
    data = layer_table.assign(
        abs_skew=layer_table["skew_median"].abs(),
        abs_kurtosis=layer_table["kurtosis_median"].abs(),
        abs_bowley=layer_table["bowley_median"].abs(),
    )
    spec = {
        "layers": ("layer", "size"),
        "median_abs_skew": ("abs_skew", "median"),
        "median_abs_kurtosis": ("abs_kurtosis", "median"),
        "median_abs_bowley": ("abs_bowley", "median"),
        "median_disparity": ("disparity", "median"),
        "median_asymmetry": ("asymmetry_abs_mean", "median"),
        "median_drift": ("drift", "median"),
    }
    for b in bits:
        spec[f"median_coverage_mean_a{b}"] = (f"coverage_mean_a{b}", "median")
        spec[f"median_coverage_below10_a{b}"] = (f"coverage_below10_a{b}", "median")
    roles = data.groupby("role", sort=False).agg(**spec).reset_index()
    roles.insert(1, "level", "tensor")
    features = data[data["has_temporal"]]
    temporal = pd.DataFrame(
        {
            "role": [TEMPORAL_ROLE_LABEL],
            "level": ["temporal"],
            "layers": [len(features)],
            "median_abs_skew": [features["temporal_skew"].abs().median()],
            "median_abs_kurtosis": [features["temporal_kurtosis"].abs().median()],
        }
    )
    out = pd.concat([roles, temporal], ignore_index=True) if len(features) else roles
    return out.astype({"layers": np.int64})


def headline(layer_table: pd.DataFrame, plan: QuantPlan) -> str:
    """A compact, printable per-role table of the analysis and the plan.

    Args:
        layer_table: the output of ``layer_summary``.
        plan: the plan decided from it.

    Returns:
        Lines of text: per role the layers, median |skew|, median coverage (mean per
        layer) at each reported bit-width, and the share of layers that get HTDQ / SCRI;
        then one line of plan totals and any notes.
    """
    roles = role_summary(layer_table)
    decided = pd.DataFrame(
        {
            "layer": [p.layer for p in plan.layers],
            "htdq": [p.htdq.apply for p in plan.layers],
            "scri": [p.scri.apply for p in plan.layers],
            "mse": [p.clipping == "mse" for p in plan.layers],
            "groups": [p.granularity == "timestep_group" for p in plan.layers],
        }
    )
    data = layer_table[["layer", "role", "has_temporal"]].merge(decided, on="layer", how="left")
    data[["htdq", "scri"]] = data[["htdq", "scri"]].fillna(False).astype(bool)
    shares = data.groupby("role", sort=False)[["htdq", "scri"]].mean()
    features = data[data["has_temporal"]]
    if len(features):
        shares.loc[TEMPORAL_ROLE_LABEL] = features[["htdq", "scri"]].mean()
    bits = _coverage_bits(layer_table)
    view = pd.DataFrame(
        {
            "role": roles["role"],
            "layers": roles["layers"],
            "|skew|": roles["median_abs_skew"].map(_fmt),
            **{f"cov A{b}": roles[f"median_coverage_mean_a{b}"].map(_pct) for b in bits},
            "HTDQ": roles["role"].map(shares["htdq"]).map(_pct),
            "SCRI": roles["role"].map(shares["scri"]).map(_pct),
        }
    )
    n = len(data)
    lines = [
        f"{plan.model}: {n} layers, plan W{plan.w_bits}A{plan.a_bits}",
        view.to_string(index=False),
        "|skew|: median over layers of the per-tensor skew (temporal features: across timesteps)",
        "cov: median over layers of the mean share of a per-tensor quantizer's levels",
        f"HTDQ {int(data['htdq'].sum())}/{n} layers, SCRI {int(data['scri'].sum())}/{n}, "
        f"mse clipping {int(data['mse'].sum())}/{n}, timestep groups "
        f"{int(data['groups'].sum())}/{n}",
    ]
    if (layer_table["role"] == "time_emb").any() and not layer_table["has_temporal"].any():
        lines.append(
            "note: no temporal features in this run, so HTDQ was not considered "
            "(recollect with temporal_stride=1)"
        )
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:.2f}"


def _pct(value: float) -> str:
    return "-" if pd.isna(value) else f"{100 * value:.0f}%"


def require_temporal(run: StatsRun) -> list[str]:
    """The layers with temporal features, for commands that cannot work without them.

    Raises:
        UserError: the run stores no temporal features.
    """
    temporal = run.temporal
    if temporal.empty:
        raise UserError(f"{run.path} has no temporal features; recollect with temporal_stride=1")
    return sorted(temporal["layer"].astype(str).unique().tolist())


def stored_layer_summary(run: StatsRun, bits: Sequence[int] = (8, 4)) -> pd.DataFrame:
    """``layer_summary(run, bits)``, read from the run's ``analysis.parquet`` when it holds it.

    ``analyze`` stores the table beside the statistics, and a stored run never changes
    under it (writes replace a whole run), so the table is read back when it lists the
    run's layers with coverage at every one of ``bits`` (the columns of other bit-widths
    are dropped: each bit-width's coverage is computed on its own); otherwise (no file, an
    unreadable one, other bit-widths) it is computed.

    Args:
        run: a stored statistics run.
        bits: activation bit-widths of the coverage columns.
    """
    wanted = [check_bits(b) for b in bits]
    path = Path(run.path) / ANALYSIS_FILE
    try:
        table = pd.read_parquet(path) if path.is_file() else None
    except (OSError, ValueError):
        table = None
    if table is not None and "layer" in table.columns:
        # Coverage columns are named coverage_<figure>_a<bits>.
        coverage = {
            c: int(c.rsplit("_a", 1)[1]) for c in table.columns if c.startswith("coverage_")
        }
        stored = [b for c, b in coverage.items() if c.startswith("coverage_mean_a")]
        same_layers = list(table["layer"]) == list(run.layers["name"])
        if same_layers and [b for b in stored if b in wanted] == wanted:
            return table.drop(columns=[c for c, b in coverage.items() if b not in wanted])
    return layer_summary(run, wanted)


def analyze(
    run_dir: str | Path,
    *,
    w_bits: int = 8,
    a_bits: int = 8,
    bits: Sequence[int] = (8, 4),
    thresholds: PlanThresholds = DEFAULT_THRESHOLDS,
) -> tuple[pd.DataFrame, QuantPlan]:
    """Measures a statistics run, decides its plan, and stores both beside the statistics.

    Writes ``<run>/analysis.parquet`` (the ``layer_summary`` table) and ``<run>/plan.json``
    (the ``QuantPlan``), each atomically.

    Args:
        run_dir: the statistics run (``stats/<run>``).
        w_bits, a_bits: the bit-widths the plan is decided for (2..16).
        bits: activation bit-widths to report coverage at (2..16).
        thresholds: the plan's thresholds.

    Returns:
        (layer table, plan).

    Raises:
        UserError: a bit-width is out of range, or the run is missing or unreadable.
    """
    w_bits, a_bits = check_bits(w_bits), check_bits(a_bits)
    bits = [check_bits(b) for b in bits]
    run = StatsRun(run_dir)
    table = layer_summary(run, bits)
    plan = make_plan(run, table, w_bits=w_bits, a_bits=a_bits, thresholds=thresholds)
    store.write_parquet(run.path / ANALYSIS_FILE, table)
    plan.save(run.path / PLAN_FILE)
    return table, plan
