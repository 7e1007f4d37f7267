"""Seeded generation for fidelity measurements, cached on disk per video.

A ``Generation`` is one video: its final latents and, per step, what the denoiser was fed
and what it predicted (the CFG-combined prediction and each branch). A model with a
diffusers pipeline is sampled by the pipeline's own call (``pipelines.run_pipeline``: its
text encoder, scheduler and conditioning), every denoiser call recorded
(``evaluate.replay``); a bare denoiser by the minimal sampler (``sample_denoiser``, with
pseudo text states). ``sampler_name`` says which. Two modes:

- ``"free"``: the model follows its own trajectory (the final latents are its video);
- ``"teacher"``: teacher-forced, the model is fed another generation's inputs at every
  step (the FP trajectory's), so its per-step predictions compare with the teacher's on
  identical inputs; its final latents are of no use and not kept. For a pipeline every
  recorded call of the teacher's run (positional and keyword arguments) is replayed into
  the expert that made it.

Predictions are stored raw (the denoiser's output, in the model's dtype); ``x0`` converts
them to x0-space when they are compared, so ε-, v- and flow-prediction models compare
alike: with ``fidelity.to_x0`` and the minimal sampler's scheduler, or with the
coefficients of the pipeline's scheduler at each step (``fidelity.x0_coefficients``).

The two CFG branches run as one batched forward per step when ``cfg_batch_safe`` says the
model's quantizers allow it (every sample computed on its own), else as two; there too,
``generate_free_and_forced`` runs a quantized model's free-running and teacher-forced
videos of a prompt side by side, one forward of 4 samples per step.

Cache: one safetensors file per (model, weight seed, method, bits, prompt index, seed,
mode) under ``<results>/generations/``; the file name ends with a digest of everything
else that decides the video (the prompt text, the sampling settings, the quantization
config and the statistics it was calibrated on), so a change of settings never reuses a
stale video, and a rerun with the same settings regenerates nothing. Files are written
atomically, so an interruption leaves only finished videos. A cached file that cannot be
read (damaged outside qvd-bench: the writes are atomic) is regenerated with a
``CacheWarning`` naming it, since the cache is derived data and generation is
deterministic.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn

from qvd_bench.errors import UserError
from qvd_bench.evaluate.fidelity import to_x0, x0_coefficients
from qvd_bench.evaluate.replay import (
    CALL_PREFIX,
    CallRecorder,
    RecordedCall,
    calls_from_tensors,
    calls_to_tensors,
    replay,
)
from qvd_bench.models import sampling
from qvd_bench.models.family import Guidance, LoadedModel
from qvd_bench.models.pipelines import step_guidance
from qvd_bench.models.sampling import CallTracker, StepOutput
from qvd_bench.store import atomic_write

MODES = ("free", "teacher")
GENERATIONS_DIR = "generations"
# Where quantization modules and attention processors come from (``cfg_batch_safe``).
QUANT_PACKAGE = "qvd_bench.quant."


class CacheWarning(UserWarning):
    """A cached generation was unreadable and is being regenerated."""


@dataclass(frozen=True)
class GenerationSettings:
    """How videos are sampled (the same for the FP model and every quantized one).

    Attributes:
        steps: denoising steps.
        guidance_scale: CFG scale; <= 1 disables guidance.
        seed: sampling seed; video i's noise depends on (seed, i) only.
        frames, height, width: latent size.
        scheduler: "ddim", "euler" or "flow-euler" (``sampling.make_scheduler``).
        pipeline_kwargs: further keyword arguments of the pipeline call, as collection
            takes them (``CollectConfig.extra["pipeline_kwargs"]``): they win over the
            derived ones and decide how a step's branches combine
            (``pipelines.step_guidance``), e.g. ``{"stg_scale": 0}`` for LTX-2. Values
            must be JSON-serialisable (they are part of the cache key and of
            ``settings.json`` when given); only a model with a diffusers pipeline takes
            any. Held as a plain dict copy: the settings are compared, never hashed.
    """

    steps: int = 10
    guidance_scale: float = 7.5
    seed: int = 0
    frames: int = 8
    height: int = 16
    width: int = 16
    scheduler: str = "ddim"
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "frames", "height", "width"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.scheduler not in sampling.SCHEDULERS:
            raise UserError(
                f"unknown scheduler {self.scheduler!r} (known: {', '.join(sampling.SCHEDULERS)})"
            )
        object.__setattr__(self, "pipeline_kwargs", checked_pipeline_kwargs(self.pipeline_kwargs))

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON; ``pipeline_kwargs`` only when given, so that the cache
        keys and records of runs with the pipeline's defaults are what they were."""
        data = asdict(self)
        if not self.pipeline_kwargs:
            del data["pipeline_kwargs"]
        return data


