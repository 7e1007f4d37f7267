"""Drives a denoiser over a sampling schedule, and describes each denoiser call.

``CallTracker`` is a forward pre-hook on the denoiser. Before every call it records
the timestep value, which CFG branch each chunk of the batch is, and the global sample
ids of the samples in it, so that layer hooks can key their statistics by
(layer, timestep value, branch) without knowing who called the denoiser (the minimal
sampler below or a diffusers pipeline).
"""

from __future__ import annotations

import contextlib
import functools
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qvd_bench.errors import UserError
from qvd_bench.models.family import LoadedModel

BRANCHES: tuple[str, ...] = ("uncond", "cond")
# Guidance passes beyond CFG's two branches, named as diffusers' guiders name their
# predictions ("pred_cond_stg" -> "cond_stg"): each runs the conditional prompt through a
# perturbed denoiser — spatio-temporal guidance's skipped blocks (LTX-2), LTX-2's
# modality isolation (no audio-video cross-attention), skip-layer / perturbed-attention
# guidance, smoothed energy guidance. They are stored as branches of their own.
GUIDANCE_BRANCHES: tuple[str, ...] = ("cond_stg", "cond_modality", "cond_skip", "cond_seg")
# Every branch a call can be keyed by; a branch's index here is its reservoir code.
ALL_BRANCHES: tuple[str, ...] = BRANCHES + GUIDANCE_BRANCHES


@dataclass(frozen=True)
class DenoiserCall:
    """What one denoiser call computes.

    Attributes:
        timestep: the timestep value of the call: the scheduler step's. When the call
            carries one timestep per frame or per token (image-to-video conditioning
            frames, Wan 2.2 TI2V's ``expand_timesteps``, diffusion forcing), the largest of
            them, the step's noise level.
        branches: one branch name per equal chunk along dim 0 of every layer input:
            ("uncond", "cond") for a batched CFG call, else one of ``ALL_BRANCHES``
            (a guidance pass such as LTX-2's "cond_stg" is a branch of its own).
        sample_ids: global ids of the samples in each chunk (the same for every chunk).
        expert: which denoiser ran the call: its pipeline attribute ("transformer_2")
            when the tracker hooks several experts, "" for a single denoiser.
        token_timesteps: (samples, tokens) timestep of every video token of a chunk when
            they are not all ``timestep``, else None.
        voxel_timesteps: (samples, frames * height * width) timestep of every voxel of a
            5-D latent input (B, C, frames, height, width), frame-major as a channel-last
            conv input's rows (the patch embedding's), when they are not all
            ``timestep``, else None (also for a packed-token input).
        entry_timesteps: (samples, entries) the call's timestep argument of a chunk, one
            entry per frame or per token, when they are not all ``timestep``, else None:
            the rows a time-embedding layer embeds.

    Layer hooks leave out the rows at another noise level than ``timestep``
    (``other_level_rows``).
    """

    timestep: float
    branches: tuple[str, ...]
    sample_ids: tuple[int, ...]
    expert: str = ""
    token_timesteps: torch.Tensor | None = None
    voxel_timesteps: torch.Tensor | None = None
    entry_timesteps: torch.Tensor | None = None


def other_level_rows(call: Any, rows: int, *, role: str | None = None) -> torch.Tensor | None:
    """Which rows of a layer input are at another noise level than the step's.

    A layer's rows per sample are matched, in this order, against the video tokens
    (``call.token_timesteps``), the latent voxels of a 5-D input
    (``call.voxel_timesteps``: the patch embedding) and, for a ``time_emb`` layer only,
    the entries of the timestep argument (``call.entry_timesteps``: one time-embedding
    row per frame or per token). Any other layer, a text layer whose length happens to
    equal the frame count included, is never masked by the timestep's entries.

    Args:
        call: the current ``DenoiserCall`` (or any object with a ``timestep``).
        rows: rows per sample of the layer input (``hooks.channel_last_rows``).
        role: the layer's role (models/family.py ROLES), or None when unknown.

    Returns:
        (samples, rows) bool, True where the row is at another level, when the call has
        per-frame or per-token timesteps and the layer's rows are one of the above; else
        None (the whole input belongs to the step).
    """
    candidates = [getattr(call, "token_timesteps", None), getattr(call, "voxel_timesteps", None)]
    if role == "time_emb":
        candidates.append(getattr(call, "entry_timesteps", None))
    for per_row in candidates:
        if per_row is not None and per_row.shape[1] == rows:
            return per_row != call.timestep
    return None


