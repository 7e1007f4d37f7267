"""Per-channel ranges and what they mean for a per-tensor quantizer.

For channel c of a layer input with range r_c = max_c − min_c:

- asymmetry a_c = (max_c + min_c)/(max_c − min_c): in [−1, 1] when the channel's range contains 0,
  beyond ±1 for a one-sided channel (NaN for a constant channel);
- inter-channel disparity per layer: max_c r_c / median_c r_c, the Gini coefficient of the
  r_c, and the (population) standard deviation of log r_c over channels with r_c > 0;
- quantization-level coverage of a per-tensor b-bit quantizer with range [lo, hi], step
  Δ = (hi − lo)/(2^b − 1) and level q(v) = clamp(round((v − lo)/Δ), 0, 2^b − 1):
  cov_c = (q(min(hi, max_c)) − q(max(lo, min_c)) + 1)/2^b, and 0 where [min_c, max_c] and
  [lo, hi] do not overlap. ``round`` is half to even (``torch.round``). [lo, hi] defaults
  to the min-max of the layer over the rows considered;
- temporal drift per layer: max_t R_t / min_t R_t of the per-step ranges R_t of the layer.

Ranges merged over timesteps, branches or channels are exact (min of mins, max of maxes).
Channels without data (count 0) get NaN and are left out of every per-layer figure.

Gini coefficient (no (n − 1)/n correction): G = Σ_i Σ_j |r_i − r_j| / (2·n²·mean r),
computed from the sorted values as 2·Σ_i i·r_(i) / (n·Σ r) − (n + 1)/n (i from 1). It is 0
for equal ranges and (n − 1)/n when one channel holds the whole range, e.g. 0.75 for
[0, 0, 0, 1]; NaN when every range is 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from qvd_bench.errors import UserError
from qvd_bench.numerics.grid import check_bits, quant_levels

TENSOR_KEYS = ("tensor", "layer", "role", "timestep", "branch")
# A channel is starved when it reaches fewer than this share of the tensor's levels.
STARVED = 0.1


def select(
    frame: pd.DataFrame,
    timesteps: Iterable[float] | None = None,
    branches: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Rows of ``frame`` at the given timestep values and CFG branches (all when None).

    Raises:
        UserError: a requested timestep or branch is not in ``frame``.
    """
    mask = np.ones(len(frame), dtype=bool)
    for column, wanted in (("timestep", timesteps), ("branch", branches)):
        if wanted is None:
            continue
        wanted = list(wanted)
        have = set(frame[column].unique().tolist())
        missing = [w for w in wanted if w not in have]
        if missing:
            shown = ", ".join(str(h) for h in sorted(have)[:10])
            raise UserError(f"{column} {missing[0]!r} is not in the statistics (have {shown})")
        mask &= frame[column].isin(wanted).to_numpy()
    return frame[mask]


def _key_columns(frame: pd.DataFrame, candidates: Sequence[str]) -> list[str]:
    return [c for c in candidates if c in frame.columns]


def _group_keys(frame: pd.DataFrame) -> list[str]:
    """The key columns of one layer (and timestep, if present) of a per-channel table."""
    return _key_columns(frame, TENSOR_KEYS)


def channel_ranges(
    channels: pd.DataFrame,
    *,
    timesteps: Iterable[float] | None = None,
    branches: Iterable[str] | None = None,
    per_timestep: bool = False,
) -> pd.DataFrame:
    """Per-channel min, max, range and asymmetry, merged over timesteps and branches.

    Args:
        channels: rows shaped like ``channels.parquet``.
        timesteps, branches: the rows to consider (all when None).
        per_timestep: keep one row per timestep (merged over branches only).

    Returns:
        One row per (tensor, layer, role[, timestep], channel): count, min, max, range
        (max − min), asymmetry ((max + min)/(max − min)). min, max, range and asymmetry are
        NaN for channels without data; asymmetry is NaN for constant channels.
    """
    rows = select(channels, timesteps, branches)
    keys = _key_columns(rows, ("tensor", "layer", "role"))
    if per_timestep:
        keys.append("timestep")
    grouped = rows.groupby([*keys, "channel"], observed=True, sort=True)
    out = grouped.agg(count=("count", "sum"), min=("min", "min"), max=("max", "max"))
    out = out.reset_index()
    empty = out["count"].to_numpy() == 0
    lo = np.where(empty, np.nan, out["min"].to_numpy(np.float64))
    hi = np.where(empty, np.nan, out["max"].to_numpy(np.float64))
    out["min"], out["max"] = lo, hi
    out["range"] = hi - lo
    with np.errstate(divide="ignore", invalid="ignore"):
        out["asymmetry"] = np.where(hi > lo, (hi + lo) / (hi - lo), np.nan)
    return out


