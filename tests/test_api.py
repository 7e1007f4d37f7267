"""The in-memory Python API on a diffusers pipeline object: qvd_bench.collect ->
qvd_bench.quantize_ -> qvd_bench.fidelity, checked against plain diffusers calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qvd_bench
from qvd_bench.errors import UserError
from qvd_bench.evaluate.calibration import ensure_stats
from qvd_bench.evaluate.config import EvalConfig
from qvd_bench.evaluate.sensitivity import probe_for_run
from qvd_bench.models import pipelines
from qvd_bench.models.roles import leaf_layers
from qvd_bench.models.zoo import load_model, pipeline_model
from qvd_bench.quant.modules import quant_wrappers

PROMPTS = ["a red ball rolls across a table", "a cat jumps onto a sofa"]
STEPS, GUIDANCE, SEED = 2, 5.0, 0
FRAMES, SIZE = 2, 8  # latent sizes


def plain_latents(pipe, prompt: str, sample_id: int) -> torch.Tensor:
    """A plain WanPipeline call with the sizes, seed and text length qvd-bench uses."""
    spatial, temporal = pipelines._compression(pipe)
    generator = torch.Generator().manual_seed(pipelines.sample_seed(SEED, sample_id))
    with torch.no_grad():
        output = pipe(
            prompt=prompt,
            height=SIZE * spatial,
            width=SIZE * spatial,
            num_frames=(FRAMES - 1) * temporal + 1,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=generator,
            output_type="latent",
            max_sequence_length=pipelines._text_length(pipe),
        )
    return torch.as_tensor(output.frames).double()


def test_collect_quantize_and_fidelity_of_a_pipeline_in_memory(tmp_path):
    pipe = pipelines.build_tiny_pipeline("tiny-wan")
    run = qvd_bench.collect(
        pipe,
        PROMPTS,
        steps=STEPS,
        out=tmp_path / "run",
        guidance_scale=GUIDANCE,
        frames=FRAMES,
        height=SIZE,
        width=SIZE,
        temporal_stride=250,
        reservoir_capacity=8,
    )
    assert isinstance(run, qvd_bench.StatsRun)
    assert set(run.layers["name"]) == set(leaf_layers(pipe.transformer))
    assert run.manifest["sampling"]["sampler"] == "pipeline"
    assert len(run.manifest["schedule"]) == STEPS

    record = qvd_bench.quantize_(pipe, qvd_bench.QuantConfig("minmax", 8, 8), stats=run)
    assert {name for name, _ in quant_wrappers(pipe.transformer)} == set(record.quantized)
    quantized = [plain_latents(pipe, p, i) for i, p in enumerate(PROMPTS)]
    reference = [
        plain_latents(pipelines.build_tiny_pipeline("tiny-wan"), p, i)
        for i, p in enumerate(PROMPTS)
    ]

    table = qvd_bench.fidelity(
        pipe,
        record,
        PROMPTS,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        seed=SEED,
        frames=FRAMES,
        height=SIZE,
        width=SIZE,
    )
    assert table.attrs["sampler"] == "pipeline: WanPipeline"
    free = table[(table["mode"] == "free-running") & (table["metric"] == "sqnr")]
    ref, test = torch.cat(reference).numpy(), torch.cat(quantized).numpy()
    expected = 10 * np.log10(np.sum(ref**2) / np.sum((ref - test) ** 2))
    assert free["value"].item() == pytest.approx(expected, rel=1e-6)
    forced = table[(table["mode"] == "teacher-forced") & (table["metric"] == "sqnr")]
    assert set(forced["branch"]) == {"cfg", "cond", "uncond"}
    assert np.isfinite(forced["value"]).all() and (forced["value"] > 0).all()
    assert set(table["method"]) == {"minmax"} and set(table["bits"]) == {"W8A8"}
    # The pipeline is left quantized as it was given.
    assert {name for name, _ in quant_wrappers(pipe.transformer)} == set(record.quantized)
    torch.testing.assert_close(plain_latents(pipe, PROMPTS[0], 0), quantized[0], rtol=0, atol=0)


def test_in_memory_api_bad_input(tmp_path):
    pipe = pipelines.build_tiny_pipeline("tiny-wan")
    with pytest.raises(UserError, match="no prompts"):
        qvd_bench.collect(pipe, [], steps=2, out=tmp_path / "a")
    with pytest.raises(UserError, match="steps must be at least 1"):
        qvd_bench.collect(pipe, PROMPTS, steps=0, out=tmp_path / "b")
    with pytest.raises(UserError, match="got object"):
        qvd_bench.collect(object(), PROMPTS, steps=2, out=tmp_path / "c")
    with pytest.raises(UserError, match="dtype must be the in-memory model's own"):
        qvd_bench.collect(pipe, PROMPTS, steps=2, out=tmp_path / "d", dtype="bfloat16")
    with pytest.raises(UserError, match="unexpected keyword argument"):
        qvd_bench.collect(pipe, PROMPTS, steps=2, out=tmp_path / "e", stepz=3)
    assert not any((tmp_path / name).exists() for name in "abcde")
    record = qvd_bench.QuantRecord(qvd_bench.QuantConfig(), {}, [], None)
    with pytest.raises(UserError, match="got str"):
        qvd_bench.fidelity("tiny-wan", record, PROMPTS)


def test_two_expert_pipeline_in_memory(tmp_path):
    from tests.experts import EXPERTS, build_two_expert_wan
    from tests.experts import STEPS as EXPERT_STEPS

    pipe = build_two_expert_wan()
    sampling = dict(guidance_scale=GUIDANCE, frames=FRAMES, height=SIZE, width=SIZE)
    run = qvd_bench.collect(
        pipe,
        PROMPTS[:1],
        steps=EXPERT_STEPS,
        out=tmp_path / "run",
        temporal_stride=250,
        reservoir_capacity=8,
        **sampling,
    )
    assert {name.split(".")[0] for name in run.layers["name"]} == set(EXPERTS)
    record = qvd_bench.quantize_(pipe, qvd_bench.QuantConfig("minmax", 8, 8), stats=run)
    for expert in EXPERTS:
        wrapped = {name for name, _ in quant_wrappers(getattr(pipe, expert))}
        assert wrapped == {
            n.split(".", 1)[1] for n in record.quantized if n.startswith(expert + ".")
        }
        assert wrapped
    table = qvd_bench.fidelity(pipe, record, PROMPTS[:1], steps=EXPERT_STEPS, **sampling)
    forced = table[(table["mode"] == "teacher-forced") & (table["branch"] == "cfg")]
    assert sorted(set(forced["step"])) == [-1, *range(EXPERT_STEPS)]
    assert np.isfinite(forced["value"]).all()


def test_fidelity_with_pipeline_kwargs_in_memory(tmp_path):
    """True CFG of guidance-distilled HunyuanVideo, asked through the call's own
    arguments: collection, sensitivity's probe and fidelity run the negative branch;
    without them, fidelity scores the one conditional branch; a bare denoiser takes none."""
    true_cfg = {"true_cfg_scale": 4.0, "negative_prompt": "blurry"}
    pipe = pipelines.build_tiny_pipeline("tiny-hunyuan")
    sampling = dict(steps=STEPS, guidance_scale=GUIDANCE, frames=FRAMES, height=SIZE, width=SIZE)
    run = qvd_bench.collect(
        pipe,
        PROMPTS[:1],
        out=tmp_path / "run",
        temporal_stride=250,
        reservoir_capacity=8,
        extra={"pipeline_kwargs": true_cfg},
        **sampling,
    )
    # Sensitivity's probe samples as the run was collected.
    probe = probe_for_run(pipeline_model(pipe), run)
    assert probe.settings.pipeline_kwargs == true_cfg and probe.reference[0].uncond is not None
    record = qvd_bench.quantize_(pipe, qvd_bench.QuantConfig("minmax", 8, 8), stats=run)
    table = qvd_bench.fidelity(pipe, record, PROMPTS[:1], pipeline_kwargs=true_cfg, **sampling)
    forced = table[(table["mode"] == "teacher-forced") & (table["metric"] == "sqnr")]
    assert set(forced["branch"]) == {"cfg", "cond", "uncond"}
    assert np.isfinite(forced["value"]).all()
    plain = qvd_bench.fidelity(pipe, record, PROMPTS[:1], **sampling)
    plain_forced = plain[plain["mode"] == "teacher-forced"]
    assert set(plain_forced["branch"]) == {"cfg", "cond"}
    # An evaluation of these statistics without them is told so.
    config = EvalConfig(model="hunyuan", prompts=PROMPTS[:1], stats=str(run.path))
    with pytest.warns(UserWarning, match="collected with pipeline_kwargs"):
        ensure_stats(config, 0, tmp_path / "eval", progress=False)
    bare = qvd_bench.QuantRecord(qvd_bench.QuantConfig(), {}, [], None)
    with pytest.raises(UserError, match="need a model with a diffusers pipeline"):
        qvd_bench.fidelity(load_model("tiny-wan"), bare, PROMPTS, pipeline_kwargs={"a": 1})
