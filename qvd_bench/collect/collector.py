"""A whole collection run: model -> hooks -> accumulators -> store.

Samples run one prompt at a time, each from its own seeded noise, so a sample's
statistics do not depend on which process or batch computed it; after each sample the
accumulators are checkpointed, and a rerun with the same config resumes after the last
finished sample. Under ``torchrun`` the prompts are sharded across processes and the
accumulators merged with torch.distributed before rank 0 writes the run.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import re
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qvd_bench import store
from qvd_bench.collect import distributed
from qvd_bench.collect.accumulator import RowCount
from qvd_bench.collect.attention import ATTENTION_TENSORS, AttentionStats
from qvd_bench.collect.checkpoint import CollectCheckpoints
from qvd_bench.collect.cost import (
    DEFAULT_TIMESTEP_GROUPS,
    DEVICE_STATE_BYTES,
    LARGE_STATE_BYTES,
    CostEstimate,
    StepFolder,
    estimate_cost,
    grouped_timesteps,
    rows_per_call,
    state_bytes,
)
from qvd_bench.collect.histogram import Histogram
from qvd_bench.collect.hooks import (
    LayerInfo,
    StatsCollector,
    capture_temporal_features,
    describe_layer,
)
from qvd_bench.collect.moments import ChannelMoments
from qvd_bench.collect.reservoir import Reservoir
from qvd_bench.collect.temporal import TemporalFeatures
from qvd_bench.config import CollectConfig
from qvd_bench.errors import UserError
from qvd_bench.models import roles as roles_module
from qvd_bench.models import sampling, zoo
from qvd_bench.models.family import ROLES, LoadedModel, split_layer_name
from qvd_bench.models.pipelines import resolve_sampler, sampling_record, step_guidance
from qvd_bench.models.sampling import ALL_BRANCHES, BRANCHES, CallTracker
from qvd_bench.numerics.edges import SignedLogEdges
from qvd_bench.numerics.moments import weight_channel_stats
from qvd_bench.resources import measure_stage

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class CollectSummary:
    """What a collection run wrote, for the one-screen summary."""

    run_dir: Path
    model: str
    weights_note: str
    layers: int
    roles: dict[str, int]
    timesteps: int
    samples: int
    resumed: int
    bytes_on_disk: int
    raw_activation_bytes: int
    stages: list[dict] = field(default_factory=list)  # StageCost.to_dict() of each stage


def select_layers(
    loaded: LoadedModel, config: CollectConfig
) -> tuple[dict[str, torch.nn.Module], dict[str, LayerInfo]]:
    """The leaf layers to hook: by role, then by include / exclude name patterns."""
    for role in config.roles:
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    decisions = roles_module.classify(loaded)
    layers, infos = {}, {}
    for name, module in roles_module.leaf_layers(loaded.layer_root).items():
        decision = decisions[name]
        if config.roles and decision.role not in config.roles:
            continue
        if config.include and not any(re.search(p, name) for p in config.include):
            continue
        if any(re.search(p, name) for p in config.exclude):
            continue
        layers[name] = module
        infos[name] = describe_layer(name, module, decision.role, decision.decided_by)
    if not layers:
        raise UserError("no layer matches the selected roles and name patterns")
    return layers, infos


def timestep_grid(stride: int) -> list[float]:
    """The grid of training timesteps on which temporal features are captured."""
    return [float(t) for t in range(0, NUM_TRAIN_TIMESTEPS, stride)]


def run_sample(
    loaded: LoadedModel,
    prompt: str,
    sample_id: int,
    config: CollectConfig,
    tracker: CallTracker,
    on_step: Callable[[], None] | None,
) -> torch.Tensor:
    """Samples one prompt through the pipeline or the minimal denoiser loop."""
    use_pipeline = resolve_sampler(loaded, config.sampler) == "pipeline"
    common = dict(
        steps=config.steps,
        guidance_scale=config.guidance_scale,
        seed=config.seed,
        sample_ids=[sample_id],
        frames=config.frames,
        height=config.height,
        width=config.width,
        tracker=tracker,
        progress=on_step,
    )
    if use_pipeline:
        from qvd_bench.models.pipelines import run_pipeline

        return run_pipeline(
            loaded,
            [prompt],
            **common,
            negative_prompt=config.extra.get("negative_prompt"),
            pipeline_kwargs=config.extra.get("pipeline_kwargs"),
        )
    cond, uncond = sampling.text_states_for_prompts(loaded, [prompt])
    return sampling.sample_denoiser(loaded, cond, uncond, **common)


def collect(
    config: CollectConfig,
    run_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool | Any = True,
    checkpoint_every: float = 60.0,
    on_estimate: Callable[[CostEstimate], None] | None = None,
    loaded: LoadedModel | None = None,
    device_state_limit: int = DEVICE_STATE_BYTES,
) -> CollectSummary:
    """Collects statistics of a model's layer inputs while it samples, and stores them.

    Args:
        config: what to collect.
        run_dir: where the run goes (``stats/<name>``).
        overwrite: replace an existing run.
        progress: show a progress bar over sampling steps; or a bar of the caller's (an
            object with tqdm's ``update``) that every sampling step advances by one.
        checkpoint_every: seconds between checkpoint writes (after a finished sample);
            0 writes one after every sample. A KeyboardInterrupt while sampling saves the
            finished samples (``CollectCheckpoints``) and is raised again as
            ``Interrupted``, which says what was saved.
        on_estimate: called with the ``CostEstimate`` of the run before any sampling.
        loaded: the model, already in memory (e.g. ``zoo.pipeline_model`` of a pipeline
            object, or a pipeline with offloading enabled), used as it is instead of
            loading ``config.model``, which then only names it; its device and dtype are
            its own.
        device_state_limit: bytes of per-key statistics kept on an accelerator between
            sampling steps; above it they move to host memory (``cost.StepFolder``).

    Returns:
        A summary of what was written.
    """
    run_dir = Path(run_dir)
    rank, world = distributed.rank_and_world(config.device)
    if rank == 0:
        store.check_writable(run_dir, overwrite=overwrite)
    torch.manual_seed(config.seed)
    stages = []  # what each stage cost, for the manifest
    with measure_stage("load", config.device) as stage:
        if loaded is None:
            loaded = zoo.load_model(
                config.model,
                weight_seed=config.weight_seed,
                disparity=config.disparity,
                asymmetry=config.asymmetry,
                device=config.device,
                dtype=DTYPES[config.dtype],
            )
    stages.append(stage)
    for denoiser in loaded.experts.values():
        denoiser.eval()
        loaded.family.check_latent_size(denoiser, config.frames, config.height, config.width)
    layers, infos = select_layers(loaded, config)
    tracker = CallTracker(loaded.experts).attach()
    edges = (
        SignedLogEdges(relative_error=config.histogram_relative_error)
        if config.histograms
        else None
    )
    collector = StatsCollector(
        layers,
        infos,
        tracker,
        outputs=config.outputs,
        histogram_edges=edges,
        histogram_stride=config.histogram_stride,
        reservoir_capacity=config.reservoir_capacity,
        seed=config.seed,
    )
    attention = None
    if config.attention:
        attention = AttentionStats(
            loaded.layer_root,
            tracker,
            histogram_edges=edges,
            histogram_stride=config.histogram_stride,
        )
    groups = config.timestep_groups
    estimate = collection_cost(loaded, config, list(infos.values()), attention, groups or 0)
    if groups is None:  # by default, per timestep unless that state is too large
        groups = 0
        if estimate.accumulator_bytes > LARGE_STATE_BYTES:
            groups = min(DEFAULT_TIMESTEP_GROUPS, config.steps)
            estimate = collection_cost(
                loaded, config, list(infos.values()), attention, groups, by_default=True
            )
    if on_estimate is not None and rank == 0:
        on_estimate(estimate)
    folder = StepFolder(
        config.steps,
        groups if groups < config.steps else 0,
        None if torch.device(config.device).type == "cpu" else device_state_limit,
    )

    def after_step() -> None:
        bar.update(1)
        collector.flush()
        folder.after_step(
            [collector.moments, collector.histograms]
            + ([attention.moments, attention.histograms] if attention is not None else []),
            tracker.current.timestep,
        )

    fingerprint = {**config.to_dict(), "rank": rank, "world": world}
    factories = {
        "moments": ChannelMoments.from_state_dict,
        "histograms": Histogram.from_state_dict,
        "reservoirs": Reservoir.from_state_dict,
        "attention": ChannelMoments.from_state_dict,
        "attention_histograms": Histogram.from_state_dict,
        "excluded_rows": RowCount.from_state_dict,
        "attention_excluded_rows": RowCount.from_state_dict,
    }
    done: set[int] = set()
    checkpoint = store.load_checkpoint(run_dir, fingerprint, factories)
    if checkpoint is not None:
        done, groups = checkpoint
        collector.moments = groups["moments"]
        collector.histograms = groups["histograms"]
        collector.reservoirs = groups["reservoirs"]
        collector.excluded_rows = groups.get("excluded_rows", {})
        if attention is not None:
            attention.moments = groups.get("attention", {})
            attention.histograms = groups.get("attention_histograms", {})
            attention.excluded_rows = groups.get("attention_excluded_rows", {})
    mine = [i for i in range(len(config.prompts)) if i % world == rank]
    todo = [i for i in mine if i not in done]
    if isinstance(progress, bool):
        bar = tqdm(
            total=len(mine) * config.steps,
            initial=(len(mine) - len(todo)) * config.steps,
            desc=f"collect {config.model}",
            unit="step",
            disable=not progress or rank != 0,
        )
    else:  # the caller's bar, which counts the whole collection
        bar = progress
        if hasattr(bar, "unpause"):  # its rate starts here: loading the model is not sampling
            bar.unpause()
        bar.update((len(mine) - len(todo)) * config.steps)
    checkpoints = CollectCheckpoints(
        run_dir,
        fingerprint,
        checkpoint_every,
        lambda: {
            "moments": collector.moments,
            "histograms": collector.histograms,
            "reservoirs": collector.reservoirs,
            "attention": attention.moments if attention else {},
            "attention_histograms": attention.histograms if attention else {},
            "excluded_rows": collector.excluded_rows,
            "attention_excluded_rows": attention.excluded_rows if attention else {},
        },
        saved=done,
    )
    try:
        with (
            measure_stage("sample", config.device) as stage,
            collector,
            attention or contextlib.nullcontext(),
            torch.no_grad(),
        ):
            for sample_id in todo:
                run_sample(
                    loaded,
                    config.prompts[sample_id],
                    sample_id,
                    config,
                    tracker,
                    after_step,
                )
                done.add(sample_id)
                collector.flush()
                checkpoints.finished(done)
    except KeyboardInterrupt:
        raise checkpoints.interrupted(len(mine)) from None
    finally:
        if isinstance(progress, bool):
            bar.close()
        tracker.detach()
    stages.append(stage)

    with measure_stage("finish", config.device) as stage:
        temporal_layers = [name for name, info in infos.items() if info.role == "time_emb"]
        temporal: dict[str, TemporalFeatures] = {}
        if config.temporal_stride and temporal_layers and rank == 0:
            temporal = temporal_features(
                loaded, temporal_layers, timestep_grid(config.temporal_stride)
            )
        weights = {
            name: weight_channel_stats(module.weight.detach().reshape(module.weight.shape[0], -1))
            for name, module in layers.items()
        }
        moments = distributed.merge_across_processes(collector.moments)
        histograms = distributed.merge_across_processes(collector.histograms)
        reservoirs = distributed.merge_across_processes(collector.reservoirs)
        excluded_rows = distributed.merge_across_processes(collector.excluded_rows)
        attention_moments = attention_histograms = None
        attention_excluded: dict[str, RowCount] = {}
        if attention is not None:
            attention_moments = distributed.merge_across_processes(attention.moments)
            attention_histograms = distributed.merge_across_processes(attention.histograms)
            attention_excluded = distributed.merge_across_processes(attention.excluded_rows)
    stages.append(stage)
    if rank != 0:
        return None  # type: ignore[return-value]

    manifest = build_manifest(
        loaded,
        config,
        infos,
        moments,
        edges,
        world,
        excluded_rows={name: int(count) for name, count in excluded_rows.items()},
    )
    if folder.groups:
        # The timesteps whose statistics each stored timestep holds.
        manifest["timestep_groups"] = {
            "groups": folder.groups,
            "by_default": config.timestep_groups is None,
            "members": {str(t): members for t, members in folder.members.items()},
        }
    measured = {
        "moments": state_bytes(moments),
        "histograms": state_bytes(histograms),
        "reservoirs": state_bytes(reservoirs),
        "temporal": state_bytes(temporal),
        "attention": state_bytes(attention_moments or {}) + state_bytes(attention_histograms or {}),
    }
    manifest["cost"] = {
        "estimate": estimate.to_dict(),
        "measured": {"accumulator_bytes": sum(measured.values()), "accumulator_parts": measured},
        # Wall time and peak memory of this process's stages (a resumed run: this part).
        "stages": [cost.to_dict() for cost in stages],
    }
    if attention is not None:
        manifest["attention"] = {
            "modules": attention.modules,
            "tensors": list(ATTENTION_TENSORS),
            "statistics": "per tensor, as the attention matmuls read them",
            # Token rows (of every head) left out as at another noise level than their
            # step: of the queries for q and the softmax, of the keys for k and v.
            "excluded_rows": {
                name: int(count) for name, count in sorted(attention_excluded.items())
            },
        }
    store.write_run(
        run_dir,
        manifest,
        moments=moments,
        histograms=histograms,
        temporal=temporal,
        reservoirs=reservoirs,
        weights=weights,
        attention=attention_moments,
        attention_histograms=attention_histograms,
        overwrite=overwrite,
    )
    role_counts: dict[str, int] = {}
    for info in infos.values():
        role_counts[info.role] = role_counts.get(info.role, 0) + 1
    return CollectSummary(
        run_dir=run_dir,
        model=config.model,
        weights_note=weights_note(loaded),
        layers=len(infos),
        roles=role_counts,
        timesteps=len(manifest["schedule"]),
        samples=len(config.prompts),
        resumed=len(mine) - len(todo),
        bytes_on_disk=sum(p.stat().st_size for p in run_dir.iterdir() if p.is_file()),
        raw_activation_bytes=raw_activation_bytes(moments, DTYPES[config.dtype].itemsize),
        stages=manifest["cost"]["stages"],
    )


def step_branches(loaded: LoadedModel, config: CollectConfig) -> tuple[str, ...]:
    """The branches a collection's denoiser runs at each step: those of the pipeline's
    own guidance (LTX-2's guidance passes, none but "cond" for guidance-distilled
    HunyuanVideo) where it samples with the pipeline, else CFG's two or "cond" alone."""
    if resolve_sampler(loaded, config.sampler) == "pipeline":
        guidance = step_guidance(
            loaded,
            config.guidance_scale,
            negative_prompt=config.extra.get("negative_prompt"),
            pipeline_kwargs=config.extra.get("pipeline_kwargs"),
        )
        return guidance.branches
    return BRANCHES if config.guidance_scale > 1 else ("cond",)


