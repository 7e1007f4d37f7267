"""Evaluation of quantized video diffusion models against the full-precision one.

- ``fidelity``: SQNR, cosine, PSNR, SSIM; ``to_x0`` puts ε-, v- and flow-predictions on
  one footing.
- ``frechet``: Frechet distance (float64, symmetric form), mergeable ``FeatureStats``,
  prompt-level bootstrap intervals, the small-sample warning.
- ``fvd``: FVD under the ``stylegan-v`` and ``cd-fvd-i3d400`` protocols.
- ``fid``: per-frame FID through torchmetrics with local Inception weights.
- ``clipsim``: CLIPSIM and CLIP-Temp with a local CLIP model.
- ``weights``: local weights files: clear errors, SHA-256, safe loading.

Submodules are imported on use, so importing this package pulls in no metric library.
"""
