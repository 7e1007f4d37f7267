"""Temporal discriminability (TDScore) of a quantizer on a temporal-feature layer.

For temporal features e_1..e_T (one per timestep of the grid) consumed by a layer with
weight W, y_i = W·e_i and ŷ_i = W·Q(e_i); over all pairs i < j with d_ij = ‖y_i − y_j‖₂ > 0
and d̂_ij = ‖ŷ_i − ŷ_j‖₂:

    TDScore = mean min(d̂_ij/d_ij, d_ij/d̂_ij)   (a pair with d̂_ij = 0 counts 0)

in [0, 1]: 1 keeps every distinction between timesteps as the consuming layer sees it, 0
collapses them. It is reported with the relative MSE ‖ŷ − y‖²/‖y‖² (Frobenius norms over
all timesteps) and the number of collisions (d̂_ij = 0 < d_ij). QVD names the score but
does not publish a formula: this is the project's definition.

The reference quantizers here are for analysis only (fake quantization: they return the
dequantized values); the quantization engine provides the real ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qvd_bench.analysis.channels import check_bits, quant_levels

F64 = torch.float64


def _pairwise(y: Tensor) -> Tensor:
    """Exact Euclidean distances (T, T): no matrix-product shortcut, so equal rows give 0."""
    return torch.cdist(y, y, compute_mode="donot_use_mm_for_euclid_dist")


def tdscore(features: Tensor, weight: Tensor, quantize: Callable[[Tensor], Tensor]) -> dict:
    """TDScore, relative MSE and collisions of ``quantize`` on one temporal-feature layer.

    Args:
        features: (T, D) temporal features e_i, one row per timestep of the grid.
        weight: (O, D) weight W of the layer that consumes them.
        quantize: maps (T, D) float64 features to their quantized (dequantized) values,
            same shape.

    Returns:
        tdscore (float, NaN when no pair has d_ij > 0), relative_mse (float, NaN when
        y = 0), collisions (int: pairs with d̂_ij = 0 < d_ij), pairs (int: pairs with
        d_ij > 0). All computed in float64.
    """
    e = torch.as_tensor(features).detach().to(F64)
    w = torch.as_tensor(weight).detach().to(device=e.device, dtype=F64)
    if e.ndim != 2 or w.ndim != 2 or w.shape[1] != e.shape[1]:
        raise ValueError(
            f"expected features (T, D) and weight (O, D), got {tuple(e.shape)} and {tuple(w.shape)}"
        )
    q = torch.as_tensor(quantize(e.clone())).detach().to(device=e.device, dtype=F64)
    if q.shape != e.shape:
        raise ValueError(f"quantize returned shape {tuple(q.shape)} for {tuple(e.shape)}")
    y, y_hat = e @ w.T, q @ w.T  # (T, O)
    i, j = torch.triu_indices(e.shape[0], e.shape[0], offset=1, device=e.device)
    d, d_hat = _pairwise(y)[i, j], _pairwise(y_hat)[i, j]
    keep = d > 0
    d, d_hat = d[keep], d_hat[keep]
    collapsed = d_hat == 0
    safe = torch.where(collapsed, 1.0, d_hat)
    ratio = torch.where(collapsed, 0.0, torch.minimum(d_hat / d, d / safe))
    pairs = int(keep.sum())
    norm = float(y.square().sum())
    return {
        "tdscore": float(ratio.mean()) if pairs else float("nan"),
        "relative_mse": float((y_hat - y).square().sum()) / norm if norm > 0 else float("nan"),
        "collisions": int(collapsed.sum()),
        "pairs": pairs,
    }


def uniform_quantize(
    x: Tensor, bits: int, lo: float | None = None, hi: float | None = None
) -> Tensor:
    """Uniform affine b-bit fake quantization with a per-tensor min-max range.

    x̂ = lo + Δ·q(x) with Δ = (hi − lo)/(2^b − 1) and q the level of ``quant_levels``.

    Args:
        x: any shape, finite.
        bits: b, an integer in 2..16.
        lo, hi: the range; the min and max of ``x`` when None.

    Returns:
        float64 tensor shaped like ``x``.
    """
    x = torch.as_tensor(x).to(F64)
    lo = float(x.min()) if lo is None else float(lo)
    hi = float(x.max()) if hi is None else float(hi)
    levels = quant_levels(x, lo, hi, bits)
    return lo + levels.to(F64) * ((hi - lo) / (2 ** check_bits(bits) - 1))


def log2_quantize(x: Tensor, bits: int, scale: float | None = None) -> Tensor:
    """Signed power-of-two fake quantization: levels 0 and ±s·2^−k, k = 0..2^(b−1) − 2.

    That is 2^b − 1 levels (one sign bit, the exponent in the others, a zero). |x| is
    rounded to the nearest level in the log2 domain, k = clamp(round(log2(s/|x|)), 0, ...);
    values whose k would exceed the last exponent, and zeros, go to 0.

    Args:
        x: any shape, finite.
        bits: b, an integer in 2..16.
        scale: s, the largest magnitude; max |x| when None.

    Returns:
        float64 tensor shaped like ``x``.
    """
    x = torch.as_tensor(x).to(F64)
    last = 2 ** (check_bits(bits) - 1) - 2
    s = float(x.abs().max()) if scale is None else float(scale)
    if s <= 0:
        return torch.zeros_like(x)
    magnitude = x.abs()
    nonzero = magnitude > 0
    k = torch.round(torch.log2(s / torch.where(nonzero, magnitude, s))).clamp(min=0)
    value = torch.sign(x) * s * torch.exp2(-k)
    return torch.where(nonzero & (k <= last), value, 0.0)
