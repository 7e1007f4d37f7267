"""Fake-quantization primitives: pure functions on tensors (simulated integers in float).

Uniform affine quantization with b bits (2 ≤ b ≤ 16), scale Δ and integer zero point z:

    x̂ = (clamp(round(x·(1/Δ)) + z, q_min, q_max) − z)·Δ

with ``round`` half to even and [q_min, q_max] = [0, 2^b − 1] (asymmetric) or
[−2^(b−1), 2^(b−1) − 1] (symmetric, z = 0). On float32 inputs this is exactly what
``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``
compute (they multiply by the float32 reciprocal of the scale too); float64 inputs are
computed in float64, half-precision inputs in float32 and cast back.

The grids themselves — bit-widths, code ranges, the parameters of a range
(``affine_qparams``) and level sets with nearest-level rounding — are in
``qvd_bench.numerics.grid``. Here: applying affine grids to tensors (per tensor, per
channel, dynamic per token), timestep groups, and the error measures ``lp_error``
(mean |x − x̂|^p, p = 2.4 as in Q-Diffusion / BRECQ) and ``sqnr_db``.
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
from qvd_bench.numerics.grid import EPS, F32, F64, compute_dtype, quant_range


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
    dtype = compute_dtype(x)
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
    xc = x.to(compute_dtype(x))
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
