"""The evaluation matrix: methods × bit-widths × metrics → ``results.parquet``.

For every weight seed ``evaluate``

1. takes statistics (``EvalConfig.stats``, or a collection it runs itself) and analyzes
   them (``calibration``);
2. generates the FP reference videos (free-running, every step recorded);
3. for every (bits, method): quantizes a fresh copy of the FP model with
   ``quant.apply.quantize_`` (one plan per bit-width, shared by the methods) and generates
   each prompt twice: free-running, and teacher-forced on the FP trajectory's inputs, side
   by side in one batch per step (``generate.generate_free_and_forced``; the first step,
   on the same noise in both, runs once). A configuration that quantizes no layer (``fp``)
   is the reference model, so its videos are the reference's and nothing is generated
   (``videos``, which also caches every video);
4. measures fidelity (always; ``results``) and, where their weights are given, FVD / FID /
   CLIPSIM (``metrics``);
5. keeps what each configuration's transforms and level sets changed, before → after
   (``quant.measure.transform_figures``), in ``transforms.parquet``: the figures a report's
   "why" cites. A configuration taken whole from the cache is not quantized again; its
   rows of an earlier run are kept.

Under torchrun with N processes (torch.distributed, gloo on CPU) the prompts are sharded
across the processes as ``collect`` shards them (``shard``): the collection merges its
accumulators, every process quantizes each configuration itself (deterministic, so
identically) and generates its own prompts' videos, and rank 0 gathers the per-prompt
generations, measures and writes everything. Each video is computed alone from its own
seeds and the statistics merge as ``collect``'s do (exactly with one prompt per process,
else to float64 rounding), so the numbers equal a single process's. The output root must
be one directory every process sees (one machine, or a shared filesystem): the statistics
are read back from it and each process writes its own videos into the generation cache.

The Frechet reference (``EvalConfig.reference``) is the FP generations paired by seed, or a
directory of real videos (``reference``).

The report of an evaluation is built from its results by ``report.results``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist

from qvd_bench import store
from qvd_bench.collect import distributed
from qvd_bench.errors import Interrupted
from qvd_bench.evaluate import generate as gen
from qvd_bench.evaluate.calibration import ensure_stats
from qvd_bench.evaluate.config import EvalConfig, split_bits_spec
from qvd_bench.evaluate.generate import GenerationCache
from qvd_bench.evaluate.latents import concat, video_frames
from qvd_bench.evaluate.metrics import check_protocols, groundtruth_rows, load_weight_metrics
from qvd_bench.evaluate.progress import COLLECT_STEP_COST, QUANTIZE_COST, JobBar, Weighted
from qvd_bench.evaluate.reference import load_real_videos, real_reference
from qvd_bench.evaluate.results import (
    RESULTS_FILE,
    SETTINGS_FILE,
    TIMINGS_FILE,
    free_running_rows,
    results_frame,
    teacher_forced_rows,
)
from qvd_bench.evaluate.shard import Shard
from qvd_bench.evaluate.videos import (
    FP_BITS,
    NO_VIDEO_METHODS,
    REFERENCE_METHOD,
    CachedVideos,
    LazyQuantized,
    quantized_videos,
    reference_videos,
)
from qvd_bench.models.families._common import model_device_dtype
from qvd_bench.quant.measure import transform_figures
from qvd_bench.resources import StageCost, measure_stage

# Before → after figures of each configuration's transforms (``transform_figures`` rows
# with weight_seed, method and bits).
TRANSFORMS_FILE = "transforms.parquet"
TRANSFORM_COLUMNS = ("weight_seed", "method", "bits", "layer", "role", "change", "figure",
                     "before", "after", "detail")  # fmt: skip


@dataclass
class EvalResult:
    """What an evaluation wrote.

    Attributes:
        results_dir: the results directory.
        results: the results table (``results.parquet``).
        timings: seconds per (weight_seed, method, bits) for quantization and generation.
        notices: one line per metric skipped (weights absent) or other caveat.
        stats_dirs: the statistics run of each weight seed.
        generated, cached: videos generated now / taken from the cache.
        fp_against_float32: for a model run in half precision, the free-running fidelity
            (SQNR, cosine, PSNR of the final latents) of its FP videos against the same
            model's float32 FP videos, per weight seed (``settings.json`` holds it too);
            empty in float32. Reported, never asserted: half precision does not equal
            float32.
        sampler: which sampler made the videos ("pipeline: WanPipeline" or
            "minimal sampler", ``generate.sampler_name``).
        frames: what free-running PSNR / SSIM and the network metrics see: "pipeline VAE"
            (the final latents decoded as the pipeline decodes them) or "latents mapped
            to [0, 1]" (no VAE; ``latents.VideoFrames``). ``settings.json`` records it
            as ``frames.decoded_by``.
    """

    results_dir: Path
    results: pd.DataFrame
    timings: pd.DataFrame
    notices: list[str]
    stats_dirs: dict[int, Path]
    generated: int = 0
    cached: int = 0
    fp_against_float32: dict[int, dict[str, float]] = field(default_factory=dict)
    sampler: str = ""
    frames: str = ""


def evaluate(
    config: EvalConfig, out_dir: str | Path, *, progress: bool = True, bar=None
) -> EvalResult | None:
    """Runs the methods × bit-widths × metrics matrix and writes the results.

    Under ``torchrun`` (WORLD_SIZE > 1) the prompts are sharded across the processes and
    rank 0 measures and writes (module doc); the process group is joined here when the
    caller has not, and left again at the end.

    Args:
        config: what to evaluate.
        out_dir: the output root: statistics go to ``stats/``, results (``results.parquet``,
            ``timings.parquet``, ``settings.json``, ``generations/``) to
            ``results/<model>/``.
        progress: show one progress bar over the work (``planned_work``; rank 0's).
        bar: a progress bar of the caller's (tqdm-like) that the evaluation advances by
            ``planned_work`` units instead of its own (the caller's total includes them
            and the caller closes it).

    Returns:
        The EvalResult on rank 0 (the only process of a single-process run); None on the
        other ranks.
    """
    joined = not (dist.is_available() and dist.is_initialized())
    shard = Shard(*distributed.rank_and_world())
    try:
        return _evaluate(config, Path(out_dir), shard, progress, bar)
    finally:
        if shard.world > 1 and joined:
            dist.destroy_process_group()


def _evaluate(
    config: EvalConfig, out_dir: Path, shard: Shard, progress: bool, bar=None
) -> EvalResult | None:
    from qvd_bench.models import zoo
    from qvd_bench.models.device import check_device
    from qvd_bench.models.pipelines import sampling_record
    from qvd_bench.quant.config import QuantConfig
    from qvd_bench.store import StatsRun

    check_device(config.device, config.dtype or "float32")  # before any work
    name = Path(config.model).name or "model"
    results_dir = out_dir / "results" / name
    notices: list[str] = []
    # Only rank 0 measures: the other processes load no metric network or reference set.
    weight_metrics = (
        load_weight_metrics(config.metrics, config.weights, notices) if shard.main else []
    )
    real_videos, reference_id, reference_record = None, "fp", {"kind": "fp"}
    if config.reference != "fp" and shard.main:
        real_videos = load_real_videos(config.reference)
        reference_id, reference_record = real_reference(config.reference, real_videos)
        if not weight_metrics:
            notices.append(
                f"reference {config.reference} is used by the Frechet metrics only; "
                "fidelity is always measured against the FP generations"
            )
    settings = config.settings
    prompts = len(config.prompts)
    mine = shard.prompts(prompts)
    # One bar for the whole evaluation, in units of one sampling step's time, its total
    # known before any work (``planned_work``): the collections still to run advance it
    # step by step, each video by its steps, each quantized configuration by its cost.
    own_bar = bar is None
    if own_bar:
        bar = JobBar(
            total=sum(planned_work(config, out_dir, len(mine)).values()),
            desc="evaluate",
            unit="step",
            disable=not (progress and shard.main),
        )
    videos = CachedVideos(GenerationCache(results_dir), config, bar)
    rows: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []
    stats_dirs: dict[int, Path] = {}
    changes: list[dict[str, Any]] = []  # transforms.parquet's rows
    requantized: set[tuple] = set()  # (weight_seed, method, bits) quantized by this run
    at = ""  # what is being made, for the message of an interruption
    decoded_by = ""  # what the decoded metrics see (``latents.VideoFrames.decoded_by``)
    against_float32: dict[int, dict[str, float]] = {}
    try:
        for weight_seed in config.weight_seeds:
            at = f"the statistics of weight seed {weight_seed}"
            collects = Weighted(bar, COLLECT_STEP_COST) if progress and shard.main else False
            with measure_stage("statistics", config.device) as cost:
                run = StatsRun(ensure_stats(config, weight_seed, out_dir, collects, shard))
            stats_dirs[weight_seed] = run.path
            timings.append(_timing(weight_seed, "statistics", "", cost.wall_s, cost=cost))
            fp_model = zoo.load_run_model(run, device=config.device, dtype=config.dtype)
            scheduler = gen.scheduler_for(fp_model, settings)
            # Videos come from the model's pipeline where it has one, else from the
            # minimal sampler (``generate``); ``sampler`` names which.
            sampling = sampling_record(
                fp_model, "auto", settings.seed, range(prompts), settings.scheduler
            )
            sampler = gen.sampler_name(fp_model)
            layout = fp_model.family.layout
            at = f"the FP videos of weight seed {weight_seed}"
            with measure_stage("reference", config.device) as cost:
                reference_local = reference_videos(videos, fp_model, settings, mine)
                reference = shard.gather(reference_local, prompts)
            timings.append(
                _timing(weight_seed, REFERENCE_METHOD, FP_BITS, 0.0, cost.wall_s, cost=cost)
            )
            if model_device_dtype(fp_model.denoiser)[1] != torch.float32:
                float32_model = zoo.load_run_model(run, device=config.device, dtype="float32")
                bar.total += len(mine) * settings.steps
                float32_local = reference_videos(videos, float32_model, settings, mine)
                float32_reference = shard.gather(float32_local, prompts)
                del float32_model
                if shard.main:
                    against_float32[weight_seed] = {
                        row["metric"]: row["value"]
                        for row in free_running_rows(float32_reference, reference, layout)
                    }
            if shard.main:
                # Decoded by the pipeline's VAE where it has one, else latents as frames.
                frames = video_frames(fp_model, settings, reference)
                decoded_by = frames.decoded_by
                ref_uint8 = None
                if weight_metrics:
                    ref_uint8 = (
                        real_videos if real_videos is not None else frames.uint8_videos(reference)
                    )
            stats_context = {"stats": run.manifest["config"], "settings": settings.to_dict()}
            plans: dict[str, Any] = {}
            for bits in config.bits:
                w_bits, a_bits, mixed = split_bits_spec(bits)
                for method in config.methods:
                    quant = QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits)
                    quantized = LazyQuantized(run, quant, plans, fp_model, mixed)
                    context = {**stats_context, "quant": quant.to_dict()}
                    if mixed:
                        context["mixed"] = bits
                    at = f"weight seed {weight_seed}, {method} {bits}"
                    with measure_stage(f"{method} {bits}", config.device) as cost:
                        try:
                            forced_local, free_local = quantized_videos(
                                videos, fp_model, reference_local, quantized, context
                            )
                        finally:
                            quantized.close()
                        if quantized.record is not None and shard.main:
                            requantized.add((weight_seed, method, bits))
                            changes += [
                                {"weight_seed": weight_seed, "method": method, "bits": bits} | row
                                for row in transform_figures(quantized.record)
                            ]
                        forced = shard.gather(forced_local, prompts)
                        free = shard.gather(free_local, prompts)
                    if method not in NO_VIDEO_METHODS:
                        bar.update(QUANTIZE_COST)
                    timings.append(
                        _timing(
                            weight_seed,
                            method,
                            bits,
                            quantized.seconds,
                            cost.wall_s - quantized.seconds,
                            cost=cost,
                        )
                    )
                    if not shard.main:
                        continue
                    measured = teacher_forced_rows(reference, forced, scheduler)
                    measured += free_running_rows(reference, free, layout, frames)
                    if "groundtruth" in config.metrics:
                        measured += groundtruth_rows(
                            concat(free, "latents"), layout, config.prompts
                        )
                    if weight_metrics:
                        test = frames.uint8_videos(free)
                        for metric in weight_metrics:
                            measured += [
                                {**row, "reference": reference_id}
                                for row in metric.rows(test, ref_uint8, config.prompts)
                            ]
                    ident = {
                        "model": fp_model.name,
                        "weight_seed": weight_seed,
                        "method": method,
                        "bits": bits,
                        "reference": "fp",
                    }
                    rows += [{**ident, **row} for row in measured]
    except KeyboardInterrupt as interrupt:
        raise _interrupted(interrupt, videos, at) from None
    finally:
        if own_bar:
            bar.close()
    generated, cached = shard.total(videos.generated, videos.cached)
    if not shard.main:
        return None

    results = results_frame(rows, config.metrics)
    check_protocols(results)
    timing_frame = pd.DataFrame(timings)
    store.write_parquet(results_dir / RESULTS_FILE, results)
    store.write_parquet(results_dir / TIMINGS_FILE, timing_frame)
    store.write_parquet(
        results_dir / TRANSFORMS_FILE, _merged_changes(results_dir, changes, requantized)
    )
    store.write_json(
        results_dir / SETTINGS_FILE,
        {
            "format": "qvd-bench-results",
            "config": store.json_safe(config.to_dict(), names_non_finite=True),
            "stats": {str(k): _portable(v, out_dir) for k, v in stats_dirs.items()},
            "reference": {"id": reference_id, **reference_record},
            "sampler": sampler,
            "sampling": sampling,
            "frames": {"decoded_by": decoded_by},
            "processes": shard.world,
            "notices": notices,
            "fp_against_float32": {str(k): v for k, v in against_float32.items()},
        },
    )
    return EvalResult(
        results_dir,
        results,
        timing_frame,
        notices,
        stats_dirs,
        generated,
        cached,
        against_float32,
        sampler,
        decoded_by,
    )


def planned_steps(config: EvalConfig, out_dir: str | Path, prompts: int | None = None) -> dict:
    """The sampling steps an evaluation will run, per stage, known before it starts.

    A step is one denoiser step of one video (both CFG branches, batched). Statistics
    already collected at the default place cost nothing; cached videos count (they are
    taken at once). A method that quantizes nothing (``NO_VIDEO_METHODS``) reuses the
    reference's videos and costs nothing.

    Args:
        config: the evaluation.
        out_dir: its output root.
        prompts: the prompts this process samples (all by default).

    Returns:
        {"statistics": steps, "fp reference": steps, "quantized": steps}.
    """
    from qvd_bench.evaluate.calibration import stats_dir_for

    prompts = len(config.prompts) if prompts is None else prompts
    steps = config.settings.steps
    seeds = config.weight_seeds
    to_collect = 0
    if config.stats is None:
        to_collect = sum(
            not (stats_dir_for(Path(out_dir), config.model, seed) / store.MANIFEST).exists()
            for seed in seeds
        )
    quantizing = [m for m in config.methods if m not in NO_VIDEO_METHODS]
    return {
        "statistics": to_collect * prompts * steps,
        "fp reference": len(seeds) * prompts * steps,
        "quantized": len(seeds) * len(config.bits) * len(quantizing) * 2 * prompts * steps,
    }


def planned_work(config: EvalConfig, out_dir: str | Path, prompts: int | None = None) -> dict:
    """The work of an evaluation per stage in units of one sampling step's time
    (``progress``), known before it starts: ``planned_steps`` with each collection step
    weighted by ``COLLECT_STEP_COST``, plus ``QUANTIZE_COST`` per configuration that
    quantizes (every method but ``NO_VIDEO_METHODS``, per weight seed and bit-width).

    Args:
        config: the evaluation.
        out_dir: its output root.
        prompts: the prompts this process samples (all by default).

    Returns:
        {"statistics": units, "fp reference": units, "quantize": units, "quantized": units}.
    """
    steps = planned_steps(config, out_dir, prompts)
    quantizing = [m for m in config.methods if m not in NO_VIDEO_METHODS]
    configurations = len(config.weight_seeds) * len(config.bits) * len(quantizing)
    return {
        "statistics": steps["statistics"] * COLLECT_STEP_COST,
        "fp reference": steps["fp reference"],
        "quantize": configurations * QUANTIZE_COST,
        "quantized": steps["quantized"],
    }


def _interrupted(interrupt: KeyboardInterrupt, videos: CachedVideos, at: str) -> Interrupted:
    """What an interrupted evaluation kept, and where a rerun of it resumes.

    Every finished video is in the generation cache (written atomically), and the
    measurements are recomputed from the videos, so a rerun continues where this run
    stopped and writes the results an uninterrupted run writes.
    """
    saved = videos.generated + videos.cached
    if isinstance(interrupt, Interrupted) and str(interrupt):
        # Interrupted while collecting statistics: the collection says what it saved.
        kept = f"; {saved} finished videos are in {videos.cache.root}" if saved else ""
        return Interrupted(f"{interrupt}{kept}")
    if not saved:
        return Interrupted(f"no video had finished; rerunning the same command resumes at {at}")
    return Interrupted(
        f"{saved} finished videos are in {videos.cache.root}; rerunning the same command "
        f"takes them from the cache and resumes at {at}"
    )


def _merged_changes(
    results_dir: Path, changes: list[dict[str, Any]], requantized: set[tuple]
) -> pd.DataFrame:
    """This run's transform rows, plus an earlier run's for configurations not quantized
    now (taken whole from the cache)."""
    frame = pd.DataFrame(changes, columns=list(TRANSFORM_COLUMNS))
    path = results_dir / TRANSFORMS_FILE
    if not path.exists():
        return frame
    earlier = pd.read_parquet(path)
    if not set(TRANSFORM_COLUMNS) <= set(earlier.columns):
        return frame
    keys = zip(earlier["weight_seed"], earlier["method"], earlier["bits"])
    keep = [key not in requantized for key in keys]
    kept = earlier.loc[keep, list(TRANSFORM_COLUMNS)]
    return frame if kept.empty else pd.concat([kept, frame], ignore_index=True)


def _timing(
    weight_seed, method, bits, quantize_s, generate_s=0.0, *, cost: StageCost
) -> dict[str, Any]:
    # For "statistics" rows quantize_s holds the collection + analysis time. The peaks
    # are those of the whole row's stage (quantizing and generating; None: not on CUDA).
    return {
        "weight_seed": weight_seed,
        "method": method,
        "bits": bits,
        "quantize_s": float(quantize_s),
        "generate_s": float(generate_s),
        "peak_host_bytes": cost.peak_host_bytes,
        "peak_device_bytes": cost.peak_device_bytes,
    }


def _portable(path: Path, out_dir: Path) -> str:
    """``path`` relative to the output root when it lies under it (the tree can move)."""
    try:
        return str(Path(path).resolve().relative_to(Path(out_dir).resolve()))
    except ValueError:
        return str(Path(path).resolve())
