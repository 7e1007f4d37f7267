"""``htdq``: QVD's high temporal discriminability quantization of temporal features.

A layer with temporal features e_1..e_T (one per timestep of the stored grid) gets a
non-uniform level set of 2^b levels — the sign counted within b, with a zero code —
chosen from a fixed family to maximise TDScore (``analysis.temporal.tdscore``: W the
layer's float weight, y_i = W·e_i) subject to

    relative MSE ≤ relative MSE of the uniform MSE-clipped set × (1 + tolerance)

(``HtdqOptions.tolerance``, default 0.1), so that a set never buys discriminability
with values the consuming layer cannot use. The family (``htdq_candidates``), with
lo = min e, hi = max e over the grid:

- ``uniform-mse``: uniform levels on the Lp-clipped range (the constraint's reference);
- ``uniform-minmax``: uniform levels on [lo, hi];
- ``log`` with base 2, √2 and 2^¼: 0 and signed powers of the base, the largest positive
  level hi and the largest negative |lo| (``signed_log_levels``);
- ``mixed``: k log levels at or below an edge e and 2^b − k uniform levels above it
  (``mixed_levels``), for e = hi·2^−j, j ∈ {1, 2, 3, 4} (``EDGE_FRACTIONS``), k =
  2^b·{1/4, 1/2, 3/4} (``LOG_SHARES``, at least 1) and each of the three bases.

Ties on TDScore keep the lower relative MSE, then the earlier candidate. Calibration uses
only the temporal-feature grid, so the choice holds for any sampling schedule. Layers
without temporal features are quantized as ``mse``.

The grid's density decides how well the calibrated TDScore carries to timesteps off the
grid. TDScore is a mean over pairs of timesteps whose ratios are erratic for close pairs
(they share levels or just cross a level boundary), so on a coarse grid it rests on few
points; and the sinusoidal timestep embedding has components that turn within a few
timesteps, so a grid coarser than that aliases them and misses the features' extremes.
Calibrate on the collector's default grid (every training timestep,
``CollectConfig.temporal_stride`` = 1): the search computes the float side of the score
once per layer and each candidate in one matrix product (``TemporalPairs``), which keeps
1000 grid points affordable. ``info["htdq"]["grid_timesteps"]`` records the grid size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qvd_bench.analysis.temporal import TemporalPairs
from qvd_bench.numerics.grid import (
    LOG_BASES,
    check_bits,
    fake_quant_levels,
    mixed_levels,
    signed_log_levels,
    uniform_levels,
)
from qvd_bench.quant.config import HtdqOptions
from qvd_bench.quant.methods.base import (
    Method,
    QuantContext,
    content_key,
    memoised,
    register_method,
    weight_record,
)
from qvd_bench.quant.methods.mse import mse_except
from qvd_bench.quant.observers import mse_range
from qvd_bench.quant.record import LayerRecord

F64 = torch.float64
EDGE_FRACTIONS = (1 / 2, 1 / 4, 1 / 8, 1 / 16)
LOG_SHARES = (1 / 4, 1 / 2, 3 / 4)
DEFAULT_TOLERANCE = HtdqOptions().tolerance
BASE_NAMES = {2.0: "2", 2.0**0.5: "sqrt2", 2.0**0.25: "2^(1/4)"}


@dataclass(frozen=True)
class Candidate:
    """One level set of the family.

    Attributes:
        family: "uniform-mse", "uniform-minmax", "log" or "mixed".
        params: its parameters (range, base, edge, k), JSON-safe.
        levels: (L,) float64 ascending, L ≤ 2^b.
    """

    family: str
    params: dict[str, Any]
    levels: Tensor

    @property
    def label(self) -> str:
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items()
        )
        return f"{self.family}({shown})"


def htdq_candidates(features: Tensor, bits: int, p: float = 2.4) -> list[Candidate]:
    """The HTDQ family for features spanning [lo, hi], in search order.

    Args:
        features: (T, D) temporal features (any values; only their range and, for the
            MSE-clipped set, their distribution matter).
        bits: b, 2..16.
        p: exponent of the clipping search of ``uniform-mse``.

    Returns:
        The candidates; sets needing hi > 0 (log, mixed) are left out when hi ≤ 0.
    """
    bits = check_bits(bits)
    e = torch.as_tensor(features).to(F64)
    lo, hi = float(e.min()), float(e.max())
    mse_lo, mse_hi = (float(v) for v in mse_range(e.reshape(1, -1), bits, p))
    out = [
        Candidate(
            "uniform-mse", {"lo": mse_lo, "hi": mse_hi}, uniform_levels(mse_lo, mse_hi, bits)
        ),
        Candidate("uniform-minmax", {"lo": lo, "hi": hi}, uniform_levels(lo, hi, bits)),
    ]
    if hi <= 0:
        return out
    negative = max(-lo, 0.0)
    for base in LOG_BASES:
        name = BASE_NAMES[base]
        levels = signed_log_levels(hi, bits, base, negative_scale=negative)
        out.append(Candidate("log", {"base": name, "hi": hi, "lo": -negative}, levels))
    total = 2**bits
    shares = sorted({min(total - 1, max(1, round(total * s))) for s in LOG_SHARES})
    for base in LOG_BASES:
        for fraction in EDGE_FRACTIONS:
            for k in shares:
                edge = hi * fraction
                levels = mixed_levels(lo, hi, bits, edge, k, base)
                params = {"base": BASE_NAMES[base], "edge": edge, "k": k, "lo": lo, "hi": hi}
                out.append(Candidate("mixed", params, levels))
    return out


def score_candidate(
    features: Tensor | TemporalPairs, weight: Tensor | None, levels: Tensor
) -> dict[str, Any]:
    """TDScore, relative MSE and collisions of one level set (float64).

    Args:
        features: (T, D) temporal features, or their ``TemporalPairs`` (then ``weight``
            is not used: the pairs hold it).
        weight: (O, D) the consuming layer's weight.
        levels: (L,) the level set.
    """
    pairs = features if isinstance(features, TemporalPairs) else TemporalPairs(features, weight)
    return pairs.score(fake_quant_levels(pairs.features, levels))


@dataclass(frozen=True)
class HtdqChoice:
    """The chosen level set and the figures behind it.

    Attributes:
        candidate: the chosen Candidate.
        scores: its tdscore / relative_mse / collisions / pairs.
        reference: the same figures for ``uniform-mse``.
        bound: the relative-MSE bound the choice satisfied.
        feasible: how many candidates met the bound, of ``total``.
        grid_timesteps: T, the grid points the scores are taken on.
    """

    candidate: Candidate
    scores: dict[str, Any]
    reference: dict[str, Any]
    bound: float
    feasible: int
    total: int
    grid_timesteps: int

    def info(self) -> dict[str, Any]:
        return {
            "family": self.candidate.family,
            "params": self.candidate.params,
            "label": self.candidate.label,
            "tdscore": self.scores["tdscore"],
            "relative_mse": self.scores["relative_mse"],
            "collisions": self.scores["collisions"],
            "uniform_mse_tdscore": self.reference["tdscore"],
            "uniform_mse_relative_mse": self.reference["relative_mse"],
            "mse_bound": self.bound,
            "feasible": self.feasible,
            "candidates": self.total,
            "grid_timesteps": self.grid_timesteps,
        }


def htdq_search(
    features: Tensor,
    weight: Tensor,
    bits: int,
    tolerance: float = DEFAULT_TOLERANCE,
    p: float = 2.4,
) -> HtdqChoice:
    """The level set of the family with the highest TDScore within the MSE bound.

    Args:
        features: (T, D) temporal features on the calibration grid.
        weight: (O, D) the consuming layer's weight.
        bits: b, 2..16.
        tolerance: the bound is (1 + tolerance) × the uniform-MSE set's relative MSE.
        p: exponent of the uniform-MSE clipping search.

    Returns:
        The HtdqChoice (``uniform-mse`` itself always meets the bound).
    """
    e = torch.as_tensor(features).to(F64)
    w = torch.as_tensor(weight).detach().to(F64).reshape(weight.shape[0], -1)
    candidates = htdq_candidates(e, bits, p)
    pairs = TemporalPairs(e, w)  # the float side, shared by every candidate
    scores = [score_candidate(pairs, None, c.levels) for c in candidates]
    reference = scores[0]
    bound = reference["relative_mse"] * (1.0 + tolerance)
    best, best_key, feasible = 0, None, 0
    for i, s in enumerate(scores):
        # NaN figures (no distinct pairs, y = 0) compare as the worst.
        mse = s["relative_mse"] if np.isfinite(s["relative_mse"]) else 0.0
        if mse > bound and i != 0:
            continue
        feasible += 1
        td = s["tdscore"] if np.isfinite(s["tdscore"]) else -1.0
        key = (td, -mse)
        if best_key is None or key > best_key:
            best, best_key = i, key
    return HtdqChoice(
        candidates[best], scores[best], reference, bound, feasible, len(candidates), e.shape[0]
    )


def htdq_record(ctx: QuantContext, name: str) -> LayerRecord:
    """One temporal-feature layer with the HTDQ level set; weights as ``config``."""
    _, vectors = ctx.run.temporal_matrix(name)
    features = torch.from_numpy(np.asarray(vectors, dtype=np.float64))
    bits, weight = ctx.a_bits(name), ctx.weight(name)
    tolerance, p = float(ctx.config.options.tolerance), float(ctx.config.p)
    # Methods and bit-widths with the same activation bits (qvd and qvd-htdq, W8A8 and
    # W4A8) make the same search.
    key = ("htdq", content_key(features), content_key(weight), bits, tolerance, p)
    choice = memoised(key, lambda: htdq_search(features, weight, bits, tolerance, p))
    record = weight_record(ctx, name)
    record.act, record.a_bits = "levels", bits
    record.tensors["levels"] = choice.candidate.levels.clone()
    record.info["htdq"] = copy.deepcopy(choice.info())  # not the memoised dicts
    return record


def htdq_layer_records(ctx: QuantContext, htdq_layers: set[str]) -> list[LayerRecord]:
    """HTDQ on ``htdq_layers``, ``mse`` elsewhere, kept-FP layers FP."""
    return mse_except(ctx, htdq_layers, htdq_record)


@register_method("htdq")
class Htdq(Method):
    description = "temporal features: TDScore-maximising level set (HTDQ); the rest as mse"

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        return htdq_layer_records(ctx, set(ctx.temporal_layers))
