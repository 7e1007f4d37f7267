"""Seeded generation with per-step records, teacher forcing, and the generation cache."""

import warnings

import pytest
import torch
from torch import nn

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
    # An FP model computes every sample on its own: generate batches the CFG branches.
    assert gen.cfg_batch_safe(loaded.denoiser)
    latents = sampling.sample_denoiser(
        loaded, cond, uncond, steps=3, sample_ids=[0], frames=2, height=16, width=16,
        batch_cfg=True,
    )  # fmt: skip
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
    # One batched [uncond, cond] call per step, each half fed the teacher's latents.
    assert len(seen) == 3
    for i in range(3):
        assert torch.equal(seen[i], reference.inputs[i].expand(2, *reference.inputs[i].shape[1:]))
    # The same model on the same inputs predicts the same: SQNR +inf.
    assert torch.equal(forced.prediction, reference.prediction)
    scheduler = gen.scheduler_for(loaded, SETTINGS)
    ref_x0 = reference.x0(scheduler)
    forced_x0 = forced.x0(scheduler, model_inputs=reference.model_inputs)
    assert float(fidelity.sqnr(ref_x0, forced_x0)) == float("inf")


@pytest.mark.parametrize("steps", [3, 1])
def test_teacher_forcing_takes_the_first_step_of_the_free_running_video(loaded, steps):
    settings = GenerationSettings(steps=steps, frames=2, height=16, width=16)
    teacher = gen.generate(loaded, "a cat", 0, settings)
    other = zoo.load_model("tiny-unet3d", weight_seed=1)  # the model under test
    calls = []
    handle = other.denoiser.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        free = gen.generate(other, "a cat", 0, settings)
        elsewhere = gen.generate(other, "a cat", 1, settings)  # sample 1: other noise
        calls.clear()
        full = gen.generate(other, "a cat", 0, settings, teacher=teacher)
        assert len(calls) == steps  # one batched CFG call per step
        calls.clear()
        reused = gen.generate(other, "a cat", 0, settings, teacher=teacher, start=free)
        assert len(calls) == steps - 1
        calls.clear()
        unused = gen.generate(other, "a cat", 0, settings, teacher=teacher, start=elsewhere)
        assert len(calls) == steps
    finally:
        handle.remove()
    assert not torch.equal(full.prediction, teacher.prediction)  # another model's outputs
    for video in (reused, unused):
        assert video.latents is None and video.inputs is None
        for name in ("timesteps", "prediction", "cond", "uncond"):
            assert torch.equal(getattr(video, name), getattr(full, name)), name
    # A free-running sampler cannot start later: its latents there are unknown.
    cond, uncond = sampling.text_states_for_prompts(other, ["a cat"])
    with pytest.raises(ValueError, match="first_step 1 needs teacher inputs"):
        sampling.sample_denoiser(
            other, cond, uncond, steps=steps, sample_ids=[0], frames=2, height=16, width=16,
            first_step=1,
        )  # fmt: skip


def _relative_difference(a, b):
    return float((a - b).abs().max() / a.abs().max())


