"""Final latents to video frames through a pipeline's own VAE, as the pipeline decodes them.

A diffusers video pipeline called with its default output type un-normalises its final
latents (each family its own way: Wan's per-channel mean and std, LTX's de-normalisation
and timestep-conditioned decoder, Mochi's mean and std, the scaling factor of CogVideoX,
HunyuanVideo and the UNets), decodes them with its VAE and post-processes the video with
its ``video_processor``. ``decode_frames`` does the same to latents sampled with
``output_type="latent"`` (``pipelines.run_pipeline``): the family's ``decode_video`` is
the pipeline's own decoding up to its ``video_processor``, and the frames are that
processor's ``"pt"`` output, so they equal the frames of the pipeline's own call.

A bare denoiser, or a pipeline without a VAE (``shapes-wan`` samples pixels), has none:
``pipeline_vae`` is None and its latents stand for frames (``evaluate.latents``).
"""

from __future__ import annotations

from typing import Any

import torch

from qvd_bench.models.family import LoadedModel
from qvd_bench.models.pipelines import pixel_size


def pipeline_vae(loaded: LoadedModel) -> Any:
    """The VAE of a model's pipeline, or None (a bare denoiser or a VAE-less pipeline)."""
    return None if loaded.pipeline is None else getattr(loaded.pipeline, "vae", None)


@torch.no_grad()
def decode_frames(
    loaded: LoadedModel, latents: torch.Tensor, frames: int, height: int, width: int
) -> torch.Tensor:
    """Final latents decoded to frames by the model's pipeline, as its own call decodes them.

    Args:
        loaded: a model whose pipeline has a VAE (``pipeline_vae``).
        latents: (B, ...) final latents in the family's layout (``run_pipeline``'s output).
        frames, height, width: the latent size they were sampled at.

    Returns:
        (B, T, C, H, W) float32 frames in [0, 1] on the CPU, T, H and W in pixels.
    """
    pipeline = loaded.pipeline
    vae = pipeline_vae(loaded)
    if vae is None:
        raise ValueError(f"the pipeline of {loaded.name} has no VAE to decode with")
    from diffusers.utils.torch_utils import get_module_execution_device

    # Where the VAE runs (its hook's device under CPU offload); the dtype stays: each
    # family casts where its pipeline does.
    latents = latents.to(get_module_execution_device(vae))
    video = loaded.family.decode_video(
        pipeline, latents, *pixel_size(pipeline, frames, height, width)
    )
    return pipeline.video_processor.postprocess_video(video, output_type="pt").float().cpu()
