"""Fake-quantization primitives: pure functions on tensors (simulated integers in float).

Uniform affine quantization with b bits (2 ≤ b ≤ 16), scale Δ and integer zero point z:

    x̂ = (clamp(round(x·(1/Δ)) + z, q_min, q_max) − z)·Δ

with ``round`` half to even and [q_min, q_max] = [0, 2^b − 1] (asymmetric) or
[−2^(b−1), 2^(b−1) − 1] (symmetric, z = 0). On float32 inputs this is exactly what
``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``
compute (they multiply by the float32 reciprocal of the scale too); float64 inputs are
computed in float64, half-precision inputs in float32 and cast back.

Parameters from a range [lo, hi] (``affine_qparams``):
- asymmetric, as PyTorch's MinMaxObserver: the range is first widened to contain 0
  (lo ← min(lo, 0), hi ← max(hi, 0)) so that 0 is a level and is quantized exactly;
  Δ = (hi − lo)/(2^b − 1) and z = clamp(q_min − round(lo/Δ), q_min, q_max);
- symmetric: Δ = max(|lo|, |hi|)/(2^(b−1) − 1) and z = 0, so ±max|x| are both levels;
  the extra code −2^(b−1) is only reached by values below −max|x| (clipped ranges).
Δ is at least ``EPS`` (float32 machine epsilon, as PyTorch), so lo = hi (constant data)
gives a valid quantizer. Scales are float32 and zero points int32, the dtypes of torch's
per-channel kernel.

Level sets (codebooks): ``fake_quant_levels`` rounds each value to the nearest of a sorted
set of levels, comparing with the midpoints m_i = (l_i + l_(i+1))/2 (computed in the
input's dtype); a value exactly at a midpoint goes to the upper level (towards +inf), and
values beyond the ends go to the end levels. The constructors return float64 levels,
sorted ascending, distinct, with an exact 0 among them:

- ``uniform_levels(lo, hi, b)``: the 2^b levels (q − z)·Δ, q = 0..2^b − 1, of the
  asymmetric affine quantizer of [lo, hi];
- ``signed_log_levels(s, b, base)``: 0; 2^(b−1) positive levels s·base^−k,
  k = 0..2^(b−1) − 1; 2^(b−1) − 1 negative levels −s_neg·base^−k, k = 0..2^(b−1) − 2
  (s_neg = s unless given). Zero takes one code of the negative half, as in two's
  complement but mirrored: the positive side keeps the extra level because temporal
  features have their long tail there;
- ``mixed_levels(lo, hi, b, e, k)``: k levels at or below the edge e — 0, n_neg negative
  log levels lo·base^−j (j = 0..n_neg − 1, the lowest at lo) and n_pos = k − 1 − n_neg
  positive log levels e·base^−j (j = 0..n_pos − 1, the highest at e) — and 2^b − k
  uniform levels e + (hi − e)·j/(2^b − k), j = 1..2^b − k, above it (the highest at hi).
  By default n_neg = (k − 1)//2 when lo < 0, else 0.

Each constructor returns exactly 2^b levels unless the set is degenerate: log levels that
underflow float64 to 0 (e.g. base 2 with b ≥ 11) are dropped, and a zero scale leaves the
single level 0. ``fake_quant_levels`` casts the levels to the input's dtype, where very
small ones may merge; it still rounds to the nearest representable level.

Error measures: ``lp_error`` (mean |x − x̂|^p, p = 2.4 as in Q-Diffusion / BRECQ) and
``sqnr_db``.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from qvd_bench.errors import UserError

F64 = torch.float64
F32 = torch.float32
# Smallest scale, as torch.ao.quantization observers (float32 machine epsilon).
EPS = float(torch.finfo(torch.float32).eps)
LOG_BASES = (2.0, 2.0**0.5, 2.0**0.25)


# --------------------------------------------------------------------------- bit-widths


def check_bits(bits: int) -> int:
    """Returns ``bits`` as an int if it is an integer in 2..16, else raises UserError."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise UserError(f"bit-width must be an integer between 2 and 16, got {bits!r}")
    if not 2 <= bits <= 16:
        raise UserError(f"bit-width must be between 2 and 16, got {bits}")
    return int(bits)