def checked_pipeline_kwargs(pipeline_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``pipeline_kwargs`` (None: empty), checked to be keyword names with
    JSON-serialisable values (a cache key and ``settings.json`` hold them).

    Raises:
        UserError: not a mapping, a key that is not a string, or a value JSON cannot
            hold (naming its key).
    """
    if pipeline_kwargs is None:
        return {}
    if not isinstance(pipeline_kwargs, Mapping):
        raise UserError(
            f"pipeline_kwargs must be a mapping of keyword names to values, got "
            f"{type(pipeline_kwargs).__name__}"
        )
    checked = {}
    for key, value in pipeline_kwargs.items():
        if not isinstance(key, str):
            raise UserError(f"pipeline_kwargs keys must be keyword names, got {key!r}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as error:
            reason = " ".join(str(error).split())
            raise UserError(
                f"pipeline_kwargs[{key!r}] must be JSON-serialisable ({reason})"
            ) from None
        checked[key] = value
    return checked


def check_pipeline_kwargs(loaded: LoadedModel, settings: GenerationSettings) -> None:
    """Raises a UserError when ``settings`` has pipeline_kwargs and ``loaded`` is a bare
    denoiser (the minimal sampler makes no pipeline call to give them to)."""
    if loaded.pipeline is None and settings.pipeline_kwargs:
        raise UserError(
            f"pipeline_kwargs need a model with a diffusers pipeline; {loaded.name} is a "
            "bare denoiser (minimal sampler)"
        )


@dataclass
class Generation:
    """One generated video and its per-step record.

    Shapes use S steps and the latent shape (1, ...) of one video in the family layout.

    Attributes:
        timesteps: (S,) the scheduler timesteps.
        prediction: (S, 1, ...) CFG-combined denoiser output.
        cond: (S, 1, ...) the conditional branch's output.
        uncond: (S, 1, ...) the unconditional branch's output; None without CFG.
        latents: (1, ...) final latents; None when teacher-forced.
        inputs: (S, 1, ...) the latents x_t denoised at each step; None when
            teacher-forced (they are the teacher's).
        model_inputs: (S, 1, ...) what the denoiser saw (x_t after the scheduler's
            ``scale_model_input``); None when teacher-forced. From a pipeline: the latent
            channels of the denoiser's input (without concatenated image latents).
        x0_coefficients: (S, 2) float64 (a, b) with x0 = a·model_input + b·prediction at
            each step, for videos sampled by a pipeline (its scheduler decides them;
            ``fidelity.x0_coefficients``); None for the minimal sampler (``x0`` then
            asks the scheduler).
        calls: every denoiser call of a pipeline run with its arguments (the FP
            reference's, which teacher-forced videos replay); None otherwise, or when
            they are left on disk (``calls_file``).
        calls_file: the cache file that holds the recorded calls when they are not kept
            in host memory (``GenerationCache.get_or_generate(..., spill_calls=True)``);
            ``recorded_calls`` reads them from it on demand.
    """

    timesteps: Tensor
    prediction: Tensor
    cond: Tensor
    uncond: Tensor | None = None
    latents: Tensor | None = None
    inputs: Tensor | None = None
    model_inputs: Tensor | None = None
    x0_coefficients: Tensor | None = None
    calls: list[RecordedCall] | None = None
    calls_file: Path | None = None

    def recorded_calls(self) -> list[RecordedCall] | None:
        """The recorded calls: those in memory, else read from ``calls_file`` (a new copy
        each time, freed with it), else None."""
        if self.calls is not None or self.calls_file is None:
            return self.calls
        return GenerationCache.load_calls(self.calls_file)

    def tensors(self) -> dict[str, Tensor]:
        """The tensors to store; ``model_inputs`` only where they differ from ``inputs``."""
        out = {
            name: getattr(self, name)
            for name in (
                "timesteps",
                "prediction",
                "cond",
                "uncond",
                "latents",
                "inputs",
                "x0_coefficients",
            )
        }
        if self.model_inputs is not None and not (
            self.inputs is not None and torch.equal(self.model_inputs, self.inputs)
        ):
            out["model_inputs"] = self.model_inputs
        out = {k: v.detach().cpu().contiguous() for k, v in out.items() if v is not None}
        if self.calls is not None:
            out.update(calls_to_tensors(self.calls)[0])
        return out

    def metadata(self) -> dict[str, str]:
        """What the tensors cannot hold: the structure of the recorded calls."""
        return {} if self.calls is None else {"calls": calls_to_tensors(self.calls)[1]}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
    ) -> Generation:
        inputs = tensors.get("inputs")
        calls = None
        if metadata and "calls" in metadata:
            calls = calls_from_tensors(tensors, metadata["calls"])
        return cls(
            timesteps=tensors["timesteps"],
            prediction=tensors["prediction"],
            cond=tensors["cond"],
            uncond=tensors.get("uncond"),
            latents=tensors.get("latents"),
            inputs=inputs,
            model_inputs=tensors.get("model_inputs", inputs),
            x0_coefficients=tensors.get("x0_coefficients"),
            calls=calls,
        )

    def x0(self, scheduler, branch: str = "cfg", model_inputs: Tensor | None = None) -> Tensor:
        """Per-step predictions in x0-space, (S, 1, ...) float64.

        Args:
            scheduler: the scheduler the video was sampled with (``scheduler_for``).
            branch: "cfg" (the combined prediction), "uncond" or "cond".
            model_inputs: (S, 1, ...) the denoiser inputs the predictions were made on;
                this generation's own by default (pass the teacher's when teacher-forced).
        """
        value = {"cfg": self.prediction, "uncond": self.uncond, "cond": self.cond}[branch]
        if value is None:
            raise ValueError(f"this generation has no {branch} branch (no CFG)")
        inputs = self.model_inputs if model_inputs is None else model_inputs
        if inputs is None:
            raise ValueError("a teacher-forced generation needs its teacher's model inputs")
        if self.x0_coefficients is not None:
            a, b = self.x0_coefficients.to(torch.float64).unbind(1)
            shape = (-1, *([1] * (value.ndim - 1)))
            return a.reshape(shape) * inputs.to(torch.float64) + b.reshape(shape) * value.to(
                torch.float64
            )
        return torch.stack(
            [to_x0(value[i], inputs[i], self.timesteps[i], scheduler) for i in range(len(value))]
        )


def cfg_batch_safe(denoiser: nn.Module) -> bool:
    """Whether one forward on [uncond, cond] gives each branch what its own forward would.

    The denoisers compute every sample on its own; so do the activation quantizers listed
    here: per tensor with calibrated constants, per timestep group (the timestep is the
    call's, the same for both branches), per token, on a level set, and split inputs made
    of those. Any other quantizer or wrapper (subclasses included), and any other module
    or attention processor of ``qvd_bench.quant``, makes the answer False (the branches
    then run as separate forwards), so a quantizer that looks across samples is never
    batched unknowingly.

    Args:
        denoiser: the model, FP or quantized in place.
    """
    from qvd_bench.quant import modules, split

    safe = (
        modules.QuantWrapper,
        modules.StaticActQuant,
        modules.GroupActQuant,
        modules.DynamicTokenActQuant,
        modules.LevelActQuant,
        split.SplitQuantWrapper,
        split.SplitActQuant,
    )
    for module in denoiser.modules():
        kind = type(module)
        quantizing = kind.__module__.startswith(QUANT_PACKAGE) or isinstance(
            module, (modules.ActQuantizer, modules.QuantWrapper)
        )
        if quantizing and kind not in safe:
            return False
        processor = getattr(module, "processor", None)
        if processor is not None and type(processor).__module__.startswith(QUANT_PACKAGE):
            return False
    return True


def scheduler_for(loaded: LoadedModel, settings: GenerationSettings):
    """The scheduler ``generate`` samples with, with its timesteps set (for ``to_x0``)."""
    scheduler = sampling.make_scheduler(settings.scheduler, loaded.family.prediction_type)
    scheduler.set_timesteps(settings.steps)
    return scheduler


def generate(
    loaded: LoadedModel,
    prompt: str,
    sample_id: int,
    settings: GenerationSettings,
    *,
    tracker: CallTracker | None = None,
    teacher: Generation | None = None,
    start: Generation | None = None,
    keep_calls: bool = False,
    batch_cfg: bool | None = None,
) -> Generation:
    """Samples one video and records every step.

    A model with a diffusers pipeline (``LoadedModel.pipeline``) samples with the
    pipeline's own call (``pipelines.run_pipeline``: its text encoder, scheduler and
    conditioning); a bare denoiser with the minimal sampler (``sample_denoiser``, pseudo
    text states from ``text_states_for_prompts``). ``sampler_name`` says which.

    Args:
        loaded: the model (FP or quantized in place).
        prompt: the prompt (pseudo text embeddings for bare denoisers).
        sample_id: the video's global id (its noise depends on (seed, id) only).
        settings: sampling settings (a pipeline uses its own scheduler, not
            ``settings.scheduler``, and its call gets ``settings.pipeline_kwargs``; a
            bare denoiser takes none: UserError).
        tracker: the CallTracker attached to the denoiser(s) (per-timestep quantizers
            read it).
        teacher: teacher forcing: feed ``teacher.inputs[i]`` at step i (minimal sampler),
            or replay every recorded denoiser call of the teacher's pipeline run
            (``teacher.calls``) into the expert that made it.
        start: with ``teacher``, this model's free-running video of the same prompt and
            seed. Both trajectories start from the same noise, so its first step is the
            teacher-forced first step (the same call on the same input): it is taken
            instead of computed again, one step in S saved. Not used when its first input
            or its timesteps differ from the teacher's, nor for pipelines.
        keep_calls: for a pipeline run, keep every denoiser call's arguments
            (``Generation.calls``): what teacher-forcing other models on this video needs.
        batch_cfg: False runs the CFG branches as separate forwards where they could be
            batched (the same values up to float rounding); None batches where
            ``cfg_batch_safe`` allows. Pipelines batch as their own call does.

    Returns:
        The Generation (``latents`` None when teacher-forced).
    """
    check_pipeline_kwargs(loaded, settings)
    if loaded.pipeline is not None:
        if teacher is not None:
            return _replayed(loaded, sample_id, settings, tracker, teacher)
        return _pipeline_generation(loaded, prompt, sample_id, settings, tracker, keep_calls)
    reuse = (
        teacher is not None
        and start is not None
        and start.inputs is not None
        and torch.equal(start.timesteps, teacher.timesteps)
        and torch.equal(start.inputs[0], teacher.inputs[0])
    )
    steps: list[StepOutput] = []
    latents = None
    if not reuse or len(teacher.inputs) > 1:  # a one-step teacher-forced video is all reused
        latents = _sample(
            loaded,
            prompt,
            sample_id,
            settings,
            tracker,
            steps,
            teacher_inputs=None if teacher is None else list(teacher.inputs),
            batch_cfg=cfg_batch_safe(loaded.denoiser) and batch_cfg is not False,
            first_step=1 if reuse else 0,
        )

    def with_start(name: str, ran: Tensor | None) -> Tensor | None:
        """The reused first step of ``start`` followed by the steps run here."""
        if not reuse:
            return ran
        first = getattr(start, name)
        if first is None:
            return None
        return first[:1].clone() if ran is None else torch.cat([first[:1], ran])

    if teacher is not None:
        forced = _forced_generation(steps, slice(None))
        return Generation(
            **{name: with_start(name, getattr(forced, name)) for name in _FORCED_FIELDS}
        )
    return _free_generation(steps, slice(None), latents)


# Names how ``generate_free_and_forced`` batches (cache contexts record it).
FREE_AND_FORCED_SCHEME = "free and teacher-forced side by side, one batch per step"
PIPELINE_SCHEME = "the pipeline free-running, then the reference's denoiser calls replayed"


def free_and_forced_scheme(loaded: LoadedModel) -> str:
    """How ``generate_free_and_forced`` makes a model's pair of videos (for cache keys)."""
    return PIPELINE_SCHEME if loaded.pipeline is not None else FREE_AND_FORCED_SCHEME


def generate_free_and_forced(
    loaded: LoadedModel,
    prompt: str,
    sample_id: int,
    settings: GenerationSettings,
    *,
    teacher: Generation,
    tracker: CallTracker | None = None,
) -> tuple[Generation, Generation]:
    """A video free-running and teacher-forced on ``teacher``, in shared forwards.

    Where the model computes every sample on its own (``cfg_batch_safe``), the two
    trajectories run side by side in one batch per step (``sample_denoiser``'s
    ``forced_inputs``): one forward of 4 samples per step costs less than two of 2, and
    the first step, on the same noise in both, runs once. Otherwise they run one after
    the other, the second reusing the first's first step (``generate``'s ``start``). A
    pipeline runs its own call free-running, then the teacher's calls are replayed.

    The values are those of separate runs up to float rounding (a batch of another size
    can round differently); a pair is always computed the same way, so reruns reproduce it.

    Args:
        loaded, prompt, sample_id, settings, tracker: as ``generate``.
        teacher: the FP model's free-running video of the same prompt and seed.

    Returns:
        (free-running, teacher-forced) Generations, as ``generate`` returns them.
    """
    check_pipeline_kwargs(loaded, settings)
    if loaded.pipeline is not None or not cfg_batch_safe(loaded.denoiser) or teacher.inputs is None:
        free = generate(loaded, prompt, sample_id, settings, tracker=tracker)
        forced = generate(
            loaded, prompt, sample_id, settings, tracker=tracker, teacher=teacher, start=free
        )
        return free, forced
    steps: list[StepOutput] = []
    latents = _sample(
        loaded,
        prompt,
        sample_id,
        settings,
        tracker,
        steps,
        batch_cfg=True,
        forced_inputs=list(teacher.inputs),
    )
    return _free_generation(steps, slice(0, 1), latents), _forced_generation(steps, slice(1, 2))


def _sample(
    loaded: LoadedModel,
    prompt: str,
    sample_id: int,
    settings: GenerationSettings,
    tracker: CallTracker | None,
    steps: list[StepOutput],
    **options: Any,
) -> Tensor:
    """``sample_denoiser`` on one prompt with ``settings``; appends each step to ``steps``.

    ``options``: the sampler's teacher forcing and batching arguments.
    """
    cond_states, uncond_states = sampling.text_states_for_prompts(loaded, [prompt])
    return sampling.sample_denoiser(
        loaded,
        cond_states,
        uncond_states,
        steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        seed=settings.seed,
        sample_ids=[sample_id],
        frames=settings.frames,
        height=settings.height,
        width=settings.width,
        tracker=tracker,
        scheduler=settings.scheduler,
        observe=steps.append,
        **options,
    )


def sampler_name(loaded: LoadedModel) -> str:
    """Which sampler ``generate`` runs for a model: "pipeline: <its class>" or
    "minimal sampler" (a bare denoiser)."""
    if loaded.pipeline is not None:
        return f"pipeline: {type(loaded.pipeline).__name__}"
    return "minimal sampler"


def sampler_context(loaded: LoadedModel) -> dict[str, Any]:
    """What of the sampler decides a video (for cache keys): its name and, for a
    pipeline, its scheduler's class and config."""
    from qvd_bench import store

    context: dict[str, Any] = {"sampler": sampler_name(loaded)}
    if loaded.pipeline is not None:
        scheduler = loaded.pipeline.scheduler
        context["scheduler"] = {
            "class": type(scheduler).__name__,
            "config": store.json_safe(dict(scheduler.config)),
        }
    return context


def _pipeline_generation(
    loaded: LoadedModel,
    prompt: str,
    sample_id: int,
    settings: GenerationSettings,
    tracker: CallTracker | None,
    keep_calls: bool,
) -> Generation:
    """One video from the model's pipeline, every denoiser call recorded."""
    from qvd_bench.models.pipelines import run_pipeline

    tracker = tracker if tracker is not None else CallTracker(loaded.experts)
    recorder = CallRecorder(tracker, keep_inputs=keep_calls)
    with recorder.active():
        latents = run_pipeline(
            loaded,
            [prompt],
            steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            seed=settings.seed,
            sample_ids=[sample_id],
            frames=settings.frames,
            height=settings.height,
            width=settings.width,
            tracker=tracker,
            pipeline_kwargs=settings.pipeline_kwargs,
        )
    calls = recorder.calls
    scheduler = loaded.pipeline.scheduler
    generation = _steps_generation(
        loaded,
        calls,
        [c.output for c in calls],
        step_guidance(loaded, settings.guidance_scale, pipeline_kwargs=settings.pipeline_kwargs),
        functools.partial(x0_coefficients, scheduler),
    )
    generation.latents = latents.detach().cpu()
    generation.x0_coefficients = torch.tensor(
        [x0_coefficients(scheduler, float(t)) for t in generation.timesteps], dtype=torch.float64
    )
    if keep_calls:
        for call in calls:  # the prediction is kept per step, not per call
            call.output = None
        generation.calls = calls
    return generation


def _replayed(
    loaded: LoadedModel,
    sample_id: int,
    settings: GenerationSettings,
    tracker: CallTracker | None,
    teacher: Generation,
) -> Generation:
    """Teacher forcing for pipelines: the teacher's denoiser calls replayed into ``loaded``."""
    calls = teacher.recorded_calls()
    if calls is None or teacher.x0_coefficients is None:
        raise ValueError("teacher forcing a pipeline needs a teacher with its recorded calls")
    tracker = tracker if tracker is not None else CallTracker(loaded.experts)
    outputs = replay(loaded.experts, calls, tracker, (int(sample_id),))
    teacher_x0 = dict(zip(teacher.timesteps.tolist(), teacher.x0_coefficients.tolist()))
    guidance = step_guidance(
        loaded, settings.guidance_scale, pipeline_kwargs=settings.pipeline_kwargs
    )
    forced = _steps_generation(loaded, calls, outputs, guidance, teacher_x0.get)
    return Generation(
        timesteps=forced.timesteps,
        prediction=forced.prediction,
        cond=forced.cond,
        uncond=forced.uncond,
        x0_coefficients=teacher.x0_coefficients,
    )


def _latent_parts(prediction: Tensor, latents: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    """The prediction and the noisy latents it predicts from, on the channels they share.

    A denoiser input may carry conditioning channels after the latent ones (SVD's image
    latents) and an output extra channels after the prediction (Latte's learned
    variance, which its pipeline drops).
    """
    if prediction.shape == latents.shape:
        return prediction, latents
    axis = 2 if layout == "BFCHW" else 1
    channels = min(prediction.shape[axis], latents.shape[axis])
    return prediction.narrow(axis, 0, channels), latents.narrow(axis, 0, channels)


def _steps_generation(
    loaded: LoadedModel,
    calls: list[RecordedCall],
    outputs: list[Tensor],
    guidance: Guidance,
    x0_at: Callable[[float], Sequence[float] | None],
) -> Generation:
    """Per-step predictions of a pipeline run from its denoiser calls.

    Consecutive calls at one timestep form a step: one batched [uncond, cond] call, or
    one call per branch (and LTX-2's guidance passes). The combined prediction is the
    pipeline's own combination of the branches the step ran (``guidance``); ``x0_at``
    gives a timestep's x0 coefficients (a, b) where the guidance needs x0-space.
    """
    layout = loaded.family.layout
    steps: list[dict[str, Any]] = []
    for call, output in zip(calls, outputs):
        step = steps[-1] if steps else None
        if (
            step is None
            or step["timestep"] != call.timestep
            or any(b in step for b in call.branches)
        ):
            step = {"timestep": call.timestep}
            steps.append(step)
        parts = zip(
            call.branches,
            output.chunk(len(call.branches)),
            call.latents().chunk(len(call.branches)),
        )
        for branch, prediction, latents in parts:
            step[branch], step["input"] = _latent_parts(prediction.cpu(), latents.cpu(), layout)
    if not steps:
        raise UserError(f"the pipeline of {loaded.name} made no denoiser call")
    for step in steps:
        if "cond" not in step:
            raise UserError(
                f"the pipeline of {loaded.name} ran no conditional call at timestep "
                f"{step['timestep']:g}"
            )
    with_uncond = all("uncond" in step for step in steps)
    predictions = []
    for step in steps:
        branches = {b: step[b] for b in sampling.ALL_BRANCHES if b in step}
        x0_map = None
        if guidance.rescale_in_x0:
            a, b = x0_at(step["timestep"])
            x0_map = (a, b, step["input"])
        predictions.append(guidance.combine(branches, x0_map))
    return Generation(
        timesteps=torch.tensor([step["timestep"] for step in steps], dtype=torch.float64),
        prediction=torch.stack(predictions),
        cond=torch.stack([step["cond"] for step in steps]),
        uncond=torch.stack([step["uncond"] for step in steps]) if with_uncond else None,
        inputs=torch.stack([step["input"] for step in steps]),
        model_inputs=torch.stack([step["input"] for step in steps]),
    )


# What a teacher-forced Generation keeps (its inputs are the teacher's).
_FORCED_FIELDS = ("timesteps", "prediction", "cond", "uncond")


def _stack_steps(steps: list[StepOutput], name: str, part: slice) -> Tensor | None:
    """(S, b, ...) one field of the steps, samples ``part`` of each step's batch."""
    values = [getattr(step, name) for step in steps]
    if not values or values[0] is None:
        return None
    return torch.stack([v[part].detach().cpu() for v in values])


def _forced_generation(steps: list[StepOutput], part: slice) -> Generation:
    timesteps = [step.timestep.detach().cpu() for step in steps]
    return Generation(
        timesteps=torch.stack(timesteps) if timesteps else None,
        prediction=_stack_steps(steps, "prediction", part),
        cond=_stack_steps(steps, "cond", part),
        uncond=_stack_steps(steps, "uncond", part),
    )


def _free_generation(steps: list[StepOutput], part: slice, latents: Tensor) -> Generation:
    return replace(
        _forced_generation(steps, part),
        latents=latents.detach().cpu(),
        inputs=_stack_steps(steps, "latents", part),
        model_inputs=_stack_steps(steps, "model_input", part),
    )


# ----------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class CacheKey:
    """What names one cached video.

    Attributes:
        model: model name (zoo name or path).
        weight_seed: its weight seed (None for loaded models).
        method: quantization method ("reference" for the FP model itself).
        bits: e.g. "W4A8" ("fp" for the reference).
        prompt_index: index of the prompt (the video's sample id).
        seed: sampling seed.
        mode: "free" or "teacher".
        context: everything else that decides the video (prompt text, settings, quant
            config, statistics identity); only its digest is in the file name.
    """

    model: str
    weight_seed: int | None
    method: str
    bits: str
    prompt_index: int
    seed: int
    mode: str
    context: str

    def relative_path(self) -> Path:
        digest = hashlib.sha256(self.context.encode("utf-8")).hexdigest()[:12]
        model = Path(self.model).name or "model"
        return (
            Path(f"{model}-w{self.weight_seed}")
            / self.method
            / self.bits
            / f"p{self.prompt_index:04d}-s{self.seed}-{self.mode}-{digest}.safetensors"
        )


def context_string(**parts: Any) -> str:
    """A canonical JSON string of what decides a video (for ``CacheKey.context``)."""
    return json.dumps(parts, sort_keys=True, default=str)


class GenerationCache:
    """The generation files under ``<results>/generations/``.

    Args:
        results_dir: the results directory.
    """

    def __init__(self, results_dir: str | Path):
        self.root = Path(results_dir) / GENERATIONS_DIR

    def path(self, key: CacheKey) -> Path:
        return self.root / key.relative_path()

    @staticmethod
    def load_path(path: str | Path, calls: bool = True) -> Generation:
        """Reads one cache file (raises safetensors' errors on a damaged one).

        Args:
            path: the file.
            calls: read the recorded calls into memory; otherwise the generation only
                names the file they are in (``Generation.calls_file``) when it has some.
        """
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            stored = handle.keys()
            names = [n for n in stored if calls or not n.startswith(CALL_PREFIX)]
            tensors = {name: handle.get_tensor(name) for name in names}
        spilled = not calls and "calls" in metadata
        if spilled:
            del metadata["calls"]
        generation = Generation.from_tensors(tensors, metadata)
        if spilled:
            generation.calls_file = Path(path)
        return generation

    @staticmethod
    def load_calls(path: str | Path) -> list[RecordedCall]:
        """The recorded denoiser calls of one cache file, and nothing else of it."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            description = (handle.metadata() or {}).get("calls")
            if description is None:
                raise UserError(f"cached generation {path} holds no recorded denoiser calls")
            stored = handle.keys()
            names = [n for n in stored if n.startswith(CALL_PREFIX)]
            tensors = {name: handle.get_tensor(name) for name in names}
        return calls_from_tensors(tensors, description)

    def load(self, key: CacheKey, calls: bool = True) -> Generation | None:
        """The cached video, or None when absent (or unreadable: warns, to regenerate).

        Args:
            key: the video.
            calls: read its recorded calls into memory (see ``load_path``).
        """
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return self.load_path(path, calls=calls)
        except (OSError, SafetensorError, KeyError, ValueError) as error:
            reason = " ".join(str(error).split())[:200]
            warnings.warn(
                f"cached generation {path} is unreadable ({reason}); regenerating it",
                CacheWarning,
                stacklevel=2,
            )
            return None

    def save(self, key: CacheKey, generation: Generation) -> Path:
        path = self.path(key)
        tensors = generation.tensors()
        metadata = {"key": json.dumps(asdict(key), sort_keys=True), **generation.metadata()}
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))
        return path

    def get_or_generate(
        self, key: CacheKey, make, spill_calls: bool = False
    ) -> tuple[Generation, bool]:
        """The cached video, or ``make()`` stored under ``key``.

        Args:
            key: the video.
            make: generates it.
            spill_calls: leave its recorded denoiser calls in the cache file rather than
                in host memory (``Generation.recorded_calls`` reads them when replayed),
                so that a matrix holds one video's calls at a time, not every prompt's.

        Returns:
            (generation, True when it was generated now).
        """
        cached = self.load(key, calls=not spill_calls)
        if cached is not None:
            return cached, False
        generation = make()
        path = self.save(key, generation)
        if spill_calls and generation.calls is not None:
            generation = replace(generation, calls=None, calls_file=path)
        return generation, True