def gini(values: Sequence[float] | np.ndarray) -> float:
    """Gini coefficient of non-negative values (definition in the module doc); NaN if all 0."""
    r = np.sort(np.asarray(values, dtype=np.float64))
    n, total = r.size, r.sum()
    if n == 0 or total <= 0:
        return float("nan")
    i = np.arange(1, n + 1)
    return float(2.0 * (i * r).sum() / (n * total) - (n + 1) / n)


def disparity(ranges: pd.DataFrame) -> pd.DataFrame:
    """Inter-channel disparity of the ranges of each layer.

    Args:
        ranges: the output of ``channel_ranges``.

    Returns:
        One row per (tensor, layer, role[, timestep]): channels (with data), zero_range
        (constant channels), max_range, median_range, max_median_ratio (inf when the median
        range is 0), gini_range, std_log_range (ddof 0, over channels with range > 0).
    """
    keys = _group_keys(ranges)
    data = ranges[ranges["range"].notna()][[*keys, "range"]].copy()
    data = data.sort_values([*keys, "range"])
    # Rank i (1-based) of each range within its layer, for the sorted Gini formula.
    data["rank"] = data.groupby(keys, observed=True).cumcount() + 1
    data["rank_range"] = data["rank"] * data["range"]
    data["zero"] = data["range"] == 0
    data["log_range"] = np.log(data["range"].where(~data["zero"]))
    grouped = data.groupby(keys, observed=True, sort=True)
    out = grouped.agg(
        channels=("range", "size"),
        zero_range=("zero", "sum"),
        max_range=("range", "max"),
        median_range=("range", "median"),
        range_sum=("range", "sum"),
        rank_range_sum=("rank_range", "sum"),
    )
    out["std_log_range"] = grouped["log_range"].std(ddof=0)
    out = out.reset_index()
    n, total = out["channels"].to_numpy(np.float64), out["range_sum"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        out["max_median_ratio"] = out["max_range"] / out["median_range"]
        gini_values = 2.0 * out["rank_range_sum"].to_numpy() / (n * total) - (n + 1) / n
    out["gini_range"] = np.where(total > 0, gini_values, np.nan)
    columns = [*keys, "channels", "zero_range", "max_range", "median_range"]
    return out[[*columns, "max_median_ratio", "gini_range", "std_log_range"]]


def coverage(
    ranges: pd.DataFrame,
    bits: int,
    quant_range: Mapping[str, tuple[float, float]] | None = None,
) -> pd.DataFrame:
    """Quantization-level coverage of each channel under a per-tensor b-bit quantizer.

    Args:
        ranges: the output of ``channel_ranges`` (per timestep or not).
        bits: b, an integer in 2..16.
        quant_range: layer -> (lo, hi) of the calibrated quantizer; layers not in it use
            the min-max over the channels of their rows in ``ranges`` (so per timestep
            when ``ranges`` is per timestep: a timestep-wise quantizer).

    Returns:
        The key columns, channel, bits, lo, hi, level_min = q(max(lo, min_c)),
        level_max = q(min(hi, max_c)) and coverage in [0, 1] (0 where the channel and
        [lo, hi] do not overlap, NaN for channels without data).

    Raises:
        UserError: ``bits`` is not an integer in 2..16.
    """
    bits = check_bits(bits)
    keys = _group_keys(ranges)
    out = ranges[[*keys, "channel", "min", "max"]].copy()
    grouped = out.groupby(keys, observed=True, sort=False)
    lo = grouped["min"].transform("min").to_numpy(np.float64, copy=True)
    hi = grouped["max"].transform("max").to_numpy(np.float64, copy=True)
    if quant_range:
        layers = out["layer"].astype(str).to_numpy()
        for layer, (q_lo, q_hi) in quant_range.items():
            if not q_lo <= q_hi:
                raise UserError(f"quantizer range of {layer} needs lo <= hi, got {q_lo}, {q_hi}")
            lo[layers == layer], hi[layers == layer] = q_lo, q_hi
    cmin, cmax = out["min"].to_numpy(np.float64), out["max"].to_numpy(np.float64)
    level_min = quant_levels(np.maximum(lo, cmin), lo, hi, bits).numpy()
    level_max = quant_levels(np.minimum(hi, cmax), lo, hi, bits).numpy()
    overlap = (cmax >= lo) & (cmin <= hi)
    share = np.where(overlap, (level_max - level_min + 1) / 2.0**bits, 0.0)
    out["bits"] = bits
    out["lo"], out["hi"] = lo, hi
    out["level_min"] = np.where(overlap, level_min, -1)
    out["level_max"] = np.where(overlap, level_max, -1)
    out["coverage"] = np.where(np.isnan(cmin) | np.isnan(cmax), np.nan, share)
    return out.drop(columns=["min", "max"])


def coverage_summary(cov: pd.DataFrame, threshold: float = 0.1) -> pd.DataFrame:
    """Coverage per layer: mean, median and share of channels under ``threshold``.

    Args:
        cov: the output of ``coverage``.
        threshold: the share of levels below which a channel counts as starved.

    Returns:
        One row per (tensor, layer, role[, timestep], bits): channels (with data),
        mean_coverage, median_coverage, threshold, share_below_threshold. Coverage at
        several bit-widths (concatenated ``coverage`` outputs) stays apart by ``bits``.
    """
    keys = [*_group_keys(cov), "bits"]
    data = cov[cov["coverage"].notna()].copy()
    data["below"] = data["coverage"] < threshold
    out = (
        data.groupby(keys, observed=True, sort=True)
        .agg(
            channels=("coverage", "size"),
            mean_coverage=("coverage", "mean"),
            median_coverage=("coverage", "median"),
            share_below_threshold=("below", "mean"),
        )
        .reset_index()
    )
    out.insert(len(keys) + 3, "threshold", threshold)
    return out


def coverage_columns(bits: int) -> list[str]:
    """Names of the coverage columns of ``layer_summary`` at one bit-width."""
    return [f"coverage_mean_a{bits}", f"coverage_median_a{bits}", f"coverage_below10_a{bits}"]


def layer_coverage(ranges: pd.DataFrame, bits: int) -> pd.DataFrame:
    """Coverage mean, median and share under 10 % per layer at one bit-width.

    Args:
        ranges: ``channel_ranges`` output (merged over timesteps: one row per channel).
        bits: activation bits, 2..16.

    Returns:
        Indexed by layer: the three columns named by ``coverage_columns(bits)``.
    """
    summary = coverage_summary(coverage(ranges, bits), threshold=STARVED)
    summary = summary.assign(layer=summary["layer"].astype(str)).set_index("layer")
    names = coverage_columns(bits)
    columns = ["mean_coverage", "median_coverage", "share_below_threshold"]
    return summary[columns].set_axis(names, axis=1)


def empirical_coverage(
    rows: torch.Tensor | np.ndarray, bits: int, lo: float, hi: float
) -> pd.DataFrame:
    """Share of the quantizer's levels each channel actually occupies on sampled rows.

    Args:
        rows: (N, C) input rows of one layer, e.g. ``StatsRun.reservoir[layer]["rows"]``
            (select timesteps with its ``timesteps`` field).
        bits: b, an integer in 2..16.
        lo, hi: the per-tensor quantizer's range (as used for ``coverage``).

    Returns:
        One row per channel: channel, rows (finite values), occupied_levels (distinct
        q(v) among them), empirical_coverage = occupied_levels / 2^b (NaN without rows).
    """
    bits = check_bits(bits)
    x = torch.as_tensor(rows).to(torch.float64)
    if x.ndim != 2:
        raise ValueError(f"rows must be (N, C), got shape {tuple(x.shape)}")
    finite = torch.isfinite(x)
    levels = quant_levels(torch.where(finite, x, lo), lo, hi, bits)
    # Non-finite values sort first as −1 and are not counted as a level.
    levels = torch.where(finite, levels, -1).sort(dim=0).values
    new_level = torch.ones_like(levels, dtype=torch.bool)
    new_level[1:] = levels[1:] != levels[:-1]
    occupied = (new_level & (levels >= 0)).sum(0).numpy()
    n = finite.sum(0).numpy()
    with np.errstate(invalid="ignore"):
        share = np.where(n > 0, occupied / 2.0**bits, np.nan)
    return pd.DataFrame(
        {
            "channel": np.arange(x.shape[1], dtype=np.int32),
            "rows": n,
            "occupied_levels": occupied,
            "empirical_coverage": share,
        }
    )


def temporal_drift(
    channels: pd.DataFrame,
    *,
    timesteps: Iterable[float] | None = None,
    branches: Iterable[str] | None = None,
) -> pd.DataFrame:
    """How the range of each layer moves across timesteps.

    The per-step range of a layer is R_t = max_c max_c,t − min_c min_c,t over its channels
    (and the chosen branches) at timestep t; drift = max_t R_t / min_t R_t.

    Args:
        channels: rows shaped like ``channels.parquet``.
        timesteps, branches: the rows to consider (all when None).

    Returns:
        One row per (tensor, layer, role): timesteps, min_step_range, max_step_range,
        timestep_of_min, timestep_of_max, drift (inf when a step range is 0 and another
        is not; NaN when all are 0).
    """
    rows = select(channels, timesteps, branches)
    rows = rows[rows["count"] > 0]
    keys = _key_columns(rows, ("tensor", "layer", "role"))
    steps = rows.groupby([*keys, "timestep"], observed=True, sort=True).agg(
        min=("min", "min"), max=("max", "max")
    )
    steps = steps.reset_index()
    steps["step_range"] = steps["max"] - steps["min"]
    grouped = steps.groupby(keys, observed=True, sort=True)
    at_min = steps.loc[grouped["step_range"].idxmin(), [*keys, "timestep"]]
    at_max = steps.loc[grouped["step_range"].idxmax(), [*keys, "timestep"]]
    out = grouped.agg(
        timesteps=("timestep", "size"),
        min_step_range=("step_range", "min"),
        max_step_range=("step_range", "max"),
    ).reset_index()
    out["timestep_of_min"] = at_min["timestep"].to_numpy()
    out["timestep_of_max"] = at_max["timestep"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        out["drift"] = out["max_step_range"] / out["min_step_range"]
    return out


def weight_summary(weights: pd.DataFrame) -> pd.DataFrame:
    """Weight statistics per layer from the per-output-channel rows of ``weights.parquet``.

    Returns:
        One row per (layer, role): out_channels, min, max, absmax_max, absmax_median,
        absmax_max_median_ratio and absmax_gini (disparity of output channels, the
        quantity a per-tensor weight quantizer suffers from), median_abs_skewness,
        median_kurtosis (excess), max_kurtosis. NaN statistics (constant channels) are
        left out of the medians.
    """
    keys = _key_columns(weights, ("layer", "role"))
    data = weights.copy()
    data["abs_skewness"] = data["skewness"].abs()
    grouped = data.groupby(keys, observed=True, sort=True)
    out = grouped.agg(
        out_channels=("absmax", "size"),
        min=("min", "min"),
        max=("max", "max"),
        absmax_max=("absmax", "max"),
        absmax_median=("absmax", "median"),
        absmax_gini=("absmax", gini),
        median_abs_skewness=("abs_skewness", "median"),
        median_kurtosis=("kurtosis", "median"),
        max_kurtosis=("kurtosis", "max"),
    ).reset_index()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = out["absmax_max"] / out["absmax_median"]
    out.insert(len(keys) + 5, "absmax_max_median_ratio", ratio)
    return out
