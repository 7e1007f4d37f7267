"""Decoded metrics through the pipeline's own VAE: the frames evaluation scores are the
frames of the pipeline's own call, and models without a VAE keep latents as frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qvd_bench.commands.evaluate import write_report
from qvd_bench.evaluate import generate as gen
from qvd_bench.evaluate.config import EvalConfig
from qvd_bench.evaluate.fvd import to_uint8_videos
from qvd_bench.evaluate.latents import (
    DECODED_BY_LATENTS,
    DECODED_BY_VAE,
    PROTOCOL_LATENTS,
    PROTOCOL_VAE,
    video_frames,
)
from qvd_bench.evaluate.matrix import evaluate
from qvd_bench.evaluate.results import SETTINGS_FILE
from qvd_bench.models import pipelines
from qvd_bench.models.decode import decode_frames, pipeline_vae
from qvd_bench.models.pipelines import PRESET_PIPELINES, tiny_pipeline_model
from tests.evaluate.test_pipelines import disabled_quantize_

PROMPT = "a red ball rolls across a wooden table"
SEED = 3
STEPS = 2
GUIDANCE = 4.0
SIZE = 8


def settings_for(loaded) -> gen.GenerationSettings:
    # Latte's temporal position embedding has exactly ``video_length`` entries.
    frames = getattr(loaded.denoiser.config, "video_length", None) or 2
    return gen.GenerationSettings(
        steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, frames=frames, height=SIZE, width=SIZE
    )


def plain_call_frames(loaded, settings: gen.GenerationSettings) -> torch.Tensor:
    """(1, T, C, H, W) frames of the pipeline's own call with its default output type,
    same prompt, seed, steps, guidance and size as ``generate`` samples video 0 with."""
    pipe = loaded.pipeline
    pixels = pipelines.pixel_size(pipe, settings.frames, settings.height, settings.width)
    kwargs = pipelines.call_arguments(
        loaded,
        PROMPT,
        settings.guidance_scale,
        *pixels,
        image=lambda: pipelines.synthetic_image(SEED, 0, pixels[1], pixels[2]),
    )
    del kwargs["output_type"]  # the pipeline's default: it decodes
    seed = pipelines.sample_seed(SEED, 0)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # I2VGenXL draws its image latents from the global RNG
    output = pipe(num_inference_steps=settings.steps, generator=generator, **kwargs).frames
    if isinstance(output, np.ndarray):  # "np": (B, T, H, W, C) floats in [0, 1]
        return torch.from_numpy(output).permute(0, 1, 4, 2, 3).float()
    # "pil": one list of uint8 RGB images per video
    video = np.stack([np.asarray(image) for image in output[0]])
    return torch.from_numpy(video).permute(0, 3, 1, 2)[None].float() / 255


# Every tiny pipeline with a VAE: the families' decoders (mean/std, LTX's de-normalisation
# and unpacking, scaling factors, the pipelines' own decode_latents) each checked.
VAE_PRESETS = [p for p in PRESET_PIPELINES if p != "tiny-wan22"] + ["tiny-wan22"]


@pytest.mark.parametrize("preset", VAE_PRESETS)
def test_evaluated_frames_are_the_frames_of_the_pipelines_own_call(preset):
    loaded = tiny_pipeline_model(preset)
    assert pipeline_vae(loaded) is not None
    settings = settings_for(loaded)
    generation = gen.generate(loaded, PROMPT, 0, settings)
    frames = video_frames(loaded, settings, [generation])
    assert frames.decoded and frames.decoded_by == DECODED_BY_VAE
    decoded = frames.frames(generation.latents)
    expected = plain_call_frames(loaded, settings)
    assert decoded.shape == expected.shape and decoded.shape[2] == 3
    assert decoded.min() >= 0 and decoded.max() <= 1
    if not _is_pil_default(loaded.pipeline):
        torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-6)
    else:  # PIL output: 8-bit, rounded from the same floats
        torch.testing.assert_close(decoded, expected, rtol=0, atol=0.5 / 255 + 1e-6)
    # The network metrics see these frames as uint8 videos (B, T, H, W, 3).
    videos = frames.uint8_videos([generation])
    assert torch.equal(videos, to_uint8_videos(decoded))


def _is_pil_default(pipe) -> bool:
    import inspect

    return inspect.signature(pipe.__call__).parameters["output_type"].default == "pil"


def test_decoding_takes_one_video_at_a_time():
    loaded = tiny_pipeline_model("tiny-wan")
    settings = settings_for(loaded)
    videos = [gen.generate(loaded, p, i, settings) for i, p in enumerate((PROMPT, "a dog"))]
    latents = torch.cat([g.latents for g in videos])
    frames = video_frames(loaded, settings, videos).frames(latents)
    for i, generation in enumerate(videos):
        one = decode_frames(loaded, generation.latents, settings.frames, SIZE, SIZE)
        assert torch.equal(frames[i : i + 1], one)


def test_evaluate_with_quantizers_off_gives_the_fp_decoded_frames(tmp_path, monkeypatch):
    directory = pipelines.save_tiny_pipeline("tiny-wan", tmp_path / "wan")
    records: list = []
    disabled_quantize_(monkeypatch, records)
    config = EvalConfig(
        model=str(directory),
        methods=("minmax",),
        bits=("W8A8",),
        prompts=(PROMPT,),
        settings=gen.GenerationSettings(
            steps=STEPS, guidance_scale=GUIDANCE, frames=2, height=SIZE, width=SIZE
        ),
    )
    result = evaluate(config, tmp_path / "out", progress=False)
    assert records and records[0][1].quantized
    assert result.frames == DECODED_BY_VAE
    final = result.results[result.results["mode"] == "free-running"]
    psnr = final[final["metric"] == "psnr"]
    assert (psnr["protocol"] == PROTOCOL_VAE).all()
    assert psnr["value"].item() > 100  # equal frames up to float rounding (inf when exact)
    assert final.loc[final["metric"] == "ssim", "value"].item() == pytest.approx(1.0, abs=1e-9)


def test_evaluate_scores_decoded_frames_of_a_saved_pipeline(tmp_path):
    directory = pipelines.save_tiny_pipeline("tiny-ltx", tmp_path / "ltx")
    settings = gen.GenerationSettings(
        steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, frames=2, height=SIZE, width=SIZE
    )
    config = EvalConfig(
        model=str(directory),
        methods=("minmax",),
        bits=("W4A4",),
        prompts=(PROMPT, "a dog runs on the beach"),
        settings=settings,
    )
    result = evaluate(config, tmp_path / "out", progress=False)
    assert result.frames == DECODED_BY_VAE
    recorded = json.loads((result.results_dir / SETTINGS_FILE).read_text())
    assert recorded["frames"] == {"decoded_by": DECODED_BY_VAE}
    index = write_report(result, config, tmp_path / "out", "ltx")
    assert (
        "PSNR / SSIM compare the frames decoded by the pipeline's own VAE"
        in (index.parent / "report.md").read_text()
    )
    results = result.results
    final = results[
        (results["mode"] == "free-running") & (results["metric"].isin(["psnr", "ssim"]))
    ]
    assert set(final["metric"]) == {"psnr", "ssim"} and (final["protocol"] == PROTOCOL_VAE).all()

    # The values: PSNR and SSIM over the decoded frames of all videos at once.
    cache = gen.GenerationCache(result.results_dir)
    files = sorted(cache.root.rglob("*-free-*.safetensors"))
    reference = [gen.GenerationCache.load_path(f) for f in files if "/reference/" in str(f)]
    free = [gen.GenerationCache.load_path(f) for f in files if "/minmax/" in str(f)]
    assert len(reference) == len(free) == 2
    from qvd_bench.evaluate import fidelity
    from qvd_bench.models.zoo import load_model

    loaded = load_model(str(directory))

    def decoded(generations):
        return torch.cat([decode_frames(loaded, g.latents, 2, SIZE, SIZE) for g in generations])

    ref, test = decoded(reference).double().numpy(), decoded(free).double().numpy()
    expected_psnr = 10 * np.log10(1.0 / np.mean((ref - test) ** 2))
    value = final.loc[final["metric"] == "psnr", "value"].item()
    assert np.isfinite(value) and value == pytest.approx(expected_psnr, rel=1e-9)
    expected_ssim = float(fidelity.ssim(torch.from_numpy(ref), torch.from_numpy(test)))
    assert final.loc[final["metric"] == "ssim", "value"].item() == pytest.approx(
        expected_ssim, rel=1e-9
    )


def test_without_a_vae_latents_stand_for_frames(tmp_path):
    from qvd_bench.models.zoo import load_model

    bare = load_model("tiny-wan")
    assert pipeline_vae(bare) is None
    shapes = load_model("shapes-wan")  # a pixel-space pipeline: vae=None
    assert shapes.pipeline is not None and pipeline_vae(shapes) is None
    settings = gen.GenerationSettings(steps=STEPS, frames=2, height=SIZE, width=SIZE)
    generation = gen.generate(bare, PROMPT, 0, settings)
    frames = video_frames(bare, settings, [generation])
    assert not frames.decoded and frames.decoded_by == DECODED_BY_LATENTS
    assert frames.protocol == PROTOCOL_LATENTS
    latents = generation.latents.double()
    lo, hi = float(latents.min()), float(latents.max())
    torch.testing.assert_close(
        frames.frames(generation.latents), ((latents - lo) / (hi - lo)).transpose(1, 2)
    )
    config = EvalConfig(model="tiny-wan", methods=("fp",), bits=("W8A8",), prompts=(PROMPT,),
                        settings=settings)  # fmt: skip
    result = evaluate(config, tmp_path, progress=False)
    assert result.frames == DECODED_BY_LATENTS
    recorded = json.loads((result.results_dir / SETTINGS_FILE).read_text())
    assert recorded["frames"] == {"decoded_by": DECODED_BY_LATENTS}
    psnr = result.results[result.results["metric"] == "psnr"]
    assert (psnr["protocol"] == PROTOCOL_LATENTS).all()
