"""MochiTransformer3DModel: Mochi 1 (asymmetric dual-stream DiT).

Mochi counts time backwards: its pipeline's scheduler inverts the sigmas
(``invert_sigmas``), so the transformer receives 1000·(1 − σ), 0 at pure noise, and
predicts x₀ − noise, the negative of the usual flow velocity. ``forward`` converts from
and to the usual flow convention (timestep σ·1000, velocity noise − x₀) that
``prediction_type = "flow"`` promises; statistics are keyed by the timestep the
transformer receives, Mochi's own.
"""

from __future__ import annotations

from typing import Any

import torch

from qvd_bench.models.families._common import COMMON_OUTLIER_TARGETS, N
from qvd_bench.models.family import Family

NUM_TRAIN_TIMESTEPS = 1000


class MochiFamily(Family):
    name = "mochi"
    denoiser_class = "MochiTransformer3DModel"
    pipeline_classes = ("MochiPipeline",)
    layout = "BCFHW"
    prediction_type = "flow"
    role_table = (
        (r"time_embed\.timestep_embedder\..*", "time_emb"),
        # Attention pooling of the text states and the caption projection: they read
        # text, not the timestep.
        (r"time_embed\.(pooler\..*|caption_proj)", "io"),
        # adaLN modulation of both streams (the last block's text stream has only a
        # scale, ``linear_1``) and of the output norm.
        (rf"transformer_blocks\.{N}\.(norm1|norm1_context)\.(linear|linear_1)", "time_emb"),
        (r"norm_out\.linear", "time_emb"),
        # Joint attention over video and text tokens.
        (rf"transformer_blocks\.{N}\.attn1\..*", "self_attn"),
        (rf"transformer_blocks\.{N}\.(ff|ff_context)\..*", "ffn"),
        (r"patch_embed\.proj|proj_out", "io"),
    )
    outlier_targets = (
        (r"time_embed\.timestep_embedder\.linear_\d", "time_mlp"),
        (r".*\.ff_context\.net\.0\.proj", "ffn_in"),
        *COMMON_OUTLIER_TARGETS,
    )

    def tiny_config(self) -> dict[str, Any]:
        return {
            "patch_size": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "num_layers": 2,
            "pooled_projection_dim": 16,
            "in_channels": 12,
            "qk_norm": "rms_norm",
            "text_embed_dim": 32,
            "time_embed_dim": 4,
            "activation_fn": "swiglu",
            "max_sequence_length": 16,
        }

    def text_embedding_shape(self, denoiser):
        # MochiPipeline pads T5 prompts to the transformer's max_sequence_length (256).
        return (denoiser.config.max_sequence_length, denoiser.config.text_embed_dim)

    def decode_video(self, pipeline, latents, frames, height, width):
        """As MochiPipeline: un-normalised by the VAE's mean and std where it has them
        (x · std / scaling_factor + mean), else divided by its scaling factor."""
        config = pipeline.vae.config
        latents = latents.to(pipeline.vae.dtype)
        if (
            getattr(config, "latents_mean", None) is None
            or getattr(config, "latents_std", None) is None
        ):
            latents = latents / config.scaling_factor
        else:
            mean = torch.tensor(config.latents_mean).view(1, 12, 1, 1, 1)
            std = torch.tensor(config.latents_std).view(1, 12, 1, 1, 1)
            mean = mean.to(latents.device, latents.dtype)
            std = std.to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        return pipeline.vae.decode(latents, return_dict=False)[0]

    def forward(self, denoiser, latents, timestep, text_states, conditioning):
        """One call as MochiPipeline makes it, in the usual flow convention (see the
        module docstring); every text token is attended to (``encoder_attention_mask``
        of ones: the text states here carry no padding)."""
        mask = torch.ones(text_states.shape[:2], dtype=torch.bool, device=text_states.device)
        prediction = denoiser(
            hidden_states=latents,
            encoder_hidden_states=text_states,
            timestep=NUM_TRAIN_TIMESTEPS - timestep,
            encoder_attention_mask=mask,
            return_dict=False,
        )[0]
        return -prediction
