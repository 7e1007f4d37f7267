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

from qvd_bench.numerics.grid import check_bits, quant_levels

F64 = torch.float64


# Squared distances below this share of ‖a‖² + ‖b‖² are recomputed from the difference:
# there the Gram form ‖a‖² + ‖b‖² − 2a·b loses its digits to cancellation (float64).
_CANCELLATION = 1e-8


def _pair_distances(y: Tensor, upper: Tensor) -> Tensor:
    """Euclidean distances of the pairs ``upper`` of the rows of ``y`` (float64).

    The Gram form costs one matrix product for all T² pairs (the cost of a direct
    difference per pair is T² × O); pairs where it cancels — close and equal rows — are
    recomputed from the difference, so equal rows give exactly 0.

    Args:
        y: (T, K) float64 rows.
        upper: (P,) flat indices i·T + j of the pairs (i < j).

    Returns:
        (P,) float64 distances.
    """
    t = y.shape[0]
    norms = y.square().sum(1)
    gram = y @ y.T
    total = (norms[:, None] + norms[None, :]).reshape(-1)[upper]
    squared = (total - 2.0 * gram.reshape(-1)[upper]).clamp_(min=0.0)
    suspect = torch.nonzero(squared <= _CANCELLATION * total).reshape(-1)
    if suspect.numel():
        i, j = upper[suspect] // t, upper[suspect] % t
        squared[suspect] = (y[i] - y[j]).square().sum(1)
    return squared.sqrt_()


class TemporalPairs:
    """The float side of TDScore on one layer, computed once for any number of quantizers.

    With W = Q·R (R: (K, D), K = min(O, D)), ‖W·v‖ = ‖R·v‖ for every v, so distances
    and errors are taken on R·e: the same values in K ≤ O dimensions.

    Args:
        features: (T, D) temporal features e_i, one row per timestep of the grid.
        weight: (O, D) weight W of the layer that consumes them.

    Raises:
        ValueError: shapes that do not match.
    """

    def __init__(self, features: Tensor, weight: Tensor):
        e = torch.as_tensor(features).detach().to(F64)
        w = torch.as_tensor(weight).detach().to(device=e.device, dtype=F64)
        if e.ndim != 2 or w.ndim != 2 or w.shape[1] != e.shape[1]:
            raise ValueError(
                f"expected features (T, D) and weight (O, D), got {tuple(e.shape)} and "
                f"{tuple(w.shape)}"
            )
        self.features = e
        self.projection = torch.linalg.qr(w, mode="r").R if w.shape[0] > w.shape[1] else w
        t = e.shape[0]
        i, j = torch.triu_indices(t, t, offset=1, device=e.device)
        upper = i * t + j
        self.y = e @ self.projection.T  # (T, K)
        d = _pair_distances(self.y, upper)
        keep = d > 0
        self.upper, self.d = upper[keep], d[keep]
        self.norm = float(self.y.square().sum())

    @property
    def pairs(self) -> int:
        """Pairs with d_ij > 0."""
        return int(self.d.numel())

    def score(self, quantized: Tensor) -> dict:
        """TDScore, relative MSE and collisions of quantized features.

        Args:
            quantized: (T, D) Q(e_i), the dequantized features.

        Returns:
            See ``tdscore``.
        """
        q = torch.as_tensor(quantized).detach().to(device=self.features.device, dtype=F64)
        if q.shape != self.features.shape:
            raise ValueError(
                f"quantize returned shape {tuple(q.shape)} for {tuple(self.features.shape)}"
            )
        y_hat = q @ self.projection.T
        d_hat = _pair_distances(y_hat, self.upper)
        collapsed = d_hat == 0
        safe = torch.where(collapsed, 1.0, d_hat)
        ratio = torch.where(collapsed, 0.0, torch.minimum(d_hat / self.d, self.d / safe))
        pairs = self.pairs
        return {
            "tdscore": float(ratio.mean()) if pairs else float("nan"),
            "relative_mse": float((y_hat - self.y).square().sum()) / self.norm
            if self.norm > 0
            else float("nan"),
            "collisions": int(collapsed.sum()),
            "pairs": pairs,
        }


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
    pairs = TemporalPairs(features, weight)
    return pairs.score(quantize(pairs.features.clone()))


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