# diffusers' ``cache_context`` names of a denoiser call and the branches of its batch:
# one branch, or [uncond, cond] for a doubled batch ("cond_uncond"). LTX2Pipeline names its
# spatio-temporal and modality-isolation passes by the delta they give ("uncond_stg",
# "uncond_modality"), though both attend to the prompt: the guiders' "pred_cond_stg" and
# "pred_cond_modality" for the same passes. Pipelines driven by a diffusers guider
# (HunyuanVideo-1.5, Motif-Video) name the calls by the guider's predictions.
CACHE_CONTEXT_BRANCHES: dict[str, tuple[str, ...]] = {
    "cond": ("cond",),
    "uncond": ("uncond",),
    "cond_uncond": BRANCHES,
    "uncond_stg": ("cond_stg",),
    "uncond_modality": ("cond_modality",),
    "pred_cond": ("cond",),
    "pred_uncond": ("uncond",),
    **{f"pred_{branch}": (branch,) for branch in GUIDANCE_BRANCHES},
}


@functools.cache
def _cache_context_hook_class() -> type:
    """A stateful diffusers ``ModelHook`` that only remembers the current cache context.

    diffusers pipelines wrap each denoiser call in ``model.cache_context(name)``, which
    hands the context to every stateful hook registered on the model (its cache hooks);
    registering this one is how the tracker learns the name (diffusers' own hook API).
    """
    from diffusers.hooks import ModelHook
    from diffusers.hooks.hooks import StateManager

    class ContextState:
        def reset(self, *args: Any, **kwargs: Any) -> None:
            pass

    class CacheContextHook(ModelHook):
        _is_stateful = True

        def __init__(self) -> None:
            super().__init__()
            self.state = StateManager(ContextState)

        @property
        def name(self) -> str | None:
            context = self.state._context
            return None if context is None else context.name

        def reset_state(self, module: nn.Module) -> nn.Module:
            return module

    return CacheContextHook


