"""CogVideoXTransformer3DModel: CogVideoX (full 3-D attention over text and video tokens)."""

from __future__ import annotations

from typing import Any

from qvd_bench.models.families._common import COMMON_OUTLIER_TARGETS, N
from qvd_bench.models.family import Family


class CogVideoXFamily(Family):
    name = "cogvideox"
    denoiser_class = "CogVideoXTransformer3DModel"
    pipeline_classes = (
        "CogVideoXPipeline",
        "CogVideoXImageToVideoPipeline",
        "CogVideoXVideoToVideoPipeline",
    )
    layout = "BFCHW"
    prediction_type = "v_prediction"
    role_table = (
        (r"time_embedding\..*", "time_emb"),
        # adaLN-zero modulation of every block and of the output norm.
        (rf"transformer_blocks\.{N}\.norm\d\.linear", "time_emb"),
        (r"norm_out\.linear", "time_emb"),
        # CogVideoX 1.5 image-to-video: frame-offset conditioning, not the timestep.
        (r"ofs_embedding\..*", "io"),
        # Joint attention over text and video tokens.
        (rf"transformer_blocks\.{N}\.attn1\..*", "self_attn"),
        (rf"transformer_blocks\.{N}\.ff\..*", "ffn"),
        (r"patch_embed\..*|proj_out", "io"),
    )
    outlier_targets = (
        (r"time_embedding\.linear_\d", "time_mlp"),
        *COMMON_OUTLIER_TARGETS,
    )

    def tiny_config(self) -> dict[str, Any]:
        return {
            "num_attention_heads": 4,
            "attention_head_dim": 8,
            "in_channels": 4,
            "out_channels": 4,
            "time_embed_dim": 2,
            "text_embed_dim": 32,
            "num_layers": 2,
            "sample_width": 16,
            "sample_height": 16,
            "sample_frames": 29,
            "patch_size": 2,
            "temporal_compression_ratio": 4,
            "max_text_seq_length": 16,
        }

    def text_embedding_shape(self, denoiser):
        return (denoiser.config.max_text_seq_length, denoiser.config.text_embed_dim)

    def forward(self, denoiser, latents, timestep, text_states, conditioning):
        return denoiser(
            latents, encoder_hidden_states=text_states, timestep=timestep, return_dict=False
        )[0]