def collection_cost(
    loaded: LoadedModel,
    config: CollectConfig,
    layers: list[LayerInfo],
    attention: AttentionStats | None,
    groups: int = 0,
    *,
    by_default: bool = False,
) -> CostEstimate:
    """``estimate_cost`` of a collection with ``config`` on the hooked ``layers``, per
    timestep or, with ``groups``, per timestep group (``by_default``: chosen by collect)."""
    steps = expert_steps(loaded, config.steps)
    if groups and groups < config.steps:
        # The first expert runs the first steps (``expert_steps``).
        first, indices = 0, {}
        for expert, count in steps.items():
            indices[expert] = range(first, first + count)
            first += count if len(steps) > 1 else 0
        steps = {
            expert: grouped_timesteps(indices[expert], config.steps, groups) for expert in steps
        }
    layer_timesteps = {
        info.name: steps[split_layer_name(info.name, loaded.experts)[0]] for info in layers
    }
    return estimate_cost(
        layers,
        layer_timesteps,
        branches=len(step_branches(loaded, config)),
        samples=len(config.prompts),
        frames=config.frames,
        outputs=config.outputs,
        histogram_bins=(
            SignedLogEdges(relative_error=config.histogram_relative_error).num_bins
            if config.histograms
            else 0
        ),
        reservoir_capacity=config.reservoir_capacity,
        temporal_grid=len(timestep_grid(config.temporal_stride)) if config.temporal_stride else 0,
        attention_timesteps=[
            steps[split_layer_name(name, loaded.experts)[0]]
            for name in (attention.modules if attention is not None else ())
        ],
        rows_per_call=rows_per_call(loaded, layers, config.frames, config.height, config.width),
        timestep_groups=groups if groups < config.steps else 0,
        grouped_by_default=by_default,
    )


