"""Streaming, mergeable statistics of layer inputs.

Every accumulator follows one pattern: its state is a fixed set of tensors declared once
(``state_dict``), ``update`` folds a batch into it, ``merge`` folds another accumulator of
the same configuration into it, and ``merge`` of partial results equals one pass over all
the data. The state holds sufficient statistics only, so merges are exact (counts,
extrema, histogram bins, reservoirs) or exact up to float64 rounding (moments), and the
state is independent of how the data was batched, sharded or ordered.

State is float64 except integer counts (and the float32 rows of a reservoir), lives on
the device of the inputs, and is made of tensors only, so ``state_dict()`` can be written
with safetensors and read back with ``from_state_dict``. ``state_dict`` returns the live
tensors (the reservoir: sorted copies); ``from_state_dict`` copies. Merging accumulators
of different type, shape or configuration raises ValueError.

Moments (Chan et al. 1979; Pébay 2008). A set A of n_A values has mean μ_A and central
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
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from qvd_bench.collect import fused

F64 = torch.float64
I64 = torch.int64
I32 = torch.int32

MOMENT_KEYS = ("count", "nan_count", "inf_count", "min", "max", "mean", "m2", "m3", "m4")


# --------------------------------------------------------------------------- moments


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


# Largest piece of a tensor reduced at once by the general path: bounds its float64 work
# memory.
CHUNK_ELEMENTS = 1 << 21
# Piece of a float32/float16/bfloat16 tensor taken at once by the low-precision path: its
# two float64 work buffers (2 MiB together) stay in L2/L3 cache through the passes.
PIECE_ELEMENTS = 1 << 17
# The low-precision path keeps its centre when it lies within this many standard
# deviations of the channel mean (the sums about it then lose at most ~(1 + 8²)² ≈ 2^12
# in relative precision); otherwise the general path starts over from the exact mean.
CENTER_SPREAD = 8.0
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def batch_moments(x: Tensor, channel_dim: int) -> dict[str, Tensor]:
    """Per-channel sufficient statistics of one tensor.

    The tensor is viewed as (A, C, L) with the channels in the middle (a view for a
    contiguous input: no transposed copy) and reduced over A and L in float64. Moments
    are taken about a centre c and then corrected by the residual mean δ = Σ(x − c)/n of
    the rounded deviations: M_2 = S_2 − nδ², M_3 = S_3 − 3δS_2 + 2nδ³,
    M_4 = S_4 − 4δS_3 + 6δ²S_2 − 3nδ⁴ with S_p = Σ(x − c)^p, which removes the error of c
    for data far from zero.

    float32 CPU inputs take the fused path when numba is installed
    (``fused.channel_moments``: two passes over the data, everything else in registers).
    Other float32, float16 and bfloat16 inputs take the low-precision path
    (``_low_precision_moments``): pieces of ``PIECE_ELEMENTS`` converted to float64 in a
    cache-sized buffer, one centre for all pieces, one host sync per tensor. It hands
    over to the general path when the input holds NaN or ±Inf or when its centre is far
    from the mean, as the fused path does for NaN and ±Inf. The general path (float64 and other inputs) upcasts pieces of at most
    ``CHUNK_ELEMENTS``, takes each piece's own mean as centre and merges the pieces with
    ``combine_moments``; NaN and ±Inf are counted per channel and left out, and a
    finiteness check on the channel sums picks its fast path for all-finite input (one
    host sync per piece).

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
    if fused.covers(x3):
        stats = fused.channel_moments(x3, CENTER_SPREAD)
        if stats is not None:
            return stats
    elif x3.dtype in LOW_PRECISION:
        stats = _low_precision_moments(x3)
        if stats is not None:
            return stats
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


