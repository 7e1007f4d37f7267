"""Per-channel moments: the formulas, and the one engine that computes them from a tensor.

**Sufficient statistics.** Per channel: count, NaN count, ±Inf count, min, max, mean and
the central moment sums M_2, M_3, M_4 (``MOMENT_KEYS``), float64 except the int64 counts.
Merging them (Chan et al. 1979; Pébay 2008): A set A of n_A values has mean μ_A and central
moment sums M_p,A = Σ (x − μ_A)^p for p = 2, 3, 4. For the union of disjoint sets A and B,
with n = n_A + n_B, δ = μ_B − μ_A, w_A = n_A / n and w_B = n_B / n:

    μ   = μ_A + δ·w_B
    M_2 = M_2,A + M_2,B + δ²·n_A·w_B
    M_3 = M_3,A + M_3,B + δ³·n_A·w_B·(w_A − w_B) + 3δ·(w_A·M_2,B − w_B·M_2,A)
    M_4 = M_4,A + M_4,B + δ⁴·n_A·w_B·(w_A² − w_A·w_B + w_B²)
          + 6δ²·(w_A²·M_2,B + w_B²·M_2,A) + 4δ·(w_A·M_3,B − w_B·M_3,A)

(the usual n_A·n_B/n, n_A·n_B·(n_A − n_B)/n², ... written with weights so no product of
counts can grow large). From the sums: population variance M_2/n, skewness
g1 = sqrt(n)·M_3/M_2^1.5 and excess kurtosis g2 = n·M_4/M_2² − 3, which are
``scipy.stats.skew`` / ``scipy.stats.kurtosis`` with ``bias=True``; they are NaN where
M_2 = 0 (constant data).

**The engine.** ``batch_moments`` computes the statistics of one tensor. Float32 CPU
inputs take two compiled passes (numba) that read the data twice and keep everything else
in registers:

1. per channel: the float64 sum (its mean is the centre c), and for rows of channels
   (Linear inputs) the minimum and maximum;
2. per channel: d = x − c in float64 and Σd, Σd², Σd³, Σd⁴.

Composed of PyTorch operations the same takes about ten passes over a float64 copy of the
data, which on a full-size video UNet's layer inputs (millions of elements per call) is
the cost of collecting moments. For channels outermost (conv inputs) the minimum and
maximum come from PyTorch's vectorised reductions. The kernel's sums run in float64 in a
different order than PyTorch's (numba may split them into vector lanes), so its results
agree with the PyTorch path to float64 rounding, not bit for bit.

Everything else takes the one PyTorch path (``torch_moments``): other dtypes, other
devices, ``QVD_BENCH_KERNELS=torch`` (``numerics.kernels``), and the inputs the kernel
hands back — any NaN or ±Inf (powers of float32 values cannot overflow float64, so a
non-finite sum means a non-finite input), or a centre far from the mean. The kernels
compile on first use (a few seconds, cached on disk by numba afterwards).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qvd_bench.numerics.kernels import fast_kernels_enabled

F64 = torch.float64
I64 = torch.int64

MOMENT_KEYS = ("count", "nan_count", "inf_count", "min", "max", "mean", "m2", "m3", "m4")

# Largest piece of a tensor reduced at once by the PyTorch path: bounds its float64 work
# memory.
CHUNK_ELEMENTS = 1 << 21
# The kernel's result is kept where its centre lies within this many standard deviations
# of the channel mean (the sums about it then lose at most ~(1 + 8²)² ≈ 2^12 in relative
# precision); otherwise the PyTorch path starts over from the exact mean.
CENTER_SPREAD = 8.0


# --------------------------------------------------------------------------- formulas


def empty_moments(
    shape: Sequence[int], device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """Sufficient statistics of no data.

    Args:
        shape: shape of every statistic, e.g. ``(C,)``.
        device: where to put them.

    Returns:
        ``MOMENT_KEYS`` -> tensors of ``shape``: zero counts and moments, min = +inf,
        max = −inf (the identities of ``combine_moments``).
    """
    shape = tuple(shape)
    out = {k: torch.zeros(shape, dtype=I64, device=device) for k in MOMENT_KEYS[:3]}
    out["min"] = torch.full(shape, math.inf, dtype=F64, device=device)
    out["max"] = torch.full(shape, -math.inf, dtype=F64, device=device)
    for k in ("mean", "m2", "m3", "m4"):
        out[k] = torch.zeros(shape, dtype=F64, device=device)
    return out


def combine_moments(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sufficient statistics of the union of two disjoint sets (formulas in the module doc).

    Args:
        a: ``MOMENT_KEYS`` -> tensors (counts int64, the rest float64).
        b: the same keys, shapes broadcastable with ``a``'s.

    Returns:
        A new dict with the broadcast shape. Empty sides (count 0) are identities.
    """
    na, nb = a["count"].to(F64), b["count"].to(F64)
    n = na + nb
    # An empty union keeps mean 0 and zero sums: w_A = w_B = 0 below.
    n_safe = n.clamp(min=1.0)
    wa, wb = na / n_safe, nb / n_safe
    delta = b["mean"] - a["mean"]
    m2a, m2b, m3a, m3b = a["m2"], b["m2"], a["m3"], b["m3"]
    nab = na * wb  # n_A·n_B/n
    d2 = delta * delta
    m2 = m2a + m2b + d2 * nab
    m3 = m3a + m3b + d2 * delta * nab * (wa - wb) + 3.0 * delta * (wa * m2b - wb * m2a)
    m4 = (
        a["m4"]
        + b["m4"]
        + d2 * d2 * nab * (wa * wa - wa * wb + wb * wb)
        + 6.0 * d2 * (wa * wa * m2b + wb * wb * m2a)
        + 4.0 * delta * (wa * m3b - wb * m3a)
    )
    return {
        "count": a["count"] + b["count"],
        "nan_count": a["nan_count"] + b["nan_count"],
        "inf_count": a["inf_count"] + b["inf_count"],
        "min": torch.minimum(a["min"], b["min"]),
        "max": torch.maximum(a["max"], b["max"]),
        "mean": a["mean"] + delta * wb,
        "m2": m2,
        "m3": m3,
        "m4": m4,
    }


