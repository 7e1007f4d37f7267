"""The statistics run each weight seed is quantized from: given, reused or collected, and
analyzed (``analysis.parquet``, ``plan.json`` beside the statistics).

A run the evaluation collects itself goes to ``<out>/stats/<model>-w<seed>/`` and is reused
when it exists with the same collection settings.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from qvd_bench import store
from qvd_bench.errors import UserError
from qvd_bench.evaluate.config import EvalConfig
from qvd_bench.evaluate.shard import Shard

# Collection settings of the statistics an evaluation collects itself: the temporal grid
# every 10 timesteps (100 points) and 64 reservoir rows per layer keep calibration cheap
# (the HTDQ search compares every pair of grid points) while covering the schedule.
STATS_TEMPORAL_STRIDE = 10
STATS_RESERVOIR = 64


def stats_dir_for(out_dir: Path, model: str, weight_seed: int) -> Path:
    return Path(out_dir) / "stats" / f"{Path(model).name or 'model'}-w{weight_seed}"


def ensure_stats(
    config: EvalConfig,
    weight_seed: int,
    out_dir: Path,
    progress: bool,
    shard: Shard | None = None,
) -> Path:
    """The statistics run of one weight seed: given, reused, or collected now; analyzed.

    With several processes every one takes part in the collection (``collect`` shards the
    prompts and merges the accumulators; rank 0 writes the run), rank 0 analyzes, and all
    of them wait until the run is complete before going on.

    Raises:
        UserError: a run exists at the default place but was collected with other settings.
    """
    from qvd_bench.analysis.summary import ANALYSIS_FILE, analyze
    from qvd_bench.collect.collector import collect
    from qvd_bench.config import CollectConfig
    from qvd_bench.models.zoo import MODELS
    from qvd_bench.store import StatsRun

    if config.stats is not None:
        run_dir = Path(config.stats)
        collected_kwargs = StatsRun(run_dir).pipeline_kwargs  # a one-line UserError: no run
        if collected_kwargs != config.settings.pipeline_kwargs:
            warnings.warn(
                f"the statistics in {run_dir} were collected with pipeline_kwargs "
                f"{collected_kwargs}, the videos are sampled with "
                f"{config.settings.pipeline_kwargs}",
                stacklevel=2,
            )
    else:
        s = config.settings
        collect_config = CollectConfig(
            model=config.model,
            weight_seed=weight_seed,
            disparity=config.disparity,
            asymmetry=config.asymmetry,
            prompts=config.prompts,
            steps=s.steps,
            guidance_scale=s.guidance_scale,
            seed=s.seed,
            frames=s.frames,
            height=s.height,
            width=s.width,
            # The pipeline where the videos are sampled with one: a path, or a preset
            # that loads with its pipeline.
            sampler="denoiser"
            if config.model in MODELS and not MODELS.get(config.model).with_pipeline
            else "auto",
            temporal_stride=STATS_TEMPORAL_STRIDE,
            reservoir_capacity=STATS_RESERVOIR,
            device=config.device,
            dtype=config.dtype or "float32",
            # The pipeline call the videos are sampled with, for the statistics too.
            extra={"pipeline_kwargs": dict(s.pipeline_kwargs)} if s.pipeline_kwargs else {},
        )
        run_dir = stats_dir_for(out_dir, config.model, weight_seed)
        if (run_dir / store.MANIFEST).exists():
            stored = StatsRun(run_dir).manifest["config"]
            expected = json.loads(json.dumps(collect_config.to_dict()))
            if stored != expected:
                raise UserError(
                    f"{run_dir} holds statistics collected with other settings; "
                    "use another out_dir or remove it"
                )
        else:
            collect(collect_config, run_dir, progress=progress)
    shard = shard or Shard()
    if shard.main and not (run_dir / ANALYSIS_FILE).exists():
        analyze(run_dir)
    shard.barrier()
    return run_dir
