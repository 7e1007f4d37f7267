"""The job's progress bar: work in units of one sampling step, an ETA before the first one.

An evaluation's stages cost very different time per sampling step: a collection step runs
the hooks and accumulators (and its share of the analysis), quantizing a configuration runs
no step at all, and the report runs after the last one. So the bar counts *units* of the
time of one quantized sampling step (one denoiser step of one video, both CFG branches):
a sampling step is one unit, and the other stages are weighted by their estimated cost in
such units (``COLLECT_STEP_COST``, ``QUANTIZE_COST``, ``REPORT_COST``), measured on the
default job (each phase's seconds in its ``timings.parquet``, and the report's, over the
seconds of one quantized sampling step), rounded: estimates, which another model or latent
size shifts. The bar's total is known before any work and it ends exactly at it.

Before its first unit completes, the bar has no measured rate; its ETA then comes from the
machine probe (``probe_forward``, the fixed forward ``qvd-bench perf`` times), timed by the
caller: ``seconds_per_unit(probe_seconds())``. From the first completed units on, tqdm's
measured rate takes over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

# One collection step (hooks, float64 accumulators, reservoirs) with its share of loading
# the model and analyzing the statistics, in quantized sampling steps.
COLLECT_STEP_COST = 8
# Quantizing one configuration (calibration, transforms, level sets) of the default model.
QUANTIZE_COST = 20
# Writing the report of the default job (figures of the statistics and the results).
REPORT_COST = 300
# The time of one unit in forwards of the machine probe: the default job (60 collection
# steps, 60 FP reference steps, 21 quantized configurations making 2,520 steps, the report)
# took about 520 probe forwards of wall time (README, ``qvd-bench perf run``).
PROBE_FORWARDS_PER_UNIT = 520 / (
    60 * COLLECT_STEP_COST + 60 + 21 * QUANTIZE_COST + 2520 + REPORT_COST
)

# The machine probe's latent (frames, height, width).
PROBE_LATENT = (8, 16, 16)


def probe_forward() -> Callable[[], torch.Tensor]:
    """The machine probe's forward, ready to time: diffusers' UNet3DConditionModel at the
    tiny-unet3d config as diffusers builds it (PyTorch's own kernels), fixed random weights
    (seed 0), batch 1 at ``PROBE_LATENT``, one conditional call at t=500."""
    from qvd_bench.models import zoo

    family = zoo.family_by_name("unet3d")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        denoiser = family.build(family.tiny_config()).eval()
    frames, height, width = PROBE_LATENT
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(
        family.latent_shape(denoiser, 1, frames, height, width), generator=generator
    )
    length, dim = family.text_embedding_shape(denoiser)
    text = torch.randn(1, length, dim, generator=generator)
    conditioning = family.conditioning(denoiser, 1, frames, height, width, generator)
    timestep = torch.full((1,), 500.0)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return family.forward(denoiser, latents, timestep, text, conditioning)

    return forward


def probe_seconds() -> float:
    """Seconds of one forward of the machine probe, after a warm-up forward."""
    forward = probe_forward()
    forward()
    started = time.perf_counter()
    forward()
    return time.perf_counter() - started


def seconds_per_unit(probe_s: float) -> float:
    """The estimated seconds of one unit on a machine whose probe forward takes ``probe_s``."""
    return probe_s * PROBE_FORWARDS_PER_UNIT


class JobBar(tqdm):
    """A tqdm bar whose rate, until it has measured one, is a prior estimate.

    Args:
        *args, **kwargs: tqdm's.
        seconds_per_unit: the prior seconds per unit (None: tqdm's "?" until measured).
    """

    def __init__(self, *args: Any, seconds_per_unit: float | None = None, **kwargs: Any):
        self.prior_seconds_per_unit = seconds_per_unit
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        shown = super().format_dict
        prior = getattr(self, "prior_seconds_per_unit", None)
        if shown.get("rate") is None and self.n == self.initial and prior:
            shown["rate"] = 1.0 / prior  # no unit done yet: the ETA is the prior's
        return shown


class Weighted:
    """A view of ``bar`` for a stage whose steps cost ``weight`` units each: what the stage
    counts in its own steps (``update(1)`` per step) advances ``bar`` by ``weight`` units."""

    def __init__(self, bar, weight: int):
        self.bar, self.weight = bar, weight

    def update(self, n: int = 1) -> None:
        self.bar.update(n * self.weight)

    def unpause(self) -> None:
        if hasattr(self.bar, "unpause"):
            self.bar.unpause()
