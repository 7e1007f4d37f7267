"""Per-frame FID through torchmetrics' ``FrechetInceptionDistance``.

Every frame of every video is one image. The Inception-v3 network is torch-fidelity's port
of the TF FID Inception (``weights-inception-2015-12-05-6726825d.pth``), read from a local
file: torchmetrics would otherwise download it when the metric is built. Resizing to
299×299 runs without antialiasing, as the TF original and pytorch-fid do, so numbers are
comparable to published ones.

``fid_from_features`` is the same distance through ``frechet.py`` (covariances divide by
N − 1, the FID convention of pytorch-fid, clean-fid and torchmetrics); on the same
features it equals torchmetrics' result. Any ``nn.Module`` mapping uint8 images
(N, 3, H, W) to (N, d) features can stand in for Inception (``custom_fid_metric``).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from qvd_bench.errors import UserError
from qvd_bench.evaluate.frechet import frechet_distance_of_features
from qvd_bench.evaluate.weights import require_weights, sha256_of

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_PUBLISHED = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth (toshas/torch-fidelity GitHub releases)"
)


def video_frames(videos: Tensor) -> Tensor:
    """uint8 videos (B, T, H, W, C) -> uint8 frames (B·T, C, H, W), as FID takes them."""
    if videos.dtype != torch.uint8 or videos.ndim != 5:
        raise UserError(
            f"FID takes uint8 videos (B, T, H, W, C), got {videos.dtype} {tuple(videos.shape)}"
        )
    b, t, h, w, c = videos.shape
    return videos.reshape(b * t, h, w, c).permute(0, 3, 1, 2).contiguous()


def inception_fid_metric(weights: str | os.PathLike | None, device: str | torch.device = "cpu"):
    """torchmetrics FID with the 2048-d Inception pool features from a local weights file.

    Args:
        weights: the Inception weights file, or a directory holding it.
        device: where the network runs.

    Returns:
        ``FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=…,
        antialias=False)``; it takes uint8 frames (N, 3, H, W).

    Raises:
        UserError: the file is missing, or torch-fidelity (which torchmetrics uses for the
            network) is not installed.
    """
    path = require_weights(weights, name=INCEPTION_FILE, published=INCEPTION_PUBLISHED)
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise UserError(
            "FID with Inception needs torch-fidelity: pip install torch-fidelity (with the "
            "torchvision that matches your torch)"
        )
    metric = FrechetInceptionDistance(
        feature=2048, feature_extractor_weights_path=str(path), antialias=False
    )
    return metric.to(device)


def inception_protocol_id(weights: str | os.PathLike) -> str:
    """``fid/inception-v3-2048/sha256:<digest>`` of the Inception weights file."""
    path = require_weights(weights, name=INCEPTION_FILE, published=INCEPTION_PUBLISHED)
    return f"fid/inception-v3-2048/sha256:{sha256_of(path)}"


def custom_fid_metric(extractor: nn.Module):
    """torchmetrics FID over any feature extractor: uint8 frames (N, 3, H, W) -> (N, d).

    Give the module a ``num_features`` attribute (else torchmetrics probes it with a
    random 299×299 image).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=extractor)


@torch.no_grad()
def frame_fid(metric, videos_a: Tensor, videos_b: Tensor, batch_size: int = 64) -> float:
    """Per-frame FID between two sets of videos through a torchmetrics FID metric.

    Args:
        metric: from ``inception_fid_metric`` or ``custom_fid_metric``; it is reset.
        videos_a: the reference videos ("real"), uint8 (B, T, H, W, C).
        videos_b: the evaluated videos ("fake"), uint8 (B', T', H, W, C).
        batch_size: frames per network call.

    Returns:
        The FID, a Python float.
    """
    metric.reset()
    for videos, real in ((videos_a, True), (videos_b, False)):
        frames = video_frames(videos)
        for i in range(0, frames.shape[0], batch_size):
            metric.update(frames[i : i + batch_size], real=real)
    return float(metric.compute())


@torch.no_grad()
def frame_features(extractor: nn.Module, videos: Tensor, batch_size: int = 64) -> Tensor:
    """Per-frame features (B·T, d) float64 of videos uint8 (B, T, H, W, C).

    ``extractor`` may be ``metric.inception`` of a torchmetrics FID metric.
    """
    frames = video_frames(videos)
    parts = [extractor(frames[i : i + batch_size]) for i in range(0, frames.shape[0], batch_size)]
    return torch.cat(parts).reshape(frames.shape[0], -1).to(torch.float64).cpu()


def fid_from_features(features_a: Tensor, features_b: Tensor) -> float:
    """FID between two (N, d) feature sets; covariances divide by N − 1 (FID convention).

    Warns (``SampleSizeWarning``) when either set has fewer than 2 × d rows.
    """
    return frechet_distance_of_features(features_a, features_b, ddof=1)
