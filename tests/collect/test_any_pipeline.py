"""Saved diffusers pipelines of other families by path: models --roles, collect, analyze,
quantize, sensitivity, evaluate; statistics against a float64 reference on the raw inputs of a plain diffusers
run; branch keying without silent drops; one-line errors for what cannot be collected."""

from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DiffusionPipeline

from qvd_bench import store
from qvd_bench.collect.collector import collect
from qvd_bench.commands import main as cli
from qvd_bench.config import CollectConfig
from qvd_bench.models import pipelines, tiny_pipelines
from tests.experts import STEPS as WAN_STEPS

PROMPT = "a cat jumps onto a table"
NEGATIVE = "blurry, low quality"
SIZE = dict(frames=2, height=8, width=8)


@functools.cache
def _saved(preset: str, root: str) -> str:
    from pathlib import Path

    return str(pipelines.save_tiny_pipeline(preset, Path(root) / preset))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipelines"))
    return lambda preset: _saved(preset, root)


def run_cli(*args):
    return cli.main([str(a) for a in args])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


SMALL = ["--num-prompts", "1", "--steps", "2", "--frames", "2", "--height", "8", "--width", "8"]


@pytest.mark.parametrize("preset", ["tiny-ltx", "tiny-hunyuan", "tiny-mochi", "wan22"])
def test_saved_pipeline_goes_by_path_through_every_stage(
    preset, saved, two_expert_wan_dir, tmp_path, capsys
):
    path = two_expert_wan_dir if preset == "wan22" else saved(preset)
    steps = ["--steps", str(WAN_STEPS)] if preset == "wan22" else []
    assert run_cli("models", "--roles", path) == 0
    stats = tmp_path / "stats"
    collect_args = ["collect", "--model", path, *SMALL, *steps, "--temporal-stride", "250"]
    assert run_cli(*collect_args, "--out", stats, "--no-progress") == 0
    run = store.StatsRun(stats)
    scheduled = run.manifest["schedule"]
    assert len(scheduled) == (WAN_STEPS if preset == "wan22" else 2)
    # Guidance-distilled HunyuanVideo: one conditional call per step, not an error.
    branches = {"cond"} if preset == "tiny-hunyuan" else {"cond", "uncond"}
    channels = run.channels[run.channels["tensor"] == "input"]
    assert set(channels["branch"]) == branches
    # No silent drop: every layer at every step its expert ran, in every branch.
    experts = run.manifest.get("timestep_experts")
    ran = {(t, e) for t, e in experts} if experts else {(t, "") for t in scheduled}
    for layer, rows in channels.groupby("layer", observed=True):
        expert = layer.split(".")[0] if experts else ""
        steps = {t for t, e in ran if e == expert}
        assert set(zip(rows["timestep"], rows["branch"])) == {
            (t, b) for t in steps for b in branches
        }, layer
    assert run_cli("analyze", stats) == 0
    record = tmp_path / "record"
    assert run_cli("quantize", "--stats", stats, "--method", "qvd", "--out", record) == 0
    assert (record / "record.json").is_file()
    if preset == "wan22":  # evaluate and sensitivity: tests/evaluate/test_pipelines.py
        capsys.readouterr()
        return
    report = tmp_path / "sensitivity"
    by_role = ["--method", "minmax", "--bits", "W4A8", "--by", "role", "--no-progress"]
    assert run_cli("sensitivity", "--stats", stats, *by_role, "--out", report) == 0
    roles = pd.read_parquet(report / "sensitivity.parquet")
    assert len(roles) and np.isfinite(roles["sqnr_db"]).all()
    out = tmp_path / "evaluate"
    matrix = ["--methods", "fp,qvd", "--bits", "W8A8", "--metrics", "fidelity", "--no-progress"]
    assert run_cli("evaluate", "--model", path, *matrix, *SMALL, "--out", out) == 0
    results = pd.read_parquet(next(out.rglob("results.parquet")))
    sqnr = results[(results["method"] == "qvd") & (results["metric"] == "sqnr")]
    assert len(sqnr) and np.isfinite(sqnr["value"]).all()
    settings = json.loads(next(out.rglob("settings.json")).read_text())
    assert settings["sampler"].startswith("pipeline: ")
    capsys.readouterr()


