"""The minimal sampler: determinism, batch independence, CFG branches, pseudo text states."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from qvd_bench.errors import UserError
from qvd_bench.models.sampling import CallTracker, sample_denoiser, text_states_for_prompts
from qvd_bench.models.zoo import load_model


@functools.cache
def model(name: str):
    # Without outlier injection the latents stay small, so tolerances are meaningful.
    return load_model(name, disparity=0.0, asymmetry=0.0)


def run(loaded, prompts, sample_ids, **kwargs):
    cond, uncond = text_states_for_prompts(loaded, prompts)
    kwargs = {"steps": 2, "frames": 2, "height": 8, "width": 8, **kwargs}
    return sample_denoiser(loaded, cond, uncond, sample_ids=sample_ids, **kwargs)


@pytest.mark.parametrize("name", ["tiny-unet3d", "tiny-svd", "tiny-latte", "tiny-wan"])
def test_sampling_is_deterministic_for_a_seed(name):
    loaded = model(name)
    a = run(loaded, ["a cat"], [0], seed=5)
    b = run(loaded, ["a cat"], [0], seed=5)
    c = run(loaded, ["a cat"], [0], seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.isfinite(a).all()
    assert a.shape == loaded.family.latent_shape(loaded.denoiser, 1, 2, 8, 8)


@pytest.mark.parametrize("name", ["tiny-unet3d", "tiny-i2vgenxl", "tiny-cogvideox", "tiny-wan"])
def test_a_sample_trajectory_does_not_depend_on_the_batch(name):
    loaded = model(name)
    together = run(loaded, ["a cat", "a dog"], [3, 7])
    alone = run(loaded, ["a dog"], [7])
    # A dependence on the batch through the random draws would be O(1); what remains is
    # float32 rounding of batch-size-dependent kernels, amplified by the CFG scale (7.5).
    torch.testing.assert_close(together[1:], alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(together[0], together[1])


def test_tracker_records_timesteps_branches_and_sample_ids():
    loaded = model("tiny-unet3d")
    tracker = CallTracker(loaded.denoiser).attach()
    calls = []
    handle = loaded.denoiser.register_forward_hook(lambda *_: calls.append(tracker.current))
    try:
        run(loaded, ["a", "b"], [4, 9], steps=3, tracker=tracker)
    finally:
        handle.remove()
        tracker.detach()
    assert [c.branches for c in calls] == [("uncond",), ("cond",)] * 3
    assert {c.sample_ids for c in calls} == {(4, 9)}
    timesteps = [c.timestep for c in calls[::2]]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 3
    assert [c.timestep for c in calls[1::2]] == timesteps


def test_guidance_scale_at_most_one_runs_only_the_cond_branch():
    loaded = model("tiny-wan")
    tracker = CallTracker(loaded.denoiser).attach()
    calls = []
    handle = loaded.denoiser.register_forward_hook(lambda *_: calls.append(tracker.current))
    try:
        no_cfg = run(loaded, ["a"], [0], steps=3, guidance_scale=1.0, tracker=tracker)
    finally:
        handle.remove()
        tracker.detach()
    assert [c.branches for c in calls] == [("cond",)] * 3
    # Flow models use the flow-matching scheduler: the first timestep is the top one.
    assert calls[0].timestep == pytest.approx(1000.0)
    assert not torch.equal(no_cfg, run(loaded, ["a"], [0], steps=3, guidance_scale=7.5))


def test_progress_is_called_once_per_step():
    loaded = model("tiny-cogvideox")
    seen = []
    run(loaded, ["a"], [0], steps=3, progress=lambda: seen.append(1))
    assert len(seen) == 3


def test_steps_below_one_is_a_user_error():
    with pytest.raises(UserError, match="steps"):
        run(model("tiny-wan"), ["a"], [0], steps=0)


def test_unknown_scheduler_is_a_user_error():
    with pytest.raises(UserError, match="scheduler"):
        run(model("tiny-unet3d"), ["a"], [0], scheduler="nope")


def test_euler_scheduler_runs():
    latents = run(model("tiny-cogvideox"), ["a"], [0], scheduler="euler")
    assert torch.isfinite(latents).all()


def test_pseudo_text_states_are_deterministic_per_prompt():
    loaded = model("tiny-unet3d")
    cond, uncond = text_states_for_prompts(loaded, ["a cat", "a dog", "a cat"])
    length, dim = loaded.family.text_embedding_shape(loaded.denoiser)
    assert cond.shape == uncond.shape == (3, length, dim)
    assert torch.equal(cond[0], cond[2]) and not torch.equal(cond[0], cond[1])
    empty, _ = text_states_for_prompts(loaded, [""])
    assert torch.equal(uncond[1], empty[0])
    again, _ = text_states_for_prompts(loaded, ["a dog"])
    assert torch.equal(again[0], cond[1])


# --------------------------------------------------------------------------- call keying


def wan_call(loaded, batch=1, timestep=500.0, context=None):
    """One call of the tiny Wan transformer, in a cache_context when named."""
    generator = torch.Generator().manual_seed(0)
    family, denoiser = loaded.family, loaded.denoiser
    latents = torch.randn(family.latent_shape(denoiser, batch, 1, 2, 2), generator=generator)
    text = torch.randn((batch, 4, denoiser.config.text_dim), generator=generator)
    timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch)
    scope = denoiser.cache_context(context) if context else contextlib.nullcontext()
    with scope, torch.no_grad():
        family.forward(denoiser, latents, timestep, text, {})


def keyed(loaded, tracker, **kwargs):
    calls = []
    handle = loaded.denoiser.register_forward_hook(lambda *_: calls.append(tracker.current))
    try:
        wan_call(loaded, **kwargs)
    finally:
        handle.remove()
    return calls[0]


def test_cache_context_names_the_branch_and_unknown_names_stop_the_run():
    loaded = model("tiny-wan")
    tracker = CallTracker(loaded.denoiser).attach()
    try:
        with tracker.batch([3]):
            assert keyed(loaded, tracker, context="uncond").branches == ("uncond",)
            assert keyed(loaded, tracker, context="cond").branches == ("cond",)
            both = keyed(loaded, tracker, batch=2, context="cond_uncond")
            assert both.branches == ("uncond", "cond") and both.sample_ids == (3,)
            # LTX-2's spatio-temporal guidance pass: a branch of its own.
            assert keyed(loaded, tracker, context="uncond_stg").branches == ("cond_stg",)
            with pytest.raises(UserError, match="cache_context 'uncond_blur' cannot be keyed"):
                wan_call(loaded, context="uncond_blur")
            with pytest.raises(UserError, match="halves .* at different timesteps"):
                wan_call(loaded, batch=2, timestep=[500.0, 400.0])
            with pytest.raises(UserError, match="batch 3 for 1 sample"):
                wan_call(loaded, batch=3)
    finally:
        tracker.detach()
    # Detached, the denoiser is as before: no hook, no instance forward left behind.
    assert "forward" not in vars(loaded.denoiser)
    assert loaded.denoiser._diffusers_hook.hooks == {}


def test_two_unnamed_calls_at_one_timestep_in_a_run_cannot_be_keyed():
    loaded = model("tiny-wan")
    tracker = CallTracker(loaded.denoiser).attach()
    try:
        with tracker.batch([0]):
            assert keyed(loaded, tracker, timestep=900.0).branches == ("cond",)
            assert keyed(loaded, tracker, timestep=500.0).branches == ("cond",)
            with pytest.raises(UserError, match="two denoiser calls at timestep 500"):
                wan_call(loaded, timestep=500.0)
        # Outside a sampling run (a probe forward), repeated calls stay "cond".
        for _ in range(2):
            assert keyed(loaded, tracker, timestep=500.0).branches == ("cond",)
    finally:
        tracker.detach()


def test_per_frame_timesteps_are_keyed_by_the_step_and_expanded_to_tokens():
    """SkyReels-V2 diffusion forcing gives each latent frame its timestep, (B, frames): the
    call is keyed by the largest, and each frame's tokens carry their frame's timestep."""
    from qvd_bench.models.families import family_by_name
    from qvd_bench.models.sampling import other_level_rows

    family = family_by_name("skyreels-v2")
    torch.manual_seed(0)
    denoiser = family.build(family.tiny_config()).eval()
    frames, height, width = 3, 4, 4
    latents = torch.randn(family.latent_shape(denoiser, 1, frames, height, width))
    text = torch.randn(1, 4, denoiser.config.text_dim)
    per_frame = torch.tensor([[0.0, 500.0, 500.0]])
    tracker = CallTracker(denoiser).attach()
    calls = []
    handle = denoiser.register_forward_hook(lambda *_: calls.append(tracker.current))
    try:
        with tracker.batch([0]), torch.no_grad():
            denoiser(latents, per_frame, text, enable_diffusion_forcing=True, return_dict=False)
    finally:
        handle.remove()
        tracker.detach()
    (call,) = calls
    tokens_per_frame = (height // 2) * (width // 2)  # patch (1, 2, 2)
    assert call.timestep == 500.0 and call.branches == ("cond",)
    expected = per_frame.double().repeat_interleave(tokens_per_frame, dim=1)
    assert torch.equal(call.token_timesteps, expected)
    other = other_level_rows(call, frames * tokens_per_frame)
    assert other.sum() == tokens_per_frame and bool(other[0, :tokens_per_frame].all())
    assert other_level_rows(call, 7) is None  # rows that are not the video tokens
    # The latent voxels (the patch embedding's rows), frame-major: a frame's entry covers
    # all its height x width voxels.
    voxels = other_level_rows(call, frames * height * width)
    assert torch.equal(voxels, (per_frame != 500.0).repeat_interleave(height * width, dim=1))
    # One row per frame is the time embedding's, for time-embedding layers alone.
    assert torch.equal(other_level_rows(call, frames, role="time_emb"), per_frame != 500.0)
    assert other_level_rows(call, frames, role="cross_attn") is None
    assert other_level_rows(call, frames) is None


def test_per_token_timesteps_cover_each_tokens_patch_of_voxels():
    """Wan 2.2 TI2V gives each token its timestep, (B, tokens): a token of patch (1, 2, 2)
    covers 1 x 2 x 2 latent voxels, so the voxels' timesteps are its timestep repeated
    over its patch (checked against an explicit loop over the voxels)."""
    from qvd_bench.models.families import family_by_name
    from qvd_bench.models.sampling import other_level_rows

    family = family_by_name("wan")
    torch.manual_seed(0)
    denoiser = family.build(family.tiny_config()).eval()
    frames, height, width = 2, 4, 6
    latents = torch.randn(family.latent_shape(denoiser, 1, frames, height, width))
    text = torch.randn(1, 4, denoiser.config.text_dim)
    grid = (frames, height // 2, width // 2)
    per_token = torch.arange(grid[0] * grid[1] * grid[2], dtype=torch.float32)[None] * 10.0
    per_token[0, 3] = per_token.max()  # two tokens at the step's level
    tracker = CallTracker(denoiser).attach()
    calls = []
    handle = denoiser.register_forward_hook(lambda *_: calls.append(tracker.current))
    try:
        with tracker.batch([0]), torch.no_grad():
            denoiser(latents, per_token, text, return_dict=False)
    finally:
        handle.remove()
        tracker.detach()
    (call,) = calls
    assert call.timestep == float(per_token.max())
    expected = torch.empty(frames, height, width, dtype=torch.float64)
    for f in range(frames):
        for h in range(height):
            for w in range(width):
                token = (f * grid[1] + h // 2) * grid[2] + w // 2
                expected[f, h, w] = per_token[0, token]
    assert torch.equal(call.voxel_timesteps, expected.reshape(1, -1))
    other = other_level_rows(call, frames * height * width)
    assert int((~other).sum()) == 2 * 4  # two tokens of four voxels each
    assert torch.equal(other_level_rows(call, per_token.shape[1]), per_token != per_token.max())
