"""``qvd_bench.fidelity``: the fidelity of a model quantized in memory against itself in
full precision, for pipelines that cannot be reloaded from disk."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from qvd_bench.errors import UserError
from qvd_bench.evaluate.generate import (
    GenerationSettings,
    check_pipeline_kwargs,
    generate,
    generate_free_and_forced,
    sampler_name,
    scheduler_for,
)
from qvd_bench.evaluate.latents import video_frames
from qvd_bench.evaluate.metrics import FIDELITY_METRICS
from qvd_bench.evaluate.results import free_running_rows, results_frame, teacher_forced_rows
from qvd_bench.models.family import LoadedModel
from qvd_bench.quant.apply import apply_record, unquantize_
from qvd_bench.quant.modules import quant_wrappers
from qvd_bench.quant.record import QuantRecord


def fidelity(
    model: Any,
    record: QuantRecord,
    prompts: Sequence[str],
    *,
    steps: int = 10,
    guidance_scale: float = 7.5,
    seed: int = 0,
    frames: int = 8,
    height: int = 16,
    width: int = 16,
    pipeline_kwargs: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Fidelity of a quantized model against its full-precision self, as ``evaluate``
    measures it: teacher-forced SQNR and cosine of the x0-space predictions per step and
    branch, the free-running final latents' SQNR and cosine, and the PSNR and SSIM of the
    videos' frames: decoded by the pipeline's own VAE where it has one, else the latents
    mapped to [0, 1] (``evaluate.latents``).

    The FP reference is the same model with the record taken back (``unquantize_``),
    sampled, and the record applied again (``apply_record``): the model is left quantized
    as it was given. A pipeline samples with its own call, and the quantized denoisers are
    fed every recorded denoiser call of the FP run (teacher forcing); a bare denoiser
    samples with the minimal sampler.

    Args:
        model: the model ``record`` quantized: a diffusers pipeline object or a LoadedModel.
        record: what ``quantize_`` returned for it.
        prompts: the prompts; video i is prompt i with sample id i.
        steps, guidance_scale, seed: sampling settings.
        frames, height, width: latent video size.
        pipeline_kwargs: further keyword arguments of the pipeline call, as
            ``qvd_bench.collect`` takes them (e.g. ``{"stg_scale": 0}`` for LTX-2): the FP
            and quantized videos are sampled with them, and a step's branches combine as
            the pipeline then combines them. Values JSON-serialisable; a bare denoiser
            takes none.

    Returns:
        The rows of ``results.parquet`` (``evaluate.results``) for this one configuration;
        its ``sampler`` attribute (``frame.attrs``) says which sampler ran, its
        ``frames`` attribute what PSNR and SSIM compare ("pipeline VAE" or "latents
        mapped to [0, 1]").

    Raises:
        UserError: no prompts, bad settings, or a model not quantized (with this record).
    """
    from qvd_bench.models.zoo import pipeline_model

    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise UserError("no prompts: fidelity needs at least one")
    if isinstance(model, LoadedModel):
        loaded = model
    elif hasattr(model, "components"):
        loaded = pipeline_model(model)
    else:
        raise UserError(
            f"fidelity takes a diffusers pipeline or a LoadedModel, got {type(model).__name__}"
        )
    if next(quant_wrappers(loaded.layer_root), None) is None and record.quantized:
        raise UserError("the model is not quantized: quantize_ it and pass its record")
    settings = GenerationSettings(
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        frames=frames,
        height=height,
        width=width,
        pipeline_kwargs=pipeline_kwargs,
    )
    check_pipeline_kwargs(loaded, settings)  # before the model is touched
    unquantize_(loaded, record)
    try:
        reference = [
            generate(loaded, prompt, i, settings, keep_calls=True)
            for i, prompt in enumerate(prompts)
        ]
    finally:
        apply_record(loaded, record)
    pairs = [
        generate_free_and_forced(
            loaded, prompt, i, settings, teacher=reference[i], tracker=record.tracker
        )
        for i, prompt in enumerate(prompts)
    ]
    free = [pair[0] for pair in pairs]
    forced = [pair[1] for pair in pairs]
    rows = teacher_forced_rows(reference, forced, scheduler_for(loaded, settings))
    frames = video_frames(loaded, settings, reference)
    rows += free_running_rows(reference, free, loaded.family.layout, frames)
    ident = {
        "model": loaded.name,
        "weight_seed": loaded.weight_seed,
        "method": record.config.method,
        "bits": record.config.bits,
        "reference": "fp",
    }
    frame = results_frame([{**ident, **row} for row in rows], FIDELITY_METRICS)
    frame.attrs["sampler"] = sampler_name(loaded)
    frame.attrs["frames"] = frames.decoded_by
    return frame
