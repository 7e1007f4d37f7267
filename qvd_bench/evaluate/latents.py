"""Frames for the decoded metrics: the final latents decoded by the pipeline's own VAE, or
the latents themselves standing in for frames where there is no VAE.

A model whose diffusers pipeline has a VAE has its final latents decoded exactly as the
pipeline's own call decodes them (``models.decode.decode_frames``): free-running PSNR and
SSIM compare those frames, and the network metrics (FVD, FID, CLIPSIM) see them as uint8
RGB videos. One video is decoded at a time, so memory holds one video's frames.

A bare denoiser, or a pipeline without a VAE (``shapes-wan`` samples pixels), has no VAE:
its final latents mapped to [0, 1] by the FP reference's range (``latents_to_unit``) stand
for frames, and the network metrics see the first three latent channels as uint8 RGB
videos (``to_uint8_videos``). For a bare denoiser that tests the metrics' protocol, not
image quality; for ``shapes-wan`` the latents are the clip's pixels.

``VideoFrames.decoded_by`` names which ("pipeline VAE" or "latents mapped to [0, 1]"), as
the results' settings record it, and the protocol id of the PSNR and SSIM rows differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qvd_bench.evaluate.generate import Generation, GenerationSettings
from qvd_bench.models.family import LoadedModel

# ``VideoFrames.decoded_by``: what the decoded metrics were computed on.
DECODED_BY_VAE = "pipeline VAE"
DECODED_BY_LATENTS = "latents mapped to [0, 1]"
# Protocol ids of the free-running PSNR and SSIM rows, by what they compare.
PROTOCOL_VAE = "fidelity/frames-pipeline-vae"
PROTOCOL_LATENTS = "fidelity/latents-minmax"


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


@dataclass(frozen=True)
class VideoFrames:
    """How a model's final latents become frames for the decoded metrics.

    Attributes:
        model: the model whose pipeline's VAE decodes (None: latents stand for frames).
        layout: the family's latent layout.
        value_range: (min, max) of the FP reference's final latents (the latent mapping).
        size: the latent (frames, height, width) the videos were sampled at.
    """

    model: LoadedModel | None
    layout: str
    value_range: tuple[float, float]
    size: tuple[int, int, int]

    @property
    def decoded(self) -> bool:
        """Whether frames are decoded by the pipeline's VAE."""
        return self.model is not None

    @property
    def decoded_by(self) -> str:
        """ "pipeline VAE" or "latents mapped to [0, 1]"."""
        return DECODED_BY_VAE if self.decoded else DECODED_BY_LATENTS

    @property
    def protocol(self) -> str:
        """The protocol id of the PSNR and SSIM rows."""
        return PROTOCOL_VAE if self.decoded else PROTOCOL_LATENTS

    def frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents (B, ...) -> frames (B, T, C, H, W) in [0, 1] (float32 when
        decoded, one video at a time; float64 and not clamped when mapped)."""
        if not self.decoded:
            return latent_frames(latents_to_unit(latents, self.value_range), self.layout)
        from qvd_bench.models.decode import decode_frames

        return torch.cat([decode_frames(self.model, video[None], *self.size) for video in latents])

    def uint8_videos(self, generations: Sequence[Generation]) -> torch.Tensor:
        """The generations' videos as uint8 RGB (B, T, H, W, 3) for the network metrics."""
        if not self.decoded:
            return to_uint8_videos(concat(generations, "latents"), self.layout, self.value_range)
        from qvd_bench.evaluate.fvd import to_uint8_videos as frames_to_uint8

        return torch.cat([frames_to_uint8(self.frames(g.latents)) for g in generations])


def video_frames(
    loaded: LoadedModel, settings: GenerationSettings, reference: Sequence[Generation]
) -> VideoFrames:
    """The frames of a model's videos: decoded by its pipeline's VAE where it has one,
    else its latents mapped to [0, 1] by the FP ``reference``'s range.

    Args:
        loaded: the FP model (its VAE decodes the quantized models' videos too:
            quantization changes the denoisers only).
        settings: the sampling settings (the latent size).
        reference: the FP model's free-running videos.
    """
    from qvd_bench.models.decode import pipeline_vae

    return VideoFrames(
        model=loaded if pipeline_vae(loaded) is not None else None,
        layout=loaded.family.layout,
        value_range=latent_range(reference),
        size=(settings.frames, settings.height, settings.width),
    )


def latent_video_frames(reference: Sequence[Generation], layout: str) -> VideoFrames:
    """Latents mapped to [0, 1] by the FP ``reference``'s range, whatever the model."""
    size = tuple(reference[0].latents.shape[-3:])
    return VideoFrames(model=None, layout=layout, value_range=latent_range(reference), size=size)
