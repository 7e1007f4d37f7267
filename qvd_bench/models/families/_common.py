"""Pieces shared by the family definitions: role-table fragments and small helpers."""

from __future__ import annotations

import torch
from torch import nn

from qvd_bench.models.family import Family

# CLIP text encoders pad prompts to 77 tokens.
CLIP_SEQUENCE_LENGTH = 77

# Regex fragment for a numbered child ("down_blocks.0").
N = r"\d+"

# Roles of the layers inside a diffusers spatial transformer (Transformer2DModel and its
# BasicTransformerBlocks), relative to the transformer's own name. ``proj_in``/``proj_out``
# are per-pixel (1x1 conv or Linear) projections in the spatial path.
SPATIAL_TRANSFORMER_ROLES: tuple[tuple[str, str], ...] = (
    (r"proj_in|proj_out", "spatial_conv"),
    (rf"transformer_blocks\.{N}\.attn1\..*", "self_attn"),
    (rf"transformer_blocks\.{N}\.attn2\..*", "cross_attn"),
    (rf"transformer_blocks\.{N}\.ff\..*", "ffn"),
)

# Roles shared by the UNet families: the timestep MLP and every ResNet's projection of
# it come first, so that temporal ResNets' ``time_emb_proj`` are time_emb, not temporal.
UNET_HEAD_ROLES: tuple[tuple[str, str], ...] = (
    (r"time_embedding\..*", "time_emb"),
    (r".*\.time_emb_proj", "time_emb"),
)

# Temporal parts of diffusers' 3-D UNet blocks (unet_3d_blocks), which UNet3DConditionModel
# and I2VGenXLUNet are both built from: temporal convs, temporal transformers, and the
# temporal transformer after conv_in.
UNET3D_TEMPORAL_ROLES: tuple[tuple[str, str], ...] = (
    (r".*\.temp_convs\..*", "temporal"),
    (r".*\.temp_attentions\..*", "temporal"),
    (r"transformer_in\..*", "temporal"),
)

# Spatial parts of a UNet block (after the temporal patterns of each family).
UNET_SPATIAL_ROLES: tuple[tuple[str, str], ...] = (
    *(
        (rf"(down_blocks\.{N}\.|up_blocks\.{N}\.|mid_block\.)attentions\.{N}\.(?:{p})", r)
        for p, r in SPATIAL_TRANSFORMER_ROLES
    ),
    (rf".*\.resnets\.{N}\.(conv1|conv2|conv_shortcut)", "spatial_conv"),
    (rf".*\.(downsamplers|upsamplers)\.{N}\.conv", "spatial_conv"),
    (r"conv_in|conv_out", "io"),
)

# Where the outlier knobs act in any diffusers denoiser; families add their timestep MLP.
# "norm" acts on the GroupNorm/LayerNorm affines among the matching modules.
COMMON_OUTLIER_TARGETS: tuple[tuple[str, str], ...] = (
    (r".*", "norm"),
    (r".*\.(ff|ffn|ff_in)\.net\.0\.proj", "ffn_in"),
    (r".*\.attn\d\.(to_v|to_out\.0)", "attn_out"),
)


def unet_spatial_factor(denoiser: nn.Module) -> int:
    """How much a UNet downsamples its latent: 2 per down block but the last."""
    return 2 ** (len(denoiser.config.block_out_channels) - 1)


def unet_probe_size(denoiser: nn.Module, num_groups: int) -> tuple[int, int, int]:
    """Smallest (frames, height, width) a UNet takes: one frame, and a side that leaves
    every GroupNorm group at least two values at the lowest resolution."""
    factor = unet_spatial_factor(denoiser)
    channels_per_group = min(denoiser.config.block_out_channels) // num_groups
    side = factor if channels_per_group >= 2 else 2 * factor
    return (1, side, side)


class TextUNetFamily(Family):
    """A text-conditioned video UNet: latents (B, C, F, H, W), CLIP text states."""

    layout = "BCFHW"

    def probe_size(self, denoiser):
        return unet_probe_size(denoiser, denoiser.config.norm_num_groups)

    def text_embedding_shape(self, denoiser):
        return (CLIP_SEQUENCE_LENGTH, denoiser.config.cross_attention_dim)


def generator_or_default(generator: torch.Generator | None) -> torch.Generator:
    """The given generator, or a fresh one with a fixed seed (conditioning is then fixed)."""
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(0)


def model_device_dtype(denoiser: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a denoiser's parameters."""
    parameter = next(denoiser.parameters())
    return parameter.device, parameter.dtype


def randn(
    shape: tuple[int, ...], generator: torch.Generator | None, denoiser: nn.Module
) -> torch.Tensor:
    """Standard normal tensor drawn on the CPU (device-independent values), moved to the model."""
    device, dtype = model_device_dtype(denoiser)
    values = torch.randn(shape, generator=generator_or_default(generator))
    return values.to(device=device, dtype=dtype)


def decode_scaled(pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Latents divided by the VAE's ``scaling_factor``, decoded (HunyuanVideo's pipelines)."""
    vae = pipeline.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    return vae.decode(latents, return_dict=False)[0]


def decode_mean_std(pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Latents un-normalised by the VAE's per-channel ``latents_mean`` and ``latents_std``
    (x / (1 / std) + mean, as WanPipeline and SkyReelsV2Pipeline compute it), decoded."""
    vae = pipeline.vae
    latents = latents.to(dtype=vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    latents = latents / std + mean
    return vae.decode(latents, return_dict=False)[0]
