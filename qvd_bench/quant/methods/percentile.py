"""``percentile``: activation ranges at the (1 − q)- and q-quantiles of the histograms."""

from qvd_bench.quant.methods.base import (
    Method,
    QuantContext,
    register_method,
    uniform_method_records,
)
from qvd_bench.quant.record import LayerRecord


@register_method("percentile")
class Percentile(Method):
    description = "per-tensor activations clipped at histogram percentiles (q = 0.999)"
    weight_clipping = "minmax"

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        return uniform_method_records(ctx, "percentile")