# --------------------------------------------------------------------------- references


def plain_run(pipe, call_kwargs, seed, handles):
    """A plain diffusers run of the pipeline, seeded as ``pipelines.run_pipeline`` seeds
    sample 0; the hook ``handles`` are removed after it."""
    generator = torch.Generator("cpu").manual_seed(pipelines.sample_seed(seed, 0))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(pipelines.sample_seed(seed, 0))
            pipe(generator=generator, output_type="latent", **call_kwargs)
    finally:
        for handle in handles:
            handle.remove()


def raw_inputs(pipe, layers, call_kwargs, seed):
    """Inputs of ``layers`` of a plain diffusers run, with each call's timestep."""
    modules = {}
    for attribute, denoiser in pipelines.pipeline_denoisers(pipe).items():
        for name, module in denoiser.named_modules():
            prefix = f"{attribute}." if len(pipelines.pipeline_denoisers(pipe)) > 1 else ""
            if prefix + name in layers:
                modules[prefix + name] = module
    assert set(modules) == set(layers)
    captured, current = [], {}
    handles = [
        denoiser.register_forward_pre_hook(
            lambda m, a, k: current.update(t=k["timestep"]), with_kwargs=True
        )
        for denoiser in pipelines.pipeline_denoisers(pipe).values()
    ]
    for name, module in modules.items():
        handles.append(
            module.register_forward_pre_hook(
                lambda m, a, name=name: captured.append((name, current["t"], a[0].detach()))
            )
        )
    plain_run(pipe, call_kwargs, seed, handles)
    return captured


def reference_statistics(captured) -> dict[tuple, np.ndarray]:
    """(layer, timestep, branch) -> (C, 4) count, min, max, mean, variance in float64.

    A doubled batch is [uncond, cond] (diffusers' order: negative prompt first)."""
    rows: dict[tuple, list[np.ndarray]] = {}
    for name, timestep, x in captured:
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        halves = x.chunk(2) if x.shape[0] == 2 else (x,)
        branches = ("uncond", "cond") if len(halves) == 2 else ("cond",)
        for branch, half in zip(branches, halves):
            values = half.double().numpy().reshape(-1, half.shape[-1])
            rows.setdefault((name, t, branch), []).append(values)
    return moments_of_rows(rows)


def moments_of_rows(rows: dict[tuple, list[np.ndarray]]) -> dict[tuple, np.ndarray]:
    """key -> (C, 5) count, min, max, mean, variance of the key's rows, each part (R, C)."""
    out = {}
    for key, parts in rows.items():
        v = np.concatenate(parts)
        out[key] = np.stack(
            [np.full(v.shape[1], len(v)), v.min(0), v.max(0), v.mean(0), v.var(0)], 1
        )
    return out


def raw_calls(pipe, layers, call_kwargs, seed):
    """(layer, index of the denoiser call, its timestep argument, input) of every call of
    ``layers`` of the pipeline's one denoiser in a plain diffusers run, seeded as
    ``pipelines.run_pipeline`` seeds sample 0."""
    transformer = pipe.transformer
    timesteps: list[torch.Tensor] = []
    captured = []
    handles = [
        transformer.register_forward_pre_hook(
            lambda m, a, k: timesteps.append(k["timestep"].detach().clone()), with_kwargs=True
        )
    ]
    for name in layers:
        handles.append(
            transformer.get_submodule(name).register_forward_pre_hook(
                lambda m, a, name=name: captured.append(
                    (name, len(timesteps) - 1, timesteps[-1], a[0].detach())
                )
            )
        )
    plain_run(pipe, call_kwargs, seed, handles)
    return captured


