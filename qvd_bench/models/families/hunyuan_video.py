"""HunyuanVideoTransformer3DModel: HunyuanVideo (dual- then single-stream DiT).

HunyuanVideo is guidance-distilled: instead of a second, unconditional call per step, the
guidance scale enters as an embedding (``guidance``, the scale times 1000) added to the
timestep embedding, together with a projection of pooled CLIP text states
(``pooled_projections``). Text tokens first pass a small refiner (``context_embedder``)
conditioned on the timestep and the mean text state, then attend jointly with the video
tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from qvd_bench.models.families._common import (
    COMMON_OUTLIER_TARGETS,
    N,
    decode_scaled,
    model_device_dtype,
    randn,
)
from qvd_bench.models.family import Family, Guidance

# HunyuanVideoPipeline pads Llama prompts to 256 tokens (after its template).
LLAMA_SEQUENCE_LENGTH = 256

# HunyuanVideoPipeline's default embedded guidance scale; the transformer receives it
# times 1000.
DEFAULT_GUIDANCE_SCALE = 6.0
GUIDANCE_EMBEDDING_FACTOR = 1000.0

_REFINER = rf"context_embedder\.token_refiner\.refiner_blocks\.{N}"


class HunyuanVideoFamily(Family):
    name = "hunyuan-video"
    denoiser_class = "HunyuanVideoTransformer3DModel"
    pipeline_classes = (
        "HunyuanVideoPipeline",
        "HunyuanVideoImageToVideoPipeline",
        "HunyuanSkyreelsImageToVideoPipeline",
    )
    layout = "BCFHW"
    prediction_type = "flow"
    role_table = (
        # The timestep MLPs, and the guidance-scale MLP: its input is the same at every
        # timestep of a run, so probe detection (inputs that change with the timestep)
        # misses it, but it computes the same kind of embedding and adds to the timestep's.
        (r"time_text_embed\.(timestep_embedder|guidance_embedder)\..*", "time_emb"),
        (r"context_embedder\.time_text_embed\.timestep_embedder\..*", "time_emb"),
        # Projections of pooled text states (CLIP's for the model, the mean Llama state
        # for the refiner): conditioning, not the timestep.
        (r"(context_embedder\.)?time_text_embed\.text_embedder\..*", "io"),
        (r"context_embedder\.proj_in", "io"),
        # adaLN modulation: of the refiner blocks, both streams, single blocks, output.
        (rf"{_REFINER}\.norm_out\.linear", "time_emb"),
        (rf"transformer_blocks\.{N}\.(norm1|norm1_context)\.linear", "time_emb"),
        (rf"single_transformer_blocks\.{N}\.norm\.linear", "time_emb"),
        (r"norm_out\.linear", "time_emb"),
        # Self-attention among the text tokens in the refiner; joint attention over text
        # and video tokens in the dual- and single-stream blocks.
        (rf"{_REFINER}\.attn\..*", "self_attn"),
        (rf"{_REFINER}\.ff\..*", "ffn"),
        (rf"transformer_blocks\.{N}\.attn\..*", "self_attn"),
        (rf"transformer_blocks\.{N}\.(ff|ff_context)\..*", "ffn"),
        (rf"single_transformer_blocks\.{N}\.attn\..*", "self_attn"),
        # A single block's proj_out reads cat([attention output, MLP hidden]); the MLP
        # hidden is most of its input.
        (rf"single_transformer_blocks\.{N}\.(proj_mlp|proj_out)", "ffn"),
        (r"x_embedder\.proj|proj_out", "io"),
    )
    outlier_targets = (
        (r"time_text_embed\.timestep_embedder\.linear_\d", "time_mlp"),
        (r".*\.(ff|ff_context)\.net\.0\.proj|.*\.proj_mlp", "ffn_in"),
        (r".*\.attn\.(to_v|to_out\.0)", "attn_out"),
        *COMMON_OUTLIER_TARGETS,
    )

    def tiny_config(self) -> dict[str, Any]:
        return {
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            # The rotary embedding splits each head over (frames, rows, columns).
            "attention_head_dim": 10,
            "rope_axes_dim": (2, 4, 4),
            "num_layers": 1,
            "num_single_layers": 1,
            "num_refiner_layers": 1,
            "patch_size": 1,
            "patch_size_t": 1,
            "guidance_embeds": True,
            "text_embed_dim": 16,
            "pooled_projection_dim": 8,
        }

    def text_embedding_shape(self, denoiser):
        return (LLAMA_SEQUENCE_LENGTH, denoiser.config.text_embed_dim)

    def conditioning(self, denoiser, batch, frames, height, width, generator=None):
        """Returns pooled_projections (B, P), standard normal (the pooled CLIP text states
        of a prompt, which a bare denoiser has none of), and, for guidance-distilled
        models, guidance (B,): the pipeline's default scale times 1000."""
        pooled = randn((batch, denoiser.config.pooled_projection_dim), generator, denoiser)
        conditioning = {"pooled_projections": pooled}
        if denoiser.config.guidance_embeds:
            device, dtype = model_device_dtype(denoiser)
            value = DEFAULT_GUIDANCE_SCALE * GUIDANCE_EMBEDDING_FACTOR
            conditioning["guidance"] = torch.full((batch,), value, device=device, dtype=dtype)
        return conditioning

    def decode_video(self, pipeline, latents, frames, height, width):
        return decode_scaled(pipeline, latents)

    def guidance(self, pipeline, guidance_scale, call):
        """Guidance-distilled: one conditional call per step (the scale is embedded),
        unless the call asks for true CFG (``true_cfg_scale`` > 1 with a negative prompt):
        neg + s·(cond − neg)."""
        true_scale = float(call.get("true_cfg_scale") or 1.0)
        negative = call.get("negative_prompt") is not None or (
            call.get("negative_prompt_embeds") is not None
        )
        if true_scale > 1 and negative:
            return Guidance(("uncond", "cond"), {"uncond": true_scale - 1})
        return Guidance(("cond",))

    def forward(self, denoiser, latents, timestep, text_states, conditioning):
        """One call as HunyuanVideoPipeline makes it; every text token is attended to
        (``encoder_attention_mask`` of ones: the text states here carry no padding)."""
        mask = torch.ones(text_states.shape[:2], dtype=torch.long, device=text_states.device)
        return denoiser(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=text_states,
            encoder_attention_mask=mask,
            pooled_projections=conditioning["pooled_projections"],
            guidance=conditioning.get("guidance"),
            return_dict=False,
        )[0]
