"""Tiny diffusers pipelines: build offline, run with CFG under the tracker, save and reload."""

import functools

import pytest
import torch
from diffusers import DiffusionPipeline

from qvd_bench.errors import UserError
from qvd_bench.models import pipelines, zoo
from qvd_bench.models.family import LoadedModel
from qvd_bench.models.sampling import CallTracker

PRESETS = list(pipelines.PRESET_PIPELINES)
STEPS = 2
SIZE = 8
PROMPTS = ["a cat jumps onto a table", "waves crash on the beach"]


@functools.cache
def tiny(preset: str, weight_seed: int = 0) -> LoadedModel:
    return pipelines.tiny_pipeline_model(preset, weight_seed)


def frames_for(loaded: LoadedModel) -> int:
    # Latte's temporal position embedding has exactly ``video_length`` entries.
    return getattr(loaded.denoiser.config, "video_length", None) or 2


def run(loaded, prompts=PROMPTS[:1], sample_ids=(0,), seed=0, **kwargs):
    options = {
        "steps": STEPS,
        "guidance_scale": 5.0,
        "seed": seed,
        "sample_ids": list(sample_ids),
        "frames": frames_for(loaded),
        "height": SIZE,
        "width": SIZE,
    }
    options.update(kwargs)
    return pipelines.run_pipeline(loaded, list(prompts), **options)


def record_calls(loaded):
    """A tracker on the denoiser(s) and the list of DenoiserCalls it publishes."""
    tracker = CallTracker(loaded.experts)
    calls = []
    handles = [
        expert.register_forward_hook(lambda m, a, o: calls.append(tracker.current))
        for expert in loaded.experts.values()
    ]

    class Handles:
        def remove(self):
            for handle in handles:
                handle.remove()

    return tracker, calls, Handles()


@pytest.mark.parametrize("preset", PRESETS)
def test_pipeline_runs_with_cfg_and_tracks_every_call(preset):
    loaded = tiny(preset)
    assert type(loaded.pipeline).__name__ == pipelines.PRESET_PIPELINES[preset]
    assert pipelines._pipeline_denoiser(loaded.pipeline) is loaded.denoiser
    tracker, calls, handle = record_calls(loaded)
    steps_seen = []
    try:
        out = run(loaded, PROMPTS, [5, 9], tracker=tracker, progress=lambda: steps_seen.append(1))
    finally:
        handle.remove()

    frames = frames_for(loaded)
    assert out.shape == loaded.family.latent_shape(loaded.denoiser, 2, frames, SIZE, SIZE)
    assert torch.isfinite(out).all()
    assert len(steps_seen) == 2 * STEPS
    assert tracker._handle is None, "run_pipeline detaches a tracker it attached"

    timesteps = [float(t) for t in loaded.pipeline.scheduler.timesteps]
    if preset in ("tiny-wan", "tiny-wan22"):
        # WanPipeline runs the branches as two calls per step, conditional first.
        expected = [
            (t, (branch,), (sample,))
            for sample in (5, 9)
            for t in timesteps
            for branch in ("cond", "uncond")
        ]
    elif preset == "tiny-hunyuan":
        # Guidance-distilled: one conditional call per step, the scale as an embedding.
        expected = [(t, ("cond",), (sample,)) for sample in (5, 9) for t in timesteps]
    else:
        expected = [(t, ("uncond", "cond"), (sample,)) for sample in (5, 9) for t in timesteps]
    got = [(c.timestep, c.branches, c.sample_ids) for c in calls]
    assert [g[1:] for g in got] == [e[1:] for e in expected]
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected])


def test_wan_branches_match_the_text_states_of_each_call():
    loaded = tiny("tiny-wan")
    pipe = loaded.pipeline
    tracker = CallTracker(loaded.denoiser)
    seen = []

    def hook(module, args, kwargs, output):
        seen.append((tracker.current.branches[0], kwargs["encoder_hidden_states"].clone()))

    handle = loaded.denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        run(loaded, tracker=tracker)
    finally:
        handle.remove()
    cond, uncond = pipe.encode_prompt(
        PROMPTS[0], negative_prompt="", max_sequence_length=pipelines._text_length(pipe)
    )
    for branch, states in seen:
        torch.testing.assert_close(states, cond if branch == "cond" else uncond)


