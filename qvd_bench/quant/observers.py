"""Range estimators for quantizers, fed from stored statistics.

Activation ranges come from a ``StatsRun`` — channel extrema, histograms, reservoir rows —
never from a second pass over raw activations:

- ``minmax_range`` / ``minmax_channel_range``: exact, from the per-channel min/max of the
  layer's inputs, merged over the chosen timesteps and CFG branches (all by default);
- ``percentile_range``: the (1 − q)- and q-quantiles of the merged histograms, with the
  accumulators' convention (``Histogram.quantile``: order-statistic position q·(N − 1),
  counts spread evenly within a bucket), so within the grid's relative error of the exact
  quantiles;
- ``mse_range``: the clipping of the min-max range that minimises the Lp error (p = 2.4)
  of per-tensor fake quantization on sampled rows — Q-Diffusion / QDrop-style range
  setting without reconstruction.

The clipping search (``shrink_search``) tries the ranges [α·lo, α·hi] for the shrink
factors α of ``grid`` (default 100 factors 1, 0.99, ..., 0.01), quantizes the data with
the qparams of each (``affine_qparams``) and keeps the α of least mean |x − x̂|^p; ties
keep the earlier factor in the grid (the least clipping for the default). Weights use the
same search per output channel (``weight_qparams``).

Every function returns float64 tensors (ranges) or the qparams dtypes of
``affine_qparams``; layers, timesteps or branches missing from the run raise UserError.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from qvd_bench.analysis.distribution import grouped_quantiles
from qvd_bench.errors import UserError
from qvd_bench.numerics.grid import affine_qparams, check_bits, quant_range
from qvd_bench.quant.primitives import fake_quant, lp_error
from qvd_bench.store import StatsRun

F64 = torch.float64
# Largest candidates × elements block of the clipping search: bounds its work memory, and
# keeps a block's float64 work tensors (1 MiB each) in a core's L2 cache: larger blocks
# make the search memory-bound.
SEARCH_ELEMENTS = 1 << 17
# Smallest candidates × elements search that is screened in float32 first (``screened_errors``).
SCREEN_ELEMENTS = 1 << 13
DEFAULT_GRID = 100


# --------------------------------------------------------------------------- selection


def _layer_rows(
    frame: pd.DataFrame,
    run: StatsRun,
    layer: str,
    timesteps: Iterable[float] | None,
    branches: Iterable[str] | None,
    what: str,
) -> pd.DataFrame:
    """Rows of one layer at the chosen timesteps and branches; UserError naming what is missing."""
    rows = frame[frame["layer"] == layer]
    if rows.empty:
        known = sorted(frame["layer"].astype(str).unique().tolist())
        hint = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
        raise UserError(f"layer {layer!r} has no {what} in {run.path} (layers: {hint})")
    for column, wanted in (("timestep", timesteps), ("branch", branches)):
        if wanted is None:
            continue
        wanted = [float(w) for w in wanted] if column == "timestep" else [str(w) for w in wanted]
        have = set(rows[column].astype(float if column == "timestep" else str).tolist())
        missing = [w for w in wanted if w not in have]
        if missing:
            shown = ", ".join(f"{h:g}" if column == "timestep" else h for h in sorted(have))
            raise UserError(
                f"{column} {', '.join(map(str, missing))} not in the statistics of layer "
                f"{layer!r} in {run.path} (have {shown})"
            )
        rows = rows[rows[column].isin(wanted)]
    return rows


def _input_channels(
    run: StatsRun,
    layer: str,
    timesteps: Iterable[float] | None,
    branches: Iterable[str] | None,
) -> pd.DataFrame:
    channels = run.channels
    if "tensor" in channels.columns:
        channels = channels[channels["tensor"] == "input"]
    rows = _layer_rows(channels, run, layer, timesteps, branches, "input statistics")
    rows = rows[rows["count"] > 0]
    if rows.empty:
        raise UserError(f"layer {layer!r} has no finite input values in {run.path}")
    return rows


# --------------------------------------------------------------------------- from statistics


def minmax_channel_range(
    run: StatsRun,
    layer: str,
    timesteps: Iterable[float] | None = None,
    branches: Iterable[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact per-channel min and max of a layer's inputs, merged over timesteps and branches.

    Args:
        run: the statistics.
        layer: the layer name.
        timesteps: timestep values to merge (all when None).
        branches: CFG branches to merge (all when None).

    Returns:
        (lo (C,), hi (C,)) float64; NaN for channels without data.
    """
    rows = _input_channels(run, layer, timesteps, branches)
    merged = rows.groupby("channel", observed=True, sort=True).agg(
        lo=("min", "min"), hi=("max", "max")
    )
    channels = int(rows["channel"].max()) + 1
    lo = np.full(channels, np.nan)
    hi = np.full(channels, np.nan)
    index = merged.index.to_numpy()
    lo[index], hi[index] = merged["lo"].to_numpy(), merged["hi"].to_numpy()
    return torch.from_numpy(lo), torch.from_numpy(hi)


