"""SkyReelsV2Transformer3DModel: SkyReels-V2 (Wan-architecture DiT, diffusion forcing).

The layers are Wan's. Its diffusion-forcing pipelines give every latent frame its own
timestep, (B, frames): the tracker keys such a call by its step (the largest timestep)
and the layer hooks leave out the tokens of frames at another noise level
(``sampling.CallTracker``).
"""

from __future__ import annotations

from typing import Any

from qvd_bench.models.families._common import COMMON_OUTLIER_TARGETS, N
from qvd_bench.models.family import Family

# The SkyReels-V2 pipelines pad UMT5 prompts to 512 tokens.
UMT5_SEQUENCE_LENGTH = 512


class SkyReelsV2Family(Family):
    name = "skyreels-v2"
    denoiser_class = "SkyReelsV2Transformer3DModel"
    pipeline_classes = (
        "SkyReelsV2Pipeline",
        "SkyReelsV2ImageToVideoPipeline",
        "SkyReelsV2DiffusionForcingPipeline",
        "SkyReelsV2DiffusionForcingImageToVideoPipeline",
        "SkyReelsV2DiffusionForcingVideoToVideoPipeline",
    )
    layout = "BCFHW"
    prediction_type = "flow"
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

    def forward(self, denoiser, latents, timestep, text_states, conditioning):
        return denoiser(
            latents, timestep=timestep, encoder_hidden_states=text_states, return_dict=False
        )[0]
