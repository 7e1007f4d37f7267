"""WanTransformer3DModel: Wan 2.x (flow-matching DiT with 3-D attention)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from qvd_bench.models.families._common import COMMON_OUTLIER_TARGETS, N, decode_mean_std
from qvd_bench.models.family import Family

# The Wan pipeline pads UMT5 prompts to 512 tokens.
UMT5_SEQUENCE_LENGTH = 512


class WanFamily(Family):
    name = "wan"
    denoiser_class = "WanTransformer3DModel"
    pipeline_classes = ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline")
    layout = "BCFHW"
    prediction_type = "flow"
    # Their prompt cleaning calls ftfy, imported only where it is installed (WanPipeline
    # checks first).
    pipeline_modules = MappingProxyType(
        {"WanImageToVideoPipeline": ("ftfy",), "WanVideoToVideoPipeline": ("ftfy",)}
    )
    role_table = (
        # Timestep MLP and the shared adaLN modulation projection (time_proj).
        (r"condition_embedder\.(time_embedder\..*|time_proj)", "time_emb"),
        (r"condition_embedder\.(text_embedder|image_embedder)\..*", "io"),
        (rf"blocks\.{N}\.attn1\..*", "self_attn"),
        (rf"blocks\.{N}\.attn2\..*", "cross_attn"),
        (rf"blocks\.{N}\.ffn\..*", "ffn"),
        (r"patch_embedding|proj_out", "io"),
    )
    outlier_targets = (
        (r"condition_embedder\.time_embedder\.linear_\d", "time_mlp"),
        *COMMON_OUTLIER_TARGETS,
    )

    def tiny_config(self) -> dict[str, Any]:
        return {
            "patch_size": (1, 2, 2),
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "in_channels": 4,
            "out_channels": 4,
            "text_dim": 16,
            "freq_dim": 256,
            "ffn_dim": 32,
            "num_layers": 2,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 32,
        }

    def probe_size(self, denoiser):
        return tuple(denoiser.config.patch_size)

    def text_embedding_shape(self, denoiser):
        return (UMT5_SEQUENCE_LENGTH, denoiser.config.text_dim)

    def decode_video(self, pipeline, latents, frames, height, width):
        return decode_mean_std(pipeline, latents)

    def forward(self, denoiser, latents, timestep, text_states, conditioning):
        return denoiser(
            latents, timestep=timestep, encoder_hidden_states=text_states, return_dict=False
        )[0]
