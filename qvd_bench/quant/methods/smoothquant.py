"""``smoothquant``: SmoothQuant migration with α = 0.5.

Per input channel s_c = max|X_c|^α / max|W_{:,c}|^(1−α) (activation extrema from the
stored channel statistics, the weight maximum over every layer sharing the input and
every kernel position), X̃ = X/s, W̃ = W·diag(s), no shift. Placement, folding and the
final quantizers are SCRI's (``scri.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qvd_bench.quant.methods.base import Method, QuantContext, register_method
from qvd_bench.quant.methods.scri import GroupData, method_records, transform_records
from qvd_bench.quant.record import LayerRecord

ALPHA = 0.5
# Floor of both maxima: channels without signal get s = 1 rather than 0 or inf.
EPS = 1e-5


def smoothing_scale(data: GroupData, alpha: float = ALPHA) -> Tensor:
    """(C,) s_c = max|X_c|^α / max|W_c|^(1−α); 1 where either maximum is below ``EPS``."""
    x_max = torch.maximum(data.lo.abs(), data.hi.abs())
    w_max = torch.zeros_like(x_max)
    for weight in data.weights.values():
        per_channel = weight.abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(1)
        # A grouped conv repeats its per-group channels; tile to the input width.
        w_max = torch.maximum(w_max, per_channel.repeat(x_max.numel() // per_channel.numel()))
    scale = x_max.pow(alpha) / w_max.clamp(min=EPS).pow(1 - alpha)
    return torch.where((x_max > EPS) & (w_max > EPS), scale, torch.ones_like(scale))


def _smooth_choice(ctx: QuantContext, data: GroupData) -> tuple[Tensor, Tensor, dict]:
    scale = smoothing_scale(data)
    return torch.zeros_like(scale), scale, {"alpha": ALPHA}


def smoothquant_records(ctx: QuantContext, layers: Sequence[str]) -> dict[str, LayerRecord]:
    """SmoothQuant records of ``layers``."""
    return transform_records(ctx, layers, _smooth_choice, "smoothquant")


@register_method("smoothquant")
class SmoothQuant(Method):
    description = "SmoothQuant: alpha = 0.5 activation-to-weight scale migration"

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        return method_records(ctx, smoothquant_records)
