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
    LayerRecord,
    Method,
    QuantContext,
    activation_timesteps,
    fp_record,
    register_method,
    set_uniform_act,
    weight_record,
)
from qvd_bench.quant.methods.mse import mse_record


def fsc_record(ctx: QuantContext, name: str) -> LayerRecord:
    """One temporal-feature layer with activation qparams per stored timestep."""
    steps = len(activation_timesteps(ctx))
    per_step = dataclasses.replace(
        ctx, config=dataclasses.replace(ctx.config, timestep_groups=steps)
    )
    return set_uniform_act(per_step, weight_record(ctx, name), "mse", "timestep_group")


@register_method("fsc")
class FiniteSetCalibration(Method):
    description = "temporal features: separate qparams at each stored timestep; the rest as mse"

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        temporal = set(ctx.temporal_layers)
        records = []
        for name in ctx.layers:
            if name in ctx.keep_fp:
                records.append(fp_record(ctx, name))
            elif name in temporal:
                records.append(fsc_record(ctx, name))
            else:
                records.append(mse_record(ctx, name))
        return records
