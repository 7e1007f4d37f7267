"""``timestep_aware``: per-timestep-group activation parameters (TFMQ-DM / ViDiT-Q style).

The stored timesteps are cut into ``config.timestep_groups`` contiguous groups; each group
gets its own MSE-clipped range from the reservoir rows of its timesteps (min-max where a
group has no rows). At run time the quantizer reads the current timestep from the tracker.
"""

from qvd_bench.quant.methods.base import (
    Method,
    QuantContext,
    register_method,
    uniform_method_records,
)
from qvd_bench.quant.record import LayerRecord


@register_method("timestep_aware")
class TimestepAware(Method):
    description = "activation qparams per timestep group (MSE-clipped); MSE weights"
    granularity = "timestep_group"

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        return uniform_method_records(ctx, "mse")