def expert_steps(loaded: LoadedModel, steps: int) -> dict[str, int]:
    """Sampling steps each expert runs: all of them with one expert; with two (Wan 2.2)
    the steps whose timestep is at or above ``boundary_ratio`` × 1000 go to the first,
    the rest to the second, as the pipeline switches."""
    experts = list(loaded.experts)
    boundary = getattr(getattr(loaded.pipeline, "config", None), "boundary_ratio", None)
    if len(experts) != 2 or boundary is None:
        return dict.fromkeys(experts, steps)
    scheduler = copy.deepcopy(loaded.pipeline.scheduler)
    scheduler.set_timesteps(steps)
    high = sum(float(t) >= boundary * NUM_TRAIN_TIMESTEPS for t in scheduler.timesteps)
    return {experts[0]: high, experts[1]: steps - high}


def temporal_features(
    loaded: LoadedModel, layer_names: list[str], grid: list[float]
) -> dict[str, TemporalFeatures]:
    """``capture_temporal_features`` of each expert's layers (on the whole grid), by layer name."""
    features: dict[str, TemporalFeatures] = {}
    for expert in loaded.experts:
        own = {
            inner: name
            for name in layer_names
            for owner, inner in [split_layer_name(name, loaded.experts)]
            if owner == expert
        }
        if not own:
            continue
        captured = capture_temporal_features(loaded.expert_model(expert), list(own), grid)
        features.update({own[inner]: value for inner, value in captured.items()})
    return {name: features[name] for name in layer_names}


