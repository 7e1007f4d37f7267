"""The results table (``results.parquet``) and the fidelity rows that fill it.

``results.parquet`` has one row per (model, weight_seed, method, bits, metric, mode,
branch, step, protocol, reference): ``value`` and ``n`` (the number of videos). Fidelity
rows:

- mode "teacher-forced": SQNR (dB) and cosine of the x0-space predictions, per step
  (``step`` 0..S-1) and over all steps (``step`` -1; SQNR from the total energies, cosine
  the mean over steps and videos), for branch "cfg" (the combined output the sampler
  uses), "uncond" and "cond"; protocol ``fidelity/x0``;
- mode "free-running", step -1: SQNR and cosine of the final latents (protocol
  ``fidelity/latents``), PSNR and SSIM of the videos' frames (data range 1,
  ``latents.VideoFrames``): decoded by the pipeline's own VAE where the model's pipeline
  has one (protocol ``fidelity/frames-pipeline-vae``), else the final latents mapped to
  [0, 1] by the FP reference's min and max over all its videos (protocol
  ``fidelity/latents-minmax``: a bare denoiser, or a pipeline without a VAE).

Identical tensors give SQNR = PSNR = +inf (the fp method): kept as inf, not capped.
Frechet metrics (mode "distribution") carry the protocol id with the detector's SHA-256
(``metrics``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from qvd_bench.evaluate import fidelity
from qvd_bench.evaluate.generate import Generation
from qvd_bench.evaluate.latents import VideoFrames, concat, latent_video_frames

RESULTS_FILE = "results.parquet"
TIMINGS_FILE = "timings.parquet"
SETTINGS_FILE = "settings.json"
BRANCHES = ("cfg", "uncond", "cond")
# The ``step`` of rows measured over all steps (and of rows that have no step).
ALL_STEPS = -1
RESULT_COLUMNS = (
    "model",
    "weight_seed",
    "method",
    "bits",
    "metric",
    "mode",
    "branch",
    "step",
    "protocol",
    "reference",
    "value",
    "n",
)


def teacher_forced_rows(
    reference: Sequence[Generation], forced: Sequence[Generation], scheduler
) -> list[dict[str, Any]]:
    """SQNR and cosine of x0-space predictions per step and over all steps, per branch.

    Args:
        reference: the FP free-running generations, one per prompt.
        forced: the quantized model's teacher-forced generations on them, same order.
        scheduler: the scheduler of the generations (``generate.scheduler_for``).

    Returns:
        Row dicts (metric, mode, branch, step, protocol, value, n).
    """
    rows = []
    n = len(reference)
    branches = [b for b in BRANCHES if b != "uncond" or reference[0].uncond is not None]
    for branch in branches:
        # (S, P, ...): steps first, the prompts of one step side by side.
        ref = torch.cat([g.x0(scheduler, branch) for g in reference], dim=1)
        test = torch.cat(
            [g.x0(scheduler, branch, r.model_inputs) for g, r in zip(forced, reference)], dim=1
        )
        for step in range(ref.shape[0]):
            for metric, value in _sqnr_cosine(ref[step], test[step]).items():
                rows.append(
                    result_row(metric, "teacher-forced", branch, step, "fidelity/x0", value, n)
                )
        flat_ref, flat_test = ref.flatten(0, 1), test.flatten(0, 1)
        for metric, value in _sqnr_cosine(flat_ref, flat_test).items():
            rows.append(
                result_row(metric, "teacher-forced", branch, ALL_STEPS, "fidelity/x0", value, n)
            )
    return rows


def _sqnr_cosine(reference: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    return {
        "sqnr": float(fidelity.sqnr(reference, test)),
        "cosine": float(fidelity.cosine_similarity(reference, test)),
    }


def free_running_rows(
    reference: Sequence[Generation],
    free: Sequence[Generation],
    layout: str,
    frames: VideoFrames | None = None,
) -> list[dict[str, Any]]:
    """SQNR and cosine of the final latents; PSNR and SSIM of the videos' frames.

    Args:
        reference: the FP free-running generations, one per prompt.
        free: the quantized model's free-running generations, same order.
        layout: the family's latent layout.
        frames: how latents become frames (``latents.video_frames``); None: the latents
            mapped to [0, 1] by the reference's range.

    Returns:
        Row dicts (metric, mode, branch, step, protocol, value, n).
    """
    n = len(reference)
    ref, test = concat(reference, "latents"), concat(free, "latents")
    rows = [
        result_row(m, "free-running", "cfg", ALL_STEPS, "fidelity/latents", v, n)
        for m, v in _sqnr_cosine(ref, test).items()
    ]
    frames = frames if frames is not None else latent_video_frames(reference, layout)
    if frames.decoded:
        psnr, ssim = _decoded_psnr_ssim(reference, free, frames)
    else:
        ref_frames, test_frames = frames.frames(ref), frames.frames(test)
        psnr = float(fidelity.psnr(ref_frames, test_frames, data_range=1.0))
        ssim = None
        if min(ref_frames.shape[-2:]) >= SSIM_WINDOW:
            ssim = float(fidelity.ssim(ref_frames, test_frames, data_range=1.0))
    rows.append(result_row("psnr", "free-running", "cfg", ALL_STEPS, frames.protocol, psnr, n))
    if ssim is not None:
        rows.append(result_row("ssim", "free-running", "cfg", ALL_STEPS, frames.protocol, ssim, n))
    return rows


# SSIM's Gaussian window: frames smaller than it have no SSIM.
SSIM_WINDOW = 11


def _decoded_psnr_ssim(
    reference: Sequence[Generation], free: Sequence[Generation], frames: VideoFrames
) -> tuple[float, float | None]:
    """PSNR and SSIM over all videos, decoding one pair of videos at a time.

    The same aggregates as over all frames at once: PSNR from the mean squared error over
    every value (the videos have one size), SSIM the mean over every frame.
    """
    errors, ssims = [], []
    for ref, test in zip(reference, free):
        ref_frames, test_frames = frames.frames(ref.latents), frames.frames(test.latents)
        difference = ref_frames.to(torch.float64) - test_frames.to(torch.float64)
        errors.append(difference.square().mean())
        if min(ref_frames.shape[-2:]) >= SSIM_WINDOW:
            ssims.append(fidelity.ssim(ref_frames, test_frames, per_sample=True).flatten())
    psnr = float(10.0 * torch.log10(1.0 / torch.stack(errors).mean()))
    return psnr, (float(torch.cat(ssims).mean()) if ssims else None)


def result_row(metric, mode, branch, step, protocol, value, n) -> dict[str, Any]:
    """The measured columns of one row of ``results.parquet`` (the caller adds who was
    measured: model, weight_seed, method, bits, reference)."""
    return {
        "metric": metric,
        "mode": mode,
        "branch": branch,
        "step": int(step),
        "protocol": protocol,
        "value": float(value),
        "n": int(n),
    }


def results_frame(rows: list[dict[str, Any]], metrics: Sequence[str]) -> pd.DataFrame:
    """The rows of the requested metrics, in RESULT_COLUMNS order."""
    frame = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    wanted = set(metrics) | ({"clip_temp"} if "clipsim" in metrics else set())
    if "groundtruth" in metrics:
        from qvd_bench.evaluate.groundtruth import RESULT_METRICS

        wanted |= set(RESULT_METRICS)
    frame = frame[frame["metric"].isin(wanted)].reset_index(drop=True)
    return frame.astype({"step": np.int64, "n": np.int64, "value": np.float64})


def stats_paths(results_dir: Path, settings: dict[str, Any]) -> dict[int, Path]:
    """The statistics run of each weight seed, from ``settings.json`` of a results dir."""
    root = Path(results_dir).parent.parent  # <out>/results/<model>
    return {int(k): root / v for k, v in settings["stats"].items()}