@pytest.mark.parametrize("preset", ["tiny-latte", "tiny-wan", "tiny-unet3d"])
def test_guidance_scale_one_runs_only_the_conditional_branch(preset):
    loaded = tiny(preset)
    tracker, calls, handle = record_calls(loaded)
    try:
        run(loaded, guidance_scale=1.0, tracker=tracker)
    finally:
        handle.remove()
    assert [c.branches for c in calls] == [("cond",)] * STEPS


@pytest.mark.parametrize("preset", ["tiny-latte", "tiny-i2vgenxl"])
def test_samples_are_deterministic_and_independent(preset):
    loaded = tiny(preset)
    both = run(loaded, PROMPTS, [3, 4], seed=7)
    again = run(tiny.__wrapped__(preset), PROMPTS, [3, 4], seed=7)
    alone = run(loaded, PROMPTS[1:], [4], seed=7)
    other_seed = run(loaded, PROMPTS, [3, 4], seed=8)
    torch.testing.assert_close(both, again, rtol=0, atol=0)
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=0)
    assert not torch.allclose(both, other_seed)
    assert not torch.allclose(both[0], both[1])


def test_run_leaves_the_global_rng_alone():
    loaded = tiny("tiny-latte")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(loaded)
    torch.testing.assert_close(torch.rand(3), expected)


def test_weight_seed_changes_the_weights():
    a = run(tiny("tiny-latte", 0))
    b = run(tiny("tiny-latte", 1))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("preset", PRESETS)
def test_save_and_reload_offline_gives_the_same_output(preset, tmp_path):
    loaded = tiny(preset)
    pipelines.save_tiny_pipeline(preset, tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert type(pipe) is type(loaded.pipeline)
    # The zoo loads the directory the same way, and finds the same family.
    reloaded = zoo.load_model(str(tmp_path))
    assert type(reloaded.pipeline) is type(pipe)
    assert reloaded.family is loaded.family

    torch.testing.assert_close(run(reloaded), run(loaded), rtol=0, atol=0)
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is not None:
        text = "the dog, 3 cats and A Car"
        assert tokenizer(text).input_ids == loaded.pipeline.tokenizer(text).input_ids


def test_synthetic_image_is_seeded_per_sample():
    a = pipelines.synthetic_image(0, 1, 16, 24)
    assert a.size == (24, 16) and a.mode == "RGB"
    assert a.tobytes() == pipelines.synthetic_image(0, 1, 16, 24).tobytes()
    assert a.tobytes() != pipelines.synthetic_image(0, 2, 16, 24).tobytes()
    assert a.tobytes() != pipelines.synthetic_image(1, 1, 16, 24).tobytes()


def test_sample_seed_depends_on_seed_and_sample():
    seeds = {pipelines.sample_seed(s, i) for s in range(4) for i in range(4)}
    assert len(seeds) == 16
    assert pipelines.sample_seed(2, 3) == pipelines.sample_seed(2, 3)


def test_a_pipeline_call_needing_an_argument_qvd_bench_cannot_supply_is_a_user_error():
    from diffusers import LucyEditPipeline

    loaded = tiny("tiny-wan")
    # A video editing pipeline needs an input video: nothing qvd-bench has.
    video_to_video = LucyEditPipeline(**loaded.pipeline.components)
    other = LoadedModel(
        name="v2v", family=loaded.family, denoiser=loaded.denoiser, pipeline=video_to_video
    )
    calls = []
    handle = loaded.denoiser.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(UserError, match="LucyEditPipeline's call needs argument 'video'"):
            run(other)
    finally:
        handle.remove()
    assert calls == []  # refused before any denoiser call

    class NotAPipeline:
        pass

    with pytest.raises(UserError, match="NotAPipeline is not a diffusers pipeline"):
        run(LoadedModel("x", loaded.family, loaded.denoiser, pipeline=NotAPipeline()))
    bare = LoadedModel(name="bare", family=loaded.family, denoiser=loaded.denoiser)
    with pytest.raises(UserError, match="no diffusers pipeline"):
        run(bare)


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="tiny-latte"):
        pipelines.build_tiny_pipeline("tiny-nothing")


