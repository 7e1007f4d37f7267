"""``minmax``: activation ranges from the exact extrema, min-max weights."""

from qvd_bench.quant.methods.base import (
    Method,
    QuantContext,
    register_method,
    uniform_method_records,
)
from qvd_bench.quant.record import LayerRecord


@register_method("minmax")
class MinMax(Method):
    description = "per-tensor activations over the min-max range; min-max weights"
    weight_clipping = "minmax"

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        return uniform_method_records(ctx, "minmax")
