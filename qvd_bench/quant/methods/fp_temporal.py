"""``fp-temporal``: temporal-feature layers kept in full precision, the rest as ``mse``.

The upper bound for HTDQ: what any quantizer of the temporal features can at best reach.
"""

from qvd_bench.quant.methods.base import Method, QuantContext, fp_record, register_method
from qvd_bench.quant.methods.mse import mse_record
from qvd_bench.quant.record import LayerRecord


@register_method("fp-temporal")
class FpTemporal(Method):
    description = "temporal-feature layers in full precision, the rest as mse"

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        temporal = set(ctx.temporal_layers)
        return [
            fp_record(ctx, name, "temporal features kept FP (fp-temporal)")
            if name in temporal
            else fp_record(ctx, name)
            if name in ctx.keep_fp
            else mse_record(ctx, name)
            for name in ctx.layers
        ]
