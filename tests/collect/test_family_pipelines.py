"""Saved pipelines of the families without a tiny preset (Allegro, SkyReels-V2, ...), built
from the family's tiny config: by path through models --roles, collect, analyze, quantize
and evaluate, with every sampled timestep stored and no denoiser call dropped; SkyReels-V2's
diffusion forcing with frames at different noise levels."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qvd_bench import store
from qvd_bench.collect.collector import collect
from qvd_bench.config import CollectConfig
from qvd_bench.models import pipelines
from tests.collect.test_any_pipeline import (
    PROMPT,
    SIZE,
    SMALL,
    assert_stats_equal_reference,
    collect_layers,
    error_line,
    moments_of_rows,
    raw_calls,
    rows_and_level,
    run_cli,
)

# (family, pipeline class) of each tiny family pipeline.
FAMILY_PIPELINES = [
    # Its text-to-video x_embedder input is the latent and C + 1 zero channels: the plan's
    # SCRI disparity there is infinite (stored as None), which the report must read.
    ("hunyuan-video-1.5", "HunyuanVideo15Pipeline"),
    ("allegro", "AllegroPipeline"),
    ("skyreels-v2", "SkyReelsV2Pipeline"),
    ("skyreels-v2", "SkyReelsV2DiffusionForcingPipeline"),
]

# The diffusers modules of SkyReels-V2's pipelines, which call ``ftfy.fix_text`` on every
# prompt but import ftfy only where it is installed.
_SKYREELS_MODULES = (
    "diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2",
    "diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2_diffusion_forcing",
)


def analyze_quantize_evaluate(path: str, stats: Path, tmp_path: Path) -> Path:
    """analyze, quantize qvd and evaluate fidelity (fp, qvd W8A8) of a collected pipeline
    by path, each exit code 0 and the qvd SQNR finite; returns the evaluation's root."""
    assert run_cli("analyze", stats) == 0
    record = tmp_path / "record"
    assert run_cli("quantize", "--stats", stats, "--method", "qvd", "--out", record) == 0
    assert (record / "record.json").is_file()
    out = tmp_path / "evaluate"
    matrix = ["--methods", "fp,qvd", "--bits", "W8A8", "--metrics", "fidelity", "--no-progress"]
    assert run_cli("evaluate", "--model", path, *matrix, *SMALL, "--out", out) == 0
    results = pd.read_parquet(next(out.rglob("results.parquet")))
    sqnr = results[(results["method"] == "qvd") & (results["metric"] == "sqnr")]
    assert len(sqnr) and np.isfinite(sqnr["value"]).all()
    return out


@pytest.fixture
def ftfy(monkeypatch):
    """ftfy where it is not installed: a stand-in whose ``fix_text`` returns the text (what
    ftfy does to the plain ASCII prompts of these tests)."""
    stand_in = types.SimpleNamespace(fix_text=lambda text: text)
    for name in _SKYREELS_MODULES:
        module = importlib.import_module(name)
        if not hasattr(module, "ftfy"):
            monkeypatch.setattr(module, "ftfy", stand_in, raising=False)


@functools.cache
def _saved(family: str, pipeline_class: str, root: str) -> str:
    from pathlib import Path

    directory = Path(root) / pipeline_class
    pipelines.tiny_family_pipeline(family, pipeline_class).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("family_pipelines"))
    return lambda family, pipeline_class: _saved(family, pipeline_class, root)


@pytest.mark.parametrize(("family", "pipeline_class"), FAMILY_PIPELINES)
def test_saved_family_pipeline_goes_by_path_through_every_stage(
    family, pipeline_class, saved, ftfy, tmp_path, capsys
):
    path = saved(family, pipeline_class)
    assert run_cli("models", "--roles", path) == 0
    stats = tmp_path / "stats"
    collect_args = ["collect", "--model", path, *SMALL, "--temporal-stride", "250"]
    assert run_cli(*collect_args, "--out", stats, "--no-progress") == 0
    run = store.StatsRun(stats)
    assert run.manifest["model"]["family"] == family
    assert run.manifest["sampling"]["sampler"] == "pipeline"
    scheduled = run.manifest["schedule"]
    assert len(scheduled) == 2
    channels = run.channels[run.channels["tensor"] == "input"]
    assert set(channels["branch"]) == {"cond", "uncond"}
    # No silent drop: every layer at every sampled timestep, in both branches, and no
    # tokens left out (every token of a text-to-video call is at the step's noise level).
    for layer, rows in channels.groupby("layer", observed=True):
        keys = set(zip(rows["timestep"], rows["branch"]))
        assert keys == {(t, b) for t in scheduled for b in ("cond", "uncond")}, layer
    assert run.manifest["keying"]["excluded_rows"] == {}
    out = analyze_quantize_evaluate(path, stats, tmp_path)
    settings = json.loads(next(out.rglob("settings.json")).read_text())
    assert settings["sampler"] == f"pipeline: {pipeline_class}"
    capsys.readouterr()