def _low_precision_pieces(x3: Tensor, limit: int) -> list[list[Tensor]]:
    """Contiguous pieces of an (A, C, L) tensor, each of at most ``limit`` elements.

    Linear inputs (L = 1) give one group, all channels, of (R, C) blocks of whole rows
    (one row even when C exceeds ``limit``), reduced over axis 0. Conv inputs give one
    group per block of channels, in channel order, holding its (c, L) pieces of every
    sample (split along L when one channel alone exceeds ``limit``), reduced over axis
    1. Every element lies in exactly one piece, and for a contiguous input every piece
    is contiguous: strided pieces reduce about half as fast.

    Returns:
        The groups, each a list of pieces covering the same channels.
    """
    outer, channels, inner = x3.shape
    if inner == 1:
        return [list(x3[:, :, 0].split(max(1, limit // channels)))]
    step, span = max(1, limit // inner), min(inner, limit)
    return [
        [p for sample in x3[:, start : start + step] for p in sample.split(span, dim=1)]
        for start in range(0, channels, step)
    ]


def _low_precision_moments(x3: Tensor) -> dict[str, Tensor] | None:
    """``batch_moments`` of a float32/float16/bfloat16 (A, C, L) tensor, or None.

    Each contiguous piece of at most ``PIECE_ELEMENTS`` (``_low_precision_pieces``) is
    copied into a cache-sized float64 work buffer, where the deviations d = x − c and
    their powers are summed. The centre c of each channel is the float32 mean of the
    first piece holding it, so the sums S_p of its pieces simply add up (no merge per
    piece); the residual mean δ = S_1/n then corrects them as in ``batch_moments``,
    removing the error of the centre.

    Error (u = 2^-53): every input value is exact in float64, so d = fl(x − c) has
    relative error ≤ u and fl(d^p) ≤ (2p − 1)·u; the float64 sums add ≤ γ·u relative to
    Σ|d|^p, γ ≈ log2(piece length) + number of pieces. So float32 inputs keep the
    precision of float64 inputs. The correction cancels S_p against powers of δ; with
    |δ| = kσ the relative error of M_2 grows by at most (1 + k²), of M_4 by ~(1 + k²)²
    (S_4 ≤ 8(M_4 + nδ⁴) and nσ⁴ ≤ M_4) and of M_3, relative to nσ³, by ~(1 + k²)^1.5. The
    result is therefore kept only where |δ| ≤ ``CENTER_SPREAD``·σ (or the channel is
    constant) and S_4 is finite, which it is exactly when every input is (powers of
    float16/bfloat16/float32 values cannot overflow float64, and a non-finite input makes
    c non-finite); otherwise None is returned and the general path starts over from the
    exact mean. For conv inputs of one sample, the first piece holds all of a channel:
    its float32 mean is off by far less than 8σ unless the channel's spread is within a
    few float32 ulps of its mean.
    """
    outer, channels, inner = x3.shape
    count = outer * inner
    groups = _low_precision_pieces(x3, PIECE_ELEMENTS)
    largest = max(p.numel() for pieces in groups for p in pieces)
    buffer = torch.empty(2 * largest, dtype=F64, device=x3.device)
    dim = 0 if inner == 1 else 1
    centers, sums, lows, highs = [], [], [], []
    for pieces in groups:
        # The centre of a group: its first piece's channel means, summed in float32 (the
        # piece is then in cache for the copy below).
        first = pieces[0]
        part_center = first.sum(dim, keepdim=True, dtype=torch.float32).to(F64)
        part_center /= first.shape[dim]
        centers.append(part_center.view(-1))
        piece_sums, piece_lows, piece_highs = [], [], []
        for piece in pieces:
            work = buffer[: 2 * piece.numel()].view(2, *piece.shape)
            dev, power = work.unbind(0)
            # copy_ then sub_: a mixed-dtype sub into float64 is slower than both.
            dev.copy_(piece).sub_(part_center)
            piece_lows.append(piece.amin(dim))
            piece_highs.append(piece.amax(dim))
            torch.mul(dev, dev, out=power)
            piece_sums.append(work.sum(dim + 1))  # S_1, S_2
            dev.mul_(power)
            power.mul_(power)
            piece_sums.append(work.sum(dim + 1))  # S_3, S_4
        if len(pieces) == 1:
            sums.append(torch.cat(piece_sums))
            lows.append(piece_lows[0])
            highs.append(piece_highs[0])
        else:
            stacked = torch.stack(piece_sums)
            sums.append(stacked.view(-1, 4, stacked.shape[-1]).sum(0))
            lows.append(torch.stack(piece_lows).amin(0))
            highs.append(torch.stack(piece_highs).amax(0))
    if len(groups) == 1:
        (s1, s2, s3, s4), lo, hi = sums[0], lows[0].to(F64), highs[0].to(F64)
        center = centers[0]
    else:
        s1, s2, s3, s4 = torch.cat(sums, dim=1)
        lo, hi = torch.cat(lows).to(F64), torch.cat(highs).to(F64)
        center = torch.cat(centers)
    return _moments_from_sums(center, (s1, s2, s3, s4), lo, hi, count)


def _moments_from_sums(
    center: Tensor, sums: tuple[Tensor, ...], lo: Tensor, hi: Tensor, count: int
) -> dict[str, Tensor] | None:
    """``MOMENT_KEYS`` from power sums about a centre, or None where they cannot be used.

    Args:
        center: (C,) float64 centre c.
        sums: S_1..S_4, each (C,) float64, S_p = Σ(x − c)^p over ``count`` values.
        lo, hi: (C,) float64 minimum and maximum.
        count: values per channel.

    Returns:
        The statistics, corrected by the residual mean δ = S_1/n (``batch_moments``); None
        when S_4 is not finite (the input held NaN or ±Inf) or some channel's centre lies
        farther than ``CENTER_SPREAD`` standard deviations from its mean.
    """
    s1, s2, s3, s4 = sums
    channels, n = center.shape[0], float(count)
    delta = s1 / n
    dd = delta * delta
    # M_2 = S_2 − nδ², M_3 = S_3 − δ(3S_2 − 2nδ²), M_4 = S_4 − δ(4S_3 − δ(6S_2 − 3nδ²)).
    m2 = torch.add(s2, dd, alpha=-n)
    m3 = torch.addcmul(s3, delta, torch.add(s2, dd, alpha=-2.0 * n / 3.0), value=-3.0)
    inner_m4 = torch.addcmul(s3, delta, torch.add(s2, dd, alpha=-n / 2.0), value=-1.5)
    m4 = torch.addcmul(s4, delta, inner_m4, value=-4.0)
    constant = lo == hi
    near = dd <= m2 * (CENTER_SPREAD**2 / n)
    usable = (torch.isfinite(s4) & (near | constant)).all()
    # One host sync for both questions.
    usable, any_constant = torch.stack((usable, constant.any())).tolist()
    if not usable:
        return None
    mean = center + delta
    if any_constant:
        # Constant channels: exact zeros (c = Σx/n need not equal x in floating point).
        mean = torch.where(constant, lo, mean)
        m2, m3, m4 = (torch.where(constant, 0.0, m) for m in (m2, m3, m4))
    full = torch.full((channels,), count, dtype=I64, device=center.device)
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


def _piece_moments(x3: Tensor) -> dict[str, Tensor]:
    """``batch_moments`` of one (A, C, L) piece, about its own mean (the general path)."""
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


# --------------------------------------------------------------------------- base


class Accumulator:
    """Base of the mergeable accumulators: a declared set of state tensors.

    Subclasses list their state in ``STATE`` and keep each as an attribute of that name;
    the configuration (channels, edges, capacity, ...) is part of the state, so
    ``from_state_dict`` needs nothing else.
    """

    STATE: ClassVar[tuple[str, ...]] = ()

    def state_dict(self) -> dict[str, Tensor]:
        """The state tensors by name (the live tensors, not copies)."""
        return {name: getattr(self, name) for name in self.STATE}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]):
        """Rebuilds an accumulator from ``state_dict()`` output (copied, same device)."""
        missing = [k for k in cls.STATE if k not in state]
        extra = [k for k in state if k not in cls.STATE]
        if missing or extra:
            raise ValueError(f"{cls.__name__} state: missing {missing}, unexpected {extra}")
        obj = cls.__new__(cls)
        for name in cls.STATE:
            setattr(obj, name, state[name].detach().clone())
        obj._validate()
        return obj

    def _validate(self) -> None:
        """Checks a loaded state for consistency; raises ValueError."""

    @property
    def device(self) -> torch.device:
        return getattr(self, self.STATE[0]).device

    def to(self, device: torch.device | str):
        """Moves the state to ``device`` in place; returns self."""
        for name in self.STATE:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def merge(self, other):
        raise NotImplementedError

    def _mergeable(self, other: Accumulator):
        """Checks the type; returns ``other``, copied to this device if it lives elsewhere."""
        if type(other) is not type(self):
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if other.device != self.device:
            other = type(other).from_state_dict(
                {k: v.to(self.device) for k, v in other.state_dict().items()}
            )
        return other


# --------------------------------------------------------------------------- ChannelMoments


class ChannelMoments(Accumulator):
    """Per-channel count, NaN/Inf counts, min, max, mean and central moment sums M2..M4.

    Args:
        channels: number of channels C.
        device: where the state starts; it follows the inputs of ``update``.

    State (all (C,)): count, nan_count, inf_count (int64); min, max, mean, m2, m3, m4
    (float64).
    """

    STATE = MOMENT_KEYS

    def __init__(self, channels: int, device: torch.device | str | None = None):
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        for k, v in empty_moments((channels,), device).items():
            setattr(self, k, v)
        self._empty = True  # not state: from_state_dict objects take the general path

    @property
    def channels(self) -> int:
        return self.count.shape[0]

    def _validate(self) -> None:
        shapes = {tuple(getattr(self, k).shape) for k in self.STATE}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"ChannelMoments state needs equal (C,) shapes, got {shapes}")

    def update(self, x: Tensor, channel_dim: int = -1) -> None:
        """Folds a tensor into the statistics.

        Args:
            x: any shape with C channels on ``channel_dim``; any float dtype (computed in
                float64). NaN and ±Inf are counted and excluded.
            channel_dim: −1 for Linear inputs, 1 for conv inputs.
        """
        if x.ndim == 0 or x.shape[channel_dim] != self.channels:
            raise ValueError(
                f"expected {self.channels} channels on axis {channel_dim}, got shape "
                f"{tuple(x.shape)}"
            )
        self.fold(batch_moments(x, channel_dim))

    def fold(self, batch: dict[str, Tensor]) -> None:
        """Folds in the ``batch_moments`` of a tensor (what ``update`` computes).

        Lets a caller that feeds one tensor to several accumulators (layers reading the
        same input) compute its statistics once.

        Args:
            batch: ``MOMENT_KEYS`` -> (C,) tensors from ``batch_moments``.
        """
        if batch["count"].shape != self.count.shape:
            raise ValueError(
                f"expected statistics of {self.channels} channels, got "
                f"{tuple(batch['count'].shape)}"
            )
        if batch["count"].device != self.device:
            self.to(batch["count"].device)
        # A merge into empty state returns the batch exactly; skip its ~30 small ops
        # (most keys see only a few updates, so this is a large share of the cost).
        if getattr(self, "_empty", False):
            self._assign(batch)
            self._empty = False
        else:
            self._assign(combine_moments(self.state_dict(), batch))

    def merge(self, other: ChannelMoments) -> ChannelMoments:
        """Folds ``other`` in (as if its data had gone through ``update``); returns self."""
        other = self._mergeable(other)
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {other.channels} channels into {self.channels}")
        self._assign(combine_moments(self.state_dict(), other.state_dict()))
        self._empty = False
        return self

    def _assign(self, stats: dict[str, Tensor]) -> None:
        for k in self.STATE:
            setattr(self, k, stats[k])

    def compute(self) -> dict[str, Tensor]:
        """Per-channel results.

        Returns:
            (C,) tensors: count, nan_count, inf_count (int64); min, max, mean, variance
            (population), skewness (g1), kurtosis (excess, g2) (float64). Channels without
            data give NaN min/max/mean/variance; constant channels give NaN skewness and
            kurtosis.
        """
        has_data = self.count > 0
        nan = torch.full_like(self.min, math.nan)
        return {
            "count": self.count,
            "nan_count": self.nan_count,
            "inf_count": self.inf_count,
            "min": torch.where(has_data, self.min, nan),
            "max": torch.where(has_data, self.max, nan),
            **moments_summary(self.state_dict()),
        }


def fold_many(pending: Sequence[tuple[ChannelMoments, dict[str, Tensor]]]) -> None:
    """``acc.fold(batch)`` for many pairs, with one merge over all their channels.

    ``combine_moments`` is elementwise (+, −, ×, ÷, min, max), so merging the
    concatenated channels of all pairs gives bit for bit what each ``fold`` gives alone,
    with ~40 small ops in all instead of ~40 per accumulator. Hooks on a few hundred
    layers fold that many small tensors per denoiser call.

    Args:
        pending: (accumulator, ``batch_moments`` result) pairs; each accumulator at most
            once (a second batch must be folded after the first).
    """
    if len({id(acc) for acc, _ in pending}) != len(pending):
        raise ValueError("fold_many needs each accumulator at most once")
    merging = []
    for acc, batch in pending:
        if getattr(acc, "_empty", False) or batch["count"].device != acc.device:
            acc.fold(batch)
        else:
            merging.append((acc, batch))
    devices = {acc.device for acc, _ in merging}
    if len(merging) < 2 or len(devices) > 1:
        for acc, batch in merging:
            acc.fold(batch)
        return
    state = {k: torch.cat([getattr(acc, k) for acc, _ in merging]) for k in MOMENT_KEYS}
    batches = {k: torch.cat([batch[k] for _, batch in merging]) for k in MOMENT_KEYS}
    merged = combine_moments(state, batches)
    sizes = [acc.channels for acc, _ in merging]
    parts = {k: merged[k].split(sizes) for k in MOMENT_KEYS}
    for i, (acc, _) in enumerate(merging):
        acc._assign({k: parts[k][i] for k in MOMENT_KEYS})


def weight_channel_stats(weight: Tensor) -> dict[str, Tensor]:
    """Statistics of a weight per output channel (dim 0).

    Args:
        weight: (O, ...) e.g. a Linear (O, I) or conv (O, I, kT, kH, kW) weight.

    Returns:
        (O,) float64 tensors: min, max, absmax, mean, variance, skewness, kurtosis.
    """
    w = weight.detach().reshape(weight.shape[0], -1)
    acc = ChannelMoments(w.shape[0], device=w.device)
    acc.update(w, channel_dim=0)
    out = acc.compute()
    return {
        "min": out["min"],
        "max": out["max"],
        "absmax": torch.maximum(out["min"].abs(), out["max"].abs()),
        "mean": out["mean"],
        "variance": out["variance"],
        "skewness": out["skewness"],
        "kurtosis": out["kurtosis"],
    }


# --------------------------------------------------------------------------- histogram edges


@functools.lru_cache(maxsize=64)
def _edge_table(edges: Any, device: torch.device, dtype: torch.dtype = F64) -> Tensor:
    """The boundaries, for exact comparisons with values of ``dtype``.

    For float32 every boundary e is rounded up to the nearest float32 u: for a float32 x,
    x < e exactly when x < u, so comparing in float32 gives the float64 answer.
    """
    table = edges.edges()
    if dtype == torch.float32:
        t32 = table.to(torch.float32)
        up = t32.nextafter(torch.full_like(t32, math.inf))
        table = torch.where(t32.to(F64) < table, up, t32)
    return table.to(device)


def _exact_bins(x: Tensor, guess: Tensor, table: Tensor) -> Tensor:
    """Fixes an analytic bin guess that is the bin or the one below it.

    Bins are half-open [table[i], table[i+1]), as ``np.searchsorted(table, x, "right") - 1``.
    Callers take their guesses half a bin low, so rounding leaves them at most one bin
    low (never high), and one comparison with the guessed bin's upper boundary settles each.

    Args:
        x: (N,) values, same dtype as ``table``.
        guess: (N,) int32 guesses: the bin or the one below it.
        table: (num_bins + 1,) boundaries.

    Returns:
        (N,) int32 bin indices.
    """
    guess = guess.clamp_(0, table.numel() - 2)
    # Compared straight into int32: a comparison into bool is 2-3x slower on CPU.
    step = torch.ge(x, table[1:].index_select(0, guess), out=torch.empty_like(guess))
    return guess.add_(step)


@dataclass(frozen=True)
class LinearEdges:
    """``bins`` equal bins on [lo, hi), plus an underflow (−inf, lo) and overflow [hi, inf) bin.

    Bin i covers [edges[i], edges[i+1]); ``x == hi`` lands in the overflow bin.
    """

    lo: float
    hi: float
    bins: int

    KIND: ClassVar[str] = "linear"

    def __post_init__(self):
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"LinearEdges needs finite lo < hi, got {self.lo}, {self.hi}")
        if int(self.bins) != self.bins or self.bins < 1:
            raise ValueError(f"LinearEdges needs bins >= 1, got {self.bins}")

    @property
    def num_bins(self) -> int:
        return int(self.bins) + 2

    def edges(self) -> Tensor:
        """(num_bins + 1,) float64 boundaries, ±inf at the ends."""
        inner = torch.linspace(self.lo, self.hi, int(self.bins) + 1, dtype=F64)
        inf = torch.tensor([math.inf], dtype=F64)
        return torch.cat([-inf, inner, inf])

    def index(self, x: Tensor) -> Tensor:
        """Bin index of each finite element of ``x`` (int64, shape of ``x``)."""
        return self._bins(x.reshape(-1)).long().reshape(x.shape)

    def _bins(self, x: Tensor) -> Tensor:
        """(N,) finite values -> (N,) int32 bins."""
        # Float32 inputs are binned in float32 when its rounding (of x − lo, and of the
        # position, up to bins + 1) stays far below half a bin.
        f32_error = 2.0**-23 * max(abs(self.lo), abs(self.hi)) * self.bins / (self.hi - self.lo)
        f32_error += 2.0**-22 * self.bins
        work = F64 if x.dtype == F64 or f32_error > 0.25 else torch.float32
        x = x.to(work)
        scale = int(self.bins) / (self.hi - self.lo)
        # The bin of x is floor(p) + 1 for p = (x − lo)·scale clamped to [−1, bins]. The
        # guess floor(p + 1/2) is that bin or the one below while rounding errs by less
        # than half a bin. Clamping p + 1/2 to [0, bins + 1] keeps that, takes +inf to the
        # last bin (which _exact_bins moves past the +inf edge, as searchsorted does),
        # and makes the truncation to int the floor.
        pos = (x - self.lo).mul_(scale).add_(0.5).clamp_(0.0, self.bins + 1.0)
        return _exact_bins(x, pos.to(I32), _edge_table(self, x.device, work))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "lo": self.lo, "hi": self.hi, "bins": int(self.bins)}

    def _params(self) -> list[float]:
        return [0.0, float(self.lo), float(self.hi), float(self.bins)]


