"""A two-expert Wan 2.2 pipeline built from tiny configs, for the multi-expert tests.

WanPipeline sends timesteps t >= boundary_ratio * 1000 to ``transformer`` (high noise) and
the others to ``transformer_2`` (low noise). With the tiny Wan pipeline's scheduler (flow
matching, shift 3) and 4 steps the timesteps are about 1000, 858, 602 and 9: the first
goes to ``transformer``, the other three to ``transformer_2``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qvd_bench.models import pipelines, zoo

BOUNDARY_RATIO = 0.875
STEPS = 4
EXPERTS = ("transformer", "transformer_2")


def build_two_expert_wan(weight_seed: int = 0):
    """A WanPipeline with ``transformer`` and ``transformer_2`` (different random weights)."""
    from diffusers import WanPipeline

    loaded = pipelines.tiny_pipeline_model("tiny-wan", weight_seed)
    low_noise = zoo.load_model("tiny-wan", weight_seed=weight_seed + 1).denoiser
    components = dict(loaded.pipeline.components, transformer_2=low_noise)
    pipe = WanPipeline(**components, boundary_ratio=BOUNDARY_RATIO)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_two_expert_wan(directory: str | Path, weight_seed: int = 0) -> Path:
    """Saves ``build_two_expert_wan`` with ``save_pretrained``; returns the directory."""
    directory = Path(directory)
    build_two_expert_wan(weight_seed).save_pretrained(directory)
    return directory


def expert_of_timestep(pipe, steps: int = STEPS) -> dict[float, str]:
    """Which expert WanPipeline runs at each of its scheduler's timesteps."""
    pipe.scheduler.set_timesteps(steps)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    return {
        float(t): "transformer" if t >= boundary else "transformer_2"
        for t in pipe.scheduler.timesteps.to(torch.float32)
    }
