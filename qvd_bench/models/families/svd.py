"""UNetSpatioTemporalConditionModel: Stable Video Diffusion (image-to-video)."""

from __future__ import annotations

from typing import Any

import torch

from qvd_bench.models.families._common import (
    COMMON_OUTLIER_TARGETS,
    UNET_HEAD_ROLES,
    UNET_SPATIAL_ROLES,
    N,
    randn,
    unet_probe_size,
)
from qvd_bench.models.family import Family

# SVD's micro-conditioning as its pipeline sets it by default: fps - 1, motion bucket id,
# noise augmentation strength.
DEFAULT_ADDED_TIME_IDS = (6.0, 127.0, 0.02)

# UNetSpatioTemporalConditionModel's GroupNorms always have 32 groups.
SVD_NORM_GROUPS = 32


class SVDFamily(Family):
    name = "svd"
    denoiser_class = "UNetSpatioTemporalConditionModel"
    pipeline_classes = ("StableVideoDiffusionPipeline",)
    layout = "BFCHW"
    # SVD is trained with EDM preconditioning; through a DDIM-style scheduler we treat
    # the output as epsilon (random weights make no difference).
    prediction_type = "epsilon"
    role_table = (
        *UNET_HEAD_ROLES,
        # fps / motion bucket / noise-augmentation embedding: conditioning only.
        (r"add_embedding\..*", "io"),
        (r".*\.temporal_res_block\..*", "temporal"),
        (rf".*\.attentions\.{N}\.temporal_transformer_blocks\..*", "temporal"),
        # MLP on the sinusoidal frame-index embedding of the temporal transformer.
        (rf".*\.attentions\.{N}\.time_pos_embed\..*", "temporal"),
        (rf".*\.resnets\.{N}\.spatial_res_block\.(conv1|conv2|conv_shortcut)", "spatial_conv"),
        *UNET_SPATIAL_ROLES,
    )
    outlier_targets = (
        (r"time_embedding\.linear_\d", "time_mlp"),
        *COMMON_OUTLIER_TARGETS,
    )

    def tiny_config(self) -> dict[str, Any]:
        return {
            "block_out_channels": (32, 64),
            "layers_per_block": 2,
            "sample_size": 16,
            # 4 noisy latent channels + 4 image-latent channels.
            "in_channels": 8,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            "up_block_types": ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            "cross_attention_dim": 32,
            "num_attention_heads": 8,
            # 3 added time ids x addition_time_embed_dim.
            "projection_class_embeddings_input_dim": 96,
            "addition_time_embed_dim": 32,
            "num_frames": 8,
        }

    def latent_shape(self, denoiser, batch, frames, height, width):
        return (batch, frames, denoiser.config.out_channels, height, width)

    def probe_size(self, denoiser):
        return unet_probe_size(denoiser, SVD_NORM_GROUPS)

    def text_embedding_shape(self, denoiser):
        # One CLIP image embedding of the conditioning image.
        return (1, denoiser.config.cross_attention_dim)

    def conditioning(self, denoiser, batch, frames, height, width, generator=None):
        """Returns image_latents (B, C_img, H, W) and added_time_ids (B, 3)."""
        image_channels = denoiser.config.in_channels - denoiser.config.out_channels
        image_latents = randn((batch, image_channels, height, width), generator, denoiser)
        added_time_ids = torch.tensor([DEFAULT_ADDED_TIME_IDS] * batch).to(image_latents)
        return {"image_latents": image_latents, "added_time_ids": added_time_ids}

    def forward(self, denoiser, latents, timestep, text_states, conditioning):
        # The conditioning image's latents are concatenated to every frame's channels.
        frames = latents.shape[1]
        image_latents = conditioning["image_latents"].unsqueeze(1).expand(-1, frames, -1, -1, -1)
        sample = torch.cat([latents, image_latents], dim=2)
        return denoiser(
            sample,
            timestep,
            encoder_hidden_states=text_states,
            added_time_ids=conditioning["added_time_ids"],
            return_dict=False,
        )[0]
