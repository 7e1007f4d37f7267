"""What is particular to the LTX-Video, HunyuanVideo and Mochi families, and what every
family conforms to."""

from __future__ import annotations

import functools
import re

import pytest
import torch

from qvd_bench.models.families import family_names
from qvd_bench.models.families._common import COMMON_OUTLIER_TARGETS
from qvd_bench.models.families.hunyuan_video import DEFAULT_GUIDANCE_SCALE
from qvd_bench.models.families.ltx import pack_tokens, unpack_tokens
from qvd_bench.models.family import ROLES
from qvd_bench.models.roles import LayerInputCapture, classify, detect_time_emb, leaf_layers
from qvd_bench.models.zoo import load_model

NEW_PRESETS = ("tiny-ltx", "tiny-hunyuan", "tiny-mochi")


@functools.cache
def preset(name: str):
    return load_model(name)


def inputs(loaded, batch: int = 1, frames: int = 2, side: int = 4, seed: int = 0):
    family, denoiser = loaded.family, loaded.denoiser
    generator = torch.Generator().manual_seed(seed)
    shape = family.latent_shape(denoiser, batch, frames, side, side)
    latents = torch.randn(shape, generator=generator)
    text = torch.randn((batch, *family.text_embedding_shape(denoiser)), generator=generator)
    conditioning = family.conditioning(denoiser, batch, frames, side, side, generator=generator)
    return latents, text, conditioning


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_every_role_table_pattern_matches_a_layer_of_the_tiny_model(name):
    loaded = preset(name)
    layers = list(leaf_layers(loaded.denoiser))
    dead = [p for p, _ in loaded.family.role_table if not any(re.fullmatch(p, n) for n in layers)]
    assert dead == []


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_every_family_outlier_target_matches_a_module_of_the_tiny_model(name):
    loaded = preset(name)
    modules = [n for n, _ in loaded.denoiser.named_modules()]
    own = [
        p for p, kind in loaded.family.outlier_targets if (p, kind) not in COMMON_OUTLIER_TARGETS
    ]
    assert own
    assert [p for p in own if not any(re.fullmatch(p, n) for n in modules)] == []


# --------------------------------------------------------------------------- LTX-Video


@pytest.mark.parametrize("patch, patch_t", [(1, 1), (2, 1), (2, 2)])
def test_ltx_packing_round_trips_and_equals_the_pipelines(patch, patch_t):
    from diffusers import LTXPipeline

    latents = torch.randn(2, 3, 4, 6, 8)
    tokens = pack_tokens(latents, patch, patch_t)
    grid = (4 // patch_t, 6 // patch, 8 // patch)
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], 3 * patch_t * patch * patch)
    assert torch.equal(tokens, LTXPipeline._pack_latents(latents, patch, patch_t))
    assert torch.equal(unpack_tokens(tokens, *grid, patch, patch_t), latents)
    assert torch.equal(
        unpack_tokens(tokens, *grid, patch, patch_t),
        LTXPipeline._unpack_latents(tokens, *grid, patch, patch_t),
    )


def test_ltx_forward_is_the_pipelines_call_on_packed_tokens():
    from diffusers import LTXPipeline

    loaded = preset("tiny-ltx")
    denoiser = loaded.denoiser
    latents, text, conditioning = inputs(loaded, batch=2, frames=3, side=4)
    timestep = torch.tensor([900.0, 100.0])
    # What LTXPipeline passes with LTX-Video's VAE (8x temporal, 32x spatial) at 25 fps.
    temporal, spatial, frame_rate = 8, 32, 25
    with torch.no_grad():
        prediction = loaded.family.forward(denoiser, latents, timestep, text, conditioning)
        tokens = denoiser(
            hidden_states=LTXPipeline._pack_latents(latents),
            encoder_hidden_states=text,
            timestep=timestep,
            encoder_attention_mask=torch.ones(text.shape[:2], dtype=torch.bool),
            num_frames=3,
            height=4,
            width=4,
            rope_interpolation_scale=(temporal / frame_rate, spatial, spatial),
            return_dict=False,
        )[0]
    assert prediction.shape == latents.shape
    assert torch.equal(prediction, LTXPipeline._unpack_latents(tokens, 3, 4, 4))


# --------------------------------------------------------------------------- HunyuanVideo


GUIDANCE_EMBEDDER = (
    "time_text_embed.guidance_embedder.linear_1",
    "time_text_embed.guidance_embedder.linear_2",
)


def test_hunyuan_guidance_embedder_is_time_emb_by_the_table_though_the_probe_misses_it():
    loaded = preset("tiny-hunyuan")
    decisions = classify(loaded)
    detected = detect_time_emb(loaded)
    for name in GUIDANCE_EMBEDDER:
        assert decisions[name].role == "time_emb"
        assert decisions[name].decided_by.startswith("table:")
        assert name not in detected
    assert "time_text_embed.timestep_embedder.linear_1" in detected


