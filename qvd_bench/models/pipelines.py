"""Real diffusers pipelines around the tiny presets, and running a pipeline sample by sample.

``build_tiny_pipeline`` wraps a preset's denoiser (from ``zoo.load_model``) in the diffusers
pipeline its family ships with (``tiny_pipelines``). Nothing is downloaded, and the result
saves with ``save_pretrained`` and reloads offline with
``DiffusionPipeline.from_pretrained(directory, local_files_only=True)``.
``tiny_family_pipeline`` does the same for the families without a preset, around the
family's tiny config.

``run_pipeline`` drives any diffusers video pipeline (tiny or real) one sample at a time
inside ``CallTracker.batch([sample_id])``, so that layer hooks see which sample, timestep
and CFG branch each denoiser call computes. There is no table of pipeline classes: the
call's arguments come from the pipeline's ``__call__`` signature (``call_arguments``) and
the family's ``pipeline_call_defaults``.

Sizes: ``frames``, ``height`` and ``width`` are always **latent** sizes (what the denoiser
sees, as in the minimal sampler); they are converted to the pixel sizes a pipeline takes
with its VAE's spatial and temporal compression factors.

Image-to-video pipelines (those whose call takes an ``image``: StableVideoDiffusionPipeline,
I2VGenXLPipeline, LTXImageToVideoPipeline, ...) need a conditioning image. There is no dataset behind the benchmark prompts, so each sample gets a
synthetic one: a smooth random RGB image (a 4x4 grid of random colours, bilinearly
upsampled to the pixel size), seeded from (seed, sample id).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import nn

from qvd_bench.errors import UserError
from qvd_bench.models.families import family_by_name
from qvd_bench.models.family import Guidance, LoadedModel
from qvd_bench.models.sampling import CallTracker
from qvd_bench.models.tiny_pipelines import (
    PRESET_PIPELINES,
    attach_tiny_pipeline,
    pipeline_around,
)
from qvd_bench.models.zoo import pipeline_denoisers, reinit_zero_layers
from qvd_bench.registry import did_you_mean

# --------------------------------------------------------------------------- public API


def tiny_pipeline_model(preset: str, weight_seed: int = 0, **load_kwargs: Any) -> LoadedModel:
    """Loads a tiny preset and wraps its denoiser in its family's diffusers pipeline.

    Args:
        preset: a tiny preset name ("tiny-latte", ...), see ``PRESET_PIPELINES``.
        weight_seed: seed of the random weights of the denoiser and of the other components.
        **load_kwargs: passed to ``zoo.load_model`` (outlier knobs, ...).

    Returns:
        The ``LoadedModel`` of ``zoo.load_model`` with ``pipeline`` set; the pipeline's
        denoiser is ``loaded.denoiser`` itself.
    """
    from qvd_bench.models import zoo

    if preset not in PRESET_PIPELINES:
        raise UserError(
            f"no tiny pipeline for {preset!r}; presets with one: {', '.join(PRESET_PIPELINES)}"
        )
    loaded = zoo.load_model(preset, weight_seed=weight_seed, **load_kwargs)
    if loaded.pipeline is None:  # a multi-expert preset comes with its pipeline
        attach_tiny_pipeline(loaded, {}, weight_seed)
    return loaded


def build_tiny_pipeline(preset: str, weight_seed: int = 0, **load_kwargs: Any):
    """Builds the diffusers pipeline of a tiny preset, offline and deterministically.

    Args:
        preset: a tiny preset name, see ``PRESET_PIPELINES``.
        weight_seed: seed of all random weights.
        **load_kwargs: passed to ``zoo.load_model``.

    Returns:
        A ``diffusers.DiffusionPipeline`` (e.g. ``LattePipeline``).
    """
    return tiny_pipeline_model(preset, weight_seed, **load_kwargs).pipeline


def save_tiny_pipeline(preset: str, directory: str | Path, weight_seed: int = 0) -> Path:
    """Saves a tiny pipeline so that ``DiffusionPipeline.from_pretrained`` reloads it offline.

    Args:
        preset: a tiny preset name.
        directory: where to write (model_index.json, one folder per component).
        weight_seed: seed of all random weights.

    Returns:
        The directory.
    """
    directory = Path(directory)
    build_tiny_pipeline(preset, weight_seed).save_pretrained(directory)
    return directory


def tiny_family_pipeline(family: str, pipeline_class: str | None = None, weight_seed: int = 0):
    """A family's tiny denoiser (its ``tiny_config``, zero-initialised layers given a small
    init as in the presets) in one of its diffusers pipelines, next to tiny components;
    for the families without a preset (LTX-2, HunyuanVideo-1.5, Allegro, SkyReels-V2).
    Nothing is downloaded.

    Args:
        family: short family name ("allegro", "skyreels-v2", ...).
        pipeline_class: one of the family's pipeline classes with a tiny builder
            ("SkyReelsV2DiffusionForcingPipeline"); None: the first of them.
        weight_seed: seed of all random weights.

    Returns:
        The diffusers pipeline (saves with ``save_pretrained``).

    Raises:
        UserError: an unknown family, or no tiny builder for it or for ``pipeline_class``.
    """
    spec = family_by_name(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weight_seed)
        denoiser = spec.build(spec.tiny_config()).eval()
        reinit_zero_layers(denoiser)
    loaded = LoadedModel(family, spec, denoiser, random_weights=True, weight_seed=weight_seed)
    return pipeline_around(loaded, weight_seed, pipeline_class).pipeline


def sample_seed(seed: int, sample_id: int) -> int:
    """A 63-bit generator seed for one sample that depends only on (seed, sample id)."""
    state = np.random.SeedSequence([int(seed), int(sample_id)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def resolve_sampler(loaded: LoadedModel, sampler: str) -> str:
    """The sampler a run uses: "pipeline" or "denoiser".

    Args:
        loaded: the model.
        sampler: "auto" (the pipeline when the model has one), "pipeline" or "denoiser".

    Raises:
        UserError: sampler "pipeline" for a model without one.
    """
    if sampler == "pipeline" and loaded.pipeline is None:
        raise UserError(f"{loaded.name} has no pipeline; use sampler='denoiser'")
    return "pipeline" if loaded.pipeline is not None and sampler != "denoiser" else "denoiser"


def sampling_record(
    loaded: LoadedModel,
    sampler: str,
    seed: int,
    sample_ids: Sequence[int],
    scheduler: str = "ddim",
) -> dict[str, Any]:
    """What reproducing each sample outside qvd-bench needs: the sampler, its scheduler
    and every sample's generator seeds.

    Args:
        loaded: the model.
        sampler: "auto", "pipeline" or "denoiser" (resolved with ``resolve_sampler``).
        seed: the sampling seed.
        sample_ids: the samples, e.g. ``range(len(prompts))``.
        scheduler: the minimal sampler's scheduler name (``sampling.make_scheduler``;
            flow-prediction models always get "flow-euler"); a pipeline uses its own.

    Returns:
        JSON data: ``sampler``, ``scheduler`` (class and config) and per sample its seeds:
        the pipeline's ``torch.Generator("cpu")`` seed (also the global RNG's during the
        call; an image-to-video sample's image is ``synthetic_image(seed, sample_id)``), or
        the minimal sampler's noise and conditioning generator seeds (its text states come
        from ``text_states_for_prompts``, seeded by the prompt's CRC-32).
    """
    from qvd_bench import store
    from qvd_bench.models import sampling

    resolved = resolve_sampler(loaded, sampler)
    if resolved == "pipeline":
        made = loaded.pipeline.scheduler
        samples = [{"sample": i, "generator_seed": sample_seed(seed, i)} for i in sample_ids]
    else:
        made = sampling.make_scheduler(scheduler, loaded.family.prediction_type)
        samples = [
            {
                "sample": i,
                "noise_seed": sampling.sample_seed(seed, i, 0),
                "conditioning_seed": sampling.sample_seed(seed, i, 1),
            }
            for i in sample_ids
        ]
    return {
        "sampler": resolved,
        "scheduler": {"class": type(made).__name__, "config": store.json_safe(dict(made.config))},
        "seed": seed,
        "samples": samples,
    }


def synthetic_image(seed: int, sample_id: int, height: int, width: int) -> PIL.Image.Image:
    """The conditioning image of one sample for image-to-video pipelines.

    A 4x4 grid of random colours bilinearly upsampled to (height, width) pixels: smooth,
    like a natural image, and the same for a given (seed, sample id).
    """
    rng = np.random.default_rng([int(seed), int(sample_id), 1])
    grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return PIL.Image.fromarray(grid, mode="RGB").resize((width, height), PIL.Image.BILINEAR)


def run_pipeline(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    steps: int,
    guidance_scale: float,
    seed: int,
    sample_ids: Sequence[int],
    frames: int,
    height: int,
    width: int,
    tracker: CallTracker | None = None,
    progress: Callable[[], Any] | None = None,
    negative_prompt: str | None = None,
    pipeline_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Generates one video per prompt with ``loaded.pipeline``, one sample at a time.

    Any diffusers video pipeline: its call's keyword arguments come from its
    ``__call__`` signature (``call_arguments``), plus the family's
    ``pipeline_call_defaults``. Each sample runs as its own pipeline call (batch of one
    prompt) with a generator seeded from (seed, sample id), so a sample does not depend on
    the others or on how prompts are sharded. The tracker keys each denoiser call by the
    pipeline's ``cache_context`` or by recognising it (``sampling.CallTracker``).

    Args:
        loaded: a model with a diffusers ``pipeline``.
        prompts: one prompt per sample (ignored by pipelines without a text input).
        steps: number of denoising steps.
        guidance_scale: CFG scale (the embedded guidance of guidance-distilled pipelines,
            the guider's scale of a pipeline driven by a diffusers guider);
            <= 1 disables CFG (one "cond" call per step). A pipeline with a guidance
            range (StableVideoDiffusionPipeline) gets it as both its min and max; a
            two-expert pipeline also as ``guidance_scale_2``.
        seed: run seed.
        sample_ids: global id of each sample, same length as ``prompts``.
        frames: latent frames.
        height: latent height.
        width: latent width.
        tracker: if given, attached to the denoisers for the run, and told each sample's id.
        progress: called with no argument once per denoising step (e.g. ``tqdm.update``).
        negative_prompt: the unconditional branch's prompt, for pipelines that take one
            (None: the pipeline's default, usually the empty prompt).
        pipeline_kwargs: further keyword arguments of the pipeline call (they win over
            the derived ones), e.g. ``{"true_cfg_scale": 4.0}`` for HunyuanVideo.

    Returns:
        The final latents of every sample, in ``sample_ids`` order, in the family's layout:
        (N, C, F, H, W) or (N, F, C, H, W), float32.

    Raises:
        UserError: no pipeline, or a pipeline whose call needs an argument qvd-bench
            cannot supply; a denoiser call that cannot be keyed (from the tracker).
    """
    pipeline = loaded.pipeline
    if pipeline is None:
        raise UserError(
            f"model {loaded.name!r} has no diffusers pipeline; load a pipeline directory "
            "or use tiny_pipeline_model() for a tiny preset"
        )
    if not callable(pipeline):
        raise UserError(f"{type(pipeline).__name__} is not a diffusers pipeline: not callable")
    for expert in loaded.experts.values():
        loaded.family.check_latent_size(expert, frames, height, width)
    if len(prompts) != len(sample_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(sample_ids)} sample ids")
    parameters = inspect.signature(pipeline.__call__).parameters
    spatial, temporal = _compression(pipeline)
    pixel_height, pixel_width = height * spatial, width * spatial
    pixel_frames = (frames - 1) * temporal + 1
    # Checked before any sample runs: nothing is computed for a call that cannot be made.
    call_arguments(loaded, "", guidance_scale, pixel_frames, pixel_height, pixel_width)
    _check_call_takes(pipeline, pipeline_kwargs or {})

    denoiser = _pipeline_denoiser(pipeline)
    denoisers = list(pipeline_denoisers(pipeline).values())
    if tracker is not None:
        _check_tracked(pipeline, tracker)
    pipeline.set_progress_bar_config(disable=True)

    outputs = []
    with contextlib.ExitStack() as stack:
        if tracker is not None:
            stack.enter_context(_attached(tracker))
        stack.enter_context(_guider_scale(pipeline, guidance_scale, parameters))
        step_kwargs, hook_progress = _progress_kwargs(parameters, progress)
        if hook_progress is not None:
            stack.enter_context(_call_counter(denoisers, hook_progress))
        tracked_timesteps: list[float] = []
        if tracker is not None:
            stack.enter_context(
                _call_counter(denoisers, lambda: _record_timestep(tracker, tracked_timesteps))
            )
        for prompt, sample_id in zip(prompts, sample_ids):
            kwargs = call_arguments(
                loaded,
                prompt,
                guidance_scale,
                pixel_frames,
                pixel_height,
                pixel_width,
                negative_prompt=negative_prompt,
                image=functools.partial(
                    synthetic_image, seed, sample_id, pixel_height, pixel_width
                ),
            )
            kwargs.update(step_kwargs)
            kwargs.update(pipeline_kwargs or {})
            generator = torch.Generator(device="cpu").manual_seed(sample_seed(seed, sample_id))
            with contextlib.ExitStack() as scope:
                if tracker is not None:
                    scope.enter_context(tracker.batch([sample_id]))
                    scope.enter_context(
                        tracker.branch_states(
                            functools.partial(branch_text_states, pipeline, kwargs)
                        )
                    )
                scope.enter_context(_global_rng(sample_seed(seed, sample_id), denoiser))
                output = pipeline(num_inference_steps=steps, generator=generator, **kwargs)
            if tracker is not None:
                _check_every_step_tracked(pipeline, tracked_timesteps)
                tracked_timesteps.clear()
            # Every diffusers video pipeline's output has ``frames`` (here the latents).
            latents = torch.as_tensor(output.frames).float().cpu()
            outputs.append(loaded.family.pipeline_latents(denoiser, latents, frames, height, width))
    return torch.cat(outputs, dim=0)


