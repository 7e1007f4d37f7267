"""Frechet Video Distance under two named protocols.

FVD numbers depend on the detector and on its preprocessing, so each protocol has an id
that includes the SHA-256 of the detector file (``fvd/stylegan-v/sha256:…``); numbers are
compared only under one id.

- ``stylegan-v`` (StyleGAN-V, ``fvd2048_16f``): the TorchScript I3D ``i3d_torchscript.pt``
  called on uint8 videos [B, C, T, H, W] with rescale=True, resize=True,
  return_features=True (the detector scales and resizes inside); 400-d features; exactly
  16 frames per clip (pass ``videos[:, :16]`` for longer clips, which is StyleGAN-V's
  choice of the first 16 frames at subsample factor 1).
- ``cd-fvd-i3d400`` (cd-fvd / TATS): ``InceptionI3d(400)`` from cd-fvd with the state dict
  ``i3d_pretrained_400.pt``; frames bilinearly resized to 224×224 (no antialias, no
  crop), scaled to 2x/255 − 1, logits averaged over time; at least 9 frames (the
  network's temporal pooling needs them; cd-fvd uses 16).

Both take videos as uint8 [B, T, H, W, C] (RGB; one channel is repeated to three, as
StyleGAN-V does). FVD divides covariances by N, as both reference implementations do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvd_bench.errors import UserError
from qvd_bench.evaluate.frechet import frechet_distance_of_features
from qvd_bench.evaluate.weights import (
    load_state_dict,
    load_torchscript,
    require_weights,
    sha256_of,
)


@dataclass(frozen=True)
class Protocol:
    """An FVD protocol: which detector file, where it is published, what clips it takes."""

    name: str
    file: str
    published: str
    min_frames: int
    max_frames: int | None


PROTOCOLS: dict[str, Protocol] = {
    "stylegan-v": Protocol(
        name="stylegan-v",
        file="i3d_torchscript.pt",
        published=(
            "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1 "
            "(universome/stylegan-v, src/metrics/frechet_video_distance.py)"
        ),
        min_frames=16,
        max_frames=16,
    ),
    "cd-fvd-i3d400": Protocol(
        name="cd-fvd-i3d400",
        file="i3d_pretrained_400.pt",
        published=(
            "https://github.com/songweige/TATS/raw/main/tats/fvd/i3d_pretrained_400.pt "
            "(songweige/TATS, tats/fvd/)"
        ),
        min_frames=9,
        max_frames=None,
    ),
}

NUM_FEATURES = 400
TATS_RESOLUTION = (224, 224)


def to_uint8_videos(frames: Tensor) -> Tensor:
    """Float frames in [0, 1], (B, T, C, H, W) (diffusers' layout) -> uint8 (B, T, H, W, C).

    Rounds half up, x·255 + 0.5 truncated, which is StyleGAN-V's (x·127.5 + 128) for
    frames in [−1, 1].
    """
    if frames.ndim != 5:
        raise ValueError(f"expected frames (B, T, C, H, W), got {tuple(frames.shape)}")
    scaled = (frames.detach().float() * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)
    return scaled.permute(0, 1, 3, 4, 2).contiguous()


def _check_videos(videos: Tensor, protocol: Protocol) -> Tensor:
    """Checks uint8 (B, T, H, W, C) with C in {1, 3}; returns them with three channels."""
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] not in (1, 3):
        raise UserError(
            f"FVD takes uint8 videos (B, T, H, W, C) with C = 1 or 3, got "
            f"{videos.dtype} {tuple(videos.shape)}; convert float frames with to_uint8_videos"
        )
    frames = videos.shape[1]
    if frames < protocol.min_frames or (
        protocol.max_frames is not None and frames > protocol.max_frames
    ):
        wanted = (
            f"exactly {protocol.min_frames}"
            if protocol.max_frames == protocol.min_frames
            else f"at least {protocol.min_frames}"
        )
        raise UserError(
            f"FVD protocol {protocol.name} takes clips of {wanted} frames, got {frames}; "
            f"generate {protocol.min_frames} frames or pass videos[:, :{protocol.min_frames}]"
        )
    return videos.expand(*videos.shape[:-1], 3) if videos.shape[-1] == 1 else videos


def preprocess_tats(videos: Tensor) -> Tensor:
    """TATS / cd-fvd preprocessing: uint8 (B, T, H, W, C) -> float (B, C, T, 224, 224).

    Bilinear resize (align_corners=False, no antialias, no crop), then 2x/255 − 1.
    """
    b, t, h, w, c = videos.shape
    frames = videos.reshape(b * t, h, w, c).permute(0, 3, 1, 2).float()
    frames = F.interpolate(frames, size=TATS_RESOLUTION, mode="bilinear", align_corners=False)
    clips = frames.reshape(b, t, c, *TATS_RESOLUTION).transpose(1, 2)
    return 2.0 * clips / 255.0 - 1.0


@dataclass
class VideoDetector:
    """A loaded FVD detector: uint8 videos (B, T, H, W, C) -> (B, 400) features.

    Attributes:
        protocol: the protocol it implements.
        path: the detector file.
        sha256: the file's SHA-256.
        module: the network (TorchScript or ``InceptionI3d``).
        device: where the network runs.
    """

    protocol: Protocol
    path: Path
    sha256: str
    module: nn.Module = field(repr=False)
    device: torch.device = torch.device("cpu")

    num_features: int = NUM_FEATURES

    @property
    def protocol_id(self) -> str:
        """``fvd/<protocol>/sha256:<64 hex digits>``."""
        return f"fvd/{self.protocol.name}/sha256:{self.sha256}"

    @torch.no_grad()
    def __call__(self, videos: Tensor) -> Tensor:
        """Features of one batch: (B, 400) float32."""
        videos = _check_videos(videos, self.protocol).to(self.device)
        if self.protocol.name == "stylegan-v":
            clips = videos.permute(0, 4, 1, 2, 3).contiguous()  # (B, C, T, H, W) uint8
            features = self.module(clips, rescale=True, resize=True, return_features=True)
        else:
            features = self.module(preprocess_tats(videos))
        if features.ndim != 2 or features.shape[0] != videos.shape[0]:
            raise UserError(
                f"detector {self.path} returned {tuple(features.shape)} for {videos.shape[0]} "
                f"videos; expected (B, {self.num_features}): is it {self.protocol.file}?"
            )
        return features.float()

    def features(self, videos: Tensor, batch_size: int = 8) -> Tensor:
        """Features of any number of videos in batches: (N, 400) float64 on the CPU."""
        parts = [self(videos[i : i + batch_size]) for i in range(0, videos.shape[0], batch_size)]
        return torch.cat(parts).to(torch.float64).cpu()


def _inception_i3d() -> type[nn.Module]:
    try:
        from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d
    except ImportError:
        raise UserError(
            "FVD protocol cd-fvd-i3d400 needs cd-fvd's InceptionI3d: install the cd-fvd "
            "package (without its dependencies)"
        ) from None
    return InceptionI3d


def load_detector(
    protocol: str, path: str | os.PathLike | None, device: str | torch.device = "cpu"
) -> VideoDetector:
    """Loads the detector of an FVD protocol from a local file (or a directory holding it).

    Args:
        protocol: a key of ``PROTOCOLS``.
        path: the detector file, or a directory that holds it under its published name.
        device: where to run it.

    Returns:
        A ``VideoDetector``.

    Raises:
        UserError: unknown protocol, missing file, or a file of the wrong format.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown FVD protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    spec = PROTOCOLS[protocol]
    file = require_weights(path, name=spec.file, published=spec.published)
    if protocol == "stylegan-v":
        module = load_torchscript(file, name=spec.file, published=spec.published)
    else:
        state = load_state_dict(file, name=spec.file, published=spec.published)
        module = _inception_i3d()(NUM_FEATURES, in_channels=3)
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(
                f"{file} is not an InceptionI3d(400) state dict "
                f"({str(e).strip().splitlines()[0]}); expected {spec.file} as published at "
                f"{spec.published}"
            ) from None
    device = torch.device(device)
    return VideoDetector(spec, file, sha256_of(file), module.eval().to(device), device)


def fvd(features_a: Tensor, features_b: Tensor) -> float:
    """FVD between two (N, d) feature sets; covariances divide by N (both protocols).

    Warns (``SampleSizeWarning``) when either set has fewer than 2 × d rows.
    """
    return frechet_distance_of_features(features_a, features_b, ddof=0)
