"""UNetMotionModel: AnimateDiff (a 2-D text-to-image UNet plus motion modules)."""

from __future__ import annotations

from typing import Any

from torch import nn

from qvd_bench.models.families._common import (
    COMMON_OUTLIER_TARGETS,
    UNET_HEAD_ROLES,
    UNET_SPATIAL_ROLES,
    TextUNetFamily,
)


class MotionFamily(TextUNetFamily):
    name = "motion"
    denoiser_class = "UNetMotionModel"
    pipeline_classes = ("AnimateDiffPipeline", "AnimateDiffVideoToVideoPipeline")
    prediction_type = "epsilon"
    role_table = (
        *UNET_HEAD_ROLES,
        (r".*\.motion_modules\..*", "temporal"),
        *UNET_SPATIAL_ROLES,
        # SDXL-based variants: pooled-text/size embedding and image-prompt projection
        # depend on conditioning only.
        (r"add_embedding\..*|encoder_hid_proj\..*", "io"),
    )
    outlier_targets = (
        (r"time_embedding\.linear_\d", "time_mlp"),
        *COMMON_OUTLIER_TARGETS,
    )

    def tiny_config(self) -> dict[str, Any]:
        # Two configs: the image UNet and the motion adapter that is merged into it.
        return {
            "unet": {
                "block_out_channels": (32, 64),
                "layers_per_block": 2,
                "sample_size": 16,
                "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
                "cross_attention_dim": 32,
                "norm_num_groups": 2,
            },
            "motion_adapter": {
                "block_out_channels": (32, 64),
                "motion_layers_per_block": 2,
                "motion_norm_num_groups": 2,
                "motion_num_attention_heads": 4,
            },
        }

    def build(self, config: dict[str, Any]) -> nn.Module:
        from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
        from diffusers.utils import logging as diffusers_logging

        if "unet" not in config:
            return UNetMotionModel(**config)
        unet = UNet2DConditionModel(**config["unet"])
        adapter = MotionAdapter(**config["motion_adapter"])
        # from_unet2d casts to the UNet's own dtype, and diffusers warns about every cast.
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            return UNetMotionModel.from_unet2d(unet, adapter)
        finally:
            diffusers_logging.set_verbosity(verbosity)

    def forward(self, denoiser, latents, timestep, text_states, conditioning):
        # The spatial blocks see one image per frame, so each sample's text states are
        # repeated per frame: (B, L, D) -> (B * F, L, D), sample-major like the latents.
        frames = latents.shape[2]
        per_frame_states = text_states.repeat_interleave(frames, dim=0)
        return denoiser(
            latents, timestep, encoder_hidden_states=per_frame_states, return_dict=False
        )[0]