def test_saved_ltx2_pipeline_collects_every_step_and_quantizes(saved, tmp_path, capsys):
    """LTX-2 by path with its default guidance: CFG and the spatio-temporal and
    modality-isolation passes, each stored as its own branch at every step; then analyze
    and quantize."""
    path = saved("ltx2", "LTX2Pipeline")
    assert run_cli("models", "--roles", path) == 0
    stats = tmp_path / "stats"
    config = CollectConfig(
        model=path, prompts=("a cat jumps onto a table",), steps=2, temporal_stride=250, **SIZE
    )
    collect(config, stats, progress=False)
    run = store.StatsRun(stats)
    scheduled = run.manifest["schedule"]
    assert len(scheduled) == 2
    branches = set(run.manifest["keying"]["stored_branches"])
    assert branches == {"cond", "uncond", "cond_stg", "cond_modality"}
    channels = run.channels[run.channels["tensor"] == "input"]
    # Both streams' layers (video and audio) at every step, in every branch; the
    # modality-isolation pass is the one that skips the attention across the streams.
    assert channels["layer"].str.contains("audio_").any()
    for layer, rows in channels.groupby("layer", observed=True):
        keys = set(zip(rows["timestep"], rows["branch"]))
        across = "audio_to_video_attn" in layer or "video_to_audio_attn" in layer
        ran = branches - {"cond_modality"} if across else branches
        assert keys == {(t, b) for t in scheduled for b in ran}, layer
    assert run.manifest["keying"]["excluded_rows"] == {}
    # The estimate counts the four branches; it overcounts only the cross-stream
    # attention's keys, which the modality-isolation pass skips.
    cost = run.manifest["cost"]
    estimated = cost["estimate"]["accumulator_parts"]["moments"]
    measured = cost["measured"]["accumulator_parts"]["moments"]
    assert measured < estimated < 1.2 * measured
    analyze_quantize_evaluate(path, stats, tmp_path)
    capsys.readouterr()


def test_diffusion_forcing_frames_at_other_noise_levels_are_left_out_not_dropped(
    saved, ftfy, tmp_path
):
    """Asynchronous diffusion forcing (``ar_step`` 1): each latent frame starts one
    iteration after the one before, so a call's timesteps (B, frames) differ per frame and
    there are more calls than steps. Each call is keyed by its largest timestep; the video
    tokens of frames at another noise level are left out and counted, none dropped."""
    path = saved("skyreels-v2", "SkyReelsV2DiffusionForcingPipeline")
    layer = "blocks.0.attn1.to_q"
    run = collect_layers(
        path, [layer], tmp_path, 2, pipeline_kwargs={"ar_step": 1, "causal_block_size": 1}
    )
    from diffusers import DiffusionPipeline

    scheduler = DiffusionPipeline.from_pretrained(path, local_files_only=True).scheduler
    scheduler.set_timesteps(2)
    assert run.manifest["schedule"] == [float(t) for t in scheduler.timesteps]
    rows = run.channels[run.channels["channel"] == 0]
    assert set(zip(rows["timestep"], rows["branch"])) == {
        (float(t), b) for t in scheduler.timesteps for b in ("cond", "uncond")
    }
    # Every video token of every call, stored or left out: the frames lag one iteration
    # each, so there are steps + frames - 1 calls per branch.
    patch = (1, 2, 2)  # the tiny Wan config's patch size
    tokens_per_frame = SIZE["height"] // patch[1] * (SIZE["width"] // patch[2])
    calls = 2 * (2 + SIZE["frames"] - 1)
    excluded = run.manifest["keying"]["excluded_rows"].get(layer, 0)
    assert excluded > 0
    assert rows["count"].sum() + excluded == calls * SIZE["frames"] * tokens_per_frame


