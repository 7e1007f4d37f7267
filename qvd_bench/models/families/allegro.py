"""AllegroTransformer3DModel: Allegro (PixArt-style DiT over 3-D patches)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch

from qvd_bench.models.families._common import COMMON_OUTLIER_TARGETS, N
from qvd_bench.models.family import Family

# AllegroPipeline pads T5 prompts to 512 tokens.
T5_SEQUENCE_LENGTH = 512


class AllegroFamily(Family):
    name = "allegro"
    denoiser_class = "AllegroTransformer3DModel"
    pipeline_classes = ("AllegroPipeline",)
    layout = "BCFHW"
    prediction_type = "epsilon"
    # Caption cleaning needs bs4 and ftfy and is meant for real captions only.
    pipeline_call_defaults = MappingProxyType({"clean_caption": False})
    role_table = (
        # adaLN-single: the timestep MLP and the shared modulation Linear.
        (r"adaln_single\..*", "time_emb"),
        (r"caption_projection\..*", "io"),
        (rf"transformer_blocks\.{N}\.attn1\..*", "self_attn"),
        (rf"transformer_blocks\.{N}\.attn2\..*", "cross_attn"),
        (rf"transformer_blocks\.{N}\.ff\..*", "ffn"),
        (r"pos_embed\.proj|proj_out", "io"),
    )
    outlier_targets = (
        (r"adaln_single\.emb\.timestep_embedder\.linear_\d", "time_mlp"),
        *COMMON_OUTLIER_TARGETS,
    )

    def tiny_config(self) -> dict[str, Any]:
        return {
            "patch_size": 2,
            "patch_size_t": 1,
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 2,
            "cross_attention_dim": 24,
            "sample_height": 8,
            "sample_width": 8,
            "sample_frames": 8,
            "caption_channels": 16,
        }

    def probe_size(self, denoiser):
        # Two patches a side: a block squeezes a sequence of a single token away.
        config = denoiser.config
        return (config.patch_size_t, 2 * config.patch_size, 2 * config.patch_size)

    def text_embedding_shape(self, denoiser):
        return (T5_SEQUENCE_LENGTH, denoiser.config.caption_channels)

    def decode_video(self, pipeline, latents, frames, height, width):
        """AllegroPipeline's ``decode_latents``, cropped to the requested pixel size.

        Allegro's VAE decodes only tiled (diffusers' example enables tiling after loading;
        without it the pipeline's own call fails): tiling is switched on for the decode
        where the pipeline has it off, and off again after.
        """
        vae = pipeline.vae
        tiled = vae.use_tiling
        vae.enable_tiling()
        try:
            video = pipeline.decode_latents(latents.to(vae.dtype))
        finally:
            if not tiled:
                vae.disable_tiling()
        return video[:, :, :frames, :height, :width]

    def forward(self, denoiser, latents, timestep, text_states, conditioning):
        """One call as AllegroPipeline makes it, with its rotary embedding of the patch
        grid; every text token is attended to (``encoder_attention_mask`` of ones: the
        text states here carry no padding)."""
        mask = torch.ones(text_states.shape[:2], dtype=latents.dtype, device=latents.device)
        _, _, frames, height, width = latents.shape
        return denoiser(
            hidden_states=latents,
            encoder_hidden_states=text_states,
            timestep=timestep,
            encoder_attention_mask=mask,
            image_rotary_emb=rotary_embedding(denoiser, frames, height, width, latents.device),
            return_dict=False,
        )[0]


def rotary_embedding(denoiser, frames: int, height: int, width: int, device) -> tuple:
    """The rotary embedding AllegroPipeline computes for a latent of this size
    (``_prepare_rotary_positional_embeddings``, on latent rather than pixel sizes)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    config = denoiser.config
    grid_height, grid_width = height // config.patch_size, width // config.patch_size
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=config.attention_head_dim,
        crops_coords=((0, 0), (grid_height, grid_width)),
        grid_size=(grid_height, grid_width),
        temporal_size=frames,
        interpolation_scale=(
            config.interpolation_scale_t,
            config.interpolation_scale_h,
            config.interpolation_scale_w,
        ),
        device=device,
    )
    grid = [g.to(dtype=torch.long) for g in (grid_t, grid_h, grid_w)]
    position = torch.cartesian_prod(*grid).reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1)
    return (freqs_t, freqs_h, freqs_w), tuple(position.contiguous())
