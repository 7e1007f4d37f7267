"""Evaluation through a model's own diffusers pipeline: its conditioning, teacher forcing by
replaying the FP run's denoiser calls, and two-expert Wan 2.2 by path."""

from __future__ import annotations

import dataclasses
import inspect
import json
import types

import numpy as np
import pandas as pd
import pytest
import torch

from qvd_bench.commands.main import main
from qvd_bench.evaluate import generate as gen
from qvd_bench.evaluate.config import EvalConfig
from qvd_bench.evaluate.matrix import evaluate
from qvd_bench.evaluate.results import ALL_STEPS, RESULTS_FILE, SETTINGS_FILE
from qvd_bench.models import pipelines
from qvd_bench.models.pipelines import PRESET_PIPELINES, tiny_pipeline_model
from qvd_bench.quant import apply as quant_apply
from qvd_bench.quant.modules import quant_wrappers, set_enabled
from tests.experts import EXPERTS, STEPS, expert_of_timestep

PROMPT = "a red ball rolls across a wooden table"
SIZE = 8


def settings_for(loaded, steps: int = 2, **overrides) -> gen.GenerationSettings:
    # Latte's temporal position embedding has exactly ``video_length`` entries.
    frames = getattr(loaded.denoiser.config, "video_length", None) or 2
    values = dict(steps=steps, guidance_scale=5.0, frames=frames, height=SIZE, width=SIZE)
    return gen.GenerationSettings(**{**values, **overrides})


def conditioning_of(call) -> torch.Tensor:
    """The states a recorded denoiser call attends to (``encoder_hidden_states``)."""
    if "encoder_hidden_states" in call.kwargs:
        return call.kwargs["encoder_hidden_states"]
    return call.args[2]


def branch_states(generation) -> dict[str, list[torch.Tensor]]:
    """branch -> the conditioning of every call of that branch, batched calls split."""
    states: dict[str, list[torch.Tensor]] = {"cond": [], "uncond": []}
    for call in generation.calls:
        for branch, chunk in zip(call.branches, conditioning_of(call).chunk(len(call.branches))):
            states[branch].append(chunk)
    return states


def encode_prompt_reference(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) states from the pipeline's own encoder, called as its __call__ does."""
    if not hasattr(pipe, "encode_prompt"):
        # Image-to-video without text (Stable Video Diffusion): CLIP image embeddings of
        # the conditioning image, zeros for the unconditional branch.
        pixels = SIZE * pipelines._compression(pipe)[0]
        image = pipelines.synthetic_image(0, 0, pixels, pixels)
        both = pipe._encode_image(image, torch.device("cpu"), 1, True)
        uncond, cond = both.chunk(2)
        return cond, uncond
    parameters = inspect.signature(pipe.encode_prompt).parameters
    kwargs = {"prompt": PROMPT, "device": torch.device("cpu")}
    if "do_classifier_free_guidance" in parameters:
        kwargs["do_classifier_free_guidance"] = True
    for name in ("num_images_per_prompt", "num_videos_per_prompt"):
        if name in parameters:
            kwargs[name] = 1
    if "max_sequence_length" in parameters:
        kwargs["max_sequence_length"] = pipelines._text_length(pipe)
    if "clean_caption" in parameters:
        kwargs["clean_caption"] = False
    encoded = pipe.encode_prompt(**kwargs)
    if len(encoded) == 4:
        # (states, mask, negative states, negative mask): LTX-Video, Mochi.
        return encoded[0], encoded[2]
    if len(encoded) == 3:
        # (states, pooled states, mask) of a guidance-distilled model: one branch.
        return encoded[0], None
    cond, uncond = encoded[:2]
    return cond, uncond