def quant_range(bits: int, symmetric: bool = False) -> tuple[int, int]:
    """The integer codes (q_min, q_max) of a b-bit quantizer.

    Returns:
        (0, 2^b − 1) when asymmetric, (−2^(b−1), 2^(b−1) − 1) when symmetric.
    """
    bits = check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def quant_levels(
    values: Tensor | np.ndarray | float,
    lo: Tensor | np.ndarray | float,
    hi: Tensor | np.ndarray | float,
    bits: int,
) -> Tensor:
    """Levels q(v) = clamp(round((v − lo)/Δ), 0, 2^b − 1) of a uniform b-bit quantizer.

    The level index used by coverage measurements (DESIGN section 4): Δ = (hi − lo)/(2^b − 1)
    on the range exactly as given (not widened to contain 0), round half to even.

    Args:
        values: any shape.
        lo, hi: the quantizer's range, broadcastable with ``values``; lo ≤ hi. Where
            hi = lo every value is at level 0.
        bits: b, an integer in 2..16.

    Returns:
        int64 tensor of the broadcast shape (float64 arithmetic).
    """
    top = 2 ** check_bits(bits) - 1
    v, lo, hi = (torch.as_tensor(a, dtype=F64) for a in (values, lo, hi))
    if bool((hi < lo).any()):
        raise ValueError("quantizer range needs lo <= hi")
    step = (hi - lo) / top
    spread = step > 0
    level = torch.round((v - lo) / torch.where(spread, step, 1.0)).clamp(0, top)
    return torch.where(spread, level, 0.0).to(torch.int64)


# --------------------------------------------------------------------------- affine


