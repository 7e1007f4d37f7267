"""Shared helpers of the evaluation tests: synthetic videos and a stand-in FVD detector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def random_videos(n: int, frames: int, size: int, seed: int) -> Tensor:
    """uint8 (n, frames, size, size, 3): smooth random clips, shifted per set."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n * frames, 3, 4, 4, generator=g)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (smooth * 255).to(torch.uint8).reshape(n, frames, 3, size, size).permute(0, 1, 3, 4, 2)


class ScriptedDetector(nn.Module):
    """Stands in for i3d_torchscript.pt: its call signature, cheap arithmetic."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 4, 400)

    def forward(
        self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> Tensor:
        if x.dtype != torch.uint8:
            raise ValueError("the detector takes uint8 videos")
        y = x.float()
        if rescale:
            y = y / 127.5 - 1.0
        if resize:
            y = F.interpolate(y, size=(16, 24, 24), mode="trilinear", align_corners=False)
        pooled = F.adaptive_avg_pool3d(y, (4, 1, 1)).flatten(1)  # (B, C·4)
        logits = self.proj(pooled)
        return logits if return_features else logits.softmax(-1)
