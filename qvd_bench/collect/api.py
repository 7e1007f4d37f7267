"""``qvd_bench.collect``: statistics of any model — a zoo name, a pipeline directory, or a
diffusers pipeline object already in memory — in one call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qvd_bench.collect.collector import DTYPES
from qvd_bench.collect.collector import collect as collect_run
from qvd_bench.config import CollectConfig
from qvd_bench.errors import UserError
from qvd_bench.models.family import LoadedModel
from qvd_bench.store import StatsRun


def collect(
    model: Any,
    prompts: Sequence[str],
    *,
    steps: int,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = False,
    **options: Any,
) -> StatsRun:
    """Samples ``prompts`` with a model and stores the statistics of its layer inputs.

    A pipeline samples with its own call (text encoder, scheduler, conditioning) and every
    denoiser of it is hooked (both experts of a two-expert Wan 2.2); a bare denoiser samples
    with the minimal sampler.

    Args:
        model: a zoo name, a local pipeline directory or hub id in the local cache, a
            diffusers pipeline object (used in place, on its own device and dtype), or a
            ``LoadedModel``.
        prompts: the prompts; sample i is prompt i.
        steps: sampling steps.
        out: the run directory to write (``stats/<name>``).
        overwrite: replace an existing run at ``out``.
        progress: show a progress bar.
        **options: any other ``CollectConfig`` field (``guidance_scale``, ``seed``,
            ``frames``, ``height``, ``width`` in latent units, ``temporal_stride``,
            ``reservoir_capacity``, ``attention`` ...).

    Returns:
        The stored run, ready for ``analyze`` and ``quantize_(model, config, stats=run)``.

    Raises:
        UserError: bad settings (one line naming the parameter), or a model that cannot be
            loaded or has no supported denoiser.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if "model" in options:
        raise UserError("give the model as the first argument, not as model=")
    loaded = None
    if isinstance(model, (str, Path)):
        name = str(model)
    else:
        loaded = _in_memory(model)
        name = loaded.name
        parameter = next(loaded.denoiser.parameters())
        dtype = next((k for k, v in DTYPES.items() if v == parameter.dtype), None)
        if dtype is None:
            raise UserError(
                f"the model's dtype {parameter.dtype} is not one of {', '.join(DTYPES)}"
            )
        for key, value in (("device", str(parameter.device)), ("dtype", dtype)):
            if options.get(key, value) != value:
                raise UserError(
                    f"{key} must be the in-memory model's own ({value}), got {options[key]!r}; "
                    "move the model instead"
                )
            options[key] = value
    try:
        config = CollectConfig(model=name, prompts=tuple(prompts), steps=steps, **options)
    except TypeError as error:
        raise UserError(f"collect: {error}") from None
    collect_run(config, Path(out), overwrite=overwrite, progress=progress, loaded=loaded)
    return StatsRun(out)


def _in_memory(model: Any) -> LoadedModel:
    """A LoadedModel for a pipeline object, a LoadedModel, or a bare denoiser module."""
    from qvd_bench.models.zoo import pipeline_model

    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.nn.Module):
        raise UserError(
            "collect takes a pipeline, a LoadedModel or a model name; wrap a bare denoiser "
            "in its diffusers pipeline"
        )
    if not hasattr(model, "components"):
        raise UserError(
            f"collect takes a model name, a diffusers pipeline or a LoadedModel, "
            f"got {type(model).__name__}"
        )
    return pipeline_model(model)