def minmax_range(
    run: StatsRun,
    layer: str,
    timesteps: Iterable[float] | None = None,
    branches: Iterable[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact min and max of a layer's inputs over the chosen timesteps and branches.

    Returns:
        (lo, hi): 0-d float64 tensors.
    """
    rows = _input_channels(run, layer, timesteps, branches)
    lo = rows["min"].to_numpy(np.float64).min()
    hi = rows["max"].to_numpy(np.float64).max()
    return torch.tensor(lo, dtype=F64), torch.tensor(hi, dtype=F64)


def percentile_range(
    run: StatsRun,
    layer: str,
    q: float = 0.999,
    timesteps: Iterable[float] | None = None,
    branches: Iterable[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """The (1 − q)- and q-quantiles of a layer's inputs, from the merged histograms.

    The histograms of the chosen timesteps and branches are added (an exact merge), then
    both quantiles are interpolated within buckets as ``Histogram.quantile`` does.

    Args:
        run: the statistics (with histograms).
        layer: the layer name.
        q: the upper probability, in [0.5, 1].
        timesteps, branches: what to merge (all when None).

    Returns:
        (lo, hi): 0-d float64 tensors, lo ≤ hi.
    """
    q = float(q)
    if not 0.5 <= q <= 1.0:
        raise UserError(f"percentile must be in [0.5, 1], got {q}")
    edges = run.manifest.get("histogram", {}).get("edges")
    if edges is None:
        raise UserError(f"{run.path} has no histograms; collect with histograms enabled")
    rows = _layer_rows(run.histograms, run, layer, timesteps, branches, "histograms")
    rows = rows.assign(layer=rows["layer"].astype(str))
    quant = grouped_quantiles(rows, edges, (1.0 - q, q), ["layer"])
    if quant.empty:
        raise UserError(f"layer {layer!r} has empty histograms in {run.path}")
    lo, hi = quant.iloc[0][f"q{1.0 - q:g}"], quant.iloc[0][f"q{q:g}"]
    return torch.tensor(float(lo), dtype=F64), torch.tensor(float(hi), dtype=F64)


def reservoir_rows(
    run: StatsRun,
    layer: str,
    timesteps: Iterable[float] | None = None,
    branches: Iterable[str] | None = None,
) -> Tensor:
    """The sampled input rows of a layer, optionally only those of some timesteps / branches.

    Returns:
        (N, C) float32 rows.
    """
    reservoir = run.reservoir
    if layer not in reservoir:
        raise UserError(
            f"layer {layer!r} has no reservoir rows in {run.path}; collect with "
            "reservoir_capacity > 0 and the layer hooked"
        )
    data = reservoir[layer]
    keep = torch.ones(data["rows"].shape[0], dtype=torch.bool)
    if timesteps is not None:
        wanted = torch.tensor([float(t) for t in timesteps], dtype=F64)
        have = set(data["timesteps"].tolist())
        missing = [t for t in wanted.tolist() if t not in have]
        if missing:
            raise UserError(
                f"timestep {missing[0]:g} has no reservoir rows of layer {layer!r} in {run.path}"
            )
        keep &= torch.isin(data["timesteps"], wanted)
    if branches is not None:
        from qvd_bench.models.sampling import ALL_BRANCHES  # the reservoir's branch codes

        names = list(ALL_BRANCHES)
        try:
            codes = torch.tensor([names.index(str(b)) for b in branches])
        except ValueError:
            raise UserError(f"unknown CFG branch in {list(branches)}; have {names}") from None
        keep &= torch.isin(data["branches"], codes)
    return data["rows"][keep]


# --------------------------------------------------------------------------- clipping search


def _check_p(p: float) -> float:
    p = float(p)
    if not (p > 0 and math.isfinite(p)):
        raise UserError(f"Lp exponent must be a finite number > 0, got {p}")
    return p


def shrink_factors(grid: int | Sequence[float] = DEFAULT_GRID) -> Tensor:
    """The candidate shrink factors α of the clipping search.

    Args:
        grid: a count n (factors 1 − i/n, i = 0..n − 1) or the factors themselves, in (0, 1].

    Returns:
        (G,) float64, in search order.
    """
    if isinstance(grid, int) and not isinstance(grid, bool):
        if grid < 1:
            raise UserError(f"the clipping grid needs at least 1 candidate, got {grid}")
        return 1.0 - torch.arange(grid, dtype=F64) / grid
    factors = torch.as_tensor(list(grid), dtype=F64)
    if factors.ndim != 1 or factors.numel() == 0 or bool(((factors <= 0) | (factors > 1)).any()):
        raise UserError("clipping shrink factors must be a non-empty list of values in (0, 1]")
    return factors


def shrink_search(
    x: Tensor,
    lo: Tensor,
    hi: Tensor,
    bits: int,
    p: float = 2.4,
    grid: int | Sequence[float] = DEFAULT_GRID,
    symmetric: bool = False,
) -> Tensor:
    """Per row, the shrink factor α of [lo, hi] that minimises the Lp error of fake quant.

    Each of the R rows of ``x`` is searched on its own (R = 1 for a per-tensor search, R =
    output channels for weights). Candidates are evaluated in blocks of at most
    ``SEARCH_ELEMENTS`` elements: memory stays bounded for large tensors. Larger searches
    are screened in float32 first (``screened_errors``, ``could_be_least``), and only the
    candidates that can still win are evaluated in float64 (none in a row where one alone
    can): the result is the exhaustive float64 search's.

    Args:
        x: (R, L) values (finite).
        lo, hi: (R,) the full ranges to shrink.
        bits: b, an integer in 2..16.
        p: the Lp exponent.
        grid: see ``shrink_factors``.
        symmetric: search symmetric qparams (weights) instead of asymmetric ones.

    Returns:
        (R,) float64 best factors (ties: the earliest in the grid).
    """
    q_min, q_max = quant_range(bits, symmetric)
    p = _check_p(p)
    factors = shrink_factors(grid).to(x.device)
    rows, length = x.shape
    lo, hi = lo.to(device=x.device, dtype=F64), hi.to(device=x.device, dtype=F64)
    xc = x.to(torch.float32 if x.dtype != F64 else F64)

    def qparams(alpha: Tensor, row: Tensor | slice = slice(None)) -> tuple[Tensor, Tensor]:
        return affine_qparams(alpha * lo[row], alpha * hi[row], bits, symmetric)

    keep = torch.ones(factors.numel(), rows, dtype=torch.bool, device=x.device)
    if keep.numel() * length > SCREEN_ELEMENTS:
        keep = could_be_least(screened_errors(xc, factors, qparams, q_min, q_max, p), p)
    # A row's only candidate left is its best: 0 stands for its error. Rows with more
    # are decided on float64 errors, which overwrite those zeros.
    errors = torch.zeros(keep.shape, dtype=F64, device=x.device).masked_fill_(~keep, math.inf)
    contested = keep & (keep.sum(0) > 1)
    candidate, row = contested.nonzero(as_tuple=True)  # (P,) pairs, in grid order per row
    block = max(1, SEARCH_ELEMENTS // max(1, length))
    for start in range(0, candidate.numel(), block):
        g, r = candidate[start : start + block], row[start : start + block]
        scale, zero_point = qparams(factors[g], r)  # (P,)
        xr = xc[r]
        xq = fake_quant(xr, scale[:, None], zero_point[:, None], q_min, q_max)
        errors[g, r] = lp_error(xr, xq, p, dim=-1)
    return factors[errors.argmin(0)]


def screened_errors(
    xc: Tensor, factors: Tensor, qparams, q_min: int, q_max: int, p: float
) -> Tensor:
    """(G, R) float64 estimates of every candidate's mean |x − x̂|^p, for ``could_be_least``.

    Taken with |x − x̂| rounded to float32, its p-th power as exp(p·log|x − x̂|) (cheaper
    than torch's float32 pow, itself cheaper than float64's) and the mean in float32. Relative errors per element: the rounded difference, p·2^-24; the power,
    at most |y|·2^-22 + 2^-23 for y = p·log|x − x̂| (1-ulp log and exp, the rounding of p
    to float32 and of the product), with |y| ≤ 89 for any power in float32's normal range:
    ~2.2e-5 (measured ≤ 1.1e-5); torch's cascaded float32 sum of positive terms, ~1e-7
    (measured up to 3e7 terms). Absolute: float32 underflow, 2·tiny^min(p, 1).

    Args:
        xc: (R, L) values, float32 or float64 (x̂ is computed in that dtype).
        factors: (G,) the shrink factors.
        qparams: factors (G, 1) -> (scale, zero_point), each (G, R).
        q_min, q_max: the integer codes.
        p: the Lp exponent.
    """
    rows, length = xc.shape
    screen = torch.empty(factors.numel(), rows, dtype=torch.float32, device=xc.device)
    scale, zero_point = qparams(factors[:, None])
    scale, zero_point = scale[..., None], zero_point[..., None]  # (G, R, 1)
    # Symmetric qparams (weights) have no zero point: one clamp with scalar bounds.
    symmetric = not bool(zero_point.any())
    block = max(1, SEARCH_ELEMENTS // max(1, rows * length))
    for start in range(0, factors.numel(), block):
        part = slice(start, start + block)
        zero = 0 if symmetric else zero_point[part]
        xq = fake_quant(xc[None], scale[part], zero, q_min, q_max)
        diff = xq.sub_(xc).to(torch.float32).abs_()  # xq is fake_quant's own tensor
        screen[start : start + block] = diff.log_().mul_(p).exp_().mean(-1)
    return screen.to(F64)


def could_be_least(estimates: Tensor, p: float) -> Tensor:
    """(G, R) the candidates whose exact error can be a row's least: all others lose in
    float64 too.

    Args:
        estimates: (G, R) ``screened_errors``, or a positive combination of them with
            exact errors (as ``lp_clip_search``'s): within its relative and absolute errors.
        p: the Lp exponent.

    Returns:
        True for the candidates within tolerances of their row's least estimate: a relative
        1e-4·max(1, p/16), above twice the estimates' relative error (the least estimate
        may be low by as much), and the underflow bound; and for any that overflowed.
    """
    rtol = 1e-4 * max(1.0, p / 16)
    atol = 2 * torch.finfo(torch.float32).tiny ** min(p, 1.0)
    least = estimates.amin(0)
    return (estimates <= least * (1 + rtol) + atol) | ~torch.isfinite(estimates)


def token_clip_ratio(
    rows: Tensor, bits: int, p: float = 2.4, grid: int | Sequence[float] = 20
) -> float:
    """One shrink factor for every token's own range: dynamic per-token with clipping.

    Per-token ranges are taken at run time, so only a ratio can be calibrated offline: the
    α minimising the mean Lp error of ``fake_quant_dynamic_per_token(rows, bits, α)`` over
    the sampled rows (tokens). Without it a token's range is its unclipped min-max, which
    loses to an MSE-clipped static range on single-token inputs (time embeddings).

    Args:
        rows: (N, C) sampled layer inputs, one token per row (finite).
        bits: b, an integer in 2..16.
        p: the Lp exponent.
        grid: see ``shrink_factors`` (a count n tries 1 − i/n, i < n).

    Returns:
        The best factor in (0, 1] (1.0 without rows; ties: the earliest in the grid).
    """
    from qvd_bench.quant.primitives import fake_quant_dynamic_per_token

    p = _check_p(p)
    if rows.numel() == 0:
        return 1.0
    xc = rows.to(F64)
    errors = [
        float((fake_quant_dynamic_per_token(xc, bits, -1, float(alpha)) - xc).abs().pow(p).mean())
        for alpha in shrink_factors(grid).tolist()
    ]
    return float(shrink_factors(grid)[int(np.argmin(errors))])


def mse_range(
    rows: Tensor,
    bits: int,
    p: float = 2.4,
    grid: int | Sequence[float] = DEFAULT_GRID,
) -> tuple[Tensor, Tensor]:
    """Per-tensor asymmetric range clipped to minimise the Lp error on sampled rows.

    Args:
        rows: (N, C) input rows (e.g. ``reservoir_rows``); non-finite values are ignored.
        bits: b, an integer in 2..16.
        p: the Lp exponent (2.4 as Q-Diffusion).
        grid: see ``shrink_factors``.

    Returns:
        (lo, hi): 0-d float64 tensors, α·min and α·max for the best α.
    """
    bits = check_bits(bits)
    x = torch.as_tensor(rows)
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        raise UserError("no finite calibration rows for the MSE range search")
    lo, hi = mse_ranges(x.reshape(1, -1), bits, p, grid)
    return lo[0], hi[0]


def mse_ranges(
    x: Tensor,
    bits: int,
    p: float = 2.4,
    grid: int | Sequence[float] = DEFAULT_GRID,
) -> tuple[Tensor, Tensor]:
    """``mse_range`` of several tensors at once (one search: far cheaper for small ones).

    Args:
        x: (K, L) finite values, one flattened tensor per row.
        bits, p, grid: as ``mse_range``.

    Returns:
        (lo (K,), hi (K,)) float64: α·min and α·max of each row for its best α.
    """
    bits = check_bits(bits)
    lo, hi = x.amin(1).to(F64), x.amax(1).to(F64)
    alpha = shrink_search(x, lo, hi, bits, p, grid)
    return alpha * lo, alpha * hi


def weight_qparams(
    weight: Tensor,
    bits: int,
    method: str = "minmax",
    p: float = 2.4,
    grid: int | Sequence[float] = DEFAULT_GRID,
) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric qparams of a weight.

    Args:
        weight: (O, ...) a Linear (O, I) or conv (O, I, k...) weight.
        bits: b, an integer in 2..16.
        method: "minmax" (max |w| per channel) or "mse" (that range shrunk per channel by
            the clipping search).
        p, grid: the search's exponent and candidates (``method="mse"``).

    Returns:
        (scale (O,) float32, zero_point (O,) int32 zeros) for ``fake_quant_affine`` with
        ``axis=0, symmetric=True``.
    """
    bits = check_bits(bits)
    if method not in ("minmax", "mse"):
        raise UserError(f"weight range method must be 'minmax' or 'mse', got {method!r}")
    w = weight.detach().reshape(weight.shape[0], -1)
    if not bool(torch.isfinite(w).all()):
        raise UserError("weight has NaN or Inf values")
    absmax = w.abs().amax(1).to(F64)
    if method == "mse":
        absmax = absmax * shrink_search(w, -absmax, absmax, bits, p, grid, symmetric=True)
    return affine_qparams(-absmax, absmax, bits, symmetric=True)
