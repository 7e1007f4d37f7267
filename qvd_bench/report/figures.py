"""Report figures: tidy tables from stored statistics, and one figure per table.

Each ``*_data`` function turns store tables (``StatsRun.channels`` / ``temporal`` /
``weights``) into the tidy DataFrame one figure draws; each figure function takes that
DataFrame and returns a ``ReportFigure``: a matplotlib ``Figure`` paired with a
one-sentence caption. Figures are built on ``matplotlib.figure.Figure`` directly, never
through pyplot: they render with the Agg canvas whatever backend is active, need no
display, leave no open figures behind, and the caller's backend is left alone.

The figures:

- ``skew_by_role``: per-tensor skewness per role, temporal features across timesteps as
  their own group;
- ``temporal_distributions``: a temporal-feature layer's input values at a few timesteps;
- ``worst_channel_ranges``: sorted per-channel min/max of the layers with the highest
  inter-channel disparity;
- ``coverage_ecdf``: per-channel quantization-level coverage by role at each bit-width;
- ``tdscore_vs_bits``: TDScore and relative MSE of uniform, log2 and mixed level sets;
- ``range_heatmap``: per-step range of every layer's input at every timestep;
- ``weight_ranges``: per-layer weight absmax by role.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib import MatplotlibDeprecationWarning
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from scipy.stats import gaussian_kde

from qvd_bench.analysis.channels import (
    channel_ranges,
    coverage,
    disparity,
    weight_summary,
)
from qvd_bench.analysis.distribution import temporal_layer_skew, tensor_skew
from qvd_bench.analysis.temporal import tdscore
from qvd_bench.numerics.grid import (
    fake_quant_levels,
    mixed_levels,
    signed_log_levels,
    uniform_levels,
)

# Roles in the order figures list them (models/family.py's roles), then the group of
# temporal features measured across timesteps.
ROLE_ORDER = ("time_emb", "temporal", "spatial_conv", "self_attn", "cross_attn", "ffn", "io")
TEMPORAL_GROUP = "time_emb features\nacross timesteps"
# The minimum of SiLU, x·sigmoid(x), reached at x ≈ −1.278: the floor of post-SiLU features.
SILU_FLOOR = -0.2784645
TDSCORE_BITS = (2, 3, 4, 5, 6, 8)
QUANTIZERS = ("uniform", "log2", "mixed")


@dataclass(frozen=True)
class ReportFigure:
    """A figure and what it shows.

    Attributes:
        name: a file-name-safe identifier, e.g. ``"skew_by_role"``.
        figure: the matplotlib figure.
        caption: one plain sentence saying what the figure shows.
    """

    name: str
    figure: Figure
    caption: str


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """Seaborn's whitegrid look, scoped to one figure (no global rcParams change)."""
    with (
        warnings.catch_warnings(),
        sns.axes_style("whitegrid"),
        sns.plotting_context("notebook", font_scale=0.8),
    ):
        # seaborn 0.13 still passes boxplot's vert=, deprecated in matplotlib 3.11.
        warnings.filterwarnings("ignore", category=MatplotlibDeprecationWarning)
        yield


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _roles_present(roles: Sequence[str]) -> list[str]:
    """Known roles in ROLE_ORDER, then any others alphabetically, the temporal group last."""
    have = set(roles)
    known = [r for r in ROLE_ORDER if r in have]
    others = sorted(have - set(ROLE_ORDER) - {TEMPORAL_GROUP})
    return known + others + ([TEMPORAL_GROUP] if TEMPORAL_GROUP in have else [])


def role_palette(groups: Sequence[str]) -> dict[str, tuple]:
    """One fixed colour per role (and the temporal group), the same in every figure."""
    colours = sns.color_palette("tab10", len(ROLE_ORDER) + 1)
    palette = {role: colours[i] for i, role in enumerate(ROLE_ORDER)}
    palette[TEMPORAL_GROUP] = colours[len(ROLE_ORDER)]
    extra = [g for g in groups if g not in palette]
    for g, colour in zip(extra, sns.color_palette("Set2", max(len(extra), 1))):
        palette[g] = colour
    return palette