def step_guidance(
    loaded: LoadedModel,
    guidance_scale: float,
    *,
    negative_prompt: str | None = None,
    pipeline_kwargs: Mapping[str, Any] | None = None,
) -> Guidance:
    """How ``loaded.pipeline`` combines the branches of a step in a ``run_pipeline`` run
    with these settings: which branches it runs and with what weights (``Family.guidance``
    on the call's arguments, its signature's defaults overlaid with those the run gives).
    """
    pipeline = loaded.pipeline
    parameters = inspect.signature(pipeline.__call__).parameters
    call = {
        name: parameter.default
        for name, parameter in parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    call.update(
        call_arguments(loaded, "", guidance_scale, 1, 1, 1, negative_prompt=negative_prompt)
    )
    _check_call_takes(pipeline, pipeline_kwargs or {})
    call.update(pipeline_kwargs or {})
    return loaded.family.guidance(pipeline, guidance_scale, call)


def _check_call_takes(pipeline: Any, pipeline_kwargs: Mapping[str, Any]) -> None:
    """Every name of ``pipeline_kwargs`` is an argument of the pipeline's call (one that
    takes ``**kwargs`` takes any).

    Raises:
        UserError: a name the call does not take, with the nearest it does.
    """
    parameters = inspect.signature(pipeline.__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    for name in pipeline_kwargs:
        if name not in parameters:
            raise UserError(
                f"pipeline {type(pipeline).__name__}'s call takes no argument {name!r} "
                f"(pipeline_kwargs){did_you_mean(name, list(parameters))}"
            )


# Arguments a pipeline call may require that ``call_arguments`` supplies.
_FRAME_ARGUMENTS = ("num_frames", "video_length")


def call_arguments(
    loaded: LoadedModel,
    prompt: str,
    guidance_scale: float,
    pixel_frames: int,
    pixel_height: int,
    pixel_width: int,
    *,
    negative_prompt: str | None = None,
    image: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of one pipeline call, from its ``__call__`` signature.

    Each argument goes only where the signature has it: ``prompt``, ``negative_prompt``
    (when given), the frame count as ``num_frames`` or ``video_length``, ``height``,
    ``width``, ``guidance_scale`` (or ``min_guidance_scale`` and ``max_guidance_scale``),
    ``guidance_scale_2`` for two experts, ``output_type="latent"``,
    ``max_sequence_length``, a conditioning ``image`` (image-to-video), then the family's
    ``pipeline_call_defaults``. The generator and step count are added by the caller.

    Raises:
        UserError: a required argument none of these supplies (one line naming it), a
            module the family's pipelines need that is not installed
            (``Family.pipeline_modules``), or a pipeline with no frame count.
    """
    pipeline = loaded.pipeline
    class_name = type(pipeline).__name__
    parameters = inspect.signature(pipeline.__call__).parameters
    frames_arg = next((name for name in _FRAME_ARGUMENTS if name in parameters), None)
    values: dict[str, Any] = {
        "prompt": prompt,
        frames_arg or _FRAME_ARGUMENTS[0]: pixel_frames,
        "height": pixel_height,
        "width": pixel_width,
        "output_type": "latent",
    }
    if negative_prompt is not None:
        values["negative_prompt"] = negative_prompt
    if "guidance_scale" in parameters:
        values["guidance_scale"] = guidance_scale
    elif "min_guidance_scale" in parameters and "max_guidance_scale" in parameters:
        values["min_guidance_scale"] = values["max_guidance_scale"] = guidance_scale
    if getattr(pipeline.config, "boundary_ratio", None):
        # The low-noise expert's scale (Wan 2.2): the same guidance for both.
        values["guidance_scale_2"] = guidance_scale
    if "max_sequence_length" in parameters:
        values["max_sequence_length"] = _text_length(pipeline)
    if "image" in parameters and image is not None:
        values["image"] = image()
    values.update(loaded.family.pipeline_call_defaults)
    supplied = set(values) | {"num_inference_steps", "generator", "image"}
    for name, parameter in parameters.items():
        required = parameter.default is inspect.Parameter.empty and parameter.kind not in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        )
        if required and name != "self" and name not in supplied:
            raise UserError(
                f"pipeline {class_name}'s call needs argument {name!r}, which qvd-bench "
                "cannot supply"
            )
    _check_pipeline_modules(loaded)
    if frames_arg is None:
        raise UserError(
            f"pipeline {class_name}'s call takes no frame count ({' or '.join(_FRAME_ARGUMENTS)}): "
            "not a video pipeline"
        )
    return {name: value for name, value in values.items() if name in parameters}


# encode_prompt arguments ``branch_text_states`` sets itself rather than as the call does.
_OWN_ENCODE_ARGUMENTS = (
    "self",
    "prompt",
    "negative_prompt",
    "prompt_embeds",
    "negative_prompt_embeds",
    "prompt_attention_mask",
    "negative_prompt_attention_mask",
    "pooled_prompt_embeds",
    "do_classifier_free_guidance",
    "num_videos_per_prompt",
    "num_images_per_prompt",
    "device",
)


@torch.no_grad()
def branch_text_states(pipeline: Any, call_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The text states each CFG branch's denoiser calls get in one pipeline call, from the
    pipeline's own ``encode_prompt``: how ``CallTracker`` tells apart a pipeline's two
    calls per step when it does not name them with ``cache_context``.

    ``encode_prompt`` is called once for the prompt and once for the negative prompt
    (the call's, else its ``__call__`` default, else the empty prompt, as diffusers
    pipelines do), each as a prompt without CFG, with every other argument it shares
    with ``__call__`` as the call has it.

    Args:
        pipeline: the diffusers pipeline.
        call_kwargs: the keyword arguments of the pipeline call.

    Returns:
        {"cond": (1, tokens, dim), "uncond": (1, tokens, dim)}; empty for a pipeline
        without a text ``encode_prompt`` whose arguments qvd-bench can supply.
    """
    encode = getattr(pipeline, "encode_prompt", None)
    if not callable(encode) or "prompt" not in call_kwargs:
        return {}
    call_parameters = inspect.signature(pipeline.__call__).parameters
    arguments: dict[str, Any] = {}
    for name, parameter in inspect.signature(encode).parameters.items():
        if name in ("num_videos_per_prompt", "num_images_per_prompt"):
            arguments[name] = 1
        elif name == "do_classifier_free_guidance":
            arguments[name] = False
        elif name == "device":
            arguments[name] = pipeline._execution_device
        elif name in _OWN_ENCODE_ARGUMENTS or parameter.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            continue
        elif name in call_kwargs:
            arguments[name] = call_kwargs[name]
        elif (
            name in call_parameters and call_parameters[name].default is not inspect.Parameter.empty
        ):
            arguments[name] = call_parameters[name].default
        elif parameter.default is inspect.Parameter.empty:
            return {}  # an argument neither the call nor its signature supplies
    negative = call_kwargs.get("negative_prompt")
    if negative is None and "negative_prompt" in call_parameters:
        negative = call_parameters["negative_prompt"].default
    negative = negative if isinstance(negative, str) else ""

    def states(text: str) -> torch.Tensor | None:
        encoded = encode(prompt=text, **arguments)
        items = encoded if isinstance(encoded, (tuple, list)) else (encoded,)
        return next((item for item in items if isinstance(item, torch.Tensor)), None)

    return {"cond": states(call_kwargs["prompt"]), "uncond": states(negative)}


# --------------------------------------------------------------------------- helpers


def _pipeline_denoiser(pipeline: Any) -> nn.Module:
    """The pipeline's first denoiser that is not None (a Wan 2.2 pipeline may hold
    ``transformer_2`` alone)."""
    denoisers = pipeline_denoisers(pipeline)
    if not denoisers:
        raise UserError(f"pipeline {type(pipeline).__name__} has neither a unet nor a transformer")
    return next(iter(denoisers.values()))


def _check_pipeline_modules(loaded: LoadedModel) -> None:
    """The modules the family's pipelines call must have been imported by the pipeline's
    module (diffusers imports optional ones only when they are installed)."""
    module = inspect.getmodule(type(loaded.pipeline))
    needed = loaded.family.pipeline_modules
    for name in (*needed.get("", ()), *needed.get(type(loaded.pipeline).__name__, ())):
        if module is not None and not hasattr(module, name):
            raise UserError(
                f"pipeline {type(loaded.pipeline).__name__} needs the {name} package, which "
                f"is not installed (pip install {name})"
            )


def _check_tracked(pipeline: Any, tracker: CallTracker) -> None:
    """Every denoiser of the pipeline must be hooked, or its calls would go unrecorded."""
    untracked = [a for a, m in pipeline_denoisers(pipeline).items() if not tracker.hooks(m)]
    if untracked:
        raise UserError(
            f"pipeline {type(pipeline).__name__}'s {', '.join(untracked)} would run unrecorded: "
            "the call tracker hooks only "
            f"{', '.join(e or type(m).__name__ for e, m in tracker.experts.items())}; "
            "track every denoiser of the pipeline (LoadedModel.experts)"
        )


def _record_timestep(tracker: CallTracker, timesteps: list[float]) -> None:
    if tracker.current is not None:
        timesteps.append(tracker.current.timestep)


def _check_every_step_tracked(pipeline: Any, timesteps: list[float]) -> None:
    """Each step of the scheduler must have had at least one tracked denoiser call."""
    scheduled = getattr(pipeline.scheduler, "timesteps", None)
    steps = 0 if scheduled is None else len(scheduled)
    if len(set(timesteps)) < steps:
        raise UserError(
            f"pipeline {type(pipeline).__name__} ran {steps} steps but the tracked denoiser "
            f"calls cover {len(set(timesteps))} timesteps: a denoiser ran outside the tracker"
        )


def _compression(pipeline: Any) -> tuple[int, int]:
    """(spatial, temporal) compression of the pipeline's VAE, as the pipeline states it
    (the attribute names differ between pipelines)."""
    spatial = _first_attribute(
        pipeline,
        (
            "vae_scale_factor_spatial",
            "vae_spatial_compression_ratio",
            "vae_spatial_scale_factor",
            "vae_scale_factor",
        ),
    )
    temporal = _first_attribute(
        pipeline,
        (
            "vae_scale_factor_temporal",
            "vae_temporal_compression_ratio",
            "vae_temporal_scale_factor",
        ),
    )
    if spatial is None:
        raise UserError(f"pipeline {type(pipeline).__name__} states no VAE compression factor")
    return int(spatial), int(temporal or 1)


def _first_attribute(pipeline: Any, names: Sequence[str]) -> Any:
    return next(
        (getattr(pipeline, n) for n in names if getattr(pipeline, n, None) is not None), None
    )


def _text_length(pipeline: Any) -> int:
    """Prompt length for pipelines that take ``max_sequence_length``."""
    transformer = getattr(pipeline, "transformer", None)
    length = getattr(getattr(transformer, "config", None), "max_text_seq_length", None)
    if length is not None:
        # CogVideoX's positional embedding is sized for exactly this many text tokens.
        return int(length)
    return int(min(pipeline.tokenizer.model_max_length, 512))


def _progress_kwargs(
    parameters: Any, progress: Callable[[], Any] | None
) -> tuple[dict[str, Any], Callable[[], Any] | None]:
    """Step-callback keyword arguments for ``progress``, or a hook fallback.

    Returns:
        (kwargs for the pipeline call, callable to run once per denoiser call or None).
    """
    if progress is None:
        return {}, None
    if "callback_on_step_end" in parameters:

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            progress()
            return tensors

        return {"callback_on_step_end": on_step_end}, None
    if "callback" in parameters:
        # Older pipelines (TextToVideoSDPipeline): callback(step, timestep, latents).
        return {"callback": lambda step, timestep, latents: progress(), "callback_steps": 1}, None
    # No step callback (I2VGenXLPipeline): one batched CFG denoiser call per step.
    return {}, progress


@contextlib.contextmanager
def _global_rng(seed: int, module: nn.Module) -> Iterator[None]:
    """Seeds the global RNG for one pipeline call and restores it afterwards.

    Some pipelines draw from the global RNG besides the generator they are given
    (I2VGenXLPipeline samples its image latents with ``latent_dist.sample()``).
    """
    device = next(module.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _guider_scale(pipeline: Any, guidance_scale: float, parameters: Any) -> Iterator[None]:
    """Gives a pipeline whose CFG scale is its ``guider``'s (HunyuanVideo15Pipeline: the
    call takes no ``guidance_scale``) the run's scale for the run, then restores its guider.
    """
    guider = getattr(pipeline, "guider", None)
    if "guidance_scale" in parameters or not hasattr(guider, "guidance_scale"):
        yield
        return
    pipeline.guider = guider.new(guidance_scale=guidance_scale)
    try:
        yield
    finally:
        pipeline.guider = guider


@contextlib.contextmanager
def _attached(tracker: CallTracker) -> Iterator[None]:
    """Attaches the tracker for the run unless the caller already did."""
    was_attached = tracker._handle is not None
    tracker.attach()
    try:
        yield
    finally:
        if not was_attached:
            tracker.detach()


@contextlib.contextmanager
def _call_counter(denoisers: Sequence[nn.Module], callback: Callable[[], Any]) -> Iterator[None]:
    """Calls ``callback`` after every call of any of ``denoisers``."""
    handles = [
        denoiser.register_forward_hook(lambda module, args, output: callback())
        for denoiser in denoisers
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def pixel_size(pipeline: Any, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(frames, height, width) in pixels of a latent size, by the pipeline's VAE
    compression factors (as ``run_pipeline`` calls the pipeline)."""
    spatial, temporal = _compression(pipeline)
    return (frames - 1) * temporal + 1, height * spatial, width * spatial