def timestep_experts(loaded: LoadedModel, schedule: list[float], moments: dict) -> list[list]:
    """[timestep, expert] for every expert that ran at each timestep, in schedule order.

    Read from the statistics keys: an expert ran at t where its layers have statistics.
    """
    ran: dict[float, set[str]] = {}
    for _, layer, timestep, _ in moments:
        ran.setdefault(timestep, set()).add(split_layer_name(layer, loaded.experts)[0])
    order = list(loaded.experts)
    return [
        [timestep, expert]
        for timestep in schedule
        for expert in sorted(ran[timestep], key=order.index)
    ]


def weights_note(loaded: LoadedModel) -> str:
    """ "seed 0, disparity 1.0, asymmetry 0.5" for random weights, "" for trained ones."""
    if not loaded.random_weights:
        return ""
    knobs = ", ".join(f"{k} {v:g}" for k, v in sorted(loaded.knobs.items()))
    return f"seed {loaded.weight_seed}" + (f", {knobs}" if knobs else "")


def raw_activation_bytes(moments: dict, itemsize: int) -> int:
    """Bytes the hooked inputs would take if kept raw (what Q-Diffusion-style tools store)."""
    total = 0
    for key, acc in moments.items():
        if key[0] == "input":
            state = acc.state_dict()
            total += int(state["count"].sum() + state["nan_count"].sum() + state["inf_count"].sum())
    return total * itemsize