def test_hunyuan_forward_passes_the_pipelines_guidance_and_pooled_projections():
    loaded = preset("tiny-hunyuan")
    family, denoiser = loaded.family, loaded.denoiser
    latents, text, conditioning = inputs(loaded, batch=2)
    assert conditioning["pooled_projections"].shape == (2, denoiser.config.pooled_projection_dim)
    assert torch.equal(conditioning["guidance"], torch.full((2,), DEFAULT_GUIDANCE_SCALE * 1000))
    timestep = torch.tensor([700.0, 300.0])
    with LayerInputCapture(denoiser) as seen, torch.no_grad():
        prediction = family.forward(denoiser, latents, timestep, text, conditioning)
        other_guidance = {**conditioning, "guidance": conditioning["guidance"] / 2}
        changed = family.forward(denoiser, latents, timestep, text, other_guidance)
    assert prediction.shape == latents.shape
    assert not torch.allclose(prediction, changed)
    # The guidance embedder read the guidance scale: the same row for both samples.
    first_call = seen[GUIDANCE_EMBEDDER[0]][0]
    assert torch.equal(first_call[0], first_call[1])
    assert not torch.equal(first_call, seen[GUIDANCE_EMBEDDER[0]][1])


# --------------------------------------------------------------------------- Mochi


def test_mochi_forward_follows_the_flow_convention_of_the_minimal_sampler():
    """One Euler step of the usual flow scheduler on ``forward`` equals one step of
    MochiPipeline's inverted-sigma scheduler on the transformer's own output."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    loaded = preset("tiny-mochi")
    denoiser = loaded.denoiser
    latents, text, _ = inputs(loaded)
    sigmas = [1.0, 0.6, 0.3]
    usual = FlowMatchEulerDiscreteScheduler()
    mochi = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    usual.set_timesteps(sigmas=sigmas)
    # MochiPipeline hands its scheduler the noise levels; the scheduler inverts them.
    mochi.set_timesteps(sigmas=sigmas)
    mask = torch.ones(text.shape[:2], dtype=torch.bool)
    a = b = latents
    with torch.no_grad():
        for t_usual, t_mochi in zip(usual.timesteps, mochi.timesteps):
            assert torch.allclose(t_mochi, 1000 - t_usual)
            velocity = loaded.family.forward(denoiser, a, t_usual.reshape(1), text, {})
            a = usual.step(velocity, t_usual, a, return_dict=False)[0]
            own = denoiser(
                hidden_states=b,
                encoder_hidden_states=text,
                timestep=t_mochi.reshape(1),
                encoder_attention_mask=mask,
                return_dict=False,
            )[0]
            b = mochi.step(own, t_mochi, b, return_dict=False)[0]
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, latents)


# --------------------------------------------------------------------------- every family


# Families whose role table names only layers of their tiny config (the others' tables
# also cover layers of config variants, e.g. CogVideoX 1.5's ofs_embedding).
TABLES_OF_ONE_CONFIG = (
    "ltx",
    "hunyuan-video",
    "mochi",
    "ltx2",
    "hunyuan-video-1.5",
    "allegro",
    "skyreels-v2",
)


@functools.cache
def family_model(name: str):
    """The family's tiny denoiser from its tiny config (a family needs no preset)."""
    from qvd_bench.models.families import family_by_name
    from qvd_bench.models.family import LoadedModel

    family = family_by_name(name)
    torch.manual_seed(0)
    return LoadedModel(name, family, family.build(family.tiny_config()).eval())


@pytest.mark.parametrize("name", family_names())
def test_every_family_conforms(name):
    """Its tiny config builds; its table gives every leaf layer a role and every pattern
    matches a layer; its outlier targets match modules; ``forward`` predicts the shape of
    its latents at the probe size and at two frames."""
    loaded = family_model(name)
    family, denoiser = loaded.family, loaded.denoiser
    assert type(denoiser).__name__ == family.denoiser_class
    decisions = classify(loaded)
    assert list(decisions) == list(leaf_layers(denoiser))
    assert all(d.role in ROLES and d.decided_by.startswith("table:") for d in decisions.values())
    if name in TABLES_OF_ONE_CONFIG:
        layers = list(decisions)
        dead = [p for p, _ in family.role_table if not any(re.fullmatch(p, n) for n in layers)]
        assert dead == []
        modules = [n for n, _ in denoiser.named_modules()]
        own = [t for t in family.outlier_targets if t not in COMMON_OUTLIER_TARGETS]
        assert [p for p, _ in own if not any(re.fullmatch(p, n) for n in modules)] == []
    frames, height, width = family.probe_size(denoiser)
    for size in [(frames, height, width), (2 * frames, 2 * height, 2 * width)]:
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(family.latent_shape(denoiser, 1, *size), generator=generator)
        text = torch.randn((1, *family.text_embedding_shape(denoiser)), generator=generator)
        conditioning = family.conditioning(denoiser, 1, *size, generator=generator)
        with torch.no_grad():
            out = family.forward(denoiser, latents, torch.tensor([500.0]), text, conditioning)
        assert out.shape == latents.shape
        assert torch.isfinite(out).all()
