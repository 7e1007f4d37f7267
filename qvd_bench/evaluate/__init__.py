"""Evaluation of quantized video diffusion models against the full-precision one.

- ``fidelity``: SQNR, cosine, PSNR, SSIM; ``to_x0`` puts ε-, v- and flow-predictions on
  one footing.
- ``frechet``: Frechet distance (float64, symmetric form), mergeable ``FeatureStats``,
  prompt-level bootstrap intervals, the small-sample warning.
- ``fvd``: FVD under the ``stylegan-v`` and ``cd-fvd-i3d400`` protocols.
- ``fid``: per-frame FID through torchmetrics with local Inception weights.
- ``clipsim``: CLIPSIM and CLIP-Temp with a local CLIP model.
- ``weights``: local weights files: clear errors, SHA-256, safe loading.
- ``matrix``: ``evaluate(config, out_dir)``, the methods × bit-widths × metrics matrix,
  built from ``config`` (``EvalConfig``), ``calibration`` (the statistics runs),
  ``videos`` (FP and quantized videos through the generation cache), ``results`` (the
  results table and its fidelity rows), ``metrics`` (the metric registry and network
  metrics), ``latents``, ``reference`` (real-video reference sets), ``shard``
  (processes under torchrun) and ``progress`` (the progress bar's weighted units and its
  ETA before the first step).

Submodules are imported on use, so importing this package pulls in no metric library.
"""