@dataclass(frozen=True)
class SignedLogEdges:
    """A universal signed log-spaced grid with bounded relative error (as DDSketch).

    With γ = (1 + α)/(1 − α) (α = ``relative_error``), k_lo = floor(log_γ min_abs) and
    k_hi = ceil(log_γ max_abs), the boundaries are

        −inf, −γ^k_hi, ..., −γ^k_lo, γ^k_lo, ..., γ^k_hi, +inf

    so bins are: one open bin below −γ^k_hi, m = k_hi − k_lo log bins on each side, a
    zero bin [−γ^k_lo, γ^k_lo) (|x| < ~min_abs) and one open bin from γ^k_hi (values
    beyond ~max_abs, clamped there by ``quantile``). Within a log bin any point is within
    relative error γ − 1 of any other. Bin i covers [edges[i], edges[i+1]).
    """

    relative_error: float = 0.01
    min_abs: float = 1e-6
    max_abs: float = 1e6

    KIND: ClassVar[str] = "signed_log"

    def __post_init__(self):
        if not 0.0 < self.relative_error < 1.0:
            raise ValueError(f"relative_error must be in (0, 1), got {self.relative_error}")
        if not 0.0 < self.min_abs < self.max_abs < math.inf:
            raise ValueError(
                f"need 0 < min_abs < max_abs < inf, got {self.min_abs}, {self.max_abs}"
            )

    @property
    def gamma(self) -> float:
        return (1.0 + self.relative_error) / (1.0 - self.relative_error)

    @property
    def _k_range(self) -> tuple[int, int]:
        log_gamma = math.log(self.gamma)
        return (
            math.floor(math.log(self.min_abs) / log_gamma),
            math.ceil(math.log(self.max_abs) / log_gamma),
        )

    @property
    def num_bins(self) -> int:
        k_lo, k_hi = self._k_range
        return 2 * (k_hi - k_lo) + 3

    def edges(self) -> Tensor:
        """(num_bins + 1,) float64 boundaries, ±inf at the ends."""
        k_lo, k_hi = self._k_range
        pos = torch.tensor(self.gamma, dtype=F64) ** torch.arange(k_lo, k_hi + 1, dtype=F64)
        inf = torch.tensor([math.inf], dtype=F64)
        return torch.cat([-inf, -pos.flip(0), pos, inf])

    def index(self, x: Tensor) -> Tensor:
        """Bin index of each finite element of ``x`` (int64, shape of ``x``)."""
        return self._bins(x.reshape(-1)).long().reshape(x.shape)

    def _bins(self, x: Tensor) -> Tensor:
        """(N,) finite values -> (N,) int32 bins."""
        k_lo, k_hi = self._k_range
        m = k_hi - k_lo
        zero_bin = m + 1
        log_gamma = math.log(self.gamma)
        # Float32 inputs are binned in float32 when its rounding (of log|x|, and of the
        # level, up to num_bins) stays far below half a bin.
        f32_error = 2.0**-22 * max(abs(math.log(self.min_abs)), abs(math.log(self.max_abs)))
        f32_error = f32_error / log_gamma + 2.0**-22 * self.num_bins
        work = F64 if x.dtype == F64 or f32_error > 0.25 else torch.float32
        x = x.to(work)
        # With l = log_γ|x| − k_lo clamped to [−1, m], the bin of x ≥ 0 is
        # zero_bin + 1 + floor(l) and that of x < 0 is zero_bin − max(ceil(l), 0)
        # (|x| = γ^k starts a positive bin and ends a negative one). The guess
        # zero_bin + floor(sign(x)·(l + 1/2)) is that bin or the one below while rounding
        # errs by less than half a bin. Clamping l + 1/2 to [−1/2, m + 1] keeps that,
        # takes +inf to the last bin (which _exact_bins moves past the +inf edge, as
        # searchsorted does), and leaves the guess at least 1/2, so the truncation to int
        # is the floor.
        level = x.abs().log_().mul_(1.0 / log_gamma).sub_(k_lo - 0.5)
        level = level.clamp_(-0.5, m + 1.0)
        guess = level.mul_(x.sign()).add_(zero_bin).to(I32)
        return _exact_bins(x, guess, _edge_table(self, x.device, work))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "relative_error": self.relative_error,
            "min_abs": self.min_abs,
            "max_abs": self.max_abs,
        }

    def _params(self) -> list[float]:
        return [1.0, float(self.relative_error), float(self.min_abs), float(self.max_abs)]


