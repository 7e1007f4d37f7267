"""Per-frame FID: our Frechet on the same features equals torchmetrics' FID."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvd_bench.errors import UserError
from qvd_bench.evaluate.fid import (
    INCEPTION_FILE,
    custom_fid_metric,
    fid_from_features,
    frame_features,
    frame_fid,
    inception_fid_metric,
    video_frames,
)


class PoolFeatures(nn.Module):
    """uint8 frames (N, 3, H, W) -> (N, 12): 2×2 average pools of each channel."""

    num_features = 12

    def forward(self, frames: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(frames.float() / 255.0, 2).flatten(1)


def videos(n: int, frames: int, seed: int, brightness: float) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, frames, 8, 8, 3, generator=g) * brightness
    return (x * 255).to(torch.uint8)


def test_frame_fid_equals_torchmetrics_on_the_same_extractor():
    extractor = PoolFeatures()
    videos_a, videos_b = videos(4, 8, seed=0, brightness=1.0), videos(5, 6, seed=1, brightness=0.8)
    expected = frame_fid(custom_fid_metric(extractor), videos_a, videos_b, batch_size=7)
    features_a = frame_features(extractor, videos_a, batch_size=5)
    features_b = frame_features(extractor, videos_b)
    assert features_a.shape == (32, 12) and features_b.shape == (30, 12)
    ours = fid_from_features(features_a, features_b)
    # torchmetrics returns float32; the traces set the scale of the Frechet tolerance.
    scale = float(features_a.var(0).sum() + features_b.var(0).sum())
    assert ours == pytest.approx(expected, abs=1e-6 * scale, rel=1e-6)
    assert ours > 0


def test_video_frames_layout():
    v = videos(2, 3, seed=0, brightness=1.0)
    frames = video_frames(v)
    assert frames.shape == (6, 3, 8, 8)
    torch.testing.assert_close(frames[4], v[1, 1].permute(2, 0, 1))
    with pytest.raises(UserError, match="uint8 videos"):
        video_frames(v.float())


def test_inception_weights_are_required(tmp_path):
    with pytest.raises(UserError) as missing:
        inception_fid_metric(tmp_path)
    message = str(missing.value)
    assert f"{INCEPTION_FILE} not found at {tmp_path / INCEPTION_FILE}" in message
    assert "toshas/torch-fidelity" in message and "--" not in message
    with pytest.raises(UserError, match="no weights path given"):
        inception_fid_metric(None)