def test_free_and_forced_side_by_side_equal_separate_runs(loaded):
    settings = GenerationSettings(steps=3, frames=2, height=16, width=16)
    teacher = gen.generate(loaded, "a cat", 0, settings)
    other = zoo.load_model("tiny-unet3d", weight_seed=1)  # the model under test
    tracker = sampling.CallTracker(other.denoiser).attach()
    calls = []
    handle = other.denoiser.register_forward_pre_hook(
        lambda module, args: calls.append((args[0].clone(), tracker.current))
    )  # registered after the tracker's hook: sees the call it published
    try:
        free, forced = gen.generate_free_and_forced(
            other, "a cat", 0, settings, teacher=teacher, tracker=tracker
        )
    finally:
        handle.remove()
        tracker.detach()
    calls_made = list(calls)
    again = gen.generate_free_and_forced(other, "a cat", 0, settings, teacher=teacher)
    separate_free = gen.generate(other, "a cat", 0, settings)
    separate_forced = gen.generate(other, "a cat", 0, settings, teacher=teacher)
    # Step 0 (the same noise in both) runs once on [uncond, cond]; later steps on
    # [uncond free, uncond forced, cond free, cond forced], announced as two samples of
    # the same id in each CFG half.
    assert [len(x) for x, _ in calls_made] == [2, 4, 4]
    assert [c.sample_ids for _, c in calls_made] == [(0,), (0, 0), (0, 0)]
    assert all(c.branches == ("uncond", "cond") for _, c in calls_made)
    for i in (1, 2):
        fed = calls_made[i][0]
        own, teacher_input = free.model_inputs[i][0], teacher.model_inputs[i][0]
        for j, expected in enumerate((own, teacher_input, own, teacher_input)):
            assert torch.equal(fed[j], expected)
    # Reruns give the same bits.
    for made, remade in zip((free, forced), again):
        for name, tensor in made.tensors().items():
            assert torch.equal(tensor, remade.tensors()[name]), name
    # Against separate runs: the same inputs and outputs up to float32 rounding (the
    # batch size can change the order of sums), and the same shapes and fields.
    assert forced.latents is None and forced.inputs is None
    assert torch.equal(forced.timesteps, separate_forced.timesteps)
    assert torch.equal(free.inputs[0], separate_free.inputs[0])
    for made, separate in ((free, separate_free), (forced, separate_forced)):
        assert made.tensors().keys() == separate.tensors().keys()
        for name in ("prediction", "cond", "uncond"):
            assert _relative_difference(getattr(separate, name), getattr(made, name)) < 1e-4
    assert _relative_difference(separate_free.latents, free.latents) < 1e-4
    # The teacher-forced video is not the free-running one after the first step.
    assert torch.equal(free.prediction[0], forced.prediction[0])
    assert _relative_difference(free.prediction[1], forced.prediction[1]) > 1e-3


def test_free_and_forced_run_one_after_the_other_where_batching_is_unsafe(loaded):
    from qvd_bench.quant.modules import QuantWrapper, StaticActQuant, swap_module

    class LooksAcrossSamples(StaticActQuant):
        """A quantizer ``cfg_batch_safe`` does not know."""

    settings = GenerationSettings(steps=2, frames=2, height=16, width=16)
    teacher = gen.generate(loaded, "a cat", 0, settings)
    other = zoo.load_model("tiny-unet3d", weight_seed=1)
    name, layer = next(
        (n, m) for n, m in other.denoiser.named_modules() if isinstance(m, nn.Linear)
    )
    swap_module(other.denoiser, name, QuantWrapper(layer, 8, LooksAcrossSamples(0.1, 128, 8)))
    batches = []
    handle = other.denoiser.register_forward_pre_hook(
        lambda module, args: batches.append(len(args[0]))
    )
    try:
        free, forced = gen.generate_free_and_forced(other, "a cat", 0, settings, teacher=teacher)
    finally:
        handle.remove()
    # Separate branches, one sample each: 2 steps free, then 1 teacher-forced step.
    assert batches == [1] * 6
    separate_free = gen.generate(other, "a cat", 0, settings)
    separate_forced = gen.generate(
        other, "a cat", 0, settings, teacher=teacher, start=separate_free
    )
    for made, separate in ((free, separate_free), (forced, separate_forced)):
        for name, tensor in separate.tensors().items():
            assert torch.equal(made.tensors()[name], tensor), name


def test_forced_inputs_are_checked(loaded):
    cond, uncond = sampling.text_states_for_prompts(loaded, ["a cat"])
    common = dict(steps=2, sample_ids=[0], frames=2, height=16, width=16)
    inputs = [torch.zeros(1, 4, 2, 16, 16)] * 2
    with pytest.raises(ValueError, match="3 forced inputs for 2 steps"):
        sampling.sample_denoiser(loaded, cond, uncond, forced_inputs=(inputs * 2)[:3], **common)
    with pytest.raises(ValueError, match="not a teacher-forced one"):
        sampling.sample_denoiser(
            loaded, cond, uncond, forced_inputs=inputs, teacher_inputs=inputs, **common
        )


