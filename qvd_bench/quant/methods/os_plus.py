"""``os+``: Outlier Suppression+ — channel shift to the midpoint and a scaling searched
for output error.

Per input channel z_c = (max_c + min_c)/2 and s_c = max(1, h_c/t) (h_c the half range),
with t among quantiles of h (``OS_QUANTILES``) chosen to minimise the mean squared error
of the quantized layer output on the reservoir rows (summed over the layers that share
the input). Placement, folding and the final quantizers are SCRI's (``scri.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from qvd_bench.quant.methods.base import Method, QuantContext, register_method
from qvd_bench.quant.methods.scri import (
    GroupData,
    evaluate,
    method_records,
    threshold_candidates,
    transform_records,
)
from qvd_bench.quant.record import LayerRecord

OS_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)


def _os_choice(ctx: QuantContext, data: GroupData) -> tuple[Tensor, Tensor, dict] | None:
    candidates = threshold_candidates(data, OS_QUANTILES)
    if not candidates:
        return None
    scored = evaluate(ctx, data, candidates, fit_rows=data.rows, eval_rows=data.rows)
    best = min(scored, key=lambda c: sum(c.output_mse.values()))
    return best.shift, best.scale, {"t": best.t, "output_mse": best.output_mse}


def os_plus_records(ctx: QuantContext, layers: Sequence[str]) -> dict[str, LayerRecord]:
    """OS+ records of ``layers``."""
    return transform_records(ctx, layers, _os_choice, "os+")


@register_method("os+")
class OsPlus(Method):
    description = "OS+: midpoint channel shift + scaling searched for output error"

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        return method_records(ctx, os_plus_records)
