"""SkyReelsV2Transformer3DModel: SkyReels-V2 (Wan-architecture DiT, diffusion forcing).

The layers, roles and calls are Wan's. Its diffusion-forcing pipelines give every latent
frame its own timestep, (B, frames): the tracker keys such a call by its step (the largest
timestep) and the layer hooks leave out the rows of frames at another noise level
(``sampling.other_level_rows``): the video tokens of the blocks, the latent voxels of the
patch embedding (a Conv3d on (B, C, frames, H, W)) and the per-frame rows of the time
embedding (``condition_embedder.time_embedder`` and ``time_proj``).
"""

from __future__ import annotations

from types import MappingProxyType

from qvd_bench.models.families.wan import WanFamily


class SkyReelsV2Family(WanFamily):
    name = "skyreels-v2"
    denoiser_class = "SkyReelsV2Transformer3DModel"
    pipeline_classes = (
        "SkyReelsV2Pipeline",
        "SkyReelsV2ImageToVideoPipeline",
        "SkyReelsV2DiffusionForcingPipeline",
        "SkyReelsV2DiffusionForcingImageToVideoPipeline",
        "SkyReelsV2DiffusionForcingVideoToVideoPipeline",
    )
    # Its pipelines clean every prompt with ftfy, imported only where it is installed.
    pipeline_modules = MappingProxyType({"": ("ftfy",)})
