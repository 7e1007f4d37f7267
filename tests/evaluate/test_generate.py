"""Seeded generation with per-step records, teacher forcing, and the generation cache."""

import warnings

import pytest
import torch

from qvd_bench.errors import UserError
from qvd_bench.evaluate import fidelity
from qvd_bench.evaluate import generate as gen
from qvd_bench.evaluate.generate import CacheKey, CacheWarning, GenerationCache, GenerationSettings
from qvd_bench.models import sampling, zoo

SETTINGS = GenerationSettings(steps=3, frames=2, height=16, width=16)


@pytest.fixture(scope="module")
def loaded():
    return zoo.load_model("tiny-unet3d")


@pytest.fixture(scope="module")
def reference(loaded):
    return gen.generate(loaded, "a cat", 0, SETTINGS)


def test_free_generation_matches_the_minimal_sampler(loaded, reference):
    cond, uncond = sampling.text_states_for_prompts(loaded, ["a cat"])
    latents = sampling.sample_denoiser(
        loaded, cond, uncond, steps=3, sample_ids=[0], frames=2, height=16, width=16
    )
    assert torch.equal(reference.latents, latents)
    assert reference.prediction.shape == (3, *latents.shape)
    assert reference.inputs.shape == (3, *latents.shape)
    # The combined output is uncond + g·(cond − uncond), as the sampler steps with.
    combined = reference.uncond + 7.5 * (reference.cond - reference.uncond)
    torch.testing.assert_close(reference.prediction, combined)


def test_x0_is_fidelity_to_x0_of_each_step(loaded, reference):
    scheduler = gen.scheduler_for(loaded, SETTINGS)
    x0 = reference.x0(scheduler)
    for i in range(3):
        expected = fidelity.to_x0(
            reference.prediction[i], reference.inputs[i], reference.timesteps[i], scheduler
        )
        assert torch.equal(x0[i], expected)


def test_teacher_forcing_feeds_the_teacher_inputs(loaded, reference):
    seen = []
    handle = loaded.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0].clone()), with_kwargs=True
    )
    try:
        forced = gen.generate(loaded, "a cat", 0, SETTINGS, teacher=reference)
    finally:
        handle.remove()
    assert forced.latents is None and forced.inputs is None
    # Two CFG branches per step, each fed the teacher's latents of that step.
    for i in range(3):
        assert torch.equal(seen[2 * i], reference.inputs[i])
        assert torch.equal(seen[2 * i + 1], reference.inputs[i])
    # The same model on the same inputs predicts the same: SQNR +inf.
    assert torch.equal(forced.prediction, reference.prediction)
    scheduler = gen.scheduler_for(loaded, SETTINGS)
    ref_x0 = reference.x0(scheduler)
    forced_x0 = forced.x0(scheduler, model_inputs=reference.model_inputs)
    assert float(fidelity.sqnr(ref_x0, forced_x0)) == float("inf")


def _key(context="ctx", mode="free"):
    return CacheKey("tiny-unet3d", 0, "minmax", "W8A8", 0, 0, mode, context)


def test_cache_round_trip_and_names(tmp_path, reference):
    cache = GenerationCache(tmp_path)
    path = cache.save(_key(), reference)
    assert path.parent == tmp_path / "generations" / "tiny-unet3d-w0" / "minmax" / "W8A8"
    assert path.name.startswith("p0000-s0-free-")
    loaded = cache.load(_key())
    for name in ("latents", "inputs", "prediction", "uncond", "cond", "timesteps"):
        assert torch.equal(getattr(loaded, name), getattr(reference, name))
    # Other settings (another context) never reuse a cached video.
    assert cache.load(_key(context="other")) is None
    assert cache.path(_key(context="other")) != path


def test_a_damaged_cache_file_is_regenerated_with_a_warning(tmp_path, reference):
    cache = GenerationCache(tmp_path)
    path = cache.save(_key(), reference)
    path.write_bytes(b"not a safetensors file")
    calls = []

    def make():
        calls.append(1)
        return reference

    with pytest.warns(CacheWarning, match=str(path)):
        generation, made = cache.get_or_generate(_key(), make)
    assert made and calls == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, made = cache.get_or_generate(_key(), make)
    assert not made and torch.equal(again.latents, reference.latents)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"steps": 0}, "--steps"), ({"frames": 0}, "--frames"), ({"scheduler": "dpm"}, "scheduler")],
)
def test_bad_settings_are_one_line_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message) as info:
        GenerationSettings(**kwargs)
    assert "\n" not in str(info.value)
