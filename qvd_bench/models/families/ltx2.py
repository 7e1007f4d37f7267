"""LTX2VideoTransformer3DModel: LTX-2 (joint audio-video DiT over packed tokens).

Every block has a video and an audio stream, each with self-attention, cross-attention
to the text, an FFN, and attention between the two streams (audio-to-video and
video-to-audio). Both streams are quantized alike; the audio layers are named
``audio_*``. The latents here are the video's, (B, C, F, H, W); ``forward`` packs them as
``ltx.pack_tokens`` does and supplies audio latents from ``conditioning``.

LTX2Pipeline adds spatio-temporal and modality-isolation guidance passes by default
(denoiser calls in ``cache_context("uncond_stg")`` and ``("uncond_modality")``, both on the
prompt's states). Their statistics are stored under branches of their own, "cond_stg" and
"cond_modality" (``sampling.CACHE_CONTEXT_BRANCHES``); a run turns them off through the
call's ``stg_scale``, ``audio_stg_scale`` (0) and ``modality_scale``,
``audio_modality_scale`` (1) in ``pipeline_kwargs``.
"""

from __future__ import annotations

from typing import Any

import torch

from qvd_bench.models.families._common import COMMON_OUTLIER_TARGETS, N, randn
from qvd_bench.models.families.ltx import decode_timestep, pack_tokens, unpack_tokens
from qvd_bench.models.family import Family, Guidance

# LTX2Pipeline pads Gemma prompts to 1024 tokens; the tiny preset's audio has 4 frames.
TEXT_SEQUENCE_LENGTH = 1024
AUDIO_FRAMES = 4

# The per-stream adaLN embedders of the timestep (and of the cross-stream gates).
_TIME_EMBEDDERS = r"(audio_)?time_embed|av_cross_attn_(video|audio)_(scale_shift|a2v_gate|v2a_gate)"


class LTX2Family(Family):
    name = "ltx2"
    denoiser_class = "LTX2VideoTransformer3DModel"
    pipeline_classes = (
        "LTX2Pipeline",
        "LTX2ImageToVideoPipeline",
        "LTX2ConditionPipeline",
    )
    layout = "BCFHW"
    prediction_type = "flow"
    role_table = (
        (rf"({_TIME_EMBEDDERS})\..*", "time_emb"),
        (r"(audio_)?caption_projection\..*", "io"),
        (rf"transformer_blocks\.{N}\.(audio_)?attn1\..*", "self_attn"),
        (rf"transformer_blocks\.{N}\.(audio_)?attn2\..*", "cross_attn"),
        # Attention between the streams: queries of one, keys and values of the other.
        (rf"transformer_blocks\.{N}\.(audio_to_video|video_to_audio)_attn\..*", "cross_attn"),
        (rf"transformer_blocks\.{N}\.(audio_)?ff\..*", "ffn"),
        (r"(audio_)?proj_in|(audio_)?proj_out", "io"),
    )
    outlier_targets = (
        (r"time_embed\.emb\.timestep_embedder\.linear_\d", "time_mlp"),
        *COMMON_OUTLIER_TARGETS,
    )

    def tiny_config(self) -> dict[str, Any]:
        return {
            "in_channels": 8,
            "out_channels": 8,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 16,
            "num_layers": 1,
            "caption_channels": 16,
            "audio_in_channels": 4,
            "audio_out_channels": 4,
            "audio_num_attention_heads": 2,
            "audio_attention_head_dim": 4,
            "audio_cross_attention_dim": 8,
        }

    def text_embedding_shape(self, denoiser):
        return (TEXT_SEQUENCE_LENGTH, denoiser.config.caption_channels)

    def conditioning(self, denoiser, batch, frames, height, width, generator=None):
        """Audio latents (B, audio frames, audio channels), standard normal: the audio
        stream's input, which a video benchmark has none of."""
        shape = (batch, AUDIO_FRAMES, denoiser.config.audio_in_channels)
        return {"audio_hidden_states": randn(shape, generator, denoiser)}

    def pipeline_latents(self, denoiser, latents, frames, height, width):
        """LTX2Pipeline returns packed video tokens with ``output_type="latent"``."""
        if latents.dim() != 3:
            return latents
        p, pt = denoiser.config.patch_size, denoiser.config.patch_size_t
        return unpack_tokens(latents, frames // pt, height // p, width // p, p, pt)

    def decode_video(self, pipeline, latents, frames, height, width):
        """As LTX2Pipeline: its latent output is already de-normalised, so decoded as it
        is (at the call's ``decode_timestep`` where the decoder is timestep-conditioned)."""
        vae = pipeline.vae
        timestep = decode_timestep(pipeline, self.pipeline_call_defaults, latents)
        return vae.decode(latents.to(vae.dtype), timestep, return_dict=False)[0]

    def guidance(self, pipeline, guidance_scale, call):
        """As LTX2Pipeline guides the video, in x0-space: cond + (g − 1)·(cond − uncond)
        + stg·(cond − cond_stg) + (m − 1)·(cond − cond_modality), then rescaled toward
        cond by ``guidance_rescale``. A pass runs when the video's or the audio's scale
        asks for it (the audio's defaulting to the video's)."""

        def scale(name: str) -> float:
            return float(call.get(name) or 0.0)

        def audio(name: str) -> float:
            return float(call.get(f"audio_{name}") or call.get(name) or 0.0)

        cfg = scale("guidance_scale")
        stg = scale("stg_scale")
        modality = scale("modality_scale")
        runs = {
            "uncond": cfg > 1 or audio("guidance_scale") > 1,
            "cond_stg": stg > 0 or audio("stg_scale") > 0,
            "cond_modality": modality > 1 or audio("modality_scale") > 1,
        }
        return Guidance(
            tuple(b for b in ("uncond", "cond", "cond_stg", "cond_modality") if runs.get(b, True)),
            {"uncond": cfg - 1, "cond_stg": stg, "cond_modality": modality - 1},
            rescale=scale("guidance_rescale"),
            rescale_in_x0=True,
        )

    def forward(self, denoiser, latents, timestep, text_states, conditioning):
        """Packs the video latents, calls the transformer with the same text for both
        streams (as LTX2Pipeline's connectors give them), returns the video prediction."""
        _, _, frames, height, width = latents.shape
        p, pt = denoiser.config.patch_size, denoiser.config.patch_size_t
        grid = (frames // pt, height // p, width // p)
        audio = conditioning["audio_hidden_states"]
        mask = torch.ones(text_states.shape[:2], device=latents.device)
        video, _ = denoiser(
            hidden_states=pack_tokens(latents, p, pt),
            audio_hidden_states=audio,
            encoder_hidden_states=text_states,
            audio_encoder_hidden_states=text_states,
            timestep=timestep,
            sigma=timestep,
            encoder_attention_mask=mask,
            audio_encoder_attention_mask=mask,
            num_frames=grid[0],
            height=grid[1],
            width=grid[2],
            audio_num_frames=audio.shape[1],
            return_dict=False,
        )
        return unpack_tokens(video, *grid, p, pt)