def build_manifest(
    loaded: LoadedModel,
    config: CollectConfig,
    infos: dict[str, LayerInfo],
    moments: dict,
    edges: SignedLogEdges | None,
    world: int,
    excluded_rows: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run metadata: model, config, schedule, seeds, versions, layers, subsampling, and how
    denoiser calls were keyed (``keying``).

    Args:
        excluded_rows: input rows left out per layer (``StatsCollector.excluded_rows``).
    """
    schedule = sorted({key[2] for key in moments}, reverse=True)
    stored_branches = {key[3] for key in moments}
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": loaded.name,
            "family": loaded.family.name,
            "denoiser_class": type(loaded.denoiser).__name__,
            "parameters": loaded.param_count,
            "random_weights": loaded.random_weights,
            "trained": loaded.trained,
            "weight_seed": loaded.weight_seed,
            "knobs": loaded.knobs,
        },
        "config": config.to_dict(),
        "schedule": schedule,
        "seeds": {"sampling": config.seed, "weights": config.weight_seed},
        "sampling": sampling_record(
            loaded, config.sampler, config.seed, range(len(config.prompts))
        ),
        "prompts": list(config.prompts),
        "histogram": {
            "edges": edges.to_dict() if edges is not None else None,
            "token_stride": config.histogram_stride,
            "steps": "all",
        },
        "reservoir": {
            "capacity_per_layer": config.reservoir_capacity,
            "key": "row_key(seed, sample_id, timestep, branch, row)",
            "branches": list(ALL_BRANCHES),
        },
        "temporal": {
            "grid": f"range(0, {NUM_TRAIN_TIMESTEPS}, {config.temporal_stride})"
            if config.temporal_stride
            else None,
        },
        "keying": {
            "branches": "the denoiser's cache_context where the pipeline sets one ('cond', "
            "'uncond', 'cond_uncond', a guider's 'pred_*'; LTX-2's guidance passes "
            "'uncond_stg' and 'uncond_modality' are the branches 'cond_stg' and "
            "'cond_modality'); else a doubled batch at one timestep is [uncond, cond] and a "
            "single batch is the branch whose text states (the pipeline's encoding of the "
            "prompt or of the negative prompt) it attends to, 'cond' when one call per step "
            "cannot tell; any other call stops the run",
            "stored_branches": [b for b in ALL_BRANCHES if b in stored_branches],
            "timestep": "the scheduler step's; a call with one timestep per frame or token "
            "is keyed by the largest (the step's noise level)",
            "other_noise_levels": "excluded: rows at another noise level than their "
            "step's (an image-to-video conditioning frame, a frame diffusion forcing "
            "denoises ahead or behind) are left out of the layers whose rows are the video "
            "tokens, of those whose rows are the latent voxels (the patch embedding) and of "
            "the time-embedding layers whose rows are the per-frame or per-token timesteps",
            "excluded_rows": dict(sorted((excluded_rows or {}).items())),
        },
        "world_size": world,
        "packages": package_versions(),
        "git_revision": git_revision(),
        "layers": [asdict(info) for info in infos.values()],
    }
    if loaded.multi_expert:
        # Layer names start with the expert's pipeline attribute.
        manifest["model"]["experts"] = {
            expert: {
                "class": type(denoiser).__name__,
                "parameters": sum(p.numel() for p in denoiser.parameters()),
            }
            for expert, denoiser in loaded.experts.items()
        }
        manifest["timestep_experts"] = timestep_experts(loaded, schedule, moments)
    return manifest


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("qvd-bench", "torch", "diffusers", "transformers", "numpy", "pandas", "pyarrow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision() -> str | None:
    """The revision of the qvd-bench source tree, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