def affine_qparams(
    lo: Tensor | float, hi: Tensor | float, bits: int, symmetric: bool = False
) -> tuple[Tensor, Tensor]:
    """Scale and zero point of a b-bit affine quantizer covering [lo, hi].

    Rules in the module doc: asymmetric ranges are widened to contain 0; Δ ≥ ``EPS``.
    Computed in float64, or in float32 when both bounds are float32 tensors (as dynamic
    quantization does), then rounded to the returned dtypes.

    Args:
        lo, hi: any broadcastable shapes (a scalar per tensor, (C,) per channel, (..., 1)
            per token); lo ≤ hi where both are finite.
        bits: b, an integer in 2..16.
        symmetric: signed codes and z = 0.

    Returns:
        (scale float32, zero_point int32), both of the broadcast shape.

    Raises:
        UserError: bits out of range, or a non-finite or reversed range.
    """
    q_min, q_max = quant_range(bits, symmetric)
    # Python numbers count as float64: only float32 tensors keep float32 arithmetic.
    lo, hi = (a if isinstance(a, Tensor) else torch.tensor(a, dtype=F64) for a in (lo, hi))
    dtype = F32 if lo.dtype == F32 and hi.dtype == F32 else F64
    lo, hi = lo.to(dtype), hi.to(device=lo.device, dtype=dtype)
    if not bool((torch.isfinite(lo) & torch.isfinite(hi)).all()):
        raise UserError("quantizer range must be finite (no data, or NaN/Inf in the statistics?)")
    if bool((lo > hi).any()):
        raise UserError("quantizer range needs lo <= hi")
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / q_max).clamp(min=EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return scale.to(F32), zero_point
    scale = ((hi - lo) / (q_max - q_min)).clamp(min=EPS)
    zero_point = (q_min - torch.round(lo / scale)).clamp(q_min, q_max)
    return scale.to(F32), zero_point.to(torch.int32)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return F64 if x.dtype == F64 else F32


def per_tensor_constants(
    scale: float, zero_point: int, q_min: int, q_max: int, dtype: torch.dtype = F32
) -> tuple[float, float, int, int]:
    """The four numbers ``fake_quant_constants`` needs, computed once per quantizer.

    Args:
        scale, zero_point: per-tensor qparams as Python numbers.
        q_min, q_max: the integer codes.
        dtype: the compute dtype (float32 for everything but float64 inputs).

    Returns:
        (step Δ, its reciprocal, q_min − z, q_max − z); for float32, Δ and 1/Δ rounded to
        float32 as torch's kernels use them.
    """
    if dtype == F64:
        return float(scale), 1.0 / float(scale), q_min - zero_point, q_max - zero_point
    step = float(np.float32(scale))
    inverse = float(np.float32(1.0) / np.float32(step))
    return step, inverse, q_min - zero_point, q_max - zero_point


def fake_quant_constants(x: Tensor, constants: tuple[float, float, int, int]) -> Tensor:
    """Per-tensor fake quant from ``per_tensor_constants``: four passes, no new tensors.

    ``x`` must already be in the dtype the constants were made for.
    """
    step, inverse, low, high = constants
    return torch.mul(x, inverse).round_().clamp_(low, high).mul_(step)


def fake_quant(
    x: Tensor, scale: Tensor | float, zero_point: Tensor | int, q_min: int, q_max: int
) -> Tensor:
    """(clamp(round(x·(1/Δ)) + z, q_min, q_max) − z)·Δ with broadcasting qparams.

    The common kernel behind the affine functions; no validation. Computed as
    clamp(round(x·(1/Δ)), q_min − z, q_max − z)·Δ, the same numbers in fewer passes
    (integers below 2^24 are exact in float32).

    Args:
        x: any shape.
        scale, zero_point: broadcastable with ``x``; a Python float and int take a path
            that creates no tensors for them, and a Python int zero point with a tensor
            scale clamps in one pass (the same numbers).
        q_min, q_max: the integer codes.

    Returns:
        Shaped and typed like ``x``.
    """
    dtype = _compute_dtype(x)
    xc = x.to(dtype)
    if isinstance(scale, float) and isinstance(zero_point, int):
        constants = per_tensor_constants(scale, zero_point, q_min, q_max, dtype)
        return fake_quant_constants(xc, constants).to(x.dtype)
    scale = torch.as_tensor(scale, device=x.device).to(dtype)
    # Multiply by the reciprocal (not divide) as torch's kernels do: identical rounding.
    q = torch.mul(xc, torch.reciprocal(scale)).round_()
    if isinstance(zero_point, int):
        q.clamp_(q_min - zero_point, q_max - zero_point)
    else:
        zero_point = torch.as_tensor(zero_point, device=x.device).to(dtype)
        # clamp_min_/clamp_max_: several times faster on CPU than clamp with two tensor
        # bounds.
        q.clamp_min_(q_min - zero_point).clamp_max_(q_max - zero_point)
    return q.mul_(scale).to(x.dtype)


def fake_quant_affine(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | int,
    bits: int,
    axis: int | None = None,
    symmetric: bool = False,
) -> Tensor:
    """Uniform affine fake quantization, per tensor or per channel.

    Args:
        x: any shape.
        scale: a scalar (per tensor) or (x.shape[axis],) (per channel).
        zero_point: like ``scale``; integers in the code range.
        bits: b, an integer in 2..16.
        axis: the channel axis for per-channel parameters; None for per tensor.
        symmetric: signed codes [−2^(b−1), 2^(b−1) − 1] instead of [0, 2^b − 1].

    Returns:
        Shaped and typed like ``x``; at most 2^b distinct values per tensor (per channel).
    """
    q_min, q_max = quant_range(bits, symmetric)
    scale = torch.as_tensor(scale, device=x.device)
    zero_point = torch.as_tensor(zero_point, device=x.device)
    if axis is not None:
        axis = axis % x.ndim
        channels = x.shape[axis]
        if scale.shape != (channels,) or zero_point.shape != (channels,):
            raise ValueError(
                f"per-channel qparams need shape ({channels},), got scale "
                f"{tuple(scale.shape)} and zero_point {tuple(zero_point.shape)}"
            )
        shape = [1] * x.ndim
        shape[axis] = channels
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    elif scale.numel() != 1 or zero_point.numel() != 1:
        raise ValueError("per-tensor qparams must be scalars; pass axis for per-channel ones")
    return fake_quant(x, scale, zero_point, q_min, q_max)


def fake_quant_dynamic_per_token(
    x: Tensor, bits: int, channel_dim: int = -1, clip_ratio: float = 1.0
) -> Tensor:
    """Dynamic per-token asymmetric fake quantization (ViDiT-Q style).

    A token is one position of every axis but ``channel_dim``; each token is quantized with
    the qparams of its own [min, max] (widened to contain 0, as ``affine_qparams``) times
    ``clip_ratio``, computed on the fly in float32 (float64 for float64 inputs).

    Args:
        x: any shape with channels on ``channel_dim`` (−1 for Linear inputs, 1 for conv).
        bits: b, an integer in 2..16.
        channel_dim: the axis reduced to find each token's range.
        clip_ratio: in (0, 1]: the share of each token's range kept (values beyond are
            clipped), calibrated offline per layer (``observers.token_clip_ratio``).

    Returns:
        Shaped and typed like ``x``; at most 2^b distinct values per token.
    """
    q_min, q_max = quant_range(bits)
    xc = x.to(_compute_dtype(x))
    # amin and amax, not aminmax: two reductions are faster on CPU than the fused one.
    lo = xc.amin(dim=channel_dim, keepdim=True).clamp_(max=0.0)
    hi = xc.amax(dim=channel_dim, keepdim=True).clamp_(min=0.0)
    if clip_ratio != 1.0:
        lo, hi = lo * clip_ratio, hi * clip_ratio
    # affine_qparams inlined: no validation or dtype round trips in the forward path.
    scale = ((hi - lo) / (q_max - q_min)).clamp_(min=EPS)
    zero_point = (q_min - torch.round(lo / scale)).clamp_(q_min, q_max)
    return fake_quant(xc, scale, zero_point, q_min, q_max).to(x.dtype)


# --------------------------------------------------------------------------- timestep groups


def timestep_groups(timesteps: Sequence[float], groups: int) -> list[list[float]]:
    """Splits timestep values into contiguous, (nearly) equal-size groups.

    The distinct values are sorted descending (the order samplers run them) and cut into
    ``groups`` runs; when they do not divide evenly the first groups get one more value
    (as ``numpy.array_split``).

    Args:
        timesteps: timestep values, e.g. those of a statistics run.
        groups: the number of groups, 1..len(distinct timesteps).

    Returns:
        ``groups`` lists of float timestep values, descending within and across groups.

    Raises:
        UserError: no timesteps, or ``groups`` out of range.
    """
    values = sorted({float(t) for t in timesteps}, reverse=True)
    if not values:
        raise UserError("no timesteps to group: the statistics have no timestep values")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise UserError(f"timestep groups must be a positive integer, got {groups!r}")
    if groups > len(values):
        raise UserError(
            f"cannot make {groups} timestep groups from {len(values)} timesteps; "
            f"use at most {len(values)} groups"
        )
    return [[float(t) for t in part] for part in np.array_split(np.asarray(values), groups)]


class TimestepLookup:
    """Maps any timestep value to its group: the group of the nearest stored timestep.

    A value halfway between two stored timesteps takes the larger one (the earlier step
    of a sampler). Lookups are a bisection on the sorted stored values: cheap enough to
    run on every denoiser call.

    Args:
        groups: the output of ``timestep_groups`` (or any disjoint lists of values).
    """

    def __init__(self, groups: Sequence[Sequence[float]]):
        pairs = sorted((float(t), g) for g, part in enumerate(groups) for t in part)
        if not pairs:
            raise UserError("timestep groups are empty")
        values = [t for t, _ in pairs]
        if len(set(values)) != len(values):
            raise UserError("a timestep value appears in more than one group")
        self.values = values  # ascending
        self.group_ids = [g for _, g in pairs]
        self.groups = len(groups)

    def nearest(self, timestep: float) -> float:
        """The stored timestep value nearest to ``timestep``."""
        return self.values[self._position(float(timestep))]

    def __call__(self, timestep: float) -> int:
        """The group index (0-based, in the order of ``groups``) of ``timestep``."""
        return self.group_ids[self._position(float(timestep))]

    def _position(self, t: float) -> int:
        if math.isnan(t):
            raise ValueError("timestep is NaN")
        i = bisect.bisect_left(self.values, t)
        if i == 0:
            return 0
        if i == len(self.values):
            return i - 1
        # values[i - 1] < t <= values[i]: ties go to the larger value.
        return i if self.values[i] - t <= t - self.values[i - 1] else i - 1


def group_of(timestep: float, groups: Sequence[Sequence[float]]) -> int:
    """The index of the group holding the stored timestep nearest to ``timestep``.

    One-off form of ``TimestepLookup`` (build that once for repeated lookups).
    """
    return TimestepLookup(groups)(timestep)


# --------------------------------------------------------------------------- level sets


def _check_levels(levels: Tensor) -> Tensor:
    levels = torch.as_tensor(levels)
    if levels.ndim != 1 or levels.numel() == 0:
        raise ValueError(f"levels must be a non-empty 1-D tensor, got shape {tuple(levels.shape)}")
    if levels.numel() > 1 and bool((levels[1:] < levels[:-1]).any()):
        raise ValueError("levels must be sorted ascending")
    return levels


def level_midpoints(levels: Tensor, dtype: torch.dtype = F32) -> tuple[Tensor, Tensor]:
    """Levels and the midpoints between neighbours, in ``dtype`` (for ``fake_quant_levels``).

    Args:
        levels: (L,) sorted ascending.
        dtype: the dtype of the values to quantize.

    Returns:
        (levels (L,), midpoints (L − 1,)), both in ``dtype``.
    """
    levels = _check_levels(levels).to(dtype)
    return levels, (levels[:-1] + levels[1:]) * 0.5


def fake_quant_levels(x: Tensor, levels: Tensor, midpoints: Tensor | None = None) -> Tensor:
    """Rounds every value to the nearest level of a sorted set (codebook quantization).

    Ties (a value exactly at a midpoint) go to the upper level; NaN goes to the top level.

    Args:
        x: any shape.
        levels: (L,) sorted ascending.
        midpoints: (L − 1,) from ``level_midpoints`` to skip recomputing them.

    Returns:
        Shaped and typed like ``x``; every value is one of the levels (cast to x's dtype).
    """
    dtype = _compute_dtype(x)
    if midpoints is None:
        levels, midpoints = level_midpoints(levels, dtype)
    levels = levels.to(device=x.device, dtype=dtype)
    midpoints = midpoints.to(device=x.device, dtype=dtype)
    index = torch.bucketize(x.to(dtype), midpoints, right=True)
    return levels[index].to(x.dtype)


def uniform_levels(lo: float, hi: float, bits: int) -> Tensor:
    """The 2^b levels of the asymmetric affine quantizer of [lo, hi] (0 among them).

    ``fake_quant_levels(x, uniform_levels(lo, hi, b))`` equals
    ``fake_quant_affine(x, *affine_qparams(lo, hi, b), b)`` up to float rounding.

    Returns:
        (2^b,) float64, ascending.
    """
    q_min, q_max = quant_range(bits)
    scale, zero_point = affine_qparams(float(lo), float(hi), bits)
    codes = torch.arange(q_min, q_max + 1, dtype=F64)
    return (codes - float(zero_point)) * float(scale)


def _check_base(base: float) -> float:
    base = float(base)
    if not base > 1.0 or not math.isfinite(base):
        raise UserError(f"log base must be a finite number > 1, got {base}")
    return base


def _log_magnitudes(top: float, count: int, base: float) -> Tensor:
    """(count,) descending magnitudes top·base^−k, k = 0..count − 1, in float64."""
    k = torch.arange(count, dtype=F64)
    return top * torch.pow(torch.tensor(base, dtype=F64), -k)


def _finish_levels(parts: list[Tensor]) -> Tensor:
    """Sorted distinct levels, with magnitudes that underflowed to 0 merged into 0."""
    return torch.unique(torch.cat(parts))  # sorted ascending


def signed_log_levels(
    scale: float, bits: int, base: float = 2.0, negative_scale: float | None = None
) -> Tensor:
    """Signed log levels: 0, 2^(b−1) positive and 2^(b−1) − 1 negative powers of ``base``.

    Positive levels s·base^−k (k = 0..2^(b−1) − 1), negative −s_neg·base^−k
    (k = 0..2^(b−1) − 2), and 0: 2^b codes with the sign counted within b (layout in the
    module doc).

    Args:
        scale: s ≥ 0, the largest positive level.
        bits: b, an integer in 2..16.
        base: ratio between neighbouring magnitudes, > 1 (DESIGN: 2, √2, 2^¼).
        negative_scale: the largest negative magnitude; ``scale`` when None.

    Returns:
        (2^b,) float64, ascending; fewer when degenerate (zero scale, underflow).
    """
    bits, base = check_bits(bits), _check_base(base)
    s = float(scale)
    s_neg = s if negative_scale is None else float(negative_scale)
    if not (s >= 0 and s_neg >= 0 and math.isfinite(s) and math.isfinite(s_neg)):
        raise UserError(f"log level scales must be finite and >= 0, got {s}, {s_neg}")
    half = 2 ** (bits - 1)
    positive = _log_magnitudes(s, half, base)
    negative = -_log_magnitudes(s_neg, half - 1, base)
    return _finish_levels([negative, torch.zeros(1, dtype=F64), positive])


def mixed_levels(
    lo: float,
    hi: float,
    bits: int,
    edge: float,
    k: int,
    base: float = 2.0,
    negative: int | None = None,
) -> Tensor:
    """k log levels at or below an edge e, 2^b − k uniform levels above it.

    For skewed temporal features (mass near zero, a SiLU floor at −0.278, a long positive
    tail): the log levels are dense near 0 on both sides, the uniform ones spread the tail.
    Layout in the module doc.

    Args:
        lo: the lowest value to cover (≤ 0; a positive lo is taken as 0: no negative levels).
        hi: the highest value to cover, > edge.
        bits: b, an integer in 2..16.
        edge: e, with 0 < e < hi.
        k: levels at or below e, including 0: 1 ≤ k ≤ 2^b − 1.
        base: ratio between neighbouring log magnitudes, > 1.
        negative: how many of the k − 1 nonzero log levels are negative; default
            (k − 1)//2 when lo < 0, else 0.

    Returns:
        (2^b,) float64, ascending; fewer when degenerate (underflow).

    Raises:
        UserError: parameters out of range.
    """
    bits, base = check_bits(bits), _check_base(base)
    lo, hi, edge = float(lo), float(hi), float(edge)
    total = 2**bits
    if not all(math.isfinite(v) for v in (lo, hi, edge)):
        raise UserError(f"mixed levels need finite lo, hi, edge, got {lo}, {hi}, {edge}")
    if not 0.0 < edge < hi:
        raise UserError(f"mixed levels need 0 < edge < hi, got edge {edge}, hi {hi}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= total - 1:
        raise UserError(f"mixed levels need 1 <= k <= {total - 1} log levels, got {k!r}")
    lo = min(lo, 0.0)
    if negative is None:
        negative = (k - 1) // 2 if lo < 0 else 0
    if not 0 <= negative <= k - 1 or (negative > 0 and lo == 0):
        raise UserError(
            f"mixed levels: {negative} negative log levels do not fit (k = {k}, lo = {lo})"
        )
    uniform = total - k
    steps = torch.arange(1, uniform + 1, dtype=F64)
    parts = [
        -_log_magnitudes(-lo, negative, base),
        torch.zeros(1, dtype=F64),
        _log_magnitudes(edge, k - 1 - negative, base),
        edge + (hi - edge) * steps / uniform,
    ]
    return _finish_levels(parts)


# --------------------------------------------------------------------------- errors


def lp_error(x: Tensor, xq: Tensor, p: float = 2.4, dim: int | None = None) -> Tensor:
    """Mean Lp error mean(|x − x̂|^p), p = 2.4 by default (Q-Diffusion's range search).

    Args:
        x, xq: broadcastable shapes.
        p: the exponent, > 0.
        dim: reduce only this axis (e.g. per channel); all elements when None.

    Returns:
        float64 tensor: 0-d, or the broadcast shape without ``dim``.
    """
    diff = (torch.as_tensor(x).to(F64) - torch.as_tensor(xq).to(F64)).abs_()
    err = diff.square_() if p == 2 else diff.pow_(p)
    return err.mean() if dim is None else err.mean(dim)


def sqnr_db(reference: Tensor, test: Tensor) -> Tensor:
    """Signal-to-quantization-noise ratio 10·log10(Σ ref² / Σ (ref − test)²), in dB.

    Returns:
        0-d float64 tensor; +inf when test equals reference, NaN when both are all zero.
    """
    ref = torch.as_tensor(reference).to(F64)
    noise = (ref - torch.as_tensor(test).to(F64)).square().sum()
    signal = ref.square().sum()
    return 10.0 * torch.log10(signal / noise)