class CallTracker:
    """Pre-forward hook on the denoiser that publishes a ``DenoiserCall`` per call.

    The sampler announces the samples of the current batch with ``batch(ids)`` and,
    when it runs the CFG branches as separate forwards, the branch with ``branch(name)``.
    A diffusers pipeline names the branch of each call with the denoiser's
    ``cache_context("cond" / "uncond" / "cond_uncond")`` where it uses one; otherwise its
    calls are recognised: a doubled batch with one timestep is [uncond, cond]; a single
    batch is the branch whose text states it attends to, when the pipeline run announced
    them (``branch_states``: the prompt's and the negative prompt's encoding), which tells
    apart two calls per step; else "cond" (one call per step: CFG off, or a
    guidance-distilled model). A call that none of these keys (a batch of another size, an
    unknown context name, a second unnamed call of the same branch at the same timestep in
    one ``batch`` block — two calls per step that only their order would tell apart — a
    doubled batch at two timesteps) raises ``UserError`` saying why: no call goes
    unrecorded.

    Args:
        denoiser: the denoiser, or expert name -> denoiser for a pipeline with several
            experts (``LoadedModel.experts``): every one is hooked, and each call says
            which expert ran it.
    """

    def __init__(self, denoiser: nn.Module | Mapping[str, nn.Module]):
        self.experts: dict[str, nn.Module] = (
            {"": denoiser} if isinstance(denoiser, nn.Module) else dict(denoiser)
        )
        if not self.experts:
            raise ValueError("a CallTracker needs at least one denoiser")
        self.denoiser = next(iter(self.experts.values()))
        self.current: DenoiserCall | None = None
        self._sample_ids: tuple[int, ...] = (0,)
        self._branch = "cond"
        self._announced = False
        self._handle = None
        self._context_hooks: dict[str, Any] = {}
        # Depth of ``batch`` blocks: unnamed calls are checked only inside a sampling run.
        self._batches = 0
        # (expert, timestep tensor, branches keyed so far) of the step of the last unnamed
        # single-batch call of this batch.
        self._last_unnamed: tuple[str, torch.Tensor, set[str]] | None = None
        # Branch -> text states its calls get, announced by ``branch_states``: a callable
        # until the first unnamed call needs them, then its result.
        self._branch_states: Callable[[], Mapping[str, Any]] | Mapping[str, Any] | None = None

    def attach(self) -> CallTracker:
        if self._handle is None:
            self._handle = [
                module.register_forward_pre_hook(
                    functools.partial(self._pre_hook, expert=expert), with_kwargs=True
                )
                for expert, module in self.experts.items()
            ]
            self._attach_context_hooks()
        return self

    def detach(self) -> None:
        if self._handle is not None:
            for handle in self._handle:
                handle.remove()
            self._handle = None
            self._detach_context_hooks()
        self.current = None

    def _attach_context_hooks(self) -> None:
        from diffusers.hooks import HookRegistry

        hook_class = _cache_context_hook_class()
        for expert, module in self.experts.items():
            if not callable(getattr(module, "cache_context", None)):
                continue  # a model without diffusers' CacheMixin has no cache context
            registry = HookRegistry.check_if_exists_or_initialize(module)
            hook = hook_class()
            registry.register_hook(hook, self._hook_name)
            self._context_hooks[expert] = hook

    def _detach_context_hooks(self) -> None:
        for expert in self._context_hooks:
            module = self.experts[expert]
            module._diffusers_hook.remove_hook(self._hook_name, recurse=False)
            # With its last hook removed diffusers leaves the module's own bound forward
            # as an instance attribute: drop it, so that the module is as it was.
            forward = vars(module).get("forward")
            if (
                getattr(forward, "__func__", None) is type(module).forward
                and forward.__self__ is module
            ):
                del vars(module)["forward"]
        self._context_hooks = {}

    @property
    def _hook_name(self) -> str:
        return f"qvd_bench_cache_context_{id(self)}"

    def hooks(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of the denoisers this tracker hooks."""
        return any(module is expert for expert in self.experts.values())

    @contextlib.contextmanager
    def batch(self, sample_ids: Sequence[int]) -> Iterator[None]:
        """Announces the global ids of the samples the next calls compute."""
        previous = self._sample_ids
        self._sample_ids = tuple(int(i) for i in sample_ids)
        self._last_unnamed = None
        self._batches += 1
        try:
            yield
        finally:
            self._sample_ids = previous
            self._last_unnamed = None
            self._batches -= 1

    @contextlib.contextmanager
    def branch_states(self, encode: Callable[[], Mapping[str, Any]]) -> Iterator[None]:
        """Announces how the unnamed single-batch calls of a pipeline run are keyed.

        Args:
            encode: returns branch name -> the text states (``encoder_hidden_states``,
                (1, tokens, dim)) the pipeline gives that branch's calls, or None where
                unknown: ``{"cond": encoding of the prompt, "uncond": of the negative
                prompt}``. Called at most once, at the first unnamed single-batch call
                (pipelines that name their calls with ``cache_context`` never need it).
        """
        previous = self._branch_states
        self._branch_states = encode
        try:
            yield
        finally:
            self._branch_states = previous

    @contextlib.contextmanager
    def branch(self, name: str) -> Iterator[None]:
        """Announces the branch of the next (unbatched) calls."""
        if name not in ALL_BRANCHES:
            raise ValueError(f"branch must be one of {ALL_BRANCHES}, got {name!r}")
        previous = self._branch, self._announced
        self._branch, self._announced = name, True
        try:
            yield
        finally:
            self._branch, self._announced = previous

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict, *, expert: str = "") -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is None:
            raise UserError(
                f"a call of {type(module).__name__} cannot be keyed: it has no timestep argument"
            )
        batch = sample.shape[0]
        n = len(self._sample_ids)
        entries = _timestep_entries(timestep, batch)
        hook = self._context_hooks.get(expert)
        context = hook.name if hook is not None else None
        branches = self._branches(context, batch, n, entries, expert, args, kwargs)
        chunk = entries[:n]
        step = float(chunk.max())
        token_timesteps = voxel_timesteps = entry_timesteps = None
        if entries.shape[1] > 1 and not bool((entries == step).all()):
            token_timesteps, voxel_timesteps = _row_timesteps(module, sample, chunk)
            entry_timesteps = chunk
        self.current = DenoiserCall(
            step,
            branches,
            self._sample_ids,
            expert,
            token_timesteps,
            voxel_timesteps,
            entry_timesteps,
        )

    def _branches(
        self,
        context: str | None,
        batch: int,
        n: int,
        entries: torch.Tensor,
        expert: str,
        args: tuple = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[str, ...]:
        """The CFG branches of a call's batch (see the class docstring)."""
        where = f"a denoiser call of batch {batch} for {n} sample(s)"
        if context is not None:
            if context not in CACHE_CONTEXT_BRANCHES:
                raise UserError(
                    f"{where} in cache_context {context!r} cannot be keyed: qvd-bench keys "
                    f"the cache contexts {', '.join(CACHE_CONTEXT_BRANCHES)}; turn that "
                    "guidance pass off through the pipeline call's arguments (pipeline_kwargs)"
                )
            branches = CACHE_CONTEXT_BRANCHES[context]
            if context == "cond_uncond" and batch == n:
                return ("cond",)  # CFG off: the conditional batch alone
            if batch != len(branches) * n:
                raise UserError(f"{where} in cache_context {context!r} cannot be keyed")
            if len(branches) == 2:
                _check_one_timestep(entries, n, where)
            return branches
        if batch == 2 * n:
            _check_one_timestep(entries, n, where)
            return BRANCHES
        if batch != n:
            raise UserError(f"{where} cannot be keyed: neither one nor two (CFG) per sample")
        if self._announced or not self._batches:
            # Announced by the sampler, or a direct call outside any sampling run.
            return (self._branch,)
        branch, why = self._branch_of_states(_text_states(args, kwargs or {}))
        last = self._last_unnamed
        if last is not None and last[0] == expert and torch.equal(last[1], entries):
            if branch in last[2]:
                raise UserError(
                    f"two denoiser calls at timestep {float(entries.max()):g} without a "
                    f"cache_context cannot be keyed: {why}; a pipeline running the CFG "
                    "branches as two calls per step must name them with the denoiser's "
                    "cache_context or give them the prompt's and the negative prompt's states"
                )
            last[2].add(branch)
        else:
            self._last_unnamed = (expert, entries, {branch})
        return (branch,)

    def _branch_of_states(self, states: torch.Tensor | None) -> tuple[str, str]:
        """The branch of an unnamed single-batch call from the text states it attends to.

        Returns:
            (branch, why): the one branch whose announced states equal ``states``, or
            "cond" and why the states do not tell (said if a second call of the step is
            keyed "cond" too).
        """
        if callable(self._branch_states):
            self._branch_states = dict(self._branch_states())
        known = {b: s for b, s in (self._branch_states or {}).items() if s is not None}
        if states is None or not known:
            return "cond", "the pipeline run gives no text states to tell the branches apart"
        matches = [b for b, reference in known.items() if _same_states(states, reference)]
        if len(matches) == 1:
            return matches[0], f"both attend to the {matches[0]} branch's text states"
        if matches:
            return "cond", (
                "the prompt and the negative prompt encode to the same text states, which "
                "both calls attend to"
            )
        return "cond", (
            "their text states are neither the prompt's nor the negative prompt's encoding"
        )


def _text_states(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The text states a denoiser call attends to: its ``encoder_hidden_states`` (keyword,
    or the third positional argument as UNets take it), if a tensor."""
    states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    return states if isinstance(states, torch.Tensor) else None


def _same_states(states: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether every sample's text states in ``states`` (B, ...) are ``reference``
    (1, ...) as the pipeline passes them (cast to the call's dtype and device)."""
    reference = reference.to(states.device, states.dtype)
    if states.shape[1:] != reference.shape[1:] or reference.shape[0] != 1:
        return False
    return bool((states == reference).all())


def _timestep_entries(timestep: Any, batch: int) -> torch.Tensor:
    """The timestep argument of a call as (batch, entries) float64 on the CPU: one entry
    per sample, or one per frame or token."""
    values = torch.as_tensor(timestep).detach().to("cpu", torch.float64)
    if values.dim() == 0:
        return values.reshape(1, 1).expand(batch, 1)
    values = values.reshape(values.shape[0], -1)
    if values.shape[0] == 1 and batch > 1:
        values = values.expand(batch, -1)
    if values.shape[0] != batch:
        raise UserError(
            f"a denoiser call cannot be keyed: {values.shape[0]} timesteps for a batch of {batch}"
        )
    return values


def _check_one_timestep(entries: torch.Tensor, n: int, where: str) -> None:
    if not torch.equal(entries[:n], entries[n:]):
        raise UserError(
            f"{where} cannot be keyed: its two halves (CFG branches) are at different timesteps"
        )


def _row_timesteps(
    module: nn.Module, sample: torch.Tensor, entries: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token and per-voxel timesteps of a call whose timestep has one entry per token,
    or per latent frame.

    A token covers patch_t x patch_h x patch_w voxels of the latent; a frame's entry
    covers all its tokens and voxels. Both are frame-major, as the transformers patchify
    and as a conv input's channel-last rows run.

    Args:
        module: the denoiser (its ``config.patch_size`` / ``patch_size_t``).
        sample: its latent input: (B, C, frames, height, width), or packed tokens
            (B, tokens, C).
        entries: (samples, entries) the timestep argument of one chunk.

    Returns:
        (samples, tokens) timesteps of the video tokens, and (samples, frames * height *
        width) of the latent voxels of a 5-D input (None for packed tokens, or for
        per-token entries whose patches do not tile the latent).

    Raises:
        UserError: entries that match neither the frames nor the tokens of the input.
    """
    samples, per_sample = entries.shape
    if sample.dim() == 3 and sample.shape[1] == per_sample:
        return entries, None  # packed tokens (LTX-Video): one timestep per token
    if sample.dim() == 5:
        config = getattr(module, "config", None)
        patch = getattr(config, "patch_size", 1) or 1
        patch_t, patch_h, patch_w = (
            tuple(patch) if isinstance(patch, (tuple, list)) else (1, patch, patch)
        )
        patch_t = getattr(config, "patch_size_t", None) or patch_t
        _, _, frames, height, width = sample.shape
        grid = (frames // patch_t, height // patch_h, width // patch_w)
        tokens = grid[0] * grid[1] * grid[2]
        if per_sample == tokens:
            voxels = None
            if (grid[0] * patch_t, grid[1] * patch_h, grid[2] * patch_w) == (frames, height, width):
                voxels = entries.reshape(samples, *grid)
                for axis, size in enumerate((patch_t, patch_h, patch_w), start=1):
                    voxels = voxels.repeat_interleave(size, dim=axis)
                voxels = voxels.reshape(samples, -1)
            return entries, voxels
        if per_sample in (frames, grid[0]):
            # One entry per latent frame (or per frame of tokens, patch_t frames each).
            frames_per_entry = frames // per_sample
            voxels = None
            if frames_per_entry * per_sample == frames:
                voxels = entries.repeat_interleave(frames_per_entry * height * width, dim=1)
            return entries.repeat_interleave(tokens // per_sample, dim=1), voxels
    raise UserError(
        f"a denoiser call cannot be keyed: {per_sample} timesteps per sample match neither "
        f"the frames nor the tokens of its input of shape {tuple(sample.shape)}"
    )


# ---------------------------------------------------------------------------------------
# Minimal sampler: a diffusers scheduler loop around ``Family.forward``.

# Noise schedule of the latent video diffusion models (ModelScope T2V, AnimateDiff, ...).
_DIFFUSION_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
SCHEDULERS: tuple[str, ...] = ("ddim", "euler", "flow-euler")


def make_scheduler(name: str, prediction_type: str):
    """A fresh diffusers scheduler for a family's prediction type.

    Args:
        name: "ddim", "euler" or "flow-euler". Flow-prediction families always get
            "flow-euler" (the other two cannot integrate a flow).
        prediction_type: "epsilon", "v_prediction" or "flow".
    """
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r} (known: {', '.join(SCHEDULERS)})")
    if prediction_type == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    if name == "flow-euler":
        raise UserError(f"scheduler 'flow-euler' needs a flow model, not {prediction_type}")
    if name == "euler":
        return EulerDiscreteScheduler(**_DIFFUSION_SCHEDULE, prediction_type=prediction_type)
    return DDIMScheduler(
        **_DIFFUSION_SCHEDULE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


@dataclass(frozen=True)
class StepOutput:
    """What one sampling step computed (for fidelity measurements).

    Attributes:
        index: the step, 0-based.
        timestep: the scheduler timestep, a 0-d tensor.
        latents: the sampler's latents x_t before the step, (B, ...).
        model_input: what the denoiser saw (``latents`` after ``scale_model_input``).
        uncond: the unconditional prediction, or None without CFG.
        cond: the conditional prediction.
        prediction: the output the scheduler steps with (after CFG combination).
    """

    index: int
    timestep: torch.Tensor
    latents: torch.Tensor
    model_input: torch.Tensor
    uncond: torch.Tensor | None
    cond: torch.Tensor
    prediction: torch.Tensor


def sample_seed(seed: int, sample_id: int, stream: int = 0) -> int:
    """The seed of one sample's random draws: a function of (seed, sample id) only."""
    return int(np.random.SeedSequence([seed, sample_id, stream]).generate_state(1)[0])


def sample_denoiser(
    loaded: LoadedModel,
    text_states: torch.Tensor,
    uncond_states: torch.Tensor,
    *,
    steps: int = 10,
    guidance_scale: float = 7.5,
    seed: int = 0,
    sample_ids: Sequence[int],
    frames: int,
    height: int,
    width: int,
    tracker: CallTracker | None = None,
    scheduler: str = "ddim",
    progress: Callable[[], Any] | None = None,
    observe: Callable[[StepOutput], Any] | None = None,
    teacher_inputs: Sequence[torch.Tensor] | None = None,
    batch_cfg: bool = False,
    first_step: int = 0,
    forced_inputs: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Samples latents with a scheduler loop and classifier-free guidance.

    Each step runs the denoiser twice, uncond then cond, as separate forwards (announced
    to ``tracker`` with ``branch``), or once (cond) when ``guidance_scale <= 1``; with
    ``batch_cfg`` the two branches run as one forward on the 2B samples [uncond, cond],
    which the tracker announces as a batched CFG call. Each sample's initial noise and
    conditioning come from its own generator seeded by ``sample_seed(seed, sample_id)``,
    so its trajectory does not depend on the other samples of the batch.

    Args:
        loaded: the model.
        text_states: (B, L, D) conditional text (or image) states.
        uncond_states: (B, L, D), or (1, L, D) / (L, D) shared by the batch.
        steps: number of denoising steps (>= 1).
        guidance_scale: CFG scale; <= 1 disables guidance.
        seed: base seed of the noise.
        sample_ids: B global sample ids.
        frames, height, width: latent size.
        tracker: an attached CallTracker to announce batches and branches to.
        scheduler: "ddim" (default), "euler" or "flow-euler"; flow-prediction families
            always use the flow-matching Euler scheduler.
        progress: called with no argument after each step (e.g. ``tqdm.update``).
        observe: called after each step's denoiser calls with its ``StepOutput``.
        teacher_inputs: teacher forcing: the latents to denoise at step i are
            ``teacher_inputs[i]`` (another trajectory's, one per step) instead of this
            sampler's own; the returned latents are then of no use.
        batch_cfg: one forward per step for both CFG branches, which saves the second
            call's per-call overhead. It gives the same values up to float rounding where
            every sample is computed on its own (the denoisers here, and quantizers that
            pass ``evaluate.generate.cfg_batch_safe``). Hooks then see batched inputs:
            the tracker marks the call as CFG-batched and statistics hooks split it.
        first_step: with ``teacher_inputs``, start at this step (0-based): the earlier
            steps are known from elsewhere. ``observe`` sees only the steps run.
        forced_inputs: a teacher-forced trajectory run alongside this sampler's own, in
            the same forwards: at step i the batch is [own latents, ``forced_inputs[i]``]
            (2B samples; with ``batch_cfg``, [uncond own, uncond forced, cond own, cond
            forced]), so each forward costs less per sample than two batches of B. A step
            whose two inputs are equal (the first, from the same noise) runs once on B
            samples, its outputs repeated. ``observe`` sees 2B samples [own, forced] at
            every step. Only for models that compute every sample on its own (as for
            ``batch_cfg``); not with ``teacher_inputs``.

    Returns:
        Final latents (B, C, F, H, W) or (B, F, C, H, W), per the family's layout.
    """
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    loaded.family.check_latent_size(loaded.denoiser, frames, height, width)
    if loaded.multi_expert:
        # Each expert runs only its own timesteps, which the pipeline decides.
        raise UserError(
            f"{loaded.name} has {len(loaded.experts)} experts ({', '.join(loaded.experts)}); "
            "the minimal sampler drives one denoiser: sample with the pipeline"
        )
    family, denoiser = loaded.family, loaded.denoiser
    sample_ids = [int(i) for i in sample_ids]
    batch = len(sample_ids)
    if text_states.shape[0] != batch:
        raise ValueError(f"text_states has batch {text_states.shape[0]} for {batch} sample ids")
    parameter = next(denoiser.parameters())
    device, dtype = parameter.device, parameter.dtype
    text_states = text_states.to(device=device, dtype=dtype)
    uncond_states = uncond_states.to(device=device, dtype=dtype)
    if uncond_states.dim() == 2:
        uncond_states = uncond_states.unsqueeze(0)
    uncond_states = uncond_states.expand(batch, -1, -1)

    noise_scheduler = make_scheduler(scheduler, family.prediction_type)
    noise_scheduler.set_timesteps(steps, device=device)
    latents, conditioning = _initial_latents(loaded, seed, sample_ids, frames, height, width)
    # Flow-matching schedulers start from unit noise and take unscaled inputs.
    latents = latents * getattr(noise_scheduler, "init_noise_sigma", 1.0)
    use_cfg = guidance_scale > 1

    def branch(name: str):
        return tracker.branch(name) if tracker is not None else contextlib.nullcontext()

    if teacher_inputs is not None and len(teacher_inputs) != len(noise_scheduler.timesteps):
        raise ValueError(
            f"{len(teacher_inputs)} teacher inputs for {len(noise_scheduler.timesteps)} steps"
        )
    total = len(noise_scheduler.timesteps)
    if first_step and (teacher_inputs is None or not 0 <= first_step <= total):
        # Without teacher inputs the latents of a later step are unknown.
        raise ValueError(f"first_step {first_step} needs teacher inputs and 0 <= it <= {total}")
    if forced_inputs is not None:
        if teacher_inputs is not None:
            raise ValueError(
                "forced_inputs runs alongside a free trajectory, not a teacher-forced one"
            )
        if len(forced_inputs) != total:
            raise ValueError(f"{len(forced_inputs)} forced inputs for {total} steps")

    def denoise(model_input: torch.Tensor, t: torch.Tensor, copies: int):
        """(uncond or None, cond) of ``model_input``: ``copies`` trajectories of the batch."""

        def stacked(x: torch.Tensor) -> torch.Tensor:
            return x if copies == 1 else torch.cat([x] * copies)

        n = copies * batch
        text, empty = stacked(text_states), stacked(uncond_states)
        extra = {key: stacked(value) for key, value in conditioning.items()}
        if use_cfg and batch_cfg:
            both = family.forward(
                denoiser,
                torch.cat([model_input, model_input]),
                t.expand(2 * n),
                torch.cat([empty, text]),
                {key: torch.cat([value, value]) for key, value in extra.items()},
            )
            return both.chunk(2)
        uncond = None
        if use_cfg:
            with branch("uncond"):
                uncond = family.forward(denoiser, model_input, t.expand(n), empty, extra)
        with branch("cond"):
            return uncond, family.forward(denoiser, model_input, t.expand(n), text, extra)

    def scaled(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if hasattr(noise_scheduler, "scale_model_input"):
            return noise_scheduler.scale_model_input(latents, t)
        return latents

    with torch.no_grad():
        for index, t in enumerate(noise_scheduler.timesteps):
            if index < first_step:
                continue
            if teacher_inputs is not None:
                latents = teacher_inputs[index].to(device=device, dtype=dtype)
            step_latents, copies = latents, 1
            if forced_inputs is not None:
                forced = forced_inputs[index].to(device=device, dtype=dtype)
                if not torch.equal(forced, latents):
                    step_latents, copies = torch.cat([latents, forced]), 2
            model_input = scaled(step_latents, t)
            # Announced per step: a step runs one or two copies of the batch.
            ids = sample_ids * copies
            with tracker.batch(ids) if tracker is not None else contextlib.nullcontext():
                uncond, cond = denoise(model_input, t, copies)
            prediction = cond
            if use_cfg:
                prediction = uncond + guidance_scale * (cond - uncond)
            if forced_inputs is not None and copies == 1:  # the step ran once for both
                step_latents, model_input, prediction, cond = (
                    torch.cat([x, x]) for x in (step_latents, model_input, prediction, cond)
                )
                uncond = None if uncond is None else torch.cat([uncond, uncond])
            if observe is not None:
                observe(StepOutput(index, t, step_latents, model_input, uncond, cond, prediction))
            latents = noise_scheduler.step(prediction[:batch], t, latents, return_dict=False)[0]
            if progress is not None:
                progress()
    return latents


def _initial_latents(
    loaded: LoadedModel,
    seed: int,
    sample_ids: Sequence[int],
    frames: int,
    height: int,
    width: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample noise (B, ...) and conditioning, each sample from its own generators."""
    family, denoiser = loaded.family, loaded.denoiser
    parameter = next(denoiser.parameters())
    shape = family.latent_shape(denoiser, 1, frames, height, width)
    noises, conditionings = [], []
    for sample_id in sample_ids:
        # Drawn on the CPU so that values do not depend on the device.
        noise_generator = torch.Generator().manual_seed(sample_seed(seed, sample_id, 0))
        noises.append(torch.randn(shape, generator=noise_generator))
        condition_generator = torch.Generator().manual_seed(sample_seed(seed, sample_id, 1))
        conditionings.append(
            family.conditioning(denoiser, 1, frames, height, width, generator=condition_generator)
        )
    latents = torch.cat(noises).to(device=parameter.device, dtype=parameter.dtype)
    conditioning = {key: torch.cat([c[key] for c in conditionings]) for key in conditionings[0]}
    return latents, conditioning


def text_states_for_prompts(
    loaded: LoadedModel, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic pseudo text embeddings for a bare denoiser without a text encoder.

    Each prompt's embedding is standard normal noise from a generator seeded by the
    CRC-32 of the prompt, so equal prompts get equal embeddings in every run. A model
    whose conditioning is known (``loaded.encode_prompts``, a trained zoo model) gets its
    own text encoder's states instead.

    Returns:
        (cond, uncond), each (N, L, D) with (L, D) = ``family.text_embedding_shape``;
        uncond is the embedding of the empty prompt, repeated.
    """
    if loaded.encode_prompts is not None:
        return loaded.encode_prompts(prompts)
    family, denoiser = loaded.family, loaded.denoiser
    parameter = next(denoiser.parameters())
    shape = family.text_embedding_shape(denoiser)

    def embed(prompt: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode("utf-8")))
        return torch.randn(shape, generator=generator)

    cond = torch.stack([embed(prompt) for prompt in prompts])
    uncond = embed("").unsqueeze(0).expand(len(prompts), -1, -1).clone()
    move = {"device": parameter.device, "dtype": parameter.dtype}
    return cond.to(**move), uncond.to(**move)
