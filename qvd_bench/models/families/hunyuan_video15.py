"""HunyuanVideo15Transformer3DModel: HunyuanVideo-1.5 (dual-stream DiT, three text streams).

The transformer reads the noisy latent concatenated with conditioning latents and a mask
(zeros for text-to-video, as HunyuanVideo15Pipeline passes them), so its ``in_channels``
is 2·C + 1 for C predicted channels; ``forward`` adds them and the latents keep C. Text
arrives as Qwen states (``encoder_hidden_states``), ByT5 glyph states
(``encoder_hidden_states_2``) and SigLIP image states (``image_embeds``, zeros without an
image). Real CFG runs as two calls per step driven by a diffusers guider, which names them
"pred_cond" and "pred_uncond" in the denoiser's cache_context.
"""

from __future__ import annotations

from typing import Any

import torch

from qvd_bench.models.families._common import (
    COMMON_OUTLIER_TARGETS,
    N,
    decode_scaled,
    randn,
)
from qvd_bench.models.family import Family

# HunyuanVideo15Pipeline: Qwen prompts padded to 1000 tokens, ByT5 glyph prompts to 256,
# and 729 SigLIP tokens of the conditioning image.
QWEN_SEQUENCE_LENGTH = 1000
BYT5_SEQUENCE_LENGTH = 256
VISION_TOKENS = 729

_REFINER = rf"context_embedder\.token_refiner\.refiner_blocks\.{N}"


class HunyuanVideo15Family(Family):
    name = "hunyuan-video-1.5"
    denoiser_class = "HunyuanVideo15Transformer3DModel"
    pipeline_classes = ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline")
    layout = "BCFHW"
    prediction_type = "flow"
    role_table = (
        (r"time_embed\.timestep_embedder\..*", "time_emb"),
        (r"context_embedder\.time_text_embed\.timestep_embedder\..*", "time_emb"),
        # Projections of the pooled Qwen state, the ByT5 and the image states.
        (r"context_embedder\.time_text_embed\.text_embedder\..*", "io"),
        (r"context_embedder\.proj_in|context_embedder_2\..*|image_embedder\..*", "io"),
        # adaLN modulation: of the refiner blocks, both streams, output.
        (rf"{_REFINER}\.norm_out\.linear", "time_emb"),
        (rf"transformer_blocks\.{N}\.(norm1|norm1_context)\.linear", "time_emb"),
        (r"norm_out\.linear", "time_emb"),
        (rf"{_REFINER}\.attn\..*", "self_attn"),
        (rf"{_REFINER}\.ff\..*", "ffn"),
        # Joint attention over text and video tokens.
        (rf"transformer_blocks\.{N}\.attn\..*", "self_attn"),
        (rf"transformer_blocks\.{N}\.(ff|ff_context)\..*", "ffn"),
        (r"x_embedder\.proj|proj_out", "io"),
    )
    outlier_targets = (
        (r"time_embed\.timestep_embedder\.linear_\d", "time_mlp"),
        (r".*\.(ff|ff_context)\.net\.0\.proj", "ffn_in"),
        (r".*\.attn\.(to_v|to_out\.0)", "attn_out"),
        *COMMON_OUTLIER_TARGETS,
    )

    def tiny_config(self) -> dict[str, Any]:
        return {
            "in_channels": 9,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 10,
            "num_layers": 1,
            "num_refiner_layers": 1,
            "mlp_ratio": 2.0,
            "patch_size": 1,
            "patch_size_t": 1,
            "text_embed_dim": 16,
            "text_embed_2_dim": 8,
            "image_embed_dim": 12,
            # The rotary embedding splits each head over (frames, rows, columns).
            "rope_axes_dim": (2, 4, 4),
            "target_size": 64,
            "task_type": "t2v",
        }

    def latent_shape(self, denoiser, batch, frames, height, width):
        return (batch, denoiser.config.out_channels, frames, height, width)

    def text_embedding_shape(self, denoiser):
        return (QWEN_SEQUENCE_LENGTH, denoiser.config.text_embed_dim)

    def conditioning(self, denoiser, batch, frames, height, width, generator=None):
        """The ByT5 glyph states (B, 256, D2), standard normal (a bare denoiser has no
        ByT5 encoder)."""
        shape = (batch, BYT5_SEQUENCE_LENGTH, denoiser.config.text_embed_2_dim)
        return {"encoder_hidden_states_2": randn(shape, generator, denoiser)}

    def decode_video(self, pipeline, latents, frames, height, width):
        return decode_scaled(pipeline, latents)

    def forward(self, denoiser, latents, timestep, text_states, conditioning):
        """One text-to-video call as HunyuanVideo15Pipeline makes it: zero conditioning
        latents and mask, zero image states; every text token is attended to."""
        batch, channels, frames, height, width = latents.shape
        zeros = latents.new_zeros((batch, channels + 1, frames, height, width))
        glyph = conditioning["encoder_hidden_states_2"]
        image = latents.new_zeros((batch, VISION_TOKENS, denoiser.config.image_embed_dim))
        return denoiser(
            hidden_states=torch.cat([latents, zeros], dim=1),
            timestep=timestep,
            encoder_hidden_states=text_states,
            encoder_attention_mask=torch.ones(text_states.shape[:2], device=latents.device),
            encoder_hidden_states_2=glyph,
            encoder_attention_mask_2=torch.ones(glyph.shape[:2], device=latents.device),
            image_embeds=image,
            return_dict=False,
        )[0]
