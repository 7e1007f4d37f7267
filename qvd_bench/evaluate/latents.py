"""Final latents standing in for frames: bare denoisers have no VAE to decode with.

The fidelity rows compare latents mapped to [0, 1] by the FP reference's range
(``latents_to_unit``), and the network metrics see the first three latent channels as
uint8 RGB videos (``to_uint8_videos``): this tests the metrics' protocol, not image quality.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qvd_bench.evaluate.generate import Generation


def concat(generations: Sequence[Generation], name: str) -> torch.Tensor:
    """One field of some generations (e.g. ``"latents"``), concatenated along the batch."""
    return torch.cat([getattr(g, name) for g in generations])


def latent_range(reference: Sequence[Generation]) -> tuple[float, float]:
    """(min, max) of the FP reference's final latents over all its videos."""
    latents = concat(reference, "latents")
    return float(latents.min()), float(latents.max())


def latents_to_unit(latents: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Latents mapped affinely to [0, 1] by the reference's (min, max); not clamped."""
    lo, hi = value_range
    return (latents.to(torch.float64) - lo) / max(hi - lo, 1e-12)


def latent_frames(latents: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, C, F, H, W) or (B, F, C, H, W) latents -> frames (B, F, C, H, W)."""
    return latents.transpose(1, 2) if layout == "BCFHW" else latents


def to_uint8_videos(latents: torch.Tensor, layout: str, value_range) -> torch.Tensor:
    """Final latents -> uint8 RGB videos (B, T, H, W, 3) for the weight metrics.

    Without a VAE the first three latent channels (repeated when fewer) stand for RGB,
    mapped by the reference's range: this tests the metrics' protocol, not image quality.
    """
    frames = latent_frames(latents_to_unit(latents, value_range), layout).clamp(0, 1)
    channels = frames.shape[2]
    frames = frames[:, :, [i % channels for i in range(3)]]
    return (frames * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous()