def _str_columns(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """``frame`` with the given (categorical) columns as plain strings."""
    return frame.assign(**{c: frame[c].astype(str) for c in columns if c in frame})


# ----------------------------------------------------------------------------- data


def skew_data(channels: pd.DataFrame, temporal: pd.DataFrame) -> pd.DataFrame:
    """Per-tensor skewness of every layer input, and of every temporal-feature layer.

    Args:
        channels: ``StatsRun.channels``.
        temporal: ``StatsRun.temporal`` (may be empty).

    Returns:
        group (the role, or ``TEMPORAL_GROUP``), level (``"tensor"``: one input tensor at
        one timestep, CFG branches merged; ``"temporal_layer"``: all values of a layer's
        temporal features across the timestep grid), layer, timestep (NaN for the
        temporal group), skewness. Rows with NaN skewness (constant data) are dropped.
    """
    inputs = channels[channels["tensor"] == "input"]
    per_tensor = _str_columns(tensor_skew(inputs, merge_branches=True), "layer", "role")
    parts = [
        pd.DataFrame(
            {
                "group": per_tensor["role"],
                "level": "tensor",
                "layer": per_tensor["layer"],
                "timestep": per_tensor["timestep"],
                "skewness": per_tensor["skewness"],
            }
        )
    ]
    if not temporal.empty:
        layer_level = _str_columns(temporal_layer_skew(temporal), "layer")
        parts.append(
            pd.DataFrame(
                {
                    "group": TEMPORAL_GROUP,
                    "level": "temporal_layer",
                    "layer": layer_level["layer"],
                    "timestep": np.nan,
                    "skewness": layer_level["skewness"],
                }
            )
        )
    out = pd.concat(parts, ignore_index=True)
    return out[np.isfinite(out["skewness"])].reset_index(drop=True)


def pick_temporal_layer(temporal: pd.DataFrame) -> str:
    """The temporal-feature layer with the most skewed values (ties: first by name)."""
    skew = _str_columns(temporal_layer_skew(temporal), "layer")
    skew = skew.assign(abs_skew=skew["skewness"].abs().fillna(-1.0))
    return str(skew.sort_values(["abs_skew", "layer"], ascending=[False, True])["layer"].iloc[0])


def temporal_values_data(
    temporal: pd.DataFrame, layer: str | None = None, n_timesteps: int = 6
) -> pd.DataFrame:
    """All input values of one temporal-feature layer at a few evenly spaced timesteps.

    Args:
        temporal: ``StatsRun.temporal`` (not empty).
        layer: the layer; the most skewed one (``pick_temporal_layer``) when None.
        n_timesteps: how many timesteps of the grid to show, first and last included.

    Returns:
        layer, timestep, value: one row per (timestep, dimension).
    """
    layer = layer or pick_temporal_layer(temporal)
    rows = temporal[temporal["layer"].astype(str) == layer].sort_values("timestep")
    picks = np.unique(np.linspace(0, len(rows) - 1, min(n_timesteps, len(rows))).round())
    rows = rows.iloc[picks.astype(int)]
    parts = [
        pd.DataFrame({"layer": layer, "timestep": t, "value": np.asarray(v, np.float64)})
        for t, v in zip(rows["timestep"], rows["vector"])
    ]
    return pd.concat(parts, ignore_index=True)


def worst_ranges_data(channels: pd.DataFrame, n_layers: int = 4) -> pd.DataFrame:
    """Per-channel min and max of the layers with the highest inter-channel disparity.

    Ranges are merged over all timesteps and branches (what one static per-tensor
    quantizer sees); disparity is max/median of the channel ranges.

    Args:
        channels: ``StatsRun.channels``.
        n_layers: how many layers to keep.

    Returns:
        layer, role, disparity, rank (0 = narrowest channel), channel, min, max, range:
        channels sorted by range within each layer, layers by descending disparity.
    """
    ranges = channel_ranges(channels[channels["tensor"] == "input"])
    ranges = _str_columns(ranges, "layer", "role")
    spread = _str_columns(disparity(ranges), "layer")
    spread = spread[np.isfinite(spread["max_median_ratio"])]
    top = spread.sort_values(["max_median_ratio", "layer"], ascending=[False, True])
    top = top.head(n_layers)[["layer", "max_median_ratio"]]
    top = top.rename(columns={"max_median_ratio": "disparity"})
    data = ranges[ranges["range"].notna()].merge(top, on="layer")
    data = data.sort_values(["disparity", "layer", "range"], ascending=[False, True, True])
    data["rank"] = data.groupby("layer", sort=False).cumcount()
    columns = ["layer", "role", "disparity", "rank", "channel", "min", "max", "range"]
    return data[columns].reset_index(drop=True)


def coverage_data(channels: pd.DataFrame, bits: Sequence[int] = (8, 4)) -> pd.DataFrame:
    """Per-channel level coverage of a per-tensor min-max quantizer, at each bit-width.

    Args:
        channels: ``StatsRun.channels``.
        bits: activation bit-widths (2..16).

    Returns:
        layer, role, channel, bits, coverage (channels without data dropped).
    """
    ranges = channel_ranges(channels[channels["tensor"] == "input"])
    parts = [coverage(ranges, b) for b in bits]
    out = _str_columns(pd.concat(parts, ignore_index=True), "layer", "role")
    out = out[out["coverage"].notna()]
    return out[["layer", "role", "channel", "bits", "coverage"]].reset_index(drop=True)


MIXED_EDGE_FRACTION = 0.125


def _mixed(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Half the codes log2 levels up to an edge at max|x|/8, the other half uniform above."""
    lo, hi = float(x.min()), float(x.max())
    edge = MIXED_EDGE_FRACTION * max(abs(lo), abs(hi))
    if not 0 < edge < hi:  # no positive tail to spread uniform levels over
        return fake_quant_levels(x, uniform_levels(lo, hi, bits))
    return fake_quant_levels(x, mixed_levels(lo, hi, bits, edge=edge, k=2 ** (bits - 1)))


def reference_quantizers() -> dict[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    """name -> quantize(x, bits) for ``tdscore_data``: level sets fitted to x's min and max.

    - ``uniform``: the 2^b levels of the asymmetric affine quantizer of [min x, max x];
    - ``log2``: signed powers of two below max x (positive) and |min x| (negative);
    - ``mixed``: 2^(b−1) log2 levels up to the edge max|x|/8, the other codes uniform up
      to max x (``numerics.grid.mixed_levels``).
    """
    return {
        "uniform": lambda x, b: fake_quant_levels(
            x, uniform_levels(float(x.min()), float(x.max()), b)
        ),
        "log2": lambda x, b: fake_quant_levels(
            x,
            signed_log_levels(
                max(float(x.max()), 0.0), b, base=2.0, negative_scale=max(-float(x.min()), 0.0)
            ),
        ),
        "mixed": _mixed,
    }


def tdscore_data(
    temporal: pd.DataFrame,
    *,
    bits: Sequence[int] = TDSCORE_BITS,
    weights: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    quantizers: Mapping[str, Callable[[torch.Tensor, int], torch.Tensor]] | None = None,
) -> pd.DataFrame:
    """TDScore and relative MSE of each quantizer at each bit-width on each temporal layer.

    Args:
        temporal: ``StatsRun.temporal`` (not empty).
        bits: bit-widths (2..16).
        weights: layer -> (O, D) weight of the consuming layer. The statistics store
            keeps no weight matrices, so layers without one use W = identity: TDScore
            then measures how well the timesteps stay apart in the feature space itself.
        quantizers: name -> quantize(x, bits); ``reference_quantizers()`` when None.

    Returns:
        layer, quantizer, bits, tdscore, relative_mse, collisions, weight
        (``"layer"`` or ``"identity"``).
    """
    quantizers = quantizers or reference_quantizers()
    weights = weights or {}
    rows = []
    for layer, group in temporal.groupby("layer", observed=True, sort=True):
        features = torch.from_numpy(
            np.stack(group.sort_values("timestep")["vector"].to_numpy()).astype(np.float64)
        )
        given = weights.get(str(layer))
        weight = torch.eye(features.shape[1], dtype=torch.float64) if given is None else given
        for name, quantize in quantizers.items():
            for b in bits:
                score = tdscore(features, weight, lambda x, q=quantize, b=b: q(x, b))
                rows.append(
                    {
                        "layer": str(layer),
                        "quantizer": name,
                        "bits": int(b),
                        "tdscore": score["tdscore"],
                        "relative_mse": score["relative_mse"],
                        "collisions": score["collisions"],
                        "weight": "identity" if given is None else "layer",
                    }
                )
    return pd.DataFrame(rows)


def range_heatmap_data(
    channels: pd.DataFrame, layer_order: Sequence[str] | None = None
) -> pd.DataFrame:
    """The range of each layer's input at each sampling timestep (both branches merged).

    Args:
        channels: ``StatsRun.channels``.
        layer_order: layer names in the order of the rows (module order); layers not in
            it follow alphabetically.

    Returns:
        A (layers × timesteps) table of max − min, indexed by layer, columns by timestep
        value in descending order (sampling order); NaN without data.
    """
    rows = channels[(channels["tensor"] == "input") & (channels["count"] > 0)]
    rows = _str_columns(rows, "layer")
    steps = rows.groupby(["layer", "timestep"], sort=True).agg(lo=("min", "min"), hi=("max", "max"))
    table = (steps["hi"] - steps["lo"]).unstack("timestep")
    table = table[sorted(table.columns, reverse=True)]
    order = [name for name in (layer_order or []) if name in table.index]
    order += sorted(set(table.index) - set(order))
    return table.loc[order]


def weight_data(weights: pd.DataFrame) -> pd.DataFrame:
    """Per-layer weight statistics (``weight_summary``) with plain-string layer and role."""
    return _str_columns(weight_summary(weights), "layer", "role")


# ----------------------------------------------------------------------------- figures


def skew_by_role(data: pd.DataFrame) -> ReportFigure:
    """Box and strip plot of per-tensor skewness per role.

    Args:
        data: ``skew_data`` output.
    """
    groups = _roles_present(data["group"].unique().tolist())
    palette = role_palette(groups)
    with _style():
        fig = _figure(8, 0.45 * len(groups) + 1.4)
        ax = fig.add_subplot()
        kw = {"data": data, "x": "skewness", "y": "group", "order": groups}
        sns.boxplot(
            **kw, hue="group", palette=palette, ax=ax, showfliers=False, legend=False,
            boxprops={"alpha": 0.35}, width=0.6,
        )  # fmt: skip
        sns.stripplot(**kw, color="0.15", size=2.5, alpha=0.6, jitter=0.25, ax=ax)
        ax.axvline(0, color="0.4", lw=0.8, ls="--")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("skewness g1 (symmetric log axis)")
        ax.set_ylabel("")
    tail = (
        "; the last group is each temporal-feature layer's values across the timestep grid"
        if TEMPORAL_GROUP in groups
        else ""
    )
    caption = (
        f"Skewness of each layer's input tensor at each sampling timestep, grouped by role{tail}."
    )
    return ReportFigure("skew_by_role", fig, caption)


def _to_symlog(v: np.ndarray, linthresh: float) -> np.ndarray:
    """sign(v)·log1p(|v|/linthresh): a smooth symmetric-log coordinate."""
    return np.sign(v) * np.log1p(np.abs(v) / linthresh)


def _from_symlog(u: np.ndarray, linthresh: float) -> np.ndarray:
    return np.sign(u) * linthresh * np.expm1(np.abs(u))


def temporal_distributions(data: pd.DataFrame) -> ReportFigure:
    """Ridge plot of one temporal-feature layer's input values at a few timesteps.

    Each ridge is a kernel density estimate in symmetric-log coordinates (the values span
    decades on the positive side), with the values themselves as ticks underneath.

    Args:
        data: ``temporal_values_data`` output.
    """
    layer = str(data["layer"].iloc[0])
    timesteps = sorted(data["timestep"].unique(), reverse=True)
    linthresh = 0.1
    values_u = _to_symlog(data["value"].to_numpy(np.float64), linthresh)
    pad = 0.05 * (values_u.max() - values_u.min() + 1e-9)
    grid_u = np.linspace(values_u.min() - pad, values_u.max() + pad, 400)
    grid = _from_symlog(grid_u, linthresh)
    colours = sns.color_palette("viridis", len(timesteps))
    with _style():
        fig = _figure(8, 0.6 * len(timesteps) + 1.6)
        ax = fig.add_subplot()
        for i, t in enumerate(timesteps):
            values = data.loc[data["timestep"] == t, "value"].to_numpy(np.float64)
            u = _to_symlog(values, linthresh)
            base = len(timesteps) - 1 - i
            if np.ptp(u) > 0:
                density = gaussian_kde(u, bw_method=0.15)(grid_u)
                height = 0.85 * density / density.max()
                ax.fill_between(grid, base, base + height, color=colours[i], alpha=0.75, lw=0)
                ax.plot(grid, base + height, color="0.2", lw=0.6)
            ax.plot(values, np.full_like(values, base), "|", color="0.2", ms=5, alpha=0.5)
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_yticks(range(len(timesteps)), [f"t = {t:g}" for t in reversed(timesteps)])
        if data["value"].min() < 0:
            ax.axvline(SILU_FLOOR, color="crimson", ls="--", lw=1)
            ax.text(SILU_FLOOR, len(timesteps) - 0.2, "SiLU floor −0.278 ", color="crimson",
                    ha="right", va="top", fontsize=8)  # fmt: skip
        ax.set_ylim(-0.3, len(timesteps) - 0.05)
        ax.set_xlabel(f"input value of {layer} (symmetric log axis)")
    caption = (
        f"Density of the input values of the temporal-feature layer {layer} at "
        f"{len(timesteps)} timesteps of the grid, with the SiLU floor at −0.278 dashed."
    )
    return ReportFigure("temporal_distributions", fig, caption)


def worst_channel_ranges(data: pd.DataFrame) -> ReportFigure:
    """Sorted per-channel ranges of the most disparate layers, one panel per layer.

    Args:
        data: ``worst_ranges_data`` output.
    """
    layers = list(dict.fromkeys(data["layer"]))
    cols = 2 if len(layers) > 1 else 1
    rows = -(-len(layers) // cols)
    palette = role_palette(data["role"].unique().tolist())
    with _style():
        fig = _figure(9, 2.6 * rows + 0.4)
        for i, layer in enumerate(layers):
            ax = fig.add_subplot(rows, cols, i + 1)
            part = data[data["layer"] == layer]
            role = str(part["role"].iloc[0])
            colour = palette[role]
            x = part["rank"].to_numpy()
            ax.fill_between(x, part["min"], part["max"], color=colour, alpha=0.3, lw=0)
            ax.plot(x, part["max"], color=colour, lw=1, label="max")
            ax.plot(x, part["min"], color=colour, lw=1, ls="--", label="min")
            ax.axhline(0, color="0.4", lw=0.6)
            ax.set_title(
                f"{_short(layer, 60)}\n{role}, max/median channel range "
                f"{part['disparity'].iloc[0]:.1f}",
                fontsize=8,
            )
            ax.set_xlabel("channel, sorted by range")
            ax.set_ylabel("input value")
            if i == 0:
                ax.legend(loc="upper left", fontsize=7)
    caption = (
        f"Per-channel minimum and maximum input value over the run for the {len(layers)} "
        "layers with the highest max/median channel-range ratio, channels sorted by range."
    )
    return ReportFigure("worst_channel_ranges", fig, caption)


def coverage_ecdf(data: pd.DataFrame) -> ReportFigure:
    """ECDF of per-channel level coverage by role, one panel per bit-width.

    Args:
        data: ``coverage_data`` output.
    """
    bits = sorted(data["bits"].unique(), reverse=True)
    roles = _roles_present(data["role"].unique().tolist())
    palette = role_palette(roles)
    with _style():
        fig = _figure(9, 3.4)
        axes = fig.subplots(1, len(bits), sharey=True, squeeze=False)[0]
        for ax, b in zip(axes, bits):
            sns.ecdfplot(
                data=data[data["bits"] == b], x="coverage", hue="role", hue_order=roles,
                palette=palette, ax=ax, legend=ax is axes[-1],
            )  # fmt: skip
            ax.axvline(0.1, color="0.4", lw=0.8, ls="--")
            ax.set_xlim(0, 1)
            ax.set_title(f"A{b}: per-tensor min-max, {2**b} levels")
            ax.set_xlabel("share of the tensor's levels the channel reaches")
        axes[0].set_ylabel("share of channels")
        legend = axes[-1].get_legend()
        if legend is not None:
            legend.set_title("role")
    caption = (
        "Cumulative distribution of the share of quantization levels each input channel "
        "can reach under a per-tensor min-max quantizer, by role, at "
        f"{' and '.join(str(b) for b in bits)} bits (dashed: 10 %)."
    )
    return ReportFigure("coverage_ecdf", fig, caption)


def tdscore_vs_bits(data: pd.DataFrame) -> ReportFigure:
    """TDScore and relative MSE against bit-width for each quantizer.

    Lines are medians over the temporal-feature layers, bands their full spread.

    Args:
        data: columns quantizer, bits, tdscore, relative_mse (more columns, e.g.
            layer, are ignored); as ``tdscore_data`` returns.
    """
    layers = data["layer"].nunique() if "layer" in data else 1
    with _style():
        fig = _figure(9, 3.4)
        left, right = fig.subplots(1, 2)
        for ax, value in ((left, "tdscore"), (right, "relative_mse")):
            sns.lineplot(
                data=data, x="bits", y=value, hue="quantizer", style="quantizer",
                markers=True, dashes=False, estimator="median", errorbar=("pi", 100),
                ax=ax, legend=ax is left,
            )  # fmt: skip
            ax.set_xticks(sorted(data["bits"].unique()))
            ax.set_xlabel("bits")
        left.set_ylabel("TDScore (1 = timesteps stay apart)")
        left.set_ylim(0, 1.02)
        right.set_ylabel("relative MSE")
        if (data["relative_mse"] > 0).any():
            right.set_yscale("log")
    weight = (
        " (W = identity: the store holds no weight matrices)"
        if "weight" in data and (data["weight"] == "identity").any()
        else ""
    )
    caption = (
        "TDScore and relative MSE of uniform, log2 and mixed level sets against bit-width "
        f"on the temporal features, median over {layers} layers with their full spread"
        f"{weight}."
    )
    return ReportFigure("tdscore_vs_bits", fig, caption)


# Rows the range heat map shows: beyond this many, the layers with the widest input range
# (at any timestep), in module order, so that every row keeps a readable label.
HEATMAP_ROWS = 40


def range_heatmap(
    data: pd.DataFrame, roles: Mapping[str, str] | None = None, top: int = HEATMAP_ROWS
) -> ReportFigure:
    """Heat map of each layer's input range at each timestep, on a log colour scale.

    Args:
        data: ``range_heatmap_data`` output (layers × timesteps).
        roles: layer -> role, to label rows; optional.
        top: at most this many rows: the layers with the widest range, in module order.
    """
    total = len(data)
    if total > top:
        widest = data.max(axis=1).nlargest(top).index
        data = data.loc[[name for name in data.index if name in set(widest)]]
    values = data.to_numpy(np.float64)
    positive = values[np.isfinite(values) & (values > 0)]
    norm = LogNorm(positive.min(), positive.max()) if positive.size else None
    masked = np.ma.masked_where(~np.isfinite(values) | (values <= 0), values)
    n = len(data)
    with _style():
        fig = _figure(9, max(3.0, 0.16 * n + 1.4))
        ax = fig.add_subplot()
        image = ax.imshow(masked, aspect="auto", cmap="magma", norm=norm, interpolation="none")
        ax.grid(False)
        # At most ~25 timestep labels, so that they do not overlap.
        every = max(1, -(-data.shape[1] // 25))
        ticks = range(0, data.shape[1], every)
        ax.set_xticks(ticks, [f"{data.columns[i]:g}" for i in ticks], rotation=90, fontsize=7)
        labels = [
            f"{_short(name)} [{roles.get(name, '?')}]" if roles else _short(name)
            for name in data.index
        ]
        ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_xlabel("timestep")
        fig.colorbar(image, ax=ax, label="input range max − min (log scale)", shrink=0.6)
    shown = (
        f"the {n} of {total} layers with the widest input range"
        if total > n
        else f"each of the {n} layers"
    )
    caption = (
        f"Range (max − min) of the input of {shown} at each sampling timestep, in module "
        "order, on a log colour scale."
    )
    return ReportFigure("range_heatmap", fig, caption)


def weight_ranges(data: pd.DataFrame) -> ReportFigure:
    """Box and strip plot of per-layer weight absmax by role.

    Args:
        data: ``weight_data`` output (layer, role, absmax_max, ...).
    """
    roles = _roles_present(data["role"].unique().tolist())
    palette = role_palette(roles)
    with _style():
        fig = _figure(8, 0.45 * len(roles) + 1.4)
        ax = fig.add_subplot()
        kw = {"data": data, "x": "absmax_max", "y": "role", "order": roles}
        sns.boxplot(
            **kw, hue="role", palette=palette, ax=ax, showfliers=False, legend=False,
            boxprops={"alpha": 0.35}, width=0.6, log_scale=True,
        )  # fmt: skip
        sns.stripplot(**kw, color="0.15", size=2.5, alpha=0.6, jitter=0.25, ax=ax)
        ax.set_xlabel("largest |weight| of the layer (log axis)")
        ax.set_ylabel("")
    caption = "Largest absolute weight of each layer, grouped by role."
    return ReportFigure("weight_ranges", fig, caption)


def _short(layer: str, keep: int = 48) -> str:
    """A layer name cut from the left to ``keep`` characters."""
    return layer if len(layer) <= keep else "…" + layer[-(keep - 1) :]


# ----------------------------------------------------------------------------- comparison
# Several runs in one figure: the same data functions, each frame with a "run" column.

RUN_PALETTE = "colorblind"


def _run_palette(runs: Sequence[str]) -> dict[str, tuple]:
    return dict(zip(runs, sns.color_palette(RUN_PALETTE, max(len(runs), 1))))


def skew_by_role_compare(data: pd.DataFrame) -> ReportFigure:
    """Per-tensor skewness per role, one box per run side by side in each role.

    Args:
        data: ``skew_data`` outputs concatenated, with a ``run`` column.
    """
    groups = _roles_present(data["group"].unique().tolist())
    runs = list(dict.fromkeys(data["run"]))
    with _style():
        fig = _figure(9, 0.3 * len(groups) * max(len(runs), 2) + 1.4)
        ax = fig.add_subplot()
        sns.boxplot(
            data=data, x="skewness", y="group", order=groups, hue="run", hue_order=runs,
            palette=_run_palette(runs), showfliers=False, width=0.75, ax=ax,
        )  # fmt: skip
        ax.axvline(0, color="0.4", lw=0.8, ls="--")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("skewness g1 (symmetric log axis)")
        ax.set_ylabel("")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), title="run", frameon=False)
    caption = (
        f"Skewness of each layer's input tensor at each sampling timestep, by role, for each "
        f"of the {len(runs)} runs (one colour per run; boxes: quartiles, whiskers 1.5 IQR)."
    )
    return ReportFigure("compare_skew_by_role", fig, caption)


def coverage_ecdf_compare(data: pd.DataFrame) -> ReportFigure:
    """ECDF of per-channel level coverage over all layers, one line per run and bit-width.

    Args:
        data: ``coverage_data`` outputs concatenated, with a ``run`` column.
    """
    bits = sorted(data["bits"].unique(), reverse=True)
    runs = list(dict.fromkeys(data["run"]))
    palette = _run_palette(runs)
    dashes = ["-", "--", ":", "-."]
    with _style():
        fig = _figure(10, 3.4)
        axes = fig.subplots(1, len(bits), sharey=True, squeeze=False)[0]
        for ax, b in zip(axes, bits):
            for i, run in enumerate(runs):
                values = np.sort(data.loc[(data["bits"] == b) & (data["run"] == run), "coverage"])
                if len(values):
                    share = np.arange(1, len(values) + 1) / len(values)
                    ax.step(values, share, where="post", color=palette[run],
                            ls=dashes[i % len(dashes)], label=run)  # fmt: skip
            ax.axvline(0.1, color="0.4", lw=0.8, ls="--")
            ax.set_xlim(0, 1)
            ax.set_title(f"A{b}: per-tensor min-max, {2**b} levels")
            ax.set_xlabel("share of the tensor's levels the channel reaches")
        axes[0].set_ylabel("share of channels")
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside right upper", title="run", frameon=False)
    caption = (
        "Cumulative distribution of the share of quantization levels each input channel "
        f"reaches under a per-tensor min-max quantizer, all layers, one line per run, at "
        f"{' and '.join(str(b) for b in bits)} bits (dashed vertical: 10 %)."
    )
    return ReportFigure("compare_coverage_ecdf", fig, caption)


def weight_ranges_compare(data: pd.DataFrame) -> ReportFigure:
    """Per-layer weight absmax by role, one box per run side by side in each role.

    Args:
        data: ``weight_data`` outputs concatenated, with a ``run`` column.
    """
    roles = _roles_present(data["role"].unique().tolist())
    runs = list(dict.fromkeys(data["run"]))
    with _style():
        fig = _figure(9, 0.3 * len(roles) * max(len(runs), 2) + 1.4)
        ax = fig.add_subplot()
        sns.boxplot(
            data=data, x="absmax_max", y="role", order=roles, hue="run", hue_order=runs,
            palette=_run_palette(runs), showfliers=False, width=0.75, log_scale=True, ax=ax,
        )  # fmt: skip
        ax.set_xlabel("largest |weight| of the layer (log axis)")
        ax.set_ylabel("")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), title="run", frameon=False)
    caption = (
        f"Largest absolute weight of each layer by role, one colour per run ({len(runs)} runs)."
    )
    return ReportFigure("compare_weight_ranges", fig, caption)
