"""``fp``: the full-precision reference; a record of FP layers, no wrapper anywhere."""

from qvd_bench.quant.methods.base import Method, QuantContext, fp_record, register_method
from qvd_bench.quant.record import LayerRecord


@register_method("fp")
class FullPrecision(Method):
    description = "no quantization (the reference every method is compared with)"

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        return [fp_record(ctx, name, "fp reference") for name in ctx.layers]
