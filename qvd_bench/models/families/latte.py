"""LatteTransformer3DModel: Latte (DiT with alternating spatial and temporal blocks)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from qvd_bench.models.families._common import COMMON_OUTLIER_TARGETS, N
from qvd_bench.models.family import Family

# The Latte pipeline pads T5 prompts to 120 tokens.
T5_SEQUENCE_LENGTH = 120


class LatteFamily(Family):
    name = "latte"
    denoiser_class = "LatteTransformer3DModel"
    pipeline_classes = ("LattePipeline",)
    layout = "BCFHW"
    prediction_type = "epsilon"
    # Caption cleaning needs bs4 and ftfy and is meant for real captions only.
    pipeline_call_defaults = MappingProxyType({"clean_caption": False})
    role_table = (
        # PixArt-style adaLN-single: timestep MLP and the shared modulation Linear.
        (r"adaln_single\..*", "time_emb"),
        (rf"temporal_transformer_blocks\.{N}\..*", "temporal"),
        (rf"transformer_blocks\.{N}\.attn1\..*", "self_attn"),
        (rf"transformer_blocks\.{N}\.attn2\..*", "cross_attn"),
        (rf"transformer_blocks\.{N}\.ff\..*", "ffn"),
        (r"pos_embed\.proj|proj_out|caption_projection\..*", "io"),
    )
    outlier_targets = (
        (r"adaln_single\.emb\.timestep_embedder\.linear_\d", "time_mlp"),
        *COMMON_OUTLIER_TARGETS,
    )

    def tiny_config(self) -> dict[str, Any]:
        return {
            "sample_size": 16,
            "num_layers": 2,
            "patch_size": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 3,
            "caption_channels": 32,
            "in_channels": 4,
            "cross_attention_dim": 24,
            # 4 predicted channels + 4 learned-variance channels.
            "out_channels": 8,
            "norm_type": "ada_norm_single",
            "num_embeds_ada_norm": 1000,
            "video_length": 8,
        }

    def text_embedding_shape(self, denoiser):
        return (T5_SEQUENCE_LENGTH, denoiser.config.caption_channels)

    def forward(self, denoiser, latents, timestep, text_states, conditioning):
        with _temporal_positions(denoiser, latents.shape[2]):
            prediction = denoiser(
                latents, timestep=timestep, encoder_hidden_states=text_states, return_dict=False
            )[0]
        # Learned-sigma models predict [epsilon, variance]; keep epsilon.
        return prediction[:, : latents.shape[1]]


@contextlib.contextmanager
def _temporal_positions(denoiser: nn.Module, frames: int) -> Iterator[None]:
    """Lets the denoiser take any number of frames, not only ``video_length``.

    Its temporal position embedding is the fixed 1-D sin-cos embedding of positions
    0..video_length-1; for another frame count it is swapped for the same embedding of
    positions 0..frames-1 (for fewer frames, exactly its first rows) during the call.
    """
    full = denoiser.temp_pos_embed
    if frames <= 1 or frames == full.shape[1]:
        yield
        return
    from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

    positions = torch.arange(0, frames).unsqueeze(1)
    embedding = get_1d_sincos_pos_embed_from_grid(full.shape[-1], positions, output_type="pt")
    denoiser.temp_pos_embed = embedding.float().unsqueeze(0).to(full)
    try:
        yield
    finally:
        denoiser.temp_pos_embed = full
