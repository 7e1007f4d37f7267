"""I2VGenXLUNet: I2VGen-XL (image-and-text-to-video UNet)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch

from qvd_bench.models.families._common import (
    COMMON_OUTLIER_TARGETS,
    UNET3D_TEMPORAL_ROLES,
    UNET_HEAD_ROLES,
    UNET_SPATIAL_ROLES,
    TextUNetFamily,
    randn,
)

# The frame rate the I2VGen-XL pipeline asks for by default.
DEFAULT_FPS = 16.0


class I2VGenXLFamily(TextUNetFamily):
    name = "i2vgenxl"
    denoiser_class = "I2VGenXLUNet"
    pipeline_classes = ("I2VGenXLPipeline",)
    prediction_type = "v_prediction"
    # The default clip_skip=1 reaches ``text_encoder.text_model``, which transformers 5's
    # CLIPTextModel no longer has: use the last layer's states.
    pipeline_call_defaults = MappingProxyType({"clip_skip": None})
    role_table = (
        *UNET_HEAD_ROLES,
        # Conditioning encoders: fps embedding (added to the time embedding but independent
        # of the timestep), CLIP image embedding and image-latent encoders.
        (r"fps_embedding\..*", "io"),
        (r"context_embedding\..*", "io"),
        (r"image_latents_proj_in\..*|image_latents_context_embedding\..*", "io"),
        # Attention over the frames of the image latents.
        (r"image_latents_temporal_encoder\..*", "temporal"),
        *UNET3D_TEMPORAL_ROLES,
        *UNET_SPATIAL_ROLES,
    )
    outlier_targets = (
        (r"time_embedding\.linear_\d", "time_mlp"),
        *COMMON_OUTLIER_TARGETS,
    )

    def tiny_config(self) -> dict[str, Any]:
        return {
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "sample_size": 16,
            "down_block_types": ("CrossAttnDownBlock3D", "DownBlock3D"),
            "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        }

    def conditioning(self, denoiser, batch, frames, height, width, generator=None):
        """Returns fps (B,), image_latents (B, C, F, H, W), image_embeddings (B, D).

        As in the pipeline, the first frame of ``image_latents`` is the image's latent
        and frame i > 0 is filled with i / (F - 1) (the frame position mask).
        """
        channels = denoiser.config.in_channels
        image = randn((batch, channels, 1, height, width), generator, denoiser)
        positions = torch.arange(1, frames).to(image) / max(frames - 1, 1)
        position_mask = positions.view(1, 1, -1, 1, 1).expand(batch, channels, -1, height, width)
        image_latents = torch.cat([image, position_mask], dim=2)
        image_embeddings = randn((batch, denoiser.config.cross_attention_dim), generator, denoiser)
        fps = torch.full((batch,), DEFAULT_FPS).to(image)
        return {"fps": fps, "image_latents": image_latents, "image_embeddings": image_embeddings}

    def forward(self, denoiser, latents, timestep, text_states, conditioning):
        return denoiser(
            latents,
            timestep,
            fps=conditioning["fps"],
            image_latents=conditioning["image_latents"],
            image_embeddings=conditioning["image_embeddings"],
            encoder_hidden_states=text_states,
            return_dict=False,
        )[0]
