"""``mse``: Lp (p = 2.4) clipping search on reservoir rows; MSE-clipped weights per channel.

Q-Diffusion / QDrop-style range setting without reconstruction.
"""

from collections.abc import Callable, Collection

from qvd_bench.quant.methods.base import (
    Method,
    QuantContext,
    fp_record,
    register_method,
    uniform_method_records,
    uniform_record,
)
from qvd_bench.quant.record import LayerRecord


def mse_record(ctx: QuantContext, name: str) -> LayerRecord:
    """One layer as ``mse`` quantizes it (the base every QVD variant starts from)."""
    return uniform_record(ctx, name, "mse")


def mse_except(
    ctx: QuantContext,
    special: Collection[str],
    make: Callable[[QuantContext, str], LayerRecord],
) -> list[LayerRecord]:
    """``make`` on the ``special`` layers, ``mse`` elsewhere; kept-FP layers FP."""
    return [
        fp_record(ctx, name)
        if name in ctx.keep_fp
        else make(ctx, name)
        if name in special
        else mse_record(ctx, name)
        for name in ctx.layers
    ]


@register_method("mse")
class Mse(Method):
    description = "per-tensor activations clipped by Lp search on reservoir rows; MSE weights"

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        return uniform_method_records(ctx, "mse")