@pytest.mark.parametrize("preset", list(PRESET_PIPELINES))
def test_evaluation_conditioning_is_the_pipelines_encode_prompt(preset):
    loaded = tiny_pipeline_model(preset)
    generation = gen.generate(loaded, PROMPT, 0, settings_for(loaded), keep_calls=True)
    assert gen.sampler_name(loaded) == f"pipeline: {PRESET_PIPELINES[preset]}"
    with torch.no_grad():
        cond, uncond = encode_prompt_reference(loaded.pipeline, PROMPT)
    states = branch_states(generation)
    if uncond is None:
        # Guidance-distilled (HunyuanVideo): one call per step, conditional only.
        assert len(states["cond"]) == 2 and not states.get("uncond")
    else:
        # Every step of both branches saw the encoder's states (CFG is on: guidance 5).
        assert len(states["cond"]) == len(states["uncond"]) == 2
    for branch, expected in (("cond", cond), ("uncond", uncond)):
        if expected is None:
            continue
        for seen in states[branch]:
            # AnimateDiff repeats the states once per latent frame for its UNetMotionModel.
            repeats = seen.shape[0] // expected.shape[0]
            expected_seen = expected.repeat_interleave(repeats, dim=0)
            torch.testing.assert_close(seen, expected_seen, rtol=0, atol=0)
    # Not the minimal sampler's pseudo text states.
    pseudo, _ = gen.sampling.text_states_for_prompts(loaded, [PROMPT])
    assert pseudo.shape != cond.shape or not torch.allclose(pseudo, cond)


@pytest.mark.parametrize("preset", list(PRESET_PIPELINES))
def test_replaying_the_recorded_calls_into_the_fp_model_gives_its_predictions(preset):
    loaded = tiny_pipeline_model(preset)
    settings = settings_for(loaded)
    reference = gen.generate(loaded, PROMPT, 0, settings, keep_calls=True)
    forced = gen.generate(loaded, PROMPT, 0, settings, teacher=reference)
    scheduler = gen.scheduler_for(loaded, settings)
    # A guidance-distilled model (HunyuanVideo) has no uncond branch.
    branches = ["cfg", "cond"] + (["uncond"] if reference.uncond is not None else [])
    for branch in branches:
        torch.testing.assert_close(
            forced.x0(scheduler, branch, reference.model_inputs),
            reference.x0(scheduler, branch),
            rtol=0,
            atol=0,
        )