def test_diffusion_forcing_frames_at_other_levels_are_left_out_of_voxel_and_time_rows(
    saved, ftfy, tmp_path
):
    """The patch embedding's rows are latent voxels and the time embedding's rows are the
    per-frame timesteps, neither the video tokens: the rows of frames at another noise
    level are left out of them too. Their statistics equal those of the raw inputs of a
    plain diffusers run restricted to the rows at each call's level."""
    path = saved("skyreels-v2", "SkyReelsV2DiffusionForcingPipeline")
    layers = {
        "patch_embedding": "voxels",
        "condition_embedder.time_embedder.linear_1": "entries",
        "condition_embedder.time_proj": "entries",
    }
    df = {"ar_step": 1, "causal_block_size": 1}
    run = collect_layers(path, list(layers), tmp_path, 2, pipeline_kwargs=df)
    assert "patch embedding" in run.manifest["keying"]["other_noise_levels"]
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    call = dict(
        prompt=PROMPT,
        num_frames=(SIZE["frames"] - 1) * pipe.vae_scale_factor_temporal + 1,
        height=SIZE["height"] * pipe.vae_scale_factor_spatial,
        width=SIZE["width"] * pipe.vae_scale_factor_spatial,
        num_inference_steps=2,
        guidance_scale=4.0,
        max_sequence_length=min(pipe.tokenizer.model_max_length, 512),
        **df,
    )
    captured = raw_calls(pipe, list(layers), call, seed=0)
    calls = 2 * (2 + SIZE["frames"] - 1)  # steps + frames - 1 calls per branch
    assert len(captured) == calls * len(layers)
    rows: dict[tuple, list[np.ndarray]] = {}
    every_row = dict.fromkeys(layers, 0)
    other_rows = dict.fromkeys(layers, 0)
    for name, index, timestep, x in captured:
        assert timestep.shape == (1, SIZE["frames"])  # one timestep per latent frame
        values, at_level = rows_and_level(layers[name], timestep, x)
        every_row[name] += len(values)
        other_rows[name] += int((~at_level).sum())
        branch = ("cond", "uncond")[index % 2]  # each iteration calls cond, then uncond
        rows.setdefault((name, float(timestep.max()), branch), []).append(values[at_level])
    assert_stats_equal_reference(run, moments_of_rows(rows))
    excluded = run.manifest["keying"]["excluded_rows"]
    channels = run.channels[(run.channels["tensor"] == "input") & (run.channels["channel"] == 0)]
    for name in layers:
        assert excluded[name] == other_rows[name] > 0, name
        stored = channels[channels["layer"] == name]["count"].sum()
        assert stored + excluded[name] == every_row[name], name
    # A frame left out of the time embedding is all its voxels left out of the patch
    # embedding.
    voxels_per_frame = SIZE["height"] * SIZE["width"]
    time_rows = excluded["condition_embedder.time_embedder.linear_1"]
    assert excluded["patch_embedding"] == time_rows * voxels_per_frame


def test_the_runs_guidance_scale_reaches_a_pipelines_guider(saved, tmp_path):
    """HunyuanVideo15Pipeline takes its CFG scale from its guider, not from its call: a
    scale of 1 runs the conditional branch alone, and the pipeline keeps its own guider."""
    from qvd_bench.models import zoo

    path = saved("hunyuan-video-1.5", "HunyuanVideo15Pipeline")
    loaded = zoo.load_model(path)
    guider = loaded.pipeline.guider
    calls = []
    handle = loaded.denoiser.register_forward_hook(lambda *args: calls.append(1))
    common = dict(steps=2, seed=0, sample_ids=[0], **SIZE)
    for scale, calls_per_step in ((1.0, 1), (4.0, 2)):
        calls.clear()
        pipelines.run_pipeline(loaded, ["a cat"], guidance_scale=scale, **common)
        assert len(calls) == 2 * calls_per_step
        assert loaded.pipeline.guider is guider
    handle.remove()
    config = CollectConfig(
        model=path,
        prompts=("a cat",),
        steps=2,
        guidance_scale=1.0,
        include=("^proj_out$",),
        histograms=False,
        reservoir_capacity=0,
        temporal_stride=0,
        **SIZE,
    )
    collect(config, tmp_path / "run", progress=False)
    assert set(store.StatsRun(tmp_path / "run").channels["branch"]) == {"cond"}


def test_skyreels_without_ftfy_is_one_line_exit_2(saved, tmp_path, capsys):
    """SkyReels-V2's pipelines call ftfy on every prompt without checking it is there."""
    for name in _SKYREELS_MODULES:
        if hasattr(importlib.import_module(name), "ftfy"):
            pytest.skip("ftfy is installed")
    path = saved("skyreels-v2", "SkyReelsV2Pipeline")
    capsys.readouterr()  # saving's progress bar
    out = tmp_path / "stats"
    assert run_cli("collect", "--model", path, *SMALL, "--out", out, "--no-progress") == 2
    assert "needs the ftfy package" in error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("family, pipeline_class", [*FAMILY_PIPELINES, ("ltx2", "LTX2Pipeline")])
def test_evaluated_frames_are_the_frames_of_the_family_pipelines_own_call(
    family, pipeline_class, saved, ftfy
):
    """The family's decoder (``Family.decode_video``) gives the frames the pipeline's own
    call returns with its default output type."""
    from qvd_bench.evaluate import generate as gen
    from qvd_bench.evaluate.latents import DECODED_BY_VAE, video_frames
    from qvd_bench.models import zoo
    from tests.evaluate.test_decoded_frames import PROMPT, plain_call_frames, settings_for

    loaded = zoo.load_model(saved(family, pipeline_class))
    settings = settings_for(loaded)
    guider = getattr(loaded.pipeline, "guider", None)
    if guider is not None:  # the plain call takes its scale from the pipeline's guider
        settings = dataclasses.replace(settings, guidance_scale=guider.guidance_scale)
    generation = gen.generate(loaded, PROMPT, 0, settings)
    frames = video_frames(loaded, settings, [generation])
    assert frames.decoded_by == DECODED_BY_VAE
    decoded = frames.frames(generation.latents)
    if family == "allegro":  # its VAE decodes tiled only, as diffusers' example sets it up
        loaded.pipeline.vae.enable_tiling()
    expected = plain_call_frames(loaded, settings)
    assert decoded.shape == expected.shape
    torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=0.5 / 255 + 1e-6)
