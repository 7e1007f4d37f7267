"""LTXVideoTransformer3DModel: LTX-Video (DiT over packed video tokens).

The transformer takes the latent video as a sequence of tokens (B, F·H·W, C) together
with the token grid (``num_frames``, ``height``, ``width``) for its rotary embedding.
``forward`` packs the (B, C, F, H, W) latents into tokens and unpacks the prediction, so
the latents stay in the family's 5-D layout.
"""

from __future__ import annotations

from typing import Any

import torch

from qvd_bench.errors import UserError
from qvd_bench.models.families._common import COMMON_OUTLIER_TARGETS, N
from qvd_bench.models.family import Family, call_default

# The LTX pipelines pad T5 prompts to 128 tokens.
T5_SEQUENCE_LENGTH = 128

# What LTXPipeline passes as ``rope_interpolation_scale`` with LTX-Video's VAE (8x
# temporal, 32x spatial compression) at its default frame rate of 25:
# (temporal compression / frame rate, spatial compression, spatial compression).
ROPE_INTERPOLATION_SCALE = (8 / 25, 32.0, 32.0)


def pack_tokens(latents: torch.Tensor, patch_size: int, patch_size_t: int) -> torch.Tensor:
    """Video latents to the token sequence LTX's transformer takes (as LTXPipeline packs).

    Args:
        latents: (B, C, F, H, W), F divisible by ``patch_size_t``, H and W by ``patch_size``.
        patch_size: spatial patch side p.
        patch_size_t: temporal patch length p_t.

    Returns:
        (B, F/p_t · H/p · W/p, C · p_t · p · p), tokens in (frame, row, column) order.
    """
    batch, channels, frames, height, width = latents.shape
    p, pt = patch_size, patch_size_t
    tokens = latents.reshape(batch, channels, frames // pt, pt, height // p, p, width // p, p)
    return tokens.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack_tokens(
    tokens: torch.Tensor, frames: int, height: int, width: int, patch_size: int, patch_size_t: int
) -> torch.Tensor:
    """The inverse of ``pack_tokens``.

    Args:
        tokens: (B, frames · height · width, C · p_t · p · p).
        frames, height, width: the token grid (latent sizes divided by the patch sizes).
        patch_size: spatial patch side p.
        patch_size_t: temporal patch length p_t.

    Returns:
        (B, C, frames · p_t, height · p, width · p).
    """
    batch = tokens.shape[0]
    p, pt = patch_size, patch_size_t
    video = tokens.reshape(batch, frames, height, width, -1, pt, p, p)
    return video.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def decode_timestep(pipeline, call_defaults, latents: torch.Tensor) -> torch.Tensor | None:
    """The timestep the LTX pipelines decode at: None for a VAE without timestep
    conditioning, else the call's ``decode_timestep`` per sample.

    The pipelines also mix ``decode_noise_scale`` of fresh noise into the latents first
    (by default the decode timestep); that noise is drawn from the call's generator after
    sampling, which decoding afterwards cannot reproduce, so only a noise scale of 0 is
    decoded.

    Raises:
        UserError: a timestep-conditioned VAE with a non-zero decode noise scale.
    """
    if not pipeline.vae.config.timestep_conditioning:
        return None
    timestep = call_default(pipeline, "decode_timestep", call_defaults)
    noise_scale = call_default(pipeline, "decode_noise_scale", call_defaults)
    noise_scale = timestep if noise_scale is None else noise_scale
    if noise_scale != 0:
        raise UserError(
            f"{type(pipeline).__name__} decodes with decode_noise_scale {noise_scale}: "
            "fresh noise that decoding the final latents cannot reproduce"
        )
    return torch.full(
        (latents.shape[0],), float(timestep), dtype=latents.dtype, device=latents.device
    )


class LTXVideoFamily(Family):
    name = "ltx"
    denoiser_class = "LTXVideoTransformer3DModel"
    pipeline_classes = (
        "LTXPipeline",
        "LTXImageToVideoPipeline",
        "LTXConditionPipeline",
        "LTXI2VLongMultiPromptPipeline",
    )
    layout = "BCFHW"
    prediction_type = "flow"
    role_table = (
        # PixArt-style adaLN-single: timestep MLP and the shared modulation Linear.
        (r"time_embed\..*", "time_emb"),
        (r"caption_projection\..*", "io"),
        (rf"transformer_blocks\.{N}\.attn1\..*", "self_attn"),
        (rf"transformer_blocks\.{N}\.attn2\..*", "cross_attn"),
        (rf"transformer_blocks\.{N}\.ff\..*", "ffn"),
        (r"proj_in|proj_out", "io"),
    )
    outlier_targets = (
        (r"time_embed\.emb\.timestep_embedder\.linear_\d", "time_mlp"),
        *COMMON_OUTLIER_TARGETS,
    )

    def tiny_config(self) -> dict[str, Any]:
        return {
            "in_channels": 8,
            "out_channels": 8,
            "patch_size": 1,
            "patch_size_t": 1,
            "num_attention_heads": 4,
            "attention_head_dim": 8,
            "cross_attention_dim": 32,
            "num_layers": 2,
            "caption_channels": 32,
        }

    def text_embedding_shape(self, denoiser):
        return (T5_SEQUENCE_LENGTH, denoiser.config.caption_channels)

    def pipeline_latents(self, denoiser, latents, frames, height, width):
        """The LTX pipelines return packed tokens with ``output_type="latent"``: unpacked."""
        if latents.dim() != 3:
            return latents
        p, pt = denoiser.config.patch_size, denoiser.config.patch_size_t
        return unpack_tokens(latents, frames // pt, height // p, width // p, p, pt)

    def decode_video(self, pipeline, latents, frames, height, width):
        """As LTXPipeline: de-normalised (``_denormalize_latents``: the VAE's mean, std and
        scaling factor), decoded at the call's ``decode_timestep`` where the decoder is
        timestep-conditioned."""
        vae = pipeline.vae
        latents = pipeline._denormalize_latents(
            latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor
        )
        timestep = decode_timestep(pipeline, self.pipeline_call_defaults, latents)
        return vae.decode(latents.to(vae.dtype), timestep, return_dict=False)[0]

    def forward(self, denoiser, latents, timestep, text_states, conditioning):
        """Packs the latents, calls the transformer as LTXPipeline does, unpacks.

        Every text token is attended to (``encoder_attention_mask`` of ones: the text
        states given here carry no padding).
        """
        _, _, frames, height, width = latents.shape
        p, pt = denoiser.config.patch_size, denoiser.config.patch_size_t
        grid = (frames // pt, height // p, width // p)
        mask = torch.ones(text_states.shape[:2], dtype=torch.bool, device=text_states.device)
        tokens = denoiser(
            hidden_states=pack_tokens(latents, p, pt),
            encoder_hidden_states=text_states,
            timestep=timestep,
            encoder_attention_mask=mask,
            num_frames=grid[0],
            height=grid[1],
            width=grid[2],
            rope_interpolation_scale=ROPE_INTERPOLATION_SCALE,
            return_dict=False,
        )[0]
        return unpack_tokens(tokens, *grid, p, pt)