def test_x0_of_a_pipeline_step_is_the_schedulers_own_estimate():
    """For DDIM (ε) and Euler (v, Karras sigmas: SVD) the stored coefficients give the
    ``pred_original_sample`` the scheduler's own step computes."""
    for preset in ("tiny-unet3d", "tiny-svd"):
        loaded = tiny_pipeline_model(preset)
        settings = settings_for(loaded, steps=3)
        generation = gen.generate(loaded, PROMPT, 0, settings, keep_calls=True)
        scheduler = loaded.pipeline.scheduler
        x0 = generation.x0(None, "cfg")
        for step, t in enumerate(scheduler.timesteps):
            scheduler._step_index = step  # Euler keeps its position in the schedule
            if hasattr(scheduler, "sigmas"):
                sigma = float(scheduler.sigmas[step])
                latents = generation.model_inputs[step] * (sigma**2 + 1) ** 0.5
            else:
                latents = generation.model_inputs[step]
            out = scheduler.step(generation.prediction[step], t, latents)
            torch.testing.assert_close(
                x0[step], out.pred_original_sample.to(torch.float64), rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("preset", ["tiny-wan", "tiny-mochi"])
def test_flow_x0_is_the_euler_step_straight_to_the_clean_end(preset):
    """For flow matching, x0 is where the scheduler's Euler update x + (σ' − σ)·v̂ lands
    at the clean end of its schedule: σ' = 0, or σ' = 1 for Mochi's inverted sigmas
    (which count up from noise to data, so a wrong sign or end shows)."""
    loaded = tiny_pipeline_model(preset)
    generation = gen.generate(loaded, PROMPT, 0, settings_for(loaded, steps=3), keep_calls=True)
    scheduler = loaded.pipeline.scheduler
    clean = 1.0 if scheduler.config.get("invert_sigmas") else 0.0
    x0 = generation.x0(None, "cfg")
    for step in range(len(scheduler.timesteps)):
        sigma = float(scheduler.sigmas[step])
        latents = generation.inputs[step].to(torch.float64)
        expected = latents + (clean - sigma) * generation.prediction[step].to(torch.float64)
        torch.testing.assert_close(x0[step], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny-unet3d", "tiny-wan"])
def test_cfg_prediction_is_what_the_pipeline_stepped_with(preset):
    """Stepping the pipeline's scheduler with the recorded CFG-combined prediction from the
    recorded latents of step i gives the latents of step i + 1 (DDIM on a batched
    [uncond, cond] call; flow-matching Euler on two calls per step)."""
    loaded = tiny_pipeline_model(preset)
    generation = gen.generate(loaded, PROMPT, 0, settings_for(loaded, steps=3), keep_calls=True)
    scheduler = loaded.pipeline.scheduler
    for step in range(len(scheduler.timesteps) - 1):
        scheduler._step_index = step  # flow-matching Euler keeps its position
        t = scheduler.timesteps[step]
        out = scheduler.step(generation.prediction[step], t, generation.inputs[step])
        torch.testing.assert_close(out.prev_sample, generation.inputs[step + 1])


# Pipelines of the families without a preset whose guidance differs from plain CFG: LTX-2's
# spatio-temporal and modality passes and x0-space rescale, HunyuanVideo-1.5's guider.
FAMILY_GUIDANCE = [("ltx2", "LTX2Pipeline"), ("hunyuan-video-1.5", "HunyuanVideo15Pipeline")]


def _stepped_with(pipe) -> list[torch.Tensor]:
    """Every model output the pipeline's scheduler is stepped with, recorded by wrapping
    this one scheduler object's ``step`` (a method, so that a copy of the scheduler, as
    LTX-2 makes for its audio, steps itself unrecorded)."""
    seen: list[torch.Tensor] = []
    scheduler = pipe.scheduler
    step = type(scheduler).step

    def recording(self, model_output, *args, **kwargs):
        if self is scheduler:
            seen.append(model_output.detach().clone())
        return step(self, model_output, *args, **kwargs)

    scheduler.step = types.MethodType(recording, scheduler)
    return seen


def _in_layout_of(stepped: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """A scheduler input as the denoiser's prediction is laid out: TextToVideoSD and
    I2VGenXL step frames as images, (B·F, C, H, W), for a (B, C, F, H, W) prediction."""
    if stepped.shape == prediction.shape:
        return stepped
    b, c, f, h, w = prediction.shape
    return stepped.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize(
    ("preset", "family_pipeline"),
    [(preset, None) for preset in PRESET_PIPELINES] + [(None, fp) for fp in FAMILY_GUIDANCE],
)
def test_combined_prediction_is_what_the_pipeline_steps_its_scheduler_with(preset, family_pipeline):
    """The guided prediction evaluation scores ("cfg") is, at every step, the model output
    the pipeline itself hands its scheduler: plain CFG, none for guidance-distilled
    HunyuanVideo, both experts of Wan 2.2, a guider's CFG, and LTX-2's four passes with
    its x0-space rescale, at each pipeline's default settings."""
    from qvd_bench.models import zoo

    if preset is not None:
        loaded = tiny_pipeline_model(preset)
    else:
        loaded = zoo.pipeline_model(pipelines.tiny_family_pipeline(*family_pipeline))
    stepped = _stepped_with(loaded.pipeline)
    generation = gen.generate(loaded, PROMPT, 0, settings_for(loaded, steps=3), keep_calls=True)
    assert len(stepped) == len(generation.prediction) == 3
    # LTX-2 combines in x0-space and divides by σ on the way back: float32 rounding of
    # another order of the same operations.
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if family_pipeline == FAMILY_GUIDANCE[0] else {}
    for step, model_output in enumerate(stepped):
        prediction = generation.prediction[step]
        expected = _in_layout_of(model_output, prediction).to(prediction.dtype)
        torch.testing.assert_close(prediction, expected, **tolerance)
    if family_pipeline == ("ltx2", "LTX2Pipeline"):
        branches = {b for call in generation.recorded_calls() for b in call.branches}
        assert branches == {"cond", "uncond", "cond_stg", "cond_modality"}


def test_guidance_rescale_is_diffusers_rescale_noise_cfg():
    """``Guidance.combine``'s rescale, on the predictions and in x0-space, against
    diffusers' own ``rescale_noise_cfg`` on the combination the LTX pipelines write out."""
    from diffusers.pipelines.ltx.pipeline_ltx import rescale_noise_cfg

    from qvd_bench.models.family import Guidance

    generator = torch.Generator().manual_seed(0)
    cond, uncond, stg = (torch.randn(1, 3, 2, 4, 4, generator=generator) for _ in range(3))
    plain = Guidance(scales={"uncond": 4.0}, rescale=0.7)
    guided = uncond + 5.0 * (cond - uncond)
    torch.testing.assert_close(
        plain.combine({"cond": cond, "uncond": uncond}),
        rescale_noise_cfg(guided, cond, guidance_rescale=0.7),
    )
    sigma = 0.6
    sample = torch.randn(1, 3, 2, 4, 4, generator=generator)
    in_x0 = Guidance(scales={"uncond": 2.0, "cond_stg": 1.0}, rescale=0.7, rescale_in_x0=True)
    x0 = {name: sample - sigma * v for name, v in (("c", cond), ("u", uncond), ("s", stg))}
    g = x0["c"] + 2.0 * (x0["c"] - x0["u"]) + 1.0 * (x0["c"] - x0["s"])
    expected = (sample - rescale_noise_cfg(g, x0["c"], guidance_rescale=0.7)) / sigma
    combined = in_x0.combine(
        {"cond": cond, "uncond": uncond, "cond_stg": stg}, (1.0, -sigma, sample)
    )
    torch.testing.assert_close(combined, expected)
    with pytest.raises(gen.UserError, match="cond_seg"):
        plain.combine({"cond": cond, "cond_seg": stg})


def test_cached_pipeline_generation_round_trips_with_its_calls(tmp_path):
    loaded = tiny_pipeline_model("tiny-wan")
    generation = gen.generate(loaded, PROMPT, 0, settings_for(loaded), keep_calls=True)
    cache = gen.GenerationCache(tmp_path)
    key = gen.CacheKey("tiny-wan", 0, "reference", "fp", 0, 0, "free", "x")
    cache.save(key, generation)
    loaded_back = cache.load(key)
    assert len(loaded_back.calls) == len(generation.calls) == 4  # 2 steps x 2 branches
    for a, b in zip(loaded_back.calls, generation.calls):
        assert (a.expert, a.timestep, a.branches) == (b.expert, b.timestep, b.branches)
        assert a.kwargs.keys() == b.kwargs.keys()
        for name, value in b.kwargs.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(a.kwargs[name], value)
            else:
                assert a.kwargs[name] == value
    # A tensor passed to several calls (the prompt states of every step) is stored once.
    distinct = {
        id(value)
        for call in generation.calls
        for value in (*call.args, *call.kwargs.values())
        if isinstance(value, torch.Tensor)
    }
    stored = [name for name in generation.tensors() if name.startswith("call.")]
    assert len(stored) == len(distinct)
    assert len({id(conditioning_of(call)) for call in generation.calls}) == 2  # cond, uncond


def disabled_quantize_(monkeypatch, records: list):
    """Makes every quantize_ of the evaluation leave its quantizers off (and keeps the
    records), so the quantized model computes what the FP one does."""
    original = quant_apply.quantize_

    def quantize_off(model, config, **kwargs):
        record = original(model, config, **kwargs)
        set_enabled(model.layer_root, False)
        records.append((model, record))
        return record

    monkeypatch.setattr(quant_apply, "quantize_", quantize_off)


@pytest.mark.parametrize("preset", ["tiny-wan", "tiny-unet3d"])
def test_quantized_pipeline_with_quantizers_off_reproduces_the_fp_videos_through_evaluate(
    preset, tmp_path, monkeypatch
):
    directory = pipelines.save_tiny_pipeline(preset, tmp_path / preset)
    records: list = []
    disabled_quantize_(monkeypatch, records)
    config = EvalConfig(
        model=str(directory),
        methods=("minmax",),
        bits=("W8A8",),
        prompts=(PROMPT, "a dog runs on the beach"),
        settings=gen.GenerationSettings(
            steps=3, guidance_scale=5.0, frames=2, height=SIZE, width=SIZE
        ),
    )
    result = evaluate(config, tmp_path / "out", progress=False)
    ((model, record),) = records
    assert record.quantized and next(quant_wrappers(model.layer_root), None) is not None
    settings = json.loads((result.results_dir / SETTINGS_FILE).read_text())
    assert settings["sampler"] == f"pipeline: {PRESET_PIPELINES[preset]}"
    assert settings["sampling"]["sampler"] == "pipeline"
    results = result.results
    assert set(results["mode"]) == {"teacher-forced", "free-running"}
    assert (results.loc[results["metric"] == "sqnr", "value"] > 100).all(), results
    # The videos themselves, from the cache: the quantized free-running ones equal the FP's.
    cache = gen.GenerationCache(result.results_dir)
    files = sorted(cache.root.rglob("*.safetensors"))
    reference = [gen.GenerationCache.load_path(f) for f in files if "/reference/" in str(f)]
    free = [
        gen.GenerationCache.load_path(f)
        for f in files
        if "-free-" in f.name and "/minmax/" in str(f)
    ]
    assert len(reference) == len(free) == 2
    for r, q in zip(reference, free):
        torch.testing.assert_close(q.latents, r.latents, rtol=1e-6, atol=1e-6)


def test_two_expert_wan_evaluate_and_sensitivity_by_path(
    two_expert_wan_dir, two_expert_run, tmp_path, monkeypatch, capsys
):
    records: list = []
    original = quant_apply.quantize_

    def keep(model, config, **kwargs):
        record = original(model, config, **kwargs)
        records.append(record)
        return record

    monkeypatch.setattr(quant_apply, "quantize_", keep)
    out = tmp_path / "out"
    argv = [
        "evaluate",
        "--model",
        str(two_expert_wan_dir),
        "--methods",
        "minmax",
        "--bits",
        "W8A8",
        "--metrics",
        "fidelity",
        "--steps",
        str(STEPS),
        "--frames",
        "2",
        "--height",
        str(SIZE),
        "--width",
        str(SIZE),
        "--num-prompts",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    # Every expert quantized.
    (record,) = records
    experts = {layer.layer.split(".")[0] for layer in record.layers if not layer.is_fp}
    assert experts == set(EXPERTS)
    results_dir = out / "results" / two_expert_wan_dir.name
    results = pd.read_parquet(results_dir / RESULTS_FILE)
    per_step = results[(results["mode"] == "teacher-forced") & (results["step"] != ALL_STEPS)]
    assert sorted(set(per_step["step"])) == list(range(STEPS))
    assert np.isfinite(results.loc[results["metric"] == "sqnr", "value"]).all()
    # The FP reference's calls: both experts ran, each at its own timesteps, and the
    # teacher-forced fidelity covers all of them.
    cache = gen.GenerationCache(results_dir)
    (reference_file,) = [f for f in cache.root.rglob("*.safetensors") if "/reference/" in str(f)]
    reference = gen.GenerationCache.load_path(reference_file)
    expected = expert_of_timestep(saved_pipeline(two_expert_wan_dir), STEPS)
    ran: dict[str, set[float]] = {}
    for call in reference.calls:
        ran.setdefault(call.expert, set()).add(round(call.timestep, 3))
    assert set(ran) == set(EXPERTS)
    for t, expert in expected.items():
        assert round(t, 3) in ran[expert]
    assert len(reference.timesteps) == STEPS

    capsys.readouterr()
    argv = [
        "sensitivity",
        "--stats",
        str(two_expert_run.path),
        "--method",
        "minmax",
        "--bits",
        "W4A4",
        "--by",
        "layer",
        "--out",
        str(tmp_path / "sensitivity"),
        "--no-progress",
    ]
    assert main(argv) == 0
    table = pd.read_parquet(tmp_path / "sensitivity" / "sensitivity.parquet")
    layers = table[table["kind"] == "layer"]
    assert {unit.split(".")[0] for unit in layers["unit"]} == set(EXPERTS)
    assert np.isfinite(layers["sqnr_db"]).all()


def saved_pipeline(directory):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(directory, local_files_only=True)


def test_bare_denoiser_keeps_the_minimal_sampler():
    from qvd_bench.models.zoo import load_model

    loaded = load_model("tiny-wan")
    assert gen.sampler_name(loaded) == "minimal sampler"
    generation = gen.generate(loaded, PROMPT, 0, settings_for(loaded), keep_calls=True)
    assert generation.calls is None and generation.x0_coefficients is None
    assert dataclasses.asdict(settings_for(loaded))["scheduler"] == "ddim"


def test_run_samples_a_saved_pipeline_with_the_pipeline(tmp_path, capsys):
    from qvd_bench.commands.run import run_job

    directory = pipelines.save_tiny_pipeline("tiny-wan", tmp_path / "wan")
    run_job(
        tmp_path / "out",
        model=str(directory),
        num_prompts=1,
        frames=2,
        height=SIZE,
        width=SIZE,
        steps=2,
        methods=("minmax",),
        bits=("W8A8",),
        progress=False,
    )
    assert "sampler: pipeline: WanPipeline" in capsys.readouterr().out
    settings = json.loads((tmp_path / "out" / "results" / "wan" / SETTINGS_FILE).read_text())
    assert settings["sampler"] == "pipeline: WanPipeline"
    stats = json.loads((tmp_path / "out" / "stats" / "wan-w0" / "manifest.json").read_text())
    assert stats["sampling"]["sampler"] == "pipeline"


def test_evaluate_of_a_zoo_preset_says_minimal_sampler(tmp_path):
    config = EvalConfig(
        model="tiny-wan",
        methods=("fp",),
        bits=("W8A8",),
        prompts=(PROMPT,),
        settings=gen.GenerationSettings(steps=2, frames=2, height=SIZE, width=SIZE),
    )
    result = evaluate(config, tmp_path, progress=False)
    assert result.sampler == "minimal sampler"
    settings = json.loads((result.results_dir / SETTINGS_FILE).read_text())
    assert settings["sampling"]["sampler"] == "denoiser"


# LTX-2 with its spatio-temporal and modality guidance passes off: plain CFG.
LTX2_PASSES_OFF = {
    "stg_scale": 0,
    "audio_stg_scale": 0,
    "modality_scale": 1,
    "audio_modality_scale": 1,
}
HUNYUAN_TRUE_CFG = {"true_cfg_scale": 4.0, "negative_prompt": "blurry"}


def test_ltx2_with_its_guidance_passes_off_by_pipeline_kwargs():
    """The settings' pipeline_kwargs reach the call (only cond and uncond run), the
    combined prediction is what the pipeline stepped with, and a teacher-forced replay
    combines the branches as that run did."""
    from qvd_bench.models import zoo

    loaded = zoo.pipeline_model(pipelines.tiny_family_pipeline("ltx2", "LTX2Pipeline"))
    stepped = _stepped_with(loaded.pipeline)
    settings = settings_for(loaded, steps=3, pipeline_kwargs=LTX2_PASSES_OFF)
    reference = gen.generate(loaded, PROMPT, 0, settings, keep_calls=True)
    assert {b for call in reference.recorded_calls() for b in call.branches} == {"cond", "uncond"}
    assert len(stepped) == len(reference.prediction) == 3
    for step, model_output in enumerate(stepped):
        prediction = reference.prediction[step]
        torch.testing.assert_close(
            prediction, model_output.to(prediction.dtype), rtol=1e-4, atol=1e-4
        )
    forced = gen.generate(loaded, PROMPT, 0, settings, teacher=reference)
    scheduler = gen.scheduler_for(loaded, settings)
    for branch in ("cfg", "cond", "uncond"):
        torch.testing.assert_close(
            forced.x0(scheduler, branch, reference.model_inputs),
            reference.x0(scheduler, branch),
            rtol=0,
            atol=0,
        )


def test_hunyuan_true_cfg_by_pipeline_kwargs():
    """Guidance-distilled HunyuanVideo runs a negative branch per step when the call asks
    for true CFG, and the combination is the one its scheduler is stepped with."""
    loaded = tiny_pipeline_model("tiny-hunyuan")
    stepped = _stepped_with(loaded.pipeline)
    settings = settings_for(loaded, steps=3, pipeline_kwargs=HUNYUAN_TRUE_CFG)
    generation = gen.generate(loaded, PROMPT, 0, settings, keep_calls=True)
    per_step: dict[float, list[str]] = {}
    for call in generation.recorded_calls():
        per_step.setdefault(call.timestep, []).extend(call.branches)
    assert len(per_step) == 3
    assert all(sorted(branches) == ["cond", "uncond"] for branches in per_step.values())
    assert generation.uncond is not None and len(stepped) == len(generation.prediction) == 3
    for step, model_output in enumerate(stepped):
        prediction = generation.prediction[step]
        torch.testing.assert_close(prediction, model_output.to(prediction.dtype))
    # The negative branch attends to the negative prompt's states, not the empty prompt's.
    with torch.no_grad():
        negative = loaded.pipeline.encode_prompt(
            prompt="blurry",
            device=torch.device("cpu"),
            max_sequence_length=pipelines._text_length(loaded.pipeline),
        )[0]
    for seen in branch_states(generation)["uncond"]:
        torch.testing.assert_close(seen, negative, rtol=0, atol=0)


def test_pipeline_kwargs_are_part_of_the_cache_key(tmp_path):
    """The same settings with other pipeline_kwargs name another cached video: nothing
    is reused, and each video is sampled with its own."""
    from tqdm import tqdm

    from qvd_bench.evaluate.videos import CachedVideos, reference_videos

    loaded = tiny_pipeline_model("tiny-hunyuan")
    plain = settings_for(loaded)
    true_cfg = dataclasses.replace(plain, pipeline_kwargs=HUNYUAN_TRUE_CFG)
    made = {}
    for name, settings in (("plain", plain), ("true_cfg", true_cfg)):
        # A zoo name is a bare denoiser: the model is named as a pipeline directory.
        config = EvalConfig(model=str(tmp_path / "hunyuan"), prompts=(PROMPT,), settings=settings)
        videos = CachedVideos(gen.GenerationCache(tmp_path), config, tqdm(disable=True))
        made[name] = reference_videos(videos, loaded, settings)[0]
        assert (videos.generated, videos.cached) == (1, 0)
    assert made["plain"].uncond is None and made["true_cfg"].uncond is not None
    assert len(list((tmp_path / gen.GENERATIONS_DIR).rglob("*.safetensors"))) == 2


def test_run_collects_and_evaluates_with_one_set_of_pipeline_kwargs(tmp_path):
    from qvd_bench.commands.run import run_job

    directory = pipelines.save_tiny_pipeline("tiny-hunyuan", tmp_path / "hunyuan")
    run_job(
        tmp_path / "out",
        model=str(directory),
        num_prompts=1,
        frames=2,
        height=SIZE,
        width=SIZE,
        steps=2,
        methods=("minmax",),
        bits=("W8A8",),
        progress=False,
        pipeline_kwargs=HUNYUAN_TRUE_CFG,
    )
    results_dir = tmp_path / "out" / "results" / "hunyuan"
    stats = json.loads((tmp_path / "out" / "stats" / "hunyuan-w0" / "manifest.json").read_text())
    assert stats["config"]["extra"]["pipeline_kwargs"] == HUNYUAN_TRUE_CFG
    settings = json.loads((results_dir / SETTINGS_FILE).read_text())
    assert settings["config"]["settings"]["pipeline_kwargs"] == HUNYUAN_TRUE_CFG
    assert json.loads((results_dir / "run.json").read_text())["pipeline_kwargs"] == (
        HUNYUAN_TRUE_CFG
    )
    # The quantized model's negative branch is scored: true CFG ran in evaluation too.
    results = pd.read_parquet(results_dir / RESULTS_FILE)
    forced = results[results["mode"] == "teacher-forced"]
    assert set(forced["branch"]) == {"cfg", "cond", "uncond"}


def test_pipeline_kwargs_bad_input(tmp_path):
    from qvd_bench.models.zoo import load_model

    with pytest.raises(gen.UserError, match=r"pipeline_kwargs\['generator'\] must be JSON") as info:
        gen.GenerationSettings(pipeline_kwargs={"generator": torch.Generator()})
    assert "\n" not in str(info.value)
    bare = load_model("tiny-wan")
    settings = settings_for(bare, pipeline_kwargs={"stg_scale": 0})
    for call in (
        lambda: gen.generate(bare, PROMPT, 0, settings),
        lambda: EvalConfig(model="tiny-wan", prompts=(PROMPT,), settings=settings),
        lambda: EvalConfig(model="tiny-wan", prompts=(PROMPT,), pipeline_kwargs={"a": 1}),
    ):
        with pytest.raises(gen.UserError, match="need a model with a diffusers pipeline") as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(gen.UserError, match="differ"):
        EvalConfig(
            model=str(tmp_path),
            prompts=(PROMPT,),
            settings=settings,
            pipeline_kwargs={"stg_scale": 1},
        )


def test_cli_evaluate_of_statistics_takes_their_pipeline_kwargs(tmp_path):
    """``evaluate --stats`` samples with the pipeline_kwargs the run was collected with
    (a Python-level option the command line has no flag for)."""
    import qvd_bench

    directory = pipelines.save_tiny_pipeline("tiny-hunyuan", tmp_path / "hunyuan")
    run = qvd_bench.collect(
        str(directory),
        [PROMPT],
        steps=2,
        out=tmp_path / "run",
        frames=2,
        height=SIZE,
        width=SIZE,
        temporal_stride=250,
        reservoir_capacity=8,
        extra={"pipeline_kwargs": HUNYUAN_TRUE_CFG},
    )
    argv = ["evaluate", "--model", str(directory), "--stats", str(run.path)]
    argv += ["--methods", "minmax", "--bits", "W8A8", "--metrics", "fidelity", "--steps", "2"]
    argv += ["--frames", "2", "--height", str(SIZE), "--width", str(SIZE), "--num-prompts", "1"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    results_dir = tmp_path / "out" / "results" / "hunyuan"
    settings = json.loads((results_dir / SETTINGS_FILE).read_text())
    assert settings["config"]["pipeline_kwargs"] == HUNYUAN_TRUE_CFG
    results = pd.read_parquet(results_dir / RESULTS_FILE)
    assert set(results.loc[results["mode"] == "teacher-forced", "branch"]) == {
        "cfg",
        "cond",
        "uncond",
    }
