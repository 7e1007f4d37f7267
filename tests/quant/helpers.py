"""Shared helpers of the quantization tests: tiny statistics, the short sampling run they
were collected on, and end-to-end SQNR."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from qvd_bench.collect.collector import collect
from qvd_bench.config import CollectConfig
from qvd_bench.models.sampling import sample_denoiser, text_states_for_prompts
from qvd_bench.models.zoo import load_model, load_run_model
from qvd_bench.quant.apply import quantize_
from qvd_bench.quant.config import QuantConfig
from qvd_bench.quant.primitives import sqnr_db
from qvd_bench.store import StatsRun

# The probe every end-to-end SQNR is taken on: one denoiser call on a 2-frame 8×8 latent.
PROBE_FRAMES, PROBE_SIZE, PROBE_TIMESTEP, PROBE_SEED = 2, 8, 500.0, 123


def collect_tiny(path: str | Path, model: str, **knobs: Any) -> StatsRun:
    """Statistics of one prompt, 2 steps, 2 frames of 8×8 latents, 96 reservoir rows.

    Args:
        path: the run directory to write.
        model: a zoo name.
        knobs: more ``CollectConfig`` fields (``weight_seed``, ``disparity``, ...).
    """
    config = CollectConfig(
        model=model,
        prompts=("a cat",),
        steps=2,
        frames=2,
        height=8,
        width=8,
        temporal_stride=100,
        reservoir_capacity=96,
        **knobs,
    )
    collect(config, path, progress=False)
    return StatsRun(path)


def end_to_end_sqnr(
    run: StatsRun,
    model: str,
    config: QuantConfig,
    *,
    seed: int = 0,
    knobs: dict[str, Any] | None = None,
) -> float:
    """SQNR (dB) of the quantized denoiser's prediction against the float one.

    The probe is one call at timestep 500 on fixed random latents and text states (not
    the sampling run the statistics come from), so ranges are tested off their data.

    Args:
        run: statistics of the model with these weights and knobs.
        model: a zoo name.
        config: how to quantize.
        seed: the weight seed.
        knobs: outlier knobs of ``load_model`` (``disparity``, ``asymmetry``).
    """
    loaded = load_model(model, weight_seed=seed, **(knobs or {}))
    family, denoiser = loaded.family, loaded.denoiser
    generator = torch.Generator().manual_seed(PROBE_SEED)
    shape = family.latent_shape(denoiser, 1, PROBE_FRAMES, PROBE_SIZE, PROBE_SIZE)
    latents = torch.randn(shape, generator=generator)
    text = torch.randn(1, 8, family.text_embedding_shape(denoiser)[1], generator=generator)
    conditioning = family.conditioning(
        denoiser, 1, PROBE_FRAMES, PROBE_SIZE, PROBE_SIZE, generator=generator
    )
    timestep = torch.tensor([PROBE_TIMESTEP])
    with torch.no_grad():
        reference = family.forward(denoiser, latents, timestep, text, conditioning)
        quantize_(loaded, config, stats=run)  # a per-group quantizer's tracker hooks the denoiser
        out = family.forward(denoiser, latents, timestep, text, conditioning)
    return float(sqnr_db(reference, out))


@functools.cache
def tiny_run(model: str, weight_seed: int = 0) -> StatsRun:
    """``collect_tiny`` statistics of a preset, made once per process and shared by tests."""
    root = tempfile.mkdtemp(prefix="qvd-quant-tiny-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return collect_tiny(Path(root) / "run", model, weight_seed=weight_seed)


# The tiny-unet3d run the method tests share: 2 prompts, 2 DDIM steps without CFG, 2
# frames of 8×8 latents.
PROMPTS = ("a cat", "a dog")
SAMPLING = {"steps": 2, "guidance_scale": 1.0, "frames": 2, "height": 8, "width": 8}
# Blocks quantized by the per-method tests (with every temporal-feature layer).
SCOPE_PREFIXES = (
    "conv_in",
    "time_embedding.",
    "down_blocks.0.resnets.0.",
    "down_blocks.0.temp_convs.0.",
    "down_blocks.0.attentions.0.transformer_blocks.0.",
    "down_blocks.0.temp_attentions.0.transformer_blocks.0.",
)


@functools.cache
def tiny_stats() -> StatsRun:
    """One statistics run shared by the quantization test modules (made once per process)."""
    root = tempfile.mkdtemp(prefix="qvd-quant-stats-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    directory = f"{root}/run"
    config = CollectConfig(
        model="tiny-unet3d",
        prompts=PROMPTS,
        steps=SAMPLING["steps"],
        guidance_scale=SAMPLING["guidance_scale"],
        frames=SAMPLING["frames"],
        height=SAMPLING["height"],
        width=SAMPLING["width"],
        temporal_stride=20,
        reservoir_capacity=64,
    )
    collect(config, directory, progress=False)
    return StatsRun(directory)


def sample(loaded, tracker=None) -> torch.Tensor:
    """Final latents of the short sampling run the statistics were collected on."""
    cond, uncond = text_states_for_prompts(loaded, PROMPTS)
    return sample_denoiser(
        loaded, cond, uncond, seed=0, sample_ids=[0, 1], tracker=tracker, **SAMPLING
    )


@functools.cache
def reference() -> torch.Tensor:
    return sample(load_run_model(tiny_stats()))


def out_of_scope(run: StatsRun) -> tuple[str, ...]:
    temporal = set(run.temporal["layer"].astype(str))
    return tuple(n for n in run.roles if n not in temporal and not n.startswith(SCOPE_PREFIXES))