def reduce_moments(stats: dict[str, Tensor], dim: int | Sequence[int]) -> dict[str, Tensor]:
    """Merges sufficient statistics along one or more axes, exactly.

    Pairwise tree reduction (halves merged with ``combine_moments``), so rounding grows
    with log2 of the axis length. ``reduce_moments(channel_stats, 0)`` gives the
    per-tensor statistics of a layer from its (C,) per-channel ones.

    Args:
        stats: ``MOMENT_KEYS`` -> tensors of one common shape.
        dim: the axis (or axes) to merge away.

    Returns:
        The statistics with ``dim`` removed (like ``Tensor.sum(dim)``).
    """
    dims = [dim] if isinstance(dim, int) else list(dim)
    ndim = stats["count"].ndim
    # Reduce the highest axis first so the remaining axis numbers stay valid.
    for d in sorted((d % ndim for d in dims), reverse=True):
        stats = _reduce_axis(stats, d)
    return stats


def _reduce_axis(stats: dict[str, Tensor], dim: int) -> dict[str, Tensor]:
    parts = {k: v.movedim(dim, 0) for k, v in stats.items()}
    size = parts["count"].shape[0]
    if size == 0:
        return empty_moments(parts["count"].shape[1:], device=parts["count"].device)
    while size > 1:
        half = size // 2
        left = {k: v[:half] for k, v in parts.items()}
        right = {k: v[half : 2 * half] for k, v in parts.items()}
        merged = combine_moments(left, right)
        if size % 2:
            merged = {k: torch.cat([merged[k], parts[k][-1:]]) for k in merged}
        parts, size = merged, merged["count"].shape[0]
    return {k: v[0] for k, v in parts.items()}


