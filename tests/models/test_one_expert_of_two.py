"""A Wan 2.2 pipeline holding one of its two experts (the other None) collects with it."""

from __future__ import annotations

import pytest
import torch

import qvd_bench
from qvd_bench.models.zoo import pipeline_model
from tests.experts import build_two_expert_wan

STEPS = 3


@pytest.mark.parametrize(
    ("missing", "boundary_ratio"),
    [
        # transformer alone: a boundary below every timestep sends each step to it.
        ("transformer_2", 0.0),
        # transformer_2 alone: a boundary above every timestep sends each step to it.
        ("transformer", 1.5),
    ],
)
def test_wan22_with_one_expert_none_collects_with_the_other(missing, boundary_ratio, tmp_path):
    from diffusers import WanPipeline

    components = dict(build_two_expert_wan().components, **{missing: None})
    pipe = WanPipeline(**components, boundary_ratio=boundary_ratio)
    present = "transformer" if missing == "transformer_2" else "transformer_2"
    expert = getattr(pipe, present)
    loaded = pipeline_model(pipe)
    assert loaded.denoiser is expert and not loaded.multi_expert

    calls = []
    handle = expert.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        run = qvd_bench.collect(
            pipe, ["a cat"], out=tmp_path / "run", steps=STEPS, guidance_scale=4.0,
            frames=2, height=8, width=8, temporal_stride=250,
        )  # fmt: skip
    finally:
        handle.remove()
    assert calls  # the present expert ran every step
    # Every layer is the present expert's, under its own names, with every sampled step.
    names = {name for name, module in expert.named_modules()}
    stored = set(run.layers["name"])
    assert stored and stored <= names
    linear = {
        n for n, m in expert.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))
    }
    assert stored == linear
    assert run.channels["timestep"].nunique() == STEPS
