"""``fsc``: TFMQ-DM's finite-set calibration of temporal features.

A sampler runs the denoiser at a finite set of timesteps, and temporal features take one
value at each, so each layer with temporal features gets separate activation parameters
at every stored timestep of the statistics (one timestep group per timestep; a call at
another timestep uses the nearest stored one's), each range found by the ``mse`` rule on
that timestep's data. Other layers are quantized as ``mse``. Unlike HTDQ, which
calibrates on the temporal-feature grid, the parameters are tied to the sampling schedule
the statistics were collected with.
"""

from __future__ import annotations

import dataclasses

from qvd_bench.quant.methods.base import (
    Method,
    QuantContext,
    activation_timesteps,
    register_method,
    set_uniform_act,
    weight_record,
)
from qvd_bench.quant.methods.mse import mse_except
from qvd_bench.quant.record import LayerRecord


def fsc_record(ctx: QuantContext, name: str) -> LayerRecord:
    """One temporal-feature layer with activation qparams per stored timestep."""
    steps = len(activation_timesteps(ctx, name))
    per_step = dataclasses.replace(
        ctx, config=dataclasses.replace(ctx.config, timestep_groups=steps)
    )
    return set_uniform_act(per_step, weight_record(ctx, name), "mse", "timestep_group")


@register_method("fsc")
class FiniteSetCalibration(Method):
    description = "temporal features: separate qparams at each stored timestep; the rest as mse"

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        return mse_except(ctx, set(ctx.temporal_layers), fsc_record)
