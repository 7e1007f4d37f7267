"""A pipeline that runs its CFG branches as two denoiser calls per step without naming them
with ``cache_context``: each call is keyed by the text states it attends to, never by
its order, and a pair the states cannot tell apart stops the run."""

from __future__ import annotations

import contextlib
import dataclasses

import pandas as pd
import pytest
from diffusers import WanTransformer3DModel

import qvd_bench
from qvd_bench.errors import UserError
from qvd_bench.models import pipelines

PROMPTS = ["a cat jumps onto a table", "a red ball rolls across a wooden floor"]
NEGATIVE = "blurry, low quality"
SIZE = dict(frames=2, height=8, width=8)


class UnnamedWanTransformer(WanTransformer3DModel):
    """Wan's transformer whose ``cache_context`` names nothing: WanPipeline's cond and
    uncond calls of each step reach it as two unnamed calls."""

    @contextlib.contextmanager
    def cache_context(self, name, **kwargs):
        yield


def unnamed_model(loaded):
    """``loaded`` with its pipeline's transformer replaced by an unnamed copy of it."""
    transformer = UnnamedWanTransformer.from_config(loaded.denoiser.config)
    transformer.load_state_dict(loaded.denoiser.state_dict())
    transformer.eval()
    pipe = type(loaded.pipeline)(**{**loaded.pipeline.components, "transformer": transformer})
    return dataclasses.replace(loaded, denoiser=transformer, pipeline=pipe)


def branch_calls(loaded, **kwargs):
    """The branches of every denoiser call of one pipeline run."""
    from qvd_bench.models.sampling import CallTracker

    tracker = CallTracker(loaded.experts)
    calls = []
    handle = loaded.denoiser.register_forward_hook(lambda *_: calls.append(tracker.current))
    try:
        pipelines.run_pipeline(
            loaded,
            PROMPTS[:1],
            steps=2,
            guidance_scale=5.0,
            seed=0,
            sample_ids=[0],
            tracker=tracker,
            **SIZE,
            **kwargs,
        )
    finally:
        handle.remove()
    return [call.branches for call in calls]


def channels(run) -> pd.DataFrame:
    table = run.channels
    return table.sort_values(["tensor", "layer", "timestep", "branch", "channel"]).reset_index(
        drop=True
    )


def test_two_unnamed_calls_per_step_store_what_the_named_pipeline_stores(tmp_path):
    loaded = pipelines.tiny_pipeline_model("tiny-wan")
    unnamed = unnamed_model(loaded)
    # WanPipeline runs cond, then uncond: keyed by their text states, not by that order.
    assert branch_calls(unnamed, negative_prompt=NEGATIVE) == [("cond",), ("uncond",)] * 2
    options = dict(steps=2, guidance_scale=5.0, extra={"negative_prompt": NEGATIVE}, **SIZE)
    named_run = qvd_bench.collect(loaded, PROMPTS, out=tmp_path / "named", **options)
    unnamed_run = qvd_bench.collect(unnamed, PROMPTS, out=tmp_path / "unnamed", **options)
    named, recognised = channels(named_run), channels(unnamed_run)
    assert set(named["branch"]) == {"cond", "uncond"}
    pd.testing.assert_frame_equal(recognised, named, check_exact=True)
    # The branches' cross-attention keys (the text states) differ: a swap would show.
    keys = named[(named["layer"] == "blocks.0.attn2.to_k") & (named["tensor"] == "input")]
    cond, uncond = (keys[keys["branch"] == b].reset_index(drop=True) for b in ("cond", "uncond"))
    assert len(cond) and not cond["mean"].equals(uncond["mean"])


def test_the_negative_prompts_default_is_the_empty_prompt():
    unnamed = unnamed_model(pipelines.tiny_pipeline_model("tiny-wan"))
    assert branch_calls(unnamed) == [("cond",), ("uncond",)] * 2


def test_two_unnamed_calls_with_the_same_text_states_cannot_be_keyed():
    unnamed = unnamed_model(pipelines.tiny_pipeline_model("tiny-wan"))
    with pytest.raises(
        UserError, match="prompt and the negative prompt encode to the same text states"
    ):
        branch_calls(unnamed, negative_prompt=PROMPTS[0])


def test_one_unnamed_call_per_step_is_cond_even_when_prompt_and_negative_agree():
    # Guidance 1: CFG off, one call per step with the prompt's states.
    unnamed = unnamed_model(pipelines.tiny_pipeline_model("tiny-wan"))
    calls = branch_calls(
        unnamed, negative_prompt=PROMPTS[0], pipeline_kwargs={"guidance_scale": 1.0}
    )
    assert calls == [("cond",)] * 2