def moments_summary(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """Descriptive statistics from sufficient statistics.

    Args:
        stats: at least count, mean, m2, m3, m4 (any common shape).

    Returns:
        mean, variance (population, M_2/n), skewness g1 = sqrt(n)·M_3/M_2^1.5 and excess
        kurtosis g2 = n·M_4/M_2² − 3, float64. Mean and variance are NaN where n = 0;
        skewness and kurtosis are NaN where M_2 = 0 (constant or empty data).
    """
    n = stats["count"].to(F64)
    m2, m3, m4 = stats["m2"], stats["m3"], stats["m4"]
    nan = torch.full_like(m2, math.nan)
    has_data = n > 0
    varying = m2 > 0
    m2_safe = torch.where(varying, m2, 1.0)
    return {
        "mean": torch.where(has_data, stats["mean"], nan),
        "variance": torch.where(has_data, m2 / n.clamp(min=1.0), nan),
        "skewness": torch.where(varying, n.sqrt() * m3 / m2_safe.pow(1.5), nan),
        "kurtosis": torch.where(varying, n * m4 / (m2_safe * m2_safe) - 3.0, nan),
    }


# --------------------------------------------------------------------------- the engine


def batch_moments(x: Tensor, channel_dim: int) -> dict[str, Tensor]:
    """Per-channel sufficient statistics of one tensor.

    The tensor is viewed as (A, C, L) with the channels in the middle (a view for a
    contiguous input: no transposed copy) and reduced over A and L in float64. Moments
    are taken about a centre c and then corrected by the residual mean δ = Σ(x − c)/n of
    the rounded deviations: M_2 = S_2 − nδ², M_3 = S_3 − 3δS_2 + 2nδ³,
    M_4 = S_4 − 4δS_3 + 6δ²S_2 − 3nδ⁴ with S_p = Σ(x − c)^p, which removes the error of c
    for data far from zero.

    Float32 CPU inputs take the compiled kernel (``kernel_moments``); everything else,
    and what the kernel hands back (NaN, ±Inf, a far centre), the PyTorch path
    (``torch_moments``). NaN and ±Inf are counted per channel and left out.

    Args:
        x: any shape; its ``channel_dim`` axis has C channels.
        channel_dim: the channel axis (−1 for Linear inputs, 1 for conv inputs).

    Returns:
        ``MOMENT_KEYS`` -> (C,) tensors on ``x.device``.
    """
    x = x.detach()
    if x.ndim == 0:
        raise ValueError("batch_moments needs a tensor with a channel axis, got a scalar")
    d = channel_dim % x.ndim
    channels = x.shape[d]
    outer, inner = math.prod(x.shape[:d]), math.prod(x.shape[d + 1 :])
    x3 = x.reshape(outer, channels, inner)
    if x3.numel() == 0:
        return empty_moments((channels,), device=x.device)
    if kernel_takes(x3):
        stats = kernel_moments(x3)
        if stats is not None:
            return stats
    return torch_moments(x3)


def weight_channel_stats(weight: Tensor) -> dict[str, Tensor]:
    """Statistics of a weight per output channel (dim 0).

    Args:
        weight: (O, ...) e.g. a Linear (O, I) or conv (O, I, kT, kH, kW) weight.

    Returns:
        (O,) float64 tensors: min, max, absmax, mean, variance, skewness, kurtosis.
    """
    w = weight.detach().reshape(weight.shape[0], -1)
    stats = batch_moments(w, channel_dim=0)
    has_data = stats["count"] > 0
    nan = torch.full_like(stats["min"], math.nan)
    lo = torch.where(has_data, stats["min"], nan)
    hi = torch.where(has_data, stats["max"], nan)
    summary = moments_summary(stats)
    return {
        "min": lo,
        "max": hi,
        "absmax": torch.maximum(lo.abs(), hi.abs()),
        "mean": summary["mean"],
        "variance": summary["variance"],
        "skewness": summary["skewness"],
        "kurtosis": summary["kurtosis"],
    }


# --------------------------------------------------------------------------- PyTorch path


def torch_moments(x3: Tensor) -> dict[str, Tensor]:
    """``batch_moments`` of an (A, C, L) tensor by PyTorch operations, any dtype and device.

    Pieces of at most ``CHUNK_ELEMENTS`` are upcast to float64, each reduced about its own
    mean and merged with ``combine_moments``; a finiteness check on a piece's channel sums
    picks its fast path for all-finite input (one host sync per piece).
    """
    stats = None
    for piece in _pieces(x3, CHUNK_ELEMENTS):
        part = _piece_moments(piece)
        stats = part if stats is None else combine_moments(stats, part)
    return stats


def _pieces(x3: Tensor, limit: int) -> list[Tensor]:
    """Splits (A, C, L) along A, or else along L, into pieces of <= ``limit`` elements."""
    outer, channels, inner = x3.shape
    if x3.numel() <= limit:
        return [x3]
    if channels * inner <= limit:
        return list(x3.split(limit // (channels * inner), dim=0))
    step = max(1, limit // channels)
    return [p for rows in x3.split(1, dim=0) for p in rows.split(step, dim=2)]


def _piece_moments(x3: Tensor) -> dict[str, Tensor]:
    """``batch_moments`` of one (A, C, L) piece, about its own mean ."""
    dims = (0, 2)
    total = x3.shape[0] * x3.shape[2]
    dev = x3.to(F64, copy=True)  # the one float64 copy, then worked on in place
    s1 = dev.sum(dims)
    # One sum tells whether everything is finite: NaN and ±Inf propagate into it.
    if bool(torch.isfinite(s1).all()):
        n = torch.full_like(s1, total, dtype=I64)
        nan_count, inf_count = torch.zeros_like(n), torch.zeros_like(n)
        lo, hi = x3.amin(dims).to(F64), x3.amax(dims).to(F64)
        center = s1 / total
        dev.sub_(center[:, None])
    else:
        finite = torch.isfinite(dev)
        n = finite.sum(dims)
        nan_count = torch.isnan(dev).sum(dims)
        inf_count = total - n - nan_count
        lo = torch.where(finite, dev, math.inf).amin(dims)
        hi = torch.where(finite, dev, -math.inf).amax(dims)
        center = dev.masked_fill_(~finite, 0.0).sum(dims) / n.clamp(min=1)
        dev.sub_(center[:, None]).masked_fill_(~finite, 0.0)
    nf = n.to(F64)
    r1 = dev.sum(dims)
    sq = dev * dev
    s2 = sq.sum(dims)
    s3 = dev.mul_(sq).sum(dims)
    s4 = sq.mul_(sq).sum(dims)
    delta = r1 / nf.clamp(min=1.0)
    m2 = s2 - nf * delta * delta
    m3 = s3 - 3.0 * delta * s2 + 2.0 * nf * delta**3
    m4 = s4 - 4.0 * delta * s3 + 6.0 * delta * delta * s2 - 3.0 * nf * delta**4
    mean = center + delta
    # Constant channels: exact zeros (c = Σx/n need not equal x in floating point).
    constant = lo == hi
    mean = torch.where(constant, lo, torch.where(n > 0, mean, 0.0))
    m2, m3, m4 = (torch.where(constant, 0.0, m) for m in (m2, m3, m4))
    return {
        "count": n,
        "nan_count": nan_count,
        "inf_count": inf_count,
        "min": lo,
        "max": hi,
        "mean": mean,
        "m2": m2,
        "m3": m3,
        "m4": m4,
    }


# --------------------------------------------------------------------------- compiled kernel


@functools.cache
def _kernels() -> tuple[Any, Any, Any]:
    """The compiled kernels (rows, planes, finish)."""
    import numba

    # reassoc: sums may be split into vector lanes; no nnan/ninf, so NaN and ±Inf still
    # propagate into the sums and are seen by the caller.
    jit = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})

    @jit
    def planes(x, out):  # pragma: no cover - compiled
        # x: (A, C, L) float32; out: (5, C) float64 rows c, S1, S2, S3, S4.
        outer, channels, inner = x.shape
        count = outer * inner
        for c in range(channels):
            total = 0.0
            for a in range(outer):
                for i in range(inner):
                    total += np.float64(x[a, c, i])
            center = total / count
            s1 = 0.0
            s2 = 0.0
            s3 = 0.0
            s4 = 0.0
            for a in range(outer):
                for i in range(inner):
                    d = np.float64(x[a, c, i]) - center
                    d2 = d * d
                    s1 += d
                    s2 += d2
                    s3 += d2 * d
                    s4 += d2 * d2
            out[0, c] = center
            out[1, c] = s1
            out[2, c] = s2
            out[3, c] = s3
            out[4, c] = s4

    @jit
    def rows(x, out, extrema):  # pragma: no cover - compiled
        # x: (R, C) float32; out: (5, C) as in planes; extrema: (2, C) float32 min, max.
        # Channels are innermost, so each row updates every channel's running sums (rows
        # of out) and extrema in one vector pass. NaN is skipped by the comparisons but
        # reaches the sums, so the caller still sees it.
        count, channels = x.shape
        center, s1, s2, s3, s4 = out[0], out[1], out[2], out[3], out[4]
        lo, hi = extrema[0], extrema[1]
        out[:] = 0.0
        lo[:] = x[0]
        hi[:] = x[0]
        for r in range(count):
            row = x[r]
            for c in range(channels):
                v = row[c]
                center[c] += np.float64(v)
                lo[c] = min(lo[c], v)
                hi[c] = max(hi[c], v)
        for c in range(channels):
            center[c] /= count
        for r in range(count):
            row = x[r]
            for c in range(channels):
                d = np.float64(row[c]) - center[c]
                d2 = d * d
                s1[c] += d
                s2[c] += d2
                s3[c] += d2 * d
                s4[c] += d2 * d2

    @jit
    def finish(sums, count, spread, moments):  # pragma: no cover - compiled
        # sums: (5, C) centre c, S1..S4 about it; moments: (4, C) mean, M2, M3, M4.
        # The correction by the residual mean δ = S1/n of batch_moments. Returns False
        # when some S4 is not finite or some centre lies too far off.
        n = np.float64(count)
        ok = True
        for c in range(sums.shape[1]):
            s1, s2, s3, s4 = sums[1, c], sums[2, c], sums[3, c], sums[4, c]
            delta = s1 / n
            dd = delta * delta
            m2 = s2 - n * dd
            moments[0, c] = sums[0, c] + delta
            moments[1, c] = m2
            moments[2, c] = s3 - 3.0 * delta * (s2 - 2.0 * n / 3.0 * dd)
            moments[3, c] = s4 - 4.0 * delta * (s3 - 1.5 * delta * (s2 - n / 2.0 * dd))
            if not np.isfinite(s4) or dd > m2 * (spread * spread / n):
                ok = False
        return ok

    return rows, planes, finish


def kernel_takes(x3: Tensor) -> bool:
    """Whether ``kernel_moments`` takes this (A, C, L) tensor: float32 on the CPU, not
    empty, no autograd, fast kernels on (any strides)."""
    return (
        x3.dtype == torch.float32
        and x3.device.type == "cpu"
        and x3.numel() > 0
        and not x3.requires_grad
        and fast_kernels_enabled()
    )


def power_sums(x3: Tensor) -> np.ndarray:
    """Per-channel centre and power sums about it, by the compiled kernel.

    Args:
        x3: (A, C, L) float32 CPU tensor, any strides.

    Returns:
        (5, C) float64: the centre c (the float64 mean) and S_1..S_4 = Σ(x − c)^p.
        Channels holding NaN or ±Inf get non-finite entries.
    """
    return _power_sums(x3)[0]


def _power_sums(x3: Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """``power_sums``, and the (2, C) float32 per-channel min and max where the kernel
    finds them in the same pass (L = 1: channels innermost), else None."""
    rows, planes, _ = _kernels()
    outer, channels, inner = x3.shape
    sums = np.empty((5, channels), dtype=np.float64)
    data = x3.detach().numpy()
    if inner == 1:
        extrema = np.empty((2, channels), dtype=np.float32)
        rows(data[:, :, 0], sums, extrema)
        return sums, extrema
    planes(data, sums)
    return sums, None


def kernel_moments(x3: Tensor) -> dict[str, Tensor] | None:
    """``batch_moments`` of a float32 CPU (A, C, L) tensor by the compiled kernel, or None.

    Args:
        x3: (A, C, L) float32 CPU tensor (``kernel_takes``), any strides.

    Returns:
        ``MOMENT_KEYS`` -> (C,) tensors; None when the input holds NaN or ±Inf or some
        channel's centre lies farther than ``CENTER_SPREAD`` standard deviations from
        its mean (``torch_moments`` then counts and excludes them, or starts over from
        the exact mean).
    """
    _, _, finish = _kernels()
    outer, channels, inner = x3.shape
    count = outer * inner
    sums, extrema = _power_sums(x3)
    moments = np.empty((4, channels), dtype=np.float64)
    if not finish(sums, count, CENTER_SPREAD, moments):
        return None
    if extrema is not None:  # found by the rows kernel in its first pass
        lo, hi = torch.from_numpy(extrema.astype(np.float64))
    else:
        # Channels outermost: PyTorch's vectorised min/max reductions along L are several
        # times faster than a compiled loop (which does not vectorise a min/max that
        # must keep NaN); along rows (L = 1) PyTorch's are slower than the kernel's.
        lo, hi = x3.amin((0, 2)).to(F64), x3.amax((0, 2)).to(F64)
    full = torch.full((channels,), count, dtype=I64)
    mean, m2, m3, m4 = torch.from_numpy(moments)
    return {
        "count": full,
        "nan_count": torch.zeros_like(full),
        "inf_count": torch.zeros_like(full),
        "min": lo,
        "max": hi,
        "mean": mean,
        "m2": m2,
        "m3": m3,
        "m4": m4,
    }