def test_a_pipeline_denoiser_the_tracker_does_not_hook_is_an_error(two_expert_wan_dir):
    loaded = zoo.load_model(str(two_expert_wan_dir))
    assert list(loaded.experts) == ["transformer", "transformer_2"]
    only_first = CallTracker(loaded.pipeline.transformer)
    with pytest.raises(UserError, match="transformer_2 would run unrecorded"):
        run(loaded, steps=4, tracker=only_first)


def test_a_step_without_a_tracked_call_is_an_error(two_expert_wan_dir, monkeypatch):
    # The backstop behind the check above: count the steps the tracker saw.
    loaded = zoo.load_model(str(two_expert_wan_dir))
    monkeypatch.setattr(pipelines, "_check_tracked", lambda pipeline, tracker: None)
    with pytest.raises(UserError, match="ran 4 steps but the tracked denoiser calls cover 1"):
        run(loaded, steps=4, tracker=CallTracker(loaded.pipeline.transformer))


def test_two_expert_calls_name_the_expert_that_ran(two_expert_wan_dir):
    from tests.experts import expert_of_timestep

    loaded = zoo.load_model(str(two_expert_wan_dir))
    tracker = CallTracker(loaded.experts)
    calls = []
    handles = [
        module.register_forward_hook(lambda m, a, o: calls.append(tracker.current))
        for module in loaded.experts.values()
    ]
    try:
        run(loaded, steps=4, tracker=tracker)
    finally:
        for handle in handles:
            handle.remove()
    expected = expert_of_timestep(loaded.pipeline)
    assert [(c.expert, c.branches) for c in calls] == [
        (expected[t], (branch,)) for t in expected for branch in ("cond", "uncond")
    ]


def test_sampling_record_reproduces_a_pipeline_sample_with_diffusers_alone():
    loaded = tiny("tiny-unet3d")
    record = pipelines.sampling_record(loaded, "auto", seed=3, sample_ids=[0, 5])
    assert record["sampler"] == "pipeline"
    assert record["scheduler"]["class"] == type(loaded.pipeline.scheduler).__name__
    assert [s["sample"] for s in record["samples"]] == [0, 5]
    ours = run(loaded, sample_ids=[5], seed=3)
    # Outside qvd-bench: the scheduler named by the record, its generator seed, pixel sizes.
    import diffusers

    pipeline = loaded.pipeline
    scheduler = getattr(diffusers, record["scheduler"]["class"])
    pipeline.scheduler = scheduler.from_config(record["scheduler"]["config"])
    spatial, _ = pipelines._compression(pipeline)
    theirs = pipeline(
        PROMPTS[0],
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        num_frames=frames_for(loaded),
        height=SIZE * spatial,
        width=SIZE * spatial,
        generator=torch.Generator().manual_seed(record["samples"][1]["generator_seed"]),
        output_type="latent",
    ).frames
    torch.testing.assert_close(torch.as_tensor(theirs).float(), ours)


@pytest.mark.parametrize(
    ("preset", "scheduler"),
    [("tiny-unet3d", "DDIMScheduler"), ("tiny-wan", "FlowMatchEulerDiscreteScheduler")],
)
def test_sampling_record_of_the_minimal_sampler_names_its_scheduler_and_noise(preset, scheduler):
    from qvd_bench.models import sampling

    loaded = zoo.load_model(preset)
    record = pipelines.sampling_record(loaded, "auto", seed=3, sample_ids=[2])
    assert record["sampler"] == "denoiser"  # a bare denoiser: "auto" has no pipeline
    assert record["scheduler"]["class"] == scheduler
    (sample,) = record["samples"]
    noise, _ = sampling._initial_latents(loaded, 3, [2], 2, SIZE, SIZE)
    shape = loaded.family.latent_shape(loaded.denoiser, 1, 2, SIZE, SIZE)
    drawn = torch.randn(shape, generator=torch.Generator().manual_seed(sample["noise_seed"]))
    assert torch.equal(noise, drawn)
    with pytest.raises(UserError, match="has no pipeline"):
        pipelines.resolve_sampler(loaded, "pipeline")