Edges = LinearEdges | SignedLogEdges


def edges_from_dict(data: dict[str, Any]) -> Edges:
    """Inverse of ``to_dict()`` of either edges type."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind == LinearEdges.KIND:
        return LinearEdges(float(data["lo"]), float(data["hi"]), int(data["bins"]))
    if kind == SignedLogEdges.KIND:
        return SignedLogEdges(**{k: float(v) for k, v in data.items()})
    raise ValueError(f"unknown histogram edges kind {kind!r}")


def _edges_from_params(params: Tensor) -> Edges:
    kind, a, b, c = params.tolist()
    if kind == 0.0:
        return LinearEdges(a, b, int(c))
    if kind == 1.0:
        return SignedLogEdges(a, b, c)
    raise ValueError(f"unknown histogram edges code {kind}")


# --------------------------------------------------------------------------- Histogram


class Histogram(Accumulator):
    """Counts of a tensor's values on fixed edges; merges add the counts.

    Args:
        edges: ``LinearEdges`` or ``SignedLogEdges``, fixed before counting.
        device: where the state starts; it follows the inputs of ``update``.

    State: edges_spec (4,) float64 (the edges' parameters), counts (num_bins,) int64,
    nan_count and inf_count () int64.
    """

    STATE = ("edges_spec", "counts", "nan_count", "inf_count")

    def __init__(self, edges: Edges, device: torch.device | str | None = None):
        self.edges = edges
        self.edges_spec = torch.tensor(edges._params(), dtype=F64, device=device)
        self.counts = torch.zeros(edges.num_bins, dtype=I64, device=device)
        self.nan_count = torch.zeros((), dtype=I64, device=device)
        self.inf_count = torch.zeros((), dtype=I64, device=device)

    def _validate(self) -> None:
        self.edges = _edges_from_params(self.edges_spec)
        if self.counts.shape != (self.edges.num_bins,):
            raise ValueError(
                f"Histogram counts shape {tuple(self.counts.shape)} does not match its edges "
                f"({self.edges.num_bins} bins)"
            )

    @property
    def total(self) -> int:
        """Number of finite values counted."""
        return int(self.counts.sum())

    def update(self, x: Tensor, stride: int = 1) -> None:
        """Counts the finite values of ``x``; NaN and ±Inf are counted apart.

        Contiguous float32 CPU tensors on a ``SignedLogEdges`` grid are counted in one
        pass by ``fused.signed_log_counts`` (the same counts); everything else by PyTorch.

        Args:
            x: any shape, any float dtype.
            stride: token subsample: ``x`` is viewed as rows of its last axis,
                (−1, x.shape[-1]), and every ``stride``-th row is counted with all its
                elements (for a Linear input (..., C): every stride-th token). Record the
                stride with the results: counts are then of a subsample.
        """
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if x.device != self.device:
            self.to(x.device)
        if x.numel() == 0:
            return
        x = x.detach()
        tables = (
            fused.bit_tables(self.edges)
            if isinstance(self.edges, SignedLogEdges) and fused.covers_histogram(x)
            else None
        )
        if tables is not None:
            counts = self.counts.clone()  # the state is replaced, never written in place
            nan, inf = fused.signed_log_counts(x, tables, stride, counts)
            self.counts = counts
            self.nan_count = self.nan_count + nan
            self.inf_count = self.inf_count + inf
            return
        rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        values = (rows[::stride] if stride > 1 else rows).reshape(-1)
        # NaN and ±Inf propagate into the sum (an overflowing sum only takes the slow path).
        total = values.sum(dtype=F64 if values.dtype == F64 else torch.float32)
        if not bool(torch.isfinite(total)):
            finite = torch.isfinite(values)
            nan = torch.isnan(values).sum()
            self.nan_count = self.nan_count + nan
            self.inf_count = self.inf_count + (values.numel() - finite.sum() - nan)
            values = values[finite]
        bins = self.edges._bins(values)
        self.counts = self.counts + torch.bincount(bins, minlength=self.edges.num_bins)

    def merge(self, other: Histogram) -> Histogram:
        """Adds ``other``'s counts (edges must be equal); returns self."""
        other = self._mergeable(other)
        if other.edges != self.edges:
            raise ValueError(f"cannot merge histograms on {other.edges} into {self.edges}")
        self.counts = self.counts + other.counts
        self.nan_count = self.nan_count + other.nan_count
        self.inf_count = self.inf_count + other.inf_count
        return self

    def bin_edges(self) -> Tensor:
        """(num_bins + 1,) float64 boundaries on the state's device."""
        return _edge_table(self.edges, self.device)

    def quantile(self, q: float | Tensor) -> Tensor:
        """Quantiles estimated from the counts.

        The q-quantile is taken at order-statistic position r = q·(N − 1) (numpy's
        "linear" convention): the bin holding that position is found from the cumulative
        counts, and the count values of a bin are taken as spread evenly across it,
        value i of c at lo + (i + 0.5)/c·(hi − lo). Open end bins return their finite
        boundary. The estimate lies in the bin of the order statistic below r, or at its
        upper edge, so for ``SignedLogEdges`` it is within relative error γ − 1 of the
        exact quantile when the neighbouring order statistics share a log bin.

        Args:
            q: scalar or tensor of probabilities in [0, 1].

        Returns:
            float64 tensor shaped like ``q``; NaN when the histogram is empty.
        """
        q = torch.as_tensor(q, dtype=F64, device=self.device)
        if bool(((q < 0) | (q > 1)).any()):
            raise ValueError("quantile probabilities must lie in [0, 1]")
        counts = self.counts.to(F64)
        total = counts.sum()
        if total == 0:
            return torch.full_like(q, math.nan)
        cum = counts.cumsum(0)
        r = q * (total - 1.0)
        b = torch.searchsorted(cum, r.reshape(-1), right=True).clamp_(max=counts.numel() - 1)
        edges = self.bin_edges()
        lo, hi = edges[b], edges[b + 1]
        before = cum[b] - counts[b]
        frac = ((r.reshape(-1) - before + 0.5) / counts[b]).clamp_(0.0, 1.0)
        inside = lo + frac * (hi - lo)
        value = torch.where(torch.isinf(lo), hi, torch.where(torch.isinf(hi), lo, inside))
        return value.reshape(q.shape)


# --------------------------------------------------------------------------- TemporalFeatures


class TemporalFeatures(Accumulator):
    """Full input vectors of a timestep-embedding layer, one per timestep value.

    The vectors depend on the timestep only, so a timestep seen twice must carry the same
    vector: max|a − b| ≤ 1e-6·max|b| over the vector, else ValueError. The vector seen first
    is kept.

    State: timesteps (T,) float64, sorted ascending; vectors (T, D) float64.
    """

    STATE = ("timesteps", "vectors")
    RTOL = 1e-6

    def __init__(self, device: torch.device | str | None = None):
        self.timesteps = torch.zeros(0, dtype=F64, device=device)
        self.vectors = torch.zeros(0, 0, dtype=F64, device=device)

    def _validate(self) -> None:
        if self.timesteps.ndim != 1 or self.vectors.ndim != 2:
            raise ValueError("TemporalFeatures state needs timesteps (T,) and vectors (T, D)")
        if self.vectors.shape[0] != self.timesteps.shape[0]:
            raise ValueError("TemporalFeatures: timesteps and vectors differ in length")

    def update(self, vectors: Tensor, timesteps: Tensor | Sequence[float]) -> None:
        """Adds vectors (N, D) recorded at timesteps (N,)."""
        vectors = vectors.detach()
        if vectors.device != self.device:
            self.to(vectors.device)
        timesteps = torch.as_tensor(timesteps, device=vectors.device).detach().to(F64)
        if vectors.ndim != 2 or timesteps.shape != (vectors.shape[0],):
            raise ValueError(
                f"expected vectors (N, D) and timesteps (N,), got {tuple(vectors.shape)} and "
                f"{tuple(timesteps.shape)}"
            )
        if not bool(torch.isfinite(timesteps).all()):
            raise ValueError("timesteps must be finite")
        self._union(timesteps, vectors.to(F64))

    def merge(self, other: TemporalFeatures) -> TemporalFeatures:
        """Union of the timesteps; returns self."""
        other = self._mergeable(other)
        self._union(other.timesteps, other.vectors)
        return self

    def _union(self, timesteps: Tensor, vectors: Tensor) -> None:
        if timesteps.numel() == 0:
            return
        if self.timesteps.numel() == 0:
            old_v = vectors.new_zeros(0, vectors.shape[1])
        elif vectors.shape[1] != self.vectors.shape[1]:
            raise ValueError(
                f"cannot add vectors of dimension {vectors.shape[1]} to {self.vectors.shape[1]}"
            )
        else:
            old_v = self.vectors
        ts = torch.cat([self.timesteps, timesteps])
        vs = torch.cat([old_v, vectors])
        ts, order = torch.sort(ts, stable=True)
        vs = vs[order]
        first = torch.ones_like(ts, dtype=torch.bool)
        first[1:] = ts[1:] != ts[:-1]
        group = first.cumsum(0) - 1
        reference = vs[first][group]
        diff = (vs - reference).abs().amax(1)
        scale = reference.abs().amax(1)
        bad = ~(diff <= self.RTOL * scale)
        if bool(bad.any()):
            t = ts[bad][0].item()
            raise ValueError(f"timestep {t} carries two different vectors")
        self.timesteps, self.vectors = ts[first], vs[first]

    def as_matrix(self) -> tuple[Tensor, Tensor]:
        """Returns (timesteps (T,) ascending, vectors (T, D))."""
        return self.timesteps, self.vectors


# --------------------------------------------------------------------------- Reservoir


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (``>>`` is arithmetic), as a new tensor."""
    return (z >> s).bitwise_and_((1 << (64 - s)) - 1)


def _mix64_(z: Tensor) -> Tensor:
    """splitmix64's finaliser, a bijection on 64 bits (int64 arithmetic wraps mod 2^64).

    Works in place on ``z`` (a temporary of the caller's), and returns it.
    """
    z ^= _shr(z, 30)
    z *= _MIX1
    z ^= _shr(z, 27)
    z *= _MIX2
    z ^= _shr(z, 31)
    return z


def _fold_int(h: int, field: int) -> int:
    """One step h = mix((h XOR f) + golden) of ``row_key`` in Python ints.

    h is the unsigned value in [0, 2^64); ``field`` may be negative (its int64 bits).
    Masking to 64 bits after each + and × gives int64's wrap-around, and ``>>`` of an
    unsigned value is the logical shift.
    """
    z = ((h ^ field) + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _timestep_bits(timestep: float) -> int:
    """The bits of a float64 timestep as a signed int (−0.0 as 0.0)."""
    return struct.unpack("=q", struct.pack("=d", float(timestep) + 0.0))[0]


def _key_prefix(seed: int, sample_id: int, timestep: float, branch: int) -> int:
    """h of ``row_key`` after every field but the row, as a signed (int64) value."""
    h = seed & _MASK64
    for field in (sample_id, _timestep_bits(timestep), branch):
        h = _fold_int(h, field)
    return _signed(h)


def _finish_key(prefix: Tensor | int, row: Tensor) -> Tensor:
    """The key from the prefix h and the row: mix((h XOR row) + golden), low 63 bits."""
    return _mix64_((prefix ^ row).add_(_GOLDEN)).bitwise_and_(_MASK63)


@functools.lru_cache(maxsize=4)
def _call_keys(
    seed: int, sample_ids: tuple[int, ...], timestep: float, branch: int, rows: int, device
) -> Tensor:
    """(n·R,) the keys of every row of one denoiser call's samples, sample-major.

    Only the row varies among a sample's rows: the other fields are folded once per sample
    on the host, and the keys take one vector mix. Every layer of a call with as many rows
    gets the same keys, so they are kept for the next layers (callers never modify them).
    """
    prefixes = [_key_prefix(seed, s, timestep, branch) for s in sample_ids]
    row_index = torch.arange(rows, dtype=I64, device=device)
    prefix = torch.tensor(prefixes, dtype=I64, device=device)
    return _finish_key(prefix[:, None], row_index[None, :]).reshape(-1)


def row_key(
    seed: int,
    sample_id: Tensor | int,
    timestep: float,
    branch: Tensor | int,
    row: Tensor | int,
) -> Tensor:
    """The 63-bit sampling key of a row; identical on every device and for any batching.

    h = seed, then for each field f of (sample_id, bits of float64 timestep, branch, row):
    h = mix((h XOR f) + 0x9E3779B97F4A7C15) with mix = splitmix64's finaliser, all mod
    2^64; the key is the low 63 bits of h (a non-negative int64).

    When sample_id and branch are ints, the fields before the row are folded on the host
    in exact integer arithmetic and only the last step runs on tensors.

    Args:
        seed: the collection seed.
        sample_id, branch, row: int64 tensors (broadcast together) or ints.
        timestep: the timestep value (−0.0 hashes as 0.0).

    Returns:
        int64 tensor of the broadcast shape, on the device of ``sample_id`` (of ``row``
        when ``sample_id`` and ``branch`` are ints).
    """
    if isinstance(sample_id, int) and isinstance(branch, int):
        prefix = _key_prefix(seed, sample_id, timestep, branch)
        return _finish_key(prefix, torch.as_tensor(row, dtype=I64))
    sample_id = torch.as_tensor(sample_id, dtype=I64)
    device = sample_id.device
    h = torch.full((), seed, dtype=I64, device=device)
    for field in (
        sample_id,
        _timestep_bits(timestep),
        torch.as_tensor(branch, device=device),
        torch.as_tensor(row, device=device),
    ):
        h = _mix64_((h ^ field) + _GOLDEN)
    return h & _MASK63


def _lexsort(columns: Sequence[Tensor]) -> Tensor:
    """Permutation sorting by columns[0], then columns[1], ... (all ascending)."""
    order = torch.arange(columns[0].numel(), device=columns[0].device)
    for col in reversed(columns):
        order = order[torch.sort(col[order], stable=True).indices]
    return order


ROW_ID_FIELDS = ("keys", "sample_ids", "timesteps", "branches", "row_indices")


def _bottom_k(ids: dict[str, Tensor], k: int) -> Tensor:
    """Positions of the k smallest distinct (key, sample_id, timestep, branch, row).

    Equal rows have equal keys, so the tie-breaking sort and the de-duplication are only
    needed when some key occurs twice (rare with 63-bit keys). Among equal rows the
    earliest position wins.
    """
    keys = ids["keys"]
    order = torch.sort(keys, stable=True).indices
    sorted_keys = keys[order]
    if not bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
        return order[:k]
    columns = [ids[f] for f in ROW_ID_FIELDS]
    order = _lexsort(columns)
    columns = [c[order] for c in columns]
    distinct = torch.ones_like(order, dtype=torch.bool)
    same = torch.ones_like(distinct[1:])
    for c in columns:
        same &= c[1:] == c[:-1]
    distinct[1:] = ~same
    return order[distinct][:k]


class Reservoir(Accumulator):
    """A bounded bottom-k sample of input rows.

    Every row gets the key ``row_key(seed, sample_id, timestep, branch, row)``; the
    reservoir keeps the ``capacity`` rows with the smallest (key, sample_id, timestep,
    branch, row). The kept set is a function of the set of rows seen, so it does not
    depend on batching, sharding or the order of updates and merges. A row is identified
    by (sample_id, timestep, branch, row): seeing it twice keeps one copy.

    Rows live in slots: an update writes its few winning rows over the evicted ones in
    place instead of rebuilding the (k, C) table. ``state_dict`` returns the canonical
    form, sorted by (key, sample_id, timestep, branch, row) (copies, not the live slots).

    Args:
        capacity: rows kept, k.
        channels: C, the length of a row.
        seed: the key seed.
        device: where the state starts; it follows the inputs of ``update``.

    State: config (3,) int64 [capacity, channels, seed]; rows (k', C) float32; keys,
    sample_ids, branches, row_indices (k',) int64; timesteps (k',) float64; k' ≤ k.
    """

    STATE = ("config", "rows", *ROW_ID_FIELDS)

    def __init__(
        self, capacity: int, channels: int, seed: int, device: torch.device | str | None = None
    ):
        if capacity < 1 or channels < 1:
            raise ValueError(f"capacity and channels must be >= 1, got {capacity}, {channels}")
        self.config = torch.tensor([capacity, channels, seed], dtype=I64, device=device)
        self.rows = torch.zeros(0, channels, dtype=torch.float32, device=device)
        for name in ROW_ID_FIELDS:
            dtype = F64 if name == "timesteps" else I64
            setattr(self, name, torch.zeros(0, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return int(self.config[0])

    @property
    def channels(self) -> int:
        return int(self.config[1])

    @property
    def seed(self) -> int:
        return int(self.config[2])

    def __len__(self) -> int:
        return self.keys.shape[0]

    def state_dict(self) -> dict[str, Tensor]:
        """The state in canonical order (new tensors)."""
        order = _lexsort([getattr(self, f) for f in ROW_ID_FIELDS])
        return {"config": self.config, **{k: getattr(self, k)[order] for k in self.STATE[1:]}}

    def _validate(self) -> None:
        n = self.keys.shape[0]
        if self.config.shape != (3,) or self.rows.shape != (n, self.channels) or n > self.capacity:
            raise ValueError("Reservoir state has inconsistent shapes")
        if any(getattr(self, k).shape != (n,) for k in ROW_ID_FIELDS):
            raise ValueError("Reservoir state has inconsistent shapes")

    def update(
        self, rows: Tensor, sample_ids: Tensor | Sequence[int], timestep: float, branch: int
    ) -> None:
        """Offers the rows of one call.

        Args:
            rows: (n, R, C): R rows (tokens, positions) of each of n samples.
            sample_ids: (n,) global sample ids, ints or an int64 tensor. The keys are
                hashed from them on the host, so a device tensor costs a host sync.
            timestep: the timestep value of the call.
            branch: the CFG branch index.
        """
        if rows.ndim != 3 or rows.shape[2] != self.channels:
            raise ValueError(f"expected rows (n, R, {self.channels}), got {tuple(rows.shape)}")
        if rows.device != self.device:
            self.to(rows.device)
        n, r = rows.shape[:2]
        device = rows.device
        ids = torch.as_tensor(sample_ids, dtype=I64)
        if ids.shape != (n,):
            raise ValueError(f"expected sample_ids ({n},), got {tuple(ids.shape)}")
        keys = _call_keys(self.seed, tuple(ids.tolist()), float(timestep), int(branch), r, device)
        # Only keys at or below the current k-th key, and among the k smallest new keys,
        # can be kept: the other rows are never copied. Once the reservoir is full, few
        # keys pass the first test, and the k-th new key is only sought among those.
        picked = None  # every row
        if len(self) == self.capacity:
            picked = (keys <= self.keys.max()).nonzero().squeeze(1)
        if (keys.numel() if picked is None else picked.numel()) > self.capacity:
            candidates = keys if picked is None else keys[picked]
            kth = torch.kthvalue(candidates, self.capacity).values
            picked = (keys <= kth).nonzero().squeeze(1)
        if picked is None:
            picked = torch.arange(keys.numel(), device=device)
        elif picked.numel() == 0:
            return
        m = picked.numel()
        self._insert(
            {
                "rows": rows.detach().reshape(n * r, self.channels)[picked].to(torch.float32),
                "keys": keys[picked],
                "sample_ids": ids.to(device)[picked // r],
                "timesteps": torch.full((m,), float(timestep), dtype=F64, device=device),
                "branches": torch.full((m,), int(branch), dtype=I64, device=device),
                "row_indices": picked % r,
            }
        )

    def merge(self, other: Reservoir) -> Reservoir:
        """Union, then bottom-k; returns self."""
        other = self._mergeable(other)
        if not torch.equal(other.config, self.config):
            raise ValueError(
                f"cannot merge a reservoir with [capacity, channels, seed] "
                f"{other.config.tolist()} into {self.config.tolist()}"
            )
        self._insert({k: getattr(other, k) for k in self.STATE[1:]})
        return self

    def _insert(self, new: dict[str, Tensor]) -> None:
        """Keeps the bottom-k of the current slots and the ``new`` rows."""
        size = len(self)
        ids = {f: torch.cat([getattr(self, f), new[f]]) for f in ROW_ID_FIELDS}
        keep = _bottom_k(ids, self.capacity)
        kept = torch.zeros(size + new["keys"].numel(), dtype=torch.bool, device=self.device)
        kept[keep] = True
        # Each kept new row takes an evicted slot; the rest are appended (filling up).
        # There are never more evicted slots than kept new rows: the old rows are distinct.
        evicted = (~kept[:size]).nonzero().squeeze(1)
        incoming = kept[size:].nonzero().squeeze(1)
        reuse = evicted.numel()
        slots, src, extra = evicted, incoming[:reuse], incoming[reuse:]
        for name in self.STATE[1:]:
            field = getattr(self, name)
            field[slots] = new[name][src]
            if extra.numel():
                field = torch.cat([field, new[name][extra]])
            setattr(self, name, field)


ACCUMULATORS: dict[str, type[Accumulator]] = {
    cls.__name__: cls for cls in (ChannelMoments, Histogram, TemporalFeatures, Reservoir)
}
