"""Skewness and kurtosis of layer inputs at explicit levels, from stored statistics.

Every result table has a ``level`` column naming what one row describes, so values of
different levels are never mixed:

- ``"channel"``: one channel over the tokens of one call's timestep (and branch), from the
  per-channel sufficient statistics of ``channels.parquet``;
- ``"tensor"``: all values of a tensor at one timestep (and branch, or both branches when
  merged): the C channel moment sets merged exactly (Pébay), or the histogram for
  quartile skew;
- ``"temporal_channel"``: one dimension of a temporal feature across the T timesteps of the
  temporal grid (a temporal feature is constant over the tokens of a call, so this is the
  only meaningful per-channel level for it);
- ``"temporal_layer"``: all T·D values of a temporal-feature layer.

Moment skewness is g1 = sqrt(n)·M3/M2^1.5 and kurtosis is the excess kurtosis
g2 = n·M4/M2² − 3 (``scipy.stats.skew`` / ``kurtosis`` with ``bias=True``); both are NaN
for constant data (M2 = 0). Quartile (Bowley) skew is (Q3 + Q1 − 2·Q2)/(Q3 − Q1), NaN when
Q3 = Q1. Summaries (``skew_by_role``) count NaN values apart and leave them out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from qvd_bench.numerics.edges import Edges, edges_from_dict
from qvd_bench.numerics.moments import (
    MOMENT_KEYS,
    batch_moments,
    moments_summary,
    reduce_moments,
)

SUMMARY_FIELDS = ("mean", "variance", "skewness", "kurtosis")
# Key columns of a per-tensor row, in the store's order.
TENSOR_KEYS = ("tensor", "layer", "role", "timestep", "branch")
_COUNT_FIELDS = ("count", "nan_count", "inf_count")


def _key_columns(frame: pd.DataFrame, candidates: Sequence[str]) -> list[str]:
    return [c for c in candidates if c in frame.columns]


def _moment_tensors(frame: pd.DataFrame) -> dict[str, torch.Tensor]:
    """The sufficient-statistics columns of ``frame`` as (N,) tensors (int64 counts, float64)."""
    return {
        # A copy: pandas may hand out read-only views, which torch does not support.
        k: torch.from_numpy(
            frame[k].to_numpy(np.int64 if k in _COUNT_FIELDS else np.float64, copy=True)
        )
        for k in MOMENT_KEYS
    }


def _summary_columns(stats: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """count, nan/inf counts, min, max (NaN without data) and ``SUMMARY_FIELDS`` as arrays."""
    summary = moments_summary(stats)
    count = stats["count"].numpy()
    empty = count == 0
    return {
        "count": count,
        "nan_count": stats["nan_count"].numpy(),
        "inf_count": stats["inf_count"].numpy(),
        # Empty sets keep the ±inf identities in the state; report NaN instead.
        "min": np.where(empty, np.nan, stats["min"].numpy()),
        "max": np.where(empty, np.nan, stats["max"].numpy()),
        **{k: summary[k].numpy() for k in SUMMARY_FIELDS},
    }


def _summary_frame(keys: pd.DataFrame, moments: pd.DataFrame, level: str) -> pd.DataFrame:
    """``keys`` (the result's key columns, filled in place) with ``level`` as its first
    column and the ``_summary_columns`` of ``moments``' rows, row for row, after its own."""
    for k, v in _summary_columns(_moment_tensors(moments)).items():
        keys[k] = v
    keys.insert(0, "level", level)
    return keys


def merge_moments(frame: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Merges the sufficient statistics of all rows that share the ``by`` columns, exactly.

    Rows are grouped by ``by``; groups of equal size are stacked into a (G, n) block and
    merged with ``reduce_moments`` (pairwise Pébay merges), so groups of different sizes
    (layers of different widths) need no padding.

    Args:
        frame: rows with the ``MOMENT_KEYS`` columns (as ``channels.parquet``).
        by: the key columns of a result row, e.g. (tensor, layer, role, timestep, branch).

    Returns:
        One row per group: the ``by`` columns, then the merged ``MOMENT_KEYS`` columns.
    """
    by = list(by)
    columns = [*by, *MOMENT_KEYS]
    if frame.empty:
        return pd.DataFrame({c: frame.get(c, []) for c in columns})
    codes = frame.groupby(by, observed=True, sort=True, dropna=False).ngroup().to_numpy()
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    values = {k: v.numpy()[order] for k, v in _moment_tensors(frame).items()}
    merged = {k: np.empty(len(sizes), dtype=v.dtype) for k, v in values.items()}
    for size in np.unique(sizes):
        groups = np.flatnonzero(sizes == size)
        index = starts[groups][:, None] + np.arange(size)
        block = reduce_moments({k: torch.from_numpy(v[index]) for k, v in values.items()}, 1)
        for k in merged:
            merged[k][groups] = block[k].numpy()
    out = frame.iloc[order[starts]][by].reset_index(drop=True)
    for k in MOMENT_KEYS:
        out[k] = merged[k]
    return out


def channel_skew(channels: pd.DataFrame) -> pd.DataFrame:
    """Skewness and excess kurtosis of every channel over the tokens of one timestep.

    Args:
        channels: rows shaped like ``channels.parquet`` (one per tensor, layer, role,
            timestep, branch, channel).

    Returns:
        Level ``"channel"``: the key columns, count, nan_count, inf_count, min, max, mean,
        variance, skewness, kurtosis.
    """
    keys = _key_columns(channels, ("tensor", "layer", "role", "timestep", "branch", "channel"))
    out = channels[keys].reset_index(drop=True)
    return _summary_frame(out, channels, "channel")


def tensor_skew(channels: pd.DataFrame, *, merge_branches: bool = False) -> pd.DataFrame:
    """Skewness and excess kurtosis of whole tensors per timestep, merged from channel moments.

    Args:
        channels: rows shaped like ``channels.parquet``.
        merge_branches: merge the CFG branches of a timestep too (``branch`` is then
            ``"all"``); otherwise one row per branch.

    Returns:
        Level ``"tensor"``: tensor, layer, role, timestep, branch, then the statistics of
        ``channel_skew`` over all values of the tensor.
    """
    by = _key_columns(channels, TENSOR_KEYS)
    if merge_branches:
        by = [c for c in by if c != "branch"]
    merged = merge_moments(channels, by)
    out = merged[by].copy()
    if merge_branches:
        out["branch"] = "all"
        out = out[_key_columns(out, TENSOR_KEYS)]
    return _summary_frame(out, merged, "tensor")


def temporal_moments(
    temporal: pd.DataFrame, roles: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Per-dimension sufficient statistics of temporal features across timesteps.

    Args:
        temporal: rows shaped like ``temporal.parquet`` (layer, timestep, vector (D,)).
        roles: layer -> role; layers not in it (all, without it) are ``"time_emb"``.

    Returns:
        One row per (layer, dimension): tensor (``"input"``), layer, role, channel, and the
        ``MOMENT_KEYS`` over the T timesteps of the layer.
    """
    parts = []
    for layer, rows in temporal.groupby("layer", observed=True, sort=True):
        matrix = np.stack(rows.sort_values("timestep")["vector"].to_numpy())  # (T, D)
        stats = batch_moments(torch.from_numpy(matrix.astype(np.float64)), channel_dim=-1)
        d = matrix.shape[1]
        part = pd.DataFrame(
            {
                "tensor": "input",
                "layer": [layer] * d,
                "role": (roles or {}).get(layer, "time_emb"),
                "channel": np.arange(d, dtype=np.int32),
            }
        )
        for k in MOMENT_KEYS:
            part[k] = stats[k].numpy()
        parts.append(part)
    if not parts:
        return pd.DataFrame({c: [] for c in ("tensor", "layer", "role", "channel", *MOMENT_KEYS)})
    return pd.concat(parts, ignore_index=True)


def temporal_channel_skew(
    temporal: pd.DataFrame, roles: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Skewness and excess kurtosis of each temporal-feature dimension across timesteps.

    Args:
        temporal: rows shaped like ``temporal.parquet``.
        roles: layer -> role; without it every layer is ``"time_emb"``.

    Returns:
        Level ``"temporal_channel"``: tensor, layer, role, channel, then the statistics of
        ``channel_skew`` over the T timestep values of that dimension.
    """
    stats = temporal_moments(temporal, roles)
    out = stats[["tensor", "layer", "role", "channel"]].copy()
    return _summary_frame(out, stats, "temporal_channel")


def temporal_layer_skew(
    temporal: pd.DataFrame, roles: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Skewness and excess kurtosis of all T·D values of each temporal-feature layer.

    Returns:
        Level ``"temporal_layer"``: tensor, layer, role, then the statistics of
        ``channel_skew``.
    """
    merged = merge_moments(temporal_moments(temporal, roles), ["tensor", "layer", "role"])
    out = merged[["tensor", "layer", "role"]].copy()
    return _summary_frame(out, merged, "temporal_layer")


def grouped_quantiles(
    histograms: pd.DataFrame,
    edges: Edges | Mapping[str, Any],
    q: Sequence[float],
    by: Sequence[str],
) -> pd.DataFrame:
    """Quantiles of the histograms of every group, interpolated within buckets.

    Same estimate as ``Histogram.quantile`` (order-statistic position r = q·(N − 1), the
    values of a bin spread evenly across it, open end bins at their finite boundary),
    computed for all groups at once from the stored non-zero bins. Rows that share ``by``
    and ``bin`` are added first (an exact histogram merge).

    Args:
        histograms: rows shaped like ``histograms.parquet`` (..., bin, count).
        edges: the grid, as ``manifest["histogram"]["edges"]`` or an edges object.
        q: probabilities in [0, 1].
        by: key columns of a result row.

    Returns:
        One row per group: the ``by`` columns, ``count`` (values counted) and one float64
        column per probability, named ``q<p>`` (e.g. ``q0.25``).
    """
    by = list(by)
    if isinstance(edges, Mapping):
        edges = edges_from_dict(edges)
    probs = np.asarray(q, dtype=np.float64)
    if np.any((probs < 0) | (probs > 1)):
        raise ValueError("quantile probabilities must lie in [0, 1]")
    table = edges.edges().numpy()
    bins = histograms.groupby([*by, "bin"], observed=True, sort=True)["count"].sum().reset_index()
    bins = bins[bins["count"] > 0].reset_index(drop=True)
    names = [f"q{p:g}" for p in probs]
    if bins.empty:
        return pd.DataFrame({c: [] for c in [*by, "count", *names]})
    codes = bins.groupby(by, observed=True, sort=False).ngroup().to_numpy()
    first = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])  # rows are sorted by group
    last = np.r_[first[1:], len(bins)] - 1
    counts = bins["count"].to_numpy(np.float64)
    cum = np.cumsum(counts)  # strictly increasing: only non-zero bins are kept
    total = cum[last] - (cum[first] - counts[first])
    offset = cum[first] - counts[first]
    # Position r within a group is position offset + r in the concatenated cumulative counts.
    r = probs[None, :] * (total[:, None] - 1.0)
    i = np.searchsorted(cum, offset[:, None] + r, side="right")
    i = np.minimum(i, last[:, None])
    b = bins["bin"].to_numpy(np.int64)[i]
    lo, hi = table[b], table[b + 1]
    before = cum[i] - counts[i] - offset[:, None]
    frac = np.clip((r - before + 0.5) / counts[i], 0.0, 1.0)
    with np.errstate(invalid="ignore"):
        inside = lo + frac * (hi - lo)
    value = np.where(np.isinf(lo), hi, np.where(np.isinf(hi), lo, inside))
    out = bins.iloc[first][by].reset_index(drop=True)
    out["count"] = total.astype(np.int64)
    for j, name in enumerate(names):
        out[name] = value[:, j]
    return out


def quartile_skew(
    histograms: pd.DataFrame,
    edges: Edges | Mapping[str, Any],
    *,
    merge_branches: bool = False,
) -> pd.DataFrame:
    """Quartile (Bowley) skew (Q3 + Q1 − 2·Q2)/(Q3 − Q1) of every tensor per timestep.

    Quartiles are interpolated within histogram buckets (``grouped_quantiles``); on a
    ``SignedLogEdges`` grid each is within the grid's relative error of the exact one.

    Args:
        histograms: rows shaped like ``histograms.parquet``.
        edges: ``manifest["histogram"]["edges"]`` or an edges object.
        merge_branches: add the histograms of both CFG branches (``branch`` = ``"all"``).

    Returns:
        Level ``"tensor"``: tensor (``"input"``: histograms are of inputs), layer, role,
        timestep, branch, count, q1, q2, q3, bowley_skew (NaN where Q3 = Q1).
    """
    by = _key_columns(histograms, TENSOR_KEYS)
    if merge_branches:
        by = [c for c in by if c != "branch"]
    quart = grouped_quantiles(histograms, edges, (0.25, 0.5, 0.75), by)
    q1, q2, q3 = (quart.pop(f"q{p:g}").to_numpy() for p in (0.25, 0.5, 0.75))
    if merge_branches:
        quart["branch"] = "all"
    out = quart[[*_key_columns(quart, TENSOR_KEYS), "count"]].copy()
    out["q1"], out["q2"], out["q3"] = q1, q2, q3
    spread = q3 - q1
    with np.errstate(divide="ignore", invalid="ignore"):
        out["bowley_skew"] = np.where(spread > 0, (q3 + q1 - 2.0 * q2) / spread, np.nan)
    out.insert(0, "tensor", "input")
    out.insert(0, "level", "tensor")
    return out


def skew_by_role(
    frames: pd.DataFrame | Sequence[pd.DataFrame], value: str = "skewness"
) -> pd.DataFrame:
    """Summary of one statistic per (level, tensor, role): how skewed each role is.

    Args:
        frames: one or more result tables of this module (they carry ``level``).
        value: the column to summarise, e.g. ``skewness``, ``kurtosis``, ``bowley_skew``.

    Returns:
        One row per (level, tensor, role): statistic (the name of ``value``), n (finite
        values summarised), n_nan (NaN values, left out: constant data), median_abs,
        mean_abs, q90_abs (of |value|) and median (signed).
    """
    if isinstance(frames, pd.DataFrame):
        frames = [frames]
    keys = ["level", "tensor", "role"]
    data = pd.concat(
        [f[[*keys, value]].astype({k: str for k in keys}) for f in frames], ignore_index=True
    )
    data["abs"] = data[value].abs()
    grouped = data.groupby(keys, sort=True)
    out = pd.DataFrame(
        {
            "n": grouped[value].count(),
            "n_nan": grouped[value].size() - grouped[value].count(),
            "median_abs": grouped["abs"].median(),
            "mean_abs": grouped["abs"].mean(),
            "q90_abs": grouped["abs"].quantile(0.9),
            "median": grouped[value].median(),
        }
    ).reset_index()
    out.insert(3, "statistic", value)
    return out