def rows_and_level(
    rows: str, timestep: torch.Tensor, x: torch.Tensor, patch: tuple[int, int] = (2, 2)
) -> tuple[np.ndarray, np.ndarray]:
    """One sample's input rows (R, C) in float64, and whether each row is at the call's
    level (the largest entry of its timestep argument (1, frames) or (1, tokens)).

    Args:
        rows: what the rows are: "voxels" (a 5-D latent (1, C, frames, H, W), frame-major:
            a frame's entry covers its H x W voxels, a token's its patch), "entries" (one
            row per entry: the video tokens, a time embedding) or "other" (all at the
            call's level).
        patch: (height, width) of a token's patch (one latent frame per token).
    """
    entries = timestep.double().numpy().reshape(-1)
    top = entries.max()
    if rows == "voxels":
        _, channels, frames, height, width = x.shape
        values = x.double().permute(0, 2, 3, 4, 1).numpy().reshape(-1, channels)
        if len(entries) == frames:
            grid, cover = entries.reshape(frames, 1, 1), (height, width)
        else:
            grid = entries.reshape(frames, height // patch[0], width // patch[1])
            cover = patch
        level = grid.repeat(cover[0], axis=1).repeat(cover[1], axis=2)
        return values, level.reshape(-1) == top
    values = x.double().numpy().reshape(-1, x.shape[-1])
    if rows == "entries":
        assert len(values) == len(entries)
        return values, entries == top
    return values, np.ones(len(values), dtype=bool)


def assert_stats_equal_reference(run, reference):
    channels = run.channels[run.channels["tensor"] == "input"]
    got_keys = set(zip(channels["layer"], channels["timestep"], channels["branch"]))
    assert got_keys == set(reference)
    for (layer, t, branch), ref in reference.items():
        rows = channels[
            (channels["layer"] == layer)
            & (channels["timestep"] == t)
            & (channels["branch"] == branch)
        ].sort_values("channel")
        count = rows["count"].to_numpy()
        np.testing.assert_array_equal(count, ref[:, 0])
        np.testing.assert_array_equal(rows["min"].to_numpy(), ref[:, 1])
        np.testing.assert_array_equal(rows["max"].to_numpy(), ref[:, 2])
        np.testing.assert_allclose(rows["mean"].to_numpy(), ref[:, 3], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(rows["m2"].to_numpy() / count, ref[:, 4], rtol=1e-6, atol=1e-9)


def collect_layers(path, layers, tmp_path, steps, **extra):
    config = CollectConfig(
        model=str(path),
        prompts=(PROMPT,),
        steps=steps,
        guidance_scale=4.0,
        include=tuple(f"^{name.replace('.', '[.]')}$" for name in layers),
        histograms=False,
        reservoir_capacity=0,
        temporal_stride=0,
        extra=extra,
        **SIZE,
    )
    collect(config, tmp_path / "run", progress=False)
    return store.StatsRun(tmp_path / "run")


def test_ltx_statistics_equal_a_float64_reference_on_a_plain_diffusers_run(saved, tmp_path):
    path = saved("tiny-ltx")
    layers = ["proj_in", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_k"]
    run = collect_layers(path, layers, tmp_path, 2, negative_prompt=NEGATIVE)
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    spatial, temporal = pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio
    call = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_frames=(SIZE["frames"] - 1) * temporal + 1,
        height=SIZE["height"] * spatial,
        width=SIZE["width"] * spatial,
        num_inference_steps=2,
        guidance_scale=4.0,
        max_sequence_length=pipe.tokenizer.model_max_length,
    )
    reference = reference_statistics(raw_inputs(pipe, layers, call, seed=0))
    assert {key[2] for key in reference} == {"uncond", "cond"}
    assert_stats_equal_reference(run, reference)


def test_two_expert_wan_statistics_equal_a_float64_reference(two_expert_wan_dir, tmp_path):
    layers = ["transformer.blocks.0.attn1.to_q", "transformer_2.blocks.1.ffn.net.0.proj"]
    run = collect_layers(two_expert_wan_dir, layers, tmp_path, WAN_STEPS)
    pipe = DiffusionPipeline.from_pretrained(str(two_expert_wan_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    call = dict(
        prompt=PROMPT,
        num_frames=(SIZE["frames"] - 1) * pipe.vae_scale_factor_temporal + 1,
        height=SIZE["height"] * pipe.vae_scale_factor_spatial,
        width=SIZE["width"] * pipe.vae_scale_factor_spatial,
        num_inference_steps=WAN_STEPS,
        guidance_scale=4.0,
        guidance_scale_2=4.0,
        max_sequence_length=pipe.tokenizer.model_max_length,
    )
    captured = raw_inputs(pipe, layers, call, seed=0)
    # WanPipeline runs cond then uncond as two calls (its cache_context names them).
    keyed, seen = [], {}
    for name, t, x in captured:
        count = seen[(name, float(t.reshape(-1)[0]))] = (
            seen.get((name, float(t.reshape(-1)[0])), 0) + 1
        )
        keyed.append((name, t, x, "cond" if count == 1 else "uncond"))
    rows: dict[tuple, list] = {}
    for name, t, x, branch in keyed:
        rows.setdefault((name, float(t.reshape(-1)[0]), branch), []).append(
            x.double().numpy().reshape(-1, x.shape[-1])
        )
    reference = {}
    for key, parts in rows.items():
        v = np.concatenate(parts)
        reference[key] = np.stack(
            [np.full(v.shape[1], len(v)), v.min(0), v.max(0), v.mean(0), v.var(0)], 1
        )
    experts = {key[0].split(".")[0] for key in reference}
    assert experts == {"transformer", "transformer_2"}
    assert_stats_equal_reference(run, reference)


# --------------------------------------------------------------------------- keying


def calls_of(loaded, **kwargs):
    from qvd_bench.models.sampling import CallTracker

    tracker = CallTracker(loaded.experts)
    calls = []
    handles = [
        m.register_forward_hook(lambda *_: calls.append(tracker.current))
        for m in loaded.experts.values()
    ]
    try:
        pipelines.run_pipeline(
            loaded,
            [PROMPT],
            steps=2,
            guidance_scale=4.0,
            seed=0,
            sample_ids=[0],
            tracker=tracker,
            **SIZE,
            **kwargs,
        )
    finally:
        for handle in handles:
            handle.remove()
    return calls


def test_guidance_distilled_hunyuan_records_cond_only_and_true_cfg_keys_uncond():
    loaded = pipelines.tiny_pipeline_model("tiny-hunyuan")
    distilled = calls_of(loaded)
    assert [c.branches for c in distilled] == [("cond",), ("cond",)]
    true_cfg = calls_of(loaded, negative_prompt=NEGATIVE, pipeline_kwargs={"true_cfg_scale": 3.0})
    # HunyuanVideoPipeline runs cond first, then uncond, each in its cache_context.
    assert [c.branches for c in true_cfg] == [("cond",), ("uncond",)] * 2


def test_mochi_attention_statistics_key_each_sample_of_its_per_sample_loop(saved, tmp_path):
    config = CollectConfig(
        model=saved("tiny-mochi"),
        prompts=(PROMPT,),
        steps=2,
        guidance_scale=4.0,
        attention=True,
        histograms=False,
        reservoir_capacity=0,
        temporal_stride=0,
        **SIZE,
    )
    collect(config, tmp_path / "run", progress=False)
    attention = store.StatsRun(tmp_path / "run").attention
    counts = attention.groupby(["module", "tensor", "timestep", "branch"], observed=True)[
        "count"
    ].sum()
    assert set(attention["branch"]) == {"uncond", "cond"}
    # Both branches of every (module, tensor, timestep), each with its own rows.
    per_branch = counts.unstack("branch")
    assert per_branch.notna().all().all() and (per_branch > 0).all().all()


# --------------------------------------------------------------------------- fixtures


def save_variant(preset: str, pipeline_class: str, directory, **config):
    """A tiny preset's components in another pipeline class of its family, saved."""
    import diffusers

    base = pipelines.build_tiny_pipeline(preset)
    pipe = getattr(diffusers, pipeline_class)(**base.components, **config)
    pipe.save_pretrained(directory)
    return str(directory)


def collected(path, tmp_path, layers):
    return collect_layers(path, layers, tmp_path, 2)


def test_image_to_video_ltx_keys_by_step_and_leaves_out_the_conditioning_frame(tmp_path):
    """LTXImageToVideoPipeline gives each token t·(1 − mask): the conditioning frame's
    tokens are at 0. They are left out of the token layers, not filed under the step."""
    path = save_variant("tiny-ltx", "LTXImageToVideoPipeline", tmp_path / "i2v")
    layers = ["proj_in", "transformer_blocks.0.attn2.to_k"]
    run = collected(path, tmp_path, layers)
    channels = run.channels[run.channels["channel"] == 0]
    tokens_per_frame = SIZE["height"] * SIZE["width"]  # patch size 1
    text_tokens = tiny_pipelines._TINY_TEXT_LENGTH
    assert len(run.manifest["schedule"]) == 2 and 0.0 not in run.manifest["schedule"]
    for _, row in channels.iterrows():
        expected = (
            tokens_per_frame * (SIZE["frames"] - 1) if row["layer"] == "proj_in" else text_tokens
        )
        assert row["count"] == expected
    assert len(channels) == 2 * 2 * len(layers)  # steps x branches x layers: nothing dropped
    excluded = run.manifest["keying"]["excluded_rows"]
    assert excluded == {"proj_in": 2 * 2 * tokens_per_frame}


def test_attention_statistics_leave_out_the_conditioning_frame_too(tmp_path):
    """LTX image-to-video: the attention operands of the self-attention leave out the
    conditioning frame's tokens as the layer hooks do — queries for q and the softmax,
    keys for k and v. Its v is the to_v output reshaped, so per step and branch the
    attention's v statistics are those of to_v's stored outputs over the kept tokens."""
    path = save_variant("tiny-ltx", "LTXImageToVideoPipeline", tmp_path / "i2v")
    config = CollectConfig(
        model=path,
        prompts=(PROMPT,),
        steps=2,
        guidance_scale=4.0,
        include=("^transformer_blocks[.]0[.]attn1[.]to_v$",),
        outputs=True,
        attention=True,
        histograms=False,
        reservoir_capacity=0,
        temporal_stride=0,
        **SIZE,
    )
    collect(config, tmp_path / "run", progress=False)
    run = store.StatsRun(tmp_path / "run")
    module = "transformer_blocks.0.attn1"
    attention = run.attention[run.attention["module"] == module]
    outputs = run.channels[run.channels["tensor"] == "output"]
    tokens_per_frame = SIZE["height"] * SIZE["width"]  # patch size 1
    kept = tokens_per_frame * (SIZE["frames"] - 1)
    for (t, branch), rows in outputs.groupby(["timestep", "branch"], observed=True):
        v = attention[
            (attention["tensor"] == "v")
            & (attention["timestep"] == t)
            & (attention["branch"] == branch)
        ].iloc[0]
        assert set(rows["count"]) == {kept}
        assert v["count"] == kept * len(rows)  # every channel of every kept token
        assert v["min"] == rows["min"].min() and v["max"] == rows["max"].max()
        np.testing.assert_allclose(v["mean"], rows["mean"].mean(), rtol=1e-9)
    excluded = run.manifest["attention"]["excluded_rows"]
    calls = 2 * 2  # steps x branches
    for tensor in ("q", "k", "v", "softmax"):
        assert excluded[f"{module}:{tensor}"] == calls * tokens_per_frame
    # Cross-attention: its queries are video tokens, its keys and values text tokens.
    cross = "transformer_blocks.0.attn2"
    assert excluded[f"{cross}:q"] == excluded[f"{cross}:softmax"] == calls * tokens_per_frame
    assert f"{cross}:k" not in excluded and f"{cross}:v" not in excluded


def test_rows_left_out_are_counted_across_an_interrupted_and_resumed_collection(
    tmp_path, monkeypatch, capsys
):
    """The count of rows left out is checkpointed with the statistics: a collection
    interrupted after its first prompt and resumed counts what an uninterrupted one does."""
    from qvd_bench.collect import collector
    from tests.commands.test_cli import _interrupt_after_step

    path = save_variant("tiny-ltx", "LTXImageToVideoPipeline", tmp_path / "i2v")
    args = ["collect", "--model", path, *SMALL, "--num-prompts", "2", "--include", "^proj_in$"]
    out, fresh = tmp_path / "resumed", tmp_path / "fresh"
    monkeypatch.setattr(collector, "run_sample", _interrupt_after_step(1, 1))
    assert run_cli(*args, "--out", out, "--no-progress") == 130
    monkeypatch.undo()
    assert run_cli(*args, "--out", out, "--no-progress") == 0
    assert run_cli(*args, "--out", fresh, "--no-progress") == 0
    tokens_per_frame = SIZE["height"] * SIZE["width"]  # patch size 1
    expected = {"proj_in": 2 * 2 * 2 * tokens_per_frame}  # prompts x steps x branches
    for run in (out, fresh):
        assert store.StatsRun(run).manifest["keying"]["excluded_rows"] == expected
    capsys.readouterr()


def test_per_token_timesteps_of_wan_expand_timesteps_are_keyed_by_the_step(tmp_path):
    """Wan 2.2 TI2V's ``expand_timesteps``: one timestep per token, all at the step's."""
    path = save_variant("tiny-wan", "WanPipeline", tmp_path / "ti2v", expand_timesteps=True)
    run = collected(
        path, tmp_path, ["blocks.0.attn1.to_q", "condition_embedder.time_embedder.linear_1"]
    )
    reference = pipelines.build_tiny_pipeline("tiny-wan").scheduler
    reference.set_timesteps(2)
    keys = set(zip(run.channels["timestep"], run.channels["branch"]))
    assert keys == {(float(t), b) for t in reference.timesteps for b in ("cond", "uncond")}
    assert run.manifest["keying"]["excluded_rows"] == {}


def test_wan_image_to_video_without_ftfy_is_one_line_exit_2(tmp_path, capsys):
    """WanImageToVideoPipeline cleans prompts with ftfy without checking it is there
    (WanPipeline checks first, and runs without it)."""
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    if hasattr(pipeline_wan_i2v, "ftfy") or hasattr(pipeline_wan, "ftfy"):
        pytest.skip("ftfy is installed")
    path = save_variant("tiny-wan", "WanImageToVideoPipeline", tmp_path / "i2v")
    capsys.readouterr()
    out = tmp_path / "stats"
    assert run_cli("collect", "--model", path, *SMALL, "--out", out, "--no-progress") == 2
    assert "WanImageToVideoPipeline needs the ftfy package" in error_line(capsys)
    assert not out.exists()


def test_wan_ti2v_conditioning_frame_is_left_out_of_token_voxel_and_time_rows(
    tmp_path, monkeypatch
):
    """WanImageToVideoPipeline with ``expand_timesteps`` (Wan 2.2 TI2V) gives the image
    frame's tokens timestep 0: they are left out of the video-token layers, of the patch
    embedding's latent voxels (a token of patch (1, 2, 2) covers 4 voxels) and of the time
    embedding's per-token rows; the text rows are all kept. The statistics equal those of
    the raw inputs of a plain diffusers run restricted to the rows at each step's level."""
    import types

    from diffusers.pipelines.wan import pipeline_wan_i2v

    if not hasattr(pipeline_wan_i2v, "ftfy"):  # its prompt cleaning calls ftfy unguarded
        monkeypatch.setattr(
            pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda t: t), raising=False
        )
    path = save_variant(
        "tiny-wan", "WanImageToVideoPipeline", tmp_path / "ti2v", expand_timesteps=True
    )
    layers = {
        "patch_embedding": "voxels",
        "blocks.0.attn1.to_q": "entries",
        "condition_embedder.time_embedder.linear_1": "entries",
        "blocks.0.attn2.to_k": "other",
    }
    run = collected(path, tmp_path, list(layers))
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    height, width = SIZE["height"] * spatial, SIZE["width"] * spatial
    call = dict(
        prompt=PROMPT,
        image=pipelines.synthetic_image(0, 0, height, width),
        num_frames=(SIZE["frames"] - 1) * temporal + 1,
        height=height,
        width=width,
        num_inference_steps=2,
        guidance_scale=4.0,
        max_sequence_length=min(pipe.tokenizer.model_max_length, 512),
    )
    captured = raw_calls(pipe, list(layers), call, seed=0)
    rows: dict[tuple, list[np.ndarray]] = {}
    every_row = dict.fromkeys(layers, 0)
    other_rows = dict.fromkeys(layers, 0)
    for name, index, timestep, x in captured:
        values, at_level = rows_and_level(layers[name], timestep, x)
        every_row[name] += len(values)
        other_rows[name] += int((~at_level).sum())
        branch = ("cond", "uncond")[index % 2]  # the pipeline calls cond, then uncond
        rows.setdefault((name, float(timestep.max()), branch), []).append(values[at_level])
    assert len({key[1] for key in rows}) == 2  # both steps, each at its own key
    assert_stats_equal_reference(run, moments_of_rows(rows))
    excluded = run.manifest["keying"]["excluded_rows"]
    assert excluded == {name: n for name, n in other_rows.items() if n}
    assert set(excluded) == set(layers) - {"blocks.0.attn2.to_k"}
    tokens_per_frame = SIZE["height"] // 2 * (SIZE["width"] // 2)
    assert excluded["blocks.0.attn1.to_q"] == 2 * 2 * tokens_per_frame  # steps x branches
    assert excluded["patch_embedding"] == 4 * excluded["blocks.0.attn1.to_q"]
    channels = run.channels[(run.channels["tensor"] == "input") & (run.channels["channel"] == 0)]
    for name in layers:
        stored = channels[channels["layer"] == name]["count"].sum()
        assert stored + excluded.get(name, 0) == every_row[name], name


# --------------------------------------------------------------------------- bad input


def test_a_directory_without_a_video_denoiser_is_one_line_exit_2(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=2,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "image")
    out = tmp_path / "stats"
    assert run_cli("collect", "--model", tmp_path / "image", *SMALL, "--out", out) == 2
    assert "denoiser class UNet2DModel is not supported" in error_line(capsys)
    assert not out.exists()


def test_an_unkeyable_denoiser_call_is_one_line_exit_2(
    two_expert_wan_dir, tmp_path, capsys, monkeypatch
):
    """Without its cache_context and without the prompts' text states (a pipeline without
    a usable ``encode_prompt``), WanPipeline's two calls per step could be told apart only
    by their order: the run stops instead of guessing."""
    from qvd_bench.models import sampling

    monkeypatch.setattr(sampling.CallTracker, "_attach_context_hooks", lambda self: None)
    monkeypatch.setattr(pipelines, "branch_text_states", lambda pipeline, kwargs: {})
    out = tmp_path / "stats"
    code = run_cli("collect", "--model", two_expert_wan_dir, *SMALL, "--out", out, "--no-progress")
    assert code == 2
    assert "two denoiser calls at timestep 1000 without a cache_context" in error_line(capsys)
    assert not out.exists()


def test_a_pipeline_argument_the_call_does_not_take_is_one_line(saved, tmp_path):
    """pipeline_kwargs name arguments of the pipeline's call: a misspelt one stops the
    collection and the evaluation before any sample runs, with the nearest name."""
    from qvd_bench.errors import UserError
    from qvd_bench.evaluate import generate as gen
    from qvd_bench.models import zoo

    path = saved("tiny-ltx")
    typo = {"guidance_rescal": 0.5}
    expected = "LTXPipeline's call takes no argument 'guidance_rescal' (pipeline_kwargs); "
    expected += "did you mean 'guidance_rescale' or"
    config = CollectConfig(
        model=path, prompts=(PROMPT,), steps=2, extra={"pipeline_kwargs": typo}, **SIZE
    )
    with pytest.raises(UserError) as error:
        collect(config, tmp_path / "run", progress=False)
    assert str(error.value).startswith(f"pipeline {expected}")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()
    settings = gen.GenerationSettings(steps=2, pipeline_kwargs=typo, **SIZE)
    with pytest.raises(UserError, match="takes no argument 'guidance_rescal'"):
        gen.generate(zoo.load_model(path), PROMPT, 0, settings)


def test_statistics_of_one_model_given_to_another_is_one_line_exit_2(saved, tmp_path, capsys):
    stats, ltx, mochi = tmp_path / "stats", saved("tiny-ltx"), saved("tiny-mochi")
    args = ["collect", "--model", ltx, *SMALL, "--temporal-stride", "0"]
    assert run_cli(*args, "--out", stats, "--no-progress") == 0
    capsys.readouterr()
    record = tmp_path / "record"
    code = run_cli("quantize", "--stats", stats, "--model", mochi, "--out", record)
    assert code == 2
    assert "from another model" in error_line(capsys)
    assert list(record.iterdir()) == []  # created empty before any work, nothing written
