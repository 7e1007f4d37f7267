"""UNet3DConditionModel: ModelScope T2V and ZeroScope (factorised spatial/temporal UNet)."""

from __future__ import annotations

from typing import Any

from qvd_bench.models.families._common import (
    COMMON_OUTLIER_TARGETS,
    UNET3D_TEMPORAL_ROLES,
    UNET_HEAD_ROLES,
    UNET_SPATIAL_ROLES,
    TextUNetFamily,
)


class UNet3DFamily(TextUNetFamily):
    name = "unet3d"
    denoiser_class = "UNet3DConditionModel"
    pipeline_classes = ("TextToVideoSDPipeline", "VideoToVideoSDPipeline")
    prediction_type = "epsilon"
    role_table = (
        *UNET_HEAD_ROLES,
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
            # In UNet3DConditionModel this is the number of heads.
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        }

    def forward(self, denoiser, latents, timestep, text_states, conditioning):
        return denoiser(latents, timestep, encoder_hidden_states=text_states, return_dict=False)[0]
