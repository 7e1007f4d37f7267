"""CLIPSIM and CLIP-Temp (EvalCrafter's definitions) with a local CLIP model.

- CLIPSIM of a video: the mean over its frames of cos(E_image(frame), E_text(prompt)).
- CLIP-Temp of a video: the mean over consecutive frame pairs of
  cos(E_image(frame_t), E_image(frame_t+1)).

Both are reported raw (cosines, e.g. 0.2930) and ×100 (29.30): papers use both scales.
Unlike torchmetrics' CLIPScore (100·cos, clamped at 0 after the mean), nothing is
clamped. The default model is CLIP ViT-B/32 (``openai/clip-vit-base-patch32``), read from
a local directory with transformers; frames go through the model's own ``CLIPProcessor``
(resize, centre crop, normalisation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from qvd_bench.errors import UserError
from qvd_bench.evaluate.weights import sha256_of

CLIP_MODEL = "openai/clip-vit-base-patch32"
CLIP_PUBLISHED = "https://huggingface.co/openai/clip-vit-base-patch32"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _require_model_dir(path: str | os.PathLike | None) -> Path:
    how = f"download {CLIP_MODEL} from {CLIP_PUBLISHED} into a directory"
    if path is None:
        raise UserError(f"CLIP: no model directory given; {how}")
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise UserError(f"no CLIP model (config.json) found at {directory}; {how}")
    return directory


def load_clip(path: str | os.PathLike | None, device: str | torch.device = "cpu"):
    """Loads a CLIP model and its processor from a local directory (never downloads).

    Args:
        path: a directory written by ``save_pretrained`` (config.json, weights, tokenizer
            and preprocessor files), e.g. a local copy of ``openai/clip-vit-base-patch32``.
        device: where the model runs.

    Returns:
        (``CLIPModel`` in eval mode, ``CLIPProcessor``).

    Raises:
        UserError: the directory or one of its files is missing or unreadable.
    """
    from transformers import CLIPModel, CLIPProcessor

    directory = _require_model_dir(path)
    try:
        model = CLIPModel.from_pretrained(directory, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load a CLIP model from {directory} ({str(e).strip().splitlines()[0]}); "
            f"it needs the files of {CLIP_MODEL} ({CLIP_PUBLISHED})"
        ) from None
    return model.eval().to(device), processor


def clip_protocol_id(path: str | os.PathLike) -> str:
    """``clipsim/<directory name>/sha256:<digest of the weights file>``."""
    directory = _require_model_dir(path)
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return f"clipsim/{directory.name}/sha256:{sha256_of(directory / name)}"
    raise UserError(f"no CLIP weights ({' or '.join(_WEIGHT_FILES)}) in {directory}")


def _embedding(output) -> Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, Tensor) else output.pooler_output


@dataclass(frozen=True)
class ClipScores:
    """Per-video CLIPSIM and CLIP-Temp (raw cosines), with their means.

    Attributes:
        clipsim_per_video: (B,) float64.
        clip_temp_per_video: (B,) float64 (NaN for one-frame videos).
    """

    clipsim_per_video: Tensor
    clip_temp_per_video: Tensor

    @property
    def clipsim(self) -> float:
        return float(self.clipsim_per_video.mean())

    @property
    def clip_temp(self) -> float:
        return float(self.clip_temp_per_video.mean())

    def as_dict(self) -> dict[str, float]:
        """Raw and ×100 values: clipsim, clipsim_x100, clip_temp, clip_temp_x100."""
        return {
            "clipsim": self.clipsim,
            "clipsim_x100": 100.0 * self.clipsim,
            "clip_temp": self.clip_temp,
            "clip_temp_x100": 100.0 * self.clip_temp,
        }


@torch.no_grad()
def image_embeddings(model, processor, frames: Tensor, batch_size: int = 32) -> Tensor:
    """Unit-norm CLIP image embeddings (N, D) float64 of uint8 frames (N, H, W, C)."""
    device = next(model.parameters()).device
    parts = []
    for i in range(0, frames.shape[0], batch_size):
        # Channel-first uint8 tensors, one per image, as torchmetrics' CLIPScore passes them.
        images = list(frames[i : i + batch_size].permute(0, 3, 1, 2).cpu())
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        parts.append(_embedding(model.get_image_features(pixel_values=pixels.to(device))))
    return F.normalize(torch.cat(parts).to(torch.float64), dim=-1).cpu()


@torch.no_grad()
def text_embeddings(model, processor, prompts: list[str]) -> Tensor:
    """Unit-norm CLIP text embeddings (P, D) float64."""
    device = next(model.parameters()).device
    max_length = model.config.text_config.max_position_embeddings
    tokens = processor(
        text=list(prompts),
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_length,
    )
    output = model.get_text_features(
        input_ids=tokens["input_ids"].to(device),
        attention_mask=tokens["attention_mask"].to(device),
    )
    return F.normalize(_embedding(output).to(torch.float64), dim=-1).cpu()


def clip_scores(
    model, processor, videos: Tensor, prompts: list[str], batch_size: int = 32
) -> ClipScores:
    """CLIPSIM and CLIP-Temp of each video.

    Args:
        model, processor: from ``load_clip``.
        videos: uint8 (B, T, H, W, C) RGB.
        prompts: B prompts, one per video.
        batch_size: frames per image-encoder call.

    Returns:
        ``ClipScores``.
    """
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise UserError(
            f"CLIPSIM takes uint8 RGB videos (B, T, H, W, 3), got {videos.dtype} "
            f"{tuple(videos.shape)}"
        )
    b, t = videos.shape[:2]
    if len(prompts) != b:
        raise UserError(f"CLIPSIM needs one prompt per video: {b} videos, {len(prompts)} prompts")
    images = image_embeddings(
        model, processor, videos.reshape(b * t, *videos.shape[2:]), batch_size
    )
    images = images.reshape(b, t, -1)
    texts = text_embeddings(model, processor, prompts)
    clipsim = (images * texts[:, None, :]).sum(-1).mean(1)
    if t > 1:
        clip_temp = (images[:, 1:] * images[:, :-1]).sum(-1).mean(1)
    else:
        clip_temp = torch.full((b,), float("nan"), dtype=torch.float64)
    return ClipScores(clipsim, clip_temp)
