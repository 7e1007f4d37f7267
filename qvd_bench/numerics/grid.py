"""Quantization-grid arithmetic: bit-widths, integer codes, affine parameters, level sets.

Shared by analysis (level coverage, TDScore quantizers), quant (fake quantization,
observers, methods) and report (quantizer figures); it imports nothing from them.

Uniform affine grids with b bits (2 ≤ b ≤ 16), scale Δ and integer zero point z: the
levels (q − z)·Δ for the codes q in [q_min, q_max] = [0, 2^b − 1] (asymmetric) or
[−2^(b−1), 2^(b−1) − 1] (symmetric, z = 0).

Parameters from a range [lo, hi] (``affine_qparams``):
- asymmetric, as PyTorch's MinMaxObserver: the range is first widened to contain 0
  (lo ← min(lo, 0), hi ← max(hi, 0)) so that 0 is a level and is quantized exactly;
  Δ = (hi − lo)/(2^b − 1) and z = clamp(q_min − round(lo/Δ), q_min, q_max);
- symmetric: Δ = max(|lo|, |hi|)/(2^(b−1) − 1) and z = 0, so ±max|x| are both levels;
  the extra code −2^(b−1) is only reached by values below −max|x| (clipped ranges).
Δ is at least ``EPS`` (float32 machine epsilon, as PyTorch), so lo = hi (constant data)
gives a valid quantizer. Scales are float32 and zero points int32, the dtypes of torch's
per-channel kernel.

The level index of coverage measurements (``quant_levels``) is that of the range exactly
as given: q(v) = clamp(round((v − lo)/Δ), 0, 2^b − 1), Δ = (hi − lo)/(2^b − 1).

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
"""

from __future__ import annotations

import math
import numbers

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

    The level index used by coverage measurements: Δ = (hi − lo)/(2^b − 1)
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


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype quantizers compute in: float64 for float64 inputs, float32 otherwise."""
    return F64 if x.dtype == F64 else F32


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
    dtype = compute_dtype(x)
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
        base: ratio between neighbouring magnitudes, > 1 (2, √2, 2^¼).
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
