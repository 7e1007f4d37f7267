"""The FP reference's recorded denoiser calls stay in their cache file during a matrix:
host memory holds one video's calls at a time, and replay still reproduces the FP run."""

from __future__ import annotations

import types

import torch

from qvd_bench.evaluate import generate as gen
from qvd_bench.evaluate import videos as matrix_videos
from qvd_bench.evaluate.config import EvalConfig
from qvd_bench.models.pipelines import tiny_pipeline_model

PROMPTS = ("a red ball rolls across a wooden table", "a dog runs on the beach")
SETTINGS = gen.GenerationSettings(steps=2, guidance_scale=5.0, frames=2, height=8, width=8)


def test_spilled_calls_replay_into_the_fp_model_gives_its_predictions(tmp_path):
    loaded = tiny_pipeline_model("tiny-wan")
    cache = gen.GenerationCache(tmp_path)
    key = gen.CacheKey("tiny-wan", 0, "reference", "fp", 0, 0, "free", "x")
    kept = gen.generate(loaded, PROMPTS[0], 0, SETTINGS, keep_calls=True)

    made, generated = cache.get_or_generate(key, lambda: kept, spill_calls=True)
    again, regenerated = cache.get_or_generate(key, lambda: kept, spill_calls=True)
    assert generated and not regenerated
    scheduler = gen.scheduler_for(loaded, SETTINGS)
    for spilled in (made, again):
        # Nothing of the calls in memory: only the file that holds them.
        assert spilled.calls is None and spilled.calls_file == cache.path(key)
        read = spilled.recorded_calls()
        assert len(read) == len(kept.calls) == 4  # 2 steps x 2 branches
        for a, b in zip(read, kept.calls):
            assert (a.expert, a.timestep, a.branches) == (b.expert, b.timestep, b.branches)
            for name, value in b.kwargs.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(a.kwargs[name], value), name
        # Teacher forcing the FP model on the spilled calls gives the FP predictions.
        forced = gen.generate(loaded, PROMPTS[0], 0, SETTINGS, teacher=spilled)
        for branch in ("cfg", "cond", "uncond"):
            torch.testing.assert_close(
                forced.x0(scheduler, branch, kept.model_inputs),
                kept.x0(scheduler, branch),
                rtol=0,
                atol=0,
            )
        torch.testing.assert_close(spilled.prediction, kept.prediction, rtol=0, atol=0)
    # Loading without spilling still reads the calls into memory.
    assert len(cache.load(key).calls) == 4


def test_the_matrix_reference_holds_no_calls_in_memory(tmp_path):
    loaded = tiny_pipeline_model("tiny-wan")
    config = EvalConfig(model="tiny-wan", prompts=PROMPTS, settings=SETTINGS)
    bar = types.SimpleNamespace(update=lambda n: None, set_postfix_str=lambda *a, **k: None)
    videos = matrix_videos.CachedVideos(gen.GenerationCache(tmp_path), config, bar)
    reference = matrix_videos.reference_videos(videos, loaded, SETTINGS)
    assert videos.generated == 2
    for i, generation in reference.items():
        assert generation.calls is None and generation.calls_file.exists()
        calls = generation.recorded_calls()
        assert {call.branches for call in calls} == {("cond",), ("uncond",)}
        alone = gen.generate(loaded, PROMPTS[i], i, SETTINGS, keep_calls=True)
        torch.testing.assert_close(generation.prediction, alone.prediction, rtol=0, atol=0)