def test_batched_cfg_equals_separate_branches_and_is_announced_as_batched(loaded):
    cond, uncond = sampling.text_states_for_prompts(loaded, ["a cat", "a dog"])
    tracker = sampling.CallTracker(loaded.denoiser).attach()
    calls = []
    handle = loaded.denoiser.register_forward_pre_hook(
        lambda module, args: calls.append(tracker.current)
    )  # registered after the tracker's hook: sees the call it published
    results = {}
    try:
        for batched in (False, True):
            steps = []
            latents = sampling.sample_denoiser(
                loaded, cond, uncond, steps=3, sample_ids=[4, 7], frames=2, height=16,
                width=16, tracker=tracker, observe=steps.append, batch_cfg=batched,
            )  # fmt: skip
            results[batched] = (latents, steps, list(calls))
            calls.clear()
    finally:
        handle.remove()
        tracker.detach()
    (separate, separate_steps, separate_calls), (batched, batched_steps, batched_calls) = (
        results[False],
        results[True],
    )
    assert [c.branches for c in separate_calls] == [("uncond",), ("cond",)] * 3
    assert [c.branches for c in batched_calls] == [("uncond", "cond")] * 3
    assert all(c.sample_ids == (4, 7) for c in separate_calls + batched_calls)

    # Each sample is computed on its own: on the same inputs (step 0) the branches differ
    # by float32 rounding only; the trajectories then drift apart by little more.
    def relative_difference(a, b):
        return float((a - b).abs().max() / a.abs().max())

    first, first_batched = separate_steps[0], batched_steps[0]
    assert torch.equal(first.latents, first_batched.latents)
    assert relative_difference(first.uncond, first_batched.uncond) < 1e-5
    assert relative_difference(first.cond, first_batched.cond) < 1e-5
    assert relative_difference(first.uncond, first.cond) > 1e-2  # the branches differ
    assert relative_difference(separate, batched) < 1e-4


def test_cfg_batching_only_with_quantizers_known_to_work_per_sample():
    from qvd_bench.collect.attention import attention_modules, install_processors
    from qvd_bench.quant.attention import QuantAttnProcessor
    from qvd_bench.quant.modules import QuantWrapper, StaticActQuant, swap_module

    class LooksAcrossSamples(StaticActQuant):
        """A quantizer the check does not know (it might use batch statistics)."""

    def quantized(act):
        model = zoo.load_model("tiny-unet3d").denoiser
        name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear))
        swap_module(model, name, QuantWrapper(layer, 8, act))
        return model

    assert gen.cfg_batch_safe(quantized(StaticActQuant(0.1, 128, 8)))
    assert not gen.cfg_batch_safe(quantized(LooksAcrossSamples(0.1, 128, 8)))
    model = zoo.load_model("tiny-unet3d").denoiser
    first = next(iter(attention_modules(model)))
    install_processors(model, lambda name, original: QuantAttnProcessor(original, name), [first])
    assert not gen.cfg_batch_safe(model)


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
    [
        ({"steps": 0}, "steps must be at least 1"),
        ({"frames": 0}, "frames must be at least 1"),
        ({"scheduler": "dpm"}, "scheduler"),
    ],
)
def test_bad_settings_are_one_line_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message) as info:
        GenerationSettings(**kwargs)
    assert "\n" not in str(info.value)


def test_cache_key_includes_everything_that_decides_a_video():
    a = CacheKey("m", 0, "minmax", "W8A8", 0, 0, "free", gen.context_string(steps=2))
    b = CacheKey("m", 0, "minmax", "W8A8", 0, 0, "free", gen.context_string(steps=3))
    assert a.relative_path() != b.relative_path()
