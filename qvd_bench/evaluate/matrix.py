"""The evaluation matrix: methods × bit-widths × metrics → ``results.parquet`` and a report.

For every weight seed the harness

1. takes statistics (``--stats``, or a collection it runs itself into
   ``<out>/stats/<model>-w<seed>/``, reused when it exists with the same config) and
   analyzes them (``analysis.parquet``, ``plan.json`` beside the statistics);
2. generates the FP reference videos (free-running, every step recorded);
3. for every (bits, method): loads a fresh model (quantization swaps modules in place),
   quantizes it with ``quant.apply.quantize_`` (one plan per bit-width, shared by the
   methods) and generates each prompt twice: free-running, and teacher-forced on the FP
   trajectory's inputs, side by side in one batch per step
   (``generate.generate_free_and_forced``; the first step, on the same noise in both,
   runs once). A configuration that quantizes no layer (``fp``) is the
   reference model, so its videos are the reference's and nothing is generated;
4. measures fidelity (always) and, where their weights are given, FVD / FID / CLIPSIM.

Every video is cached (``generate.GenerationCache``): an interrupted evaluation resumes
without regenerating finished videos (a prompt's two quantized videos are made together:
one left unfinished makes its twin again, the same bit for bit), and a rerun regenerates
nothing.

Under ``torchrun --nproc_per_node=N`` (torch.distributed, gloo on CPU) the prompts are
sharded across the processes as ``collect`` shards them (prompt i on rank i mod N): the
collection merges its accumulators, every process quantizes each configuration itself
(deterministic, so identically) and generates its own prompts' videos, and rank 0 gathers
the per-prompt generations, measures and writes everything. Each video is computed alone
from its own seeds and the statistics merge as ``collect``'s do (exactly with one prompt
per process, else to float64 rounding), so the numbers equal a single process's. The
output root must be one directory every process sees (one machine, or a shared
filesystem): the statistics are read back from it and each process writes its own videos
into the generation cache.

The Frechet reference (``--reference``) is the FP generations paired by seed, or a
directory of real videos (``videos.safetensors`` with one tensor ``videos``, uint8
(N, T, H, W, 3)); Frechet rows name it in their ``reference`` column (``fp``, or
``real:<directory name>/sha256:<16 hex digits of the file>``) and ``settings.json``
records the file, its full digest and the number and shape of the videos.

``results.parquet`` has one row per (model, weight_seed, method, bits, metric, mode,
branch, step, protocol, reference): ``value`` and ``n`` (the number of videos). Fidelity
rows:

- mode "teacher-forced": SQNR (dB) and cosine of the x0-space predictions, per step
  (``step`` 0..S-1) and over all steps (``step`` -1; SQNR from the total energies, cosine
  the mean over steps and videos), for branch "cfg" (the combined output the sampler
  uses), "uncond" and "cond"; protocol ``fidelity/x0``;
- mode "free-running", step -1: SQNR and cosine of the final latents (protocol
  ``fidelity/latents``), PSNR and SSIM of the final latents mapped to [0, 1] by the FP
  reference's min and max over all its videos (data range 1; protocol
  ``fidelity/latents-minmax``): bare denoisers have no VAE to decode frames with.

Identical tensors give SQNR = PSNR = +inf (the fp method): kept as inf, not capped.
Frechet metrics (mode "distribution") carry the protocol id with the detector's SHA-256;
numbers under different protocol ids are never put in one table (``check_protocols``).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from qvd_bench import store
from qvd_bench.collect import distributed
from qvd_bench.errors import UserError
from qvd_bench.evaluate import fidelity
from qvd_bench.evaluate import generate as gen
from qvd_bench.evaluate.generate import CacheKey, Generation, GenerationCache, GenerationSettings
from qvd_bench.models.family import LoadedModel
from qvd_bench.registry import Registry

RESULTS_FILE = "results.parquet"
TIMINGS_FILE = "timings.parquet"
SETTINGS_FILE = "settings.json"
REFERENCE_METHOD = "reference"
FP_BITS = "fp"
BRANCHES = ("cfg", "uncond", "cond")
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
# Collection settings of the statistics the harness collects itself: the temporal grid
# every 10 timesteps (100 points) and 64 reservoir rows per layer keep calibration cheap
# (the HTDQ search compares every pair of grid points) while covering the schedule.
STATS_TEMPORAL_STRIDE = 10
STATS_RESERVOIR = 64
REAL_VIDEOS_FILE = "videos.safetensors"
REAL_VIDEOS_KEY = "videos"


@dataclass(frozen=True)
class MetricSpec:
    """A metric of the matrix.

    Attributes:
        name: its name on the command line.
        kind: "fidelity" (always computed, needs nothing) or "weights" (needs a local
            network: skipped with a notice when absent).
        option: the option that passes the weights path ("" for fidelity metrics).
        description: one line.
    """

    name: str
    kind: str
    option: str
    description: str


METRICS: Registry[MetricSpec] = Registry("metric")
for _spec in (
    MetricSpec("sqnr", "fidelity", "", "SQNR (dB) against FP, x0-space and final latents"),
    MetricSpec("cosine", "fidelity", "", "cosine similarity against FP"),
    MetricSpec("psnr", "fidelity", "", "PSNR (dB) of the final output against FP"),
    MetricSpec("ssim", "fidelity", "", "SSIM of the final output against FP"),
    MetricSpec("fvd", "weights", "--fvd-weights", "FVD, StyleGAN-V protocol"),
    MetricSpec("fvd-cd", "weights", "--fvd-cd-weights", "FVD, cd-fvd / TATS I3D protocol"),
    MetricSpec("fid", "weights", "--fid-weights", "per-frame FID, Inception-v3"),
    MetricSpec("clipsim", "weights", "--clip-model", "CLIPSIM and CLIP-Temp"),
):
    METRICS.register(_spec.name, _spec)
FIDELITY_METRICS = ("sqnr", "cosine", "psnr", "ssim")


def check_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """The requested metrics plus the fidelity ones (always run), in a stable order.

    Raises:
        UserError: an unknown metric (with a did-you-mean).
    """
    for name in names:
        METRICS.get(name)
    return tuple(dict.fromkeys([*FIDELITY_METRICS, *names]))


def check_methods(names: Sequence[str]) -> tuple[str, ...]:
    """Checks method names against the quantization registry (did-you-mean on a typo)."""
    from qvd_bench.quant.methods import get_method

    if not names:
        raise UserError("no quantization method given")
    for name in names:
        get_method(name)
    return tuple(dict.fromkeys(names))


MIXED_SUFFIX = "-mixed"


def split_bits_spec(spec: str) -> tuple[int, int, bool]:
    """``"W8A6"`` -> (8, 6, False); ``"W8A6-mixed"`` -> (8, 6, True).

    A mixed spec keeps weights at W bits and gives activations bits per layer from measured
    sensitivity with a mean of at most A (``evaluate.sensitivity.mixed_config``, candidates
    4, 6 and 8).
    """
    from qvd_bench.quant.config import parse_bits

    text = str(spec).strip()
    mixed = text.lower().endswith(MIXED_SUFFIX)
    w_bits, a_bits = parse_bits(text[: -len(MIXED_SUFFIX)] if mixed else text)
    return w_bits, a_bits, mixed


def normalise_bits_specs(specs: Sequence[str]) -> tuple[str, ...]:
    """Normalises bit-width specs ("w4a8" -> "W4A8", "w8a6-MIXED" -> "W8A6-mixed")."""
    if not specs:
        raise UserError("no bit-width given (e.g. W8A8,W4A8)")
    normalised = []
    for spec in specs:
        w_bits, a_bits, mixed = split_bits_spec(spec)
        normalised.append(f"W{w_bits}A{a_bits}{MIXED_SUFFIX if mixed else ''}")
    return tuple(dict.fromkeys(normalised))


def check_protocols(frame: pd.DataFrame) -> None:
    """Refuses a table where one metric is measured under more than one protocol id.

    Raises:
        UserError: naming the metric and the ids.
    """
    if frame.empty:
        return
    ids = frame.groupby("metric")["protocol"].unique()
    for metric, protocols in ids.items():
        protocols = sorted(set(protocols))
        if len(protocols) > 1 and metric not in FIDELITY_METRICS:
            raise UserError(
                f"{metric} is measured under different protocol ids ({', '.join(protocols)}); "
                "numbers of different protocols are never compared"
            )


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate.

    Attributes:
        model: zoo name or path.
        weight_seeds: one evaluation per weight seed (random-weight presets).
        methods: quantization method names.
        bits: bit-width specs ("W4A8").
        metrics: metric names (the fidelity metrics are always added).
        prompts: the prompts; video i is prompt i with sample id i.
        settings: sampling settings shared by every model.
        disparity, asymmetry: outlier knobs of presets (None: preset defaults).
        stats: a statistics run to quantize from (one weight seed only); None collects.
        reference: "fp" (FP generations paired by seed) or a directory of real videos
            (``videos.safetensors`` holding ``videos``, uint8 (N, T, H, W, 3), N >= 1)
            for the Frechet metrics; checked here, before anything runs.
        weights: metric name -> local weights path (FVD detectors, Inception, CLIP dir).
    """

    model: str = "tiny-unet3d"
    weight_seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = ("fp", "minmax")
    bits: tuple[str, ...] = ("W8A8",)
    metrics: tuple[str, ...] = FIDELITY_METRICS
    prompts: tuple[str, ...] = ()
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    disparity: float | None = None
    asymmetry: float | None = None
    stats: str | None = None
    reference: str = "fp"
    weights: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise UserError("no prompts: give a prompt file with at least one prompt")
        if not self.weight_seeds:
            raise UserError("no weight seed: weight_seeds is empty")
        if self.stats is not None and len(self.weight_seeds) > 1:
            raise UserError("stats describes one model; it cannot serve several weight seeds")
        object.__setattr__(self, "metrics", check_metrics(self.metrics))
        object.__setattr__(self, "methods", check_methods(self.methods))
        object.__setattr__(self, "bits", normalise_bits_specs(self.bits))
        for name in self.weights:
            METRICS.get(name)
        if self.reference != "fp":
            if not Path(self.reference).is_dir():
                raise UserError(
                    f"reference must be 'fp' or a directory of real videos; "
                    f"{self.reference} is neither"
                )
            check_real_videos(self.reference)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["settings"] = self.settings.to_dict()
        return data


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
    """

    results_dir: Path
    results: pd.DataFrame
    timings: pd.DataFrame
    notices: list[str]
    stats_dirs: dict[int, Path]
    generated: int = 0
    cached: int = 0


# ----------------------------------------------------------------------------- statistics


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
    from qvd_bench.store import StatsRun

    if config.stats is not None:
        run_dir = Path(config.stats)
        StatsRun(run_dir)  # a one-line UserError when it is not a run
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
            sampler="denoiser",
            temporal_stride=STATS_TEMPORAL_STRIDE,
            reservoir_capacity=STATS_RESERVOIR,
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


# ----------------------------------------------------------------------------- fidelity


def _cat(generations: Sequence[Generation], name: str) -> torch.Tensor:
    return torch.cat([getattr(g, name) for g in generations])


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
                rows.append(_row(metric, "teacher-forced", branch, step, "fidelity/x0", value, n))
        flat_ref, flat_test = ref.flatten(0, 1), test.flatten(0, 1)
        for metric, value in _sqnr_cosine(flat_ref, flat_test).items():
            rows.append(_row(metric, "teacher-forced", branch, ALL_STEPS, "fidelity/x0", value, n))
    return rows


def _sqnr_cosine(reference: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    return {
        "sqnr": float(fidelity.sqnr(reference, test)),
        "cosine": float(fidelity.cosine_similarity(reference, test)),
    }


def latent_range(reference: Sequence[Generation]) -> tuple[float, float]:
    """(min, max) of the FP reference's final latents over all its videos."""
    latents = _cat(reference, "latents")
    return float(latents.min()), float(latents.max())


def latents_to_unit(latents: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Latents mapped affinely to [0, 1] by the reference's (min, max); not clamped."""
    lo, hi = value_range
    return (latents.to(torch.float64) - lo) / max(hi - lo, 1e-12)


def latent_frames(latents: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, C, F, H, W) or (B, F, C, H, W) latents -> frames (B, F, C, H, W)."""
    return latents.transpose(1, 2) if layout == "BCFHW" else latents


def free_running_rows(
    reference: Sequence[Generation], free: Sequence[Generation], layout: str
) -> list[dict[str, Any]]:
    """SQNR and cosine of the final latents; PSNR and SSIM of them mapped to [0, 1]."""
    n = len(reference)
    ref, test = _cat(reference, "latents"), _cat(free, "latents")
    rows = [
        _row(m, "free-running", "cfg", ALL_STEPS, "fidelity/latents", v, n)
        for m, v in _sqnr_cosine(ref, test).items()
    ]
    value_range = latent_range(reference)
    ref_frames = latent_frames(latents_to_unit(ref, value_range), layout)
    test_frames = latent_frames(latents_to_unit(test, value_range), layout)
    psnr = float(fidelity.psnr(ref_frames, test_frames, data_range=1.0))
    rows.append(_row("psnr", "free-running", "cfg", ALL_STEPS, "fidelity/latents-minmax", psnr, n))
    if min(ref_frames.shape[-2:]) >= 11:
        ssim = float(fidelity.ssim(ref_frames, test_frames, data_range=1.0))
        rows.append(
            _row("ssim", "free-running", "cfg", ALL_STEPS, "fidelity/latents-minmax", ssim, n)
        )
    return rows


def _row(metric, mode, branch, step, protocol, value, n) -> dict[str, Any]:
    return {
        "metric": metric,
        "mode": mode,
        "branch": branch,
        "step": int(step),
        "protocol": protocol,
        "value": float(value),
        "n": int(n),
    }


# ----------------------------------------------------------------------------- Frechet / CLIP


def to_uint8_videos(latents: torch.Tensor, layout: str, value_range) -> torch.Tensor:
    """Final latents -> uint8 RGB videos (B, T, H, W, 3) for the weight metrics.

    Without a VAE the first three latent channels (repeated when fewer) stand for RGB,
    mapped by the reference's range: this tests the metrics' protocol, not image quality.
    """
    frames = latent_frames(latents_to_unit(latents, value_range), layout).clamp(0, 1)
    channels = frames.shape[2]
    frames = frames[:, :, [i % channels for i in range(3)]]
    return (frames * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous()


def check_real_videos(directory: str | Path) -> tuple[int, ...]:
    """Checks a real-video reference directory from the file header, without loading it.

    Args:
        directory: holds ``videos.safetensors`` with ``videos``, uint8 (N, T, H, W, 3).

    Returns:
        The shape (N, T, H, W, 3).

    Raises:
        UserError: one line, when the file is absent (an empty directory), unreadable, or
            holds no uint8 (N, T, H, W, 3) ``videos`` with N >= 1.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(directory) / REAL_VIDEOS_FILE
    if not path.is_file():
        raise UserError(
            f"the reference directory {directory} holds no {REAL_VIDEOS_FILE}: put the real videos there "
            f"as one tensor '{REAL_VIDEOS_KEY}', uint8 (N, T, H, W, 3)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = sorted(handle.keys())
            if REAL_VIDEOS_KEY not in names:
                raise UserError(
                    f"{path} has no tensor '{REAL_VIDEOS_KEY}' (it has {', '.join(names) or 'none'})"
                )
            view = handle.get_slice(REAL_VIDEOS_KEY)
            shape, dtype = tuple(view.get_shape()), view.get_dtype()
    except (OSError, SafetensorError) as error:
        reason = " ".join(str(error).split())
        raise UserError(f"cannot read real videos from {path}: {reason}") from None
    if dtype != "U8" or len(shape) != 5 or shape[-1] != 3 or shape[0] < 1:
        raise UserError(
            f"{path}: '{REAL_VIDEOS_KEY}' must be uint8 (N, T, H, W, 3) with N >= 1, got "
            f"{dtype} {shape}"
        )
    return shape


def load_real_videos(directory: str | Path) -> torch.Tensor:
    """The real reference videos: uint8 (N, T, H, W, 3), ``videos`` in
    ``<dir>/videos.safetensors`` (checked by ``check_real_videos``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_real_videos(directory)
    path = Path(directory) / REAL_VIDEOS_FILE
    try:
        return load_file(str(path))[REAL_VIDEOS_KEY]
    except (OSError, SafetensorError) as error:
        reason = " ".join(str(error).split())
        raise UserError(f"cannot read real videos from {path}: {reason}") from None


def real_reference(directory: str | Path, videos: torch.Tensor) -> tuple[str, dict[str, Any]]:
    """The id of a real reference set for the ``reference`` column, and its record.

    The id names the directory and the file's content (``real:<name>/sha256:<16 hex>``),
    so numbers measured against different real sets are told apart wherever they go.

    Args:
        directory: the reference directory.
        videos: its videos, uint8 (N, T, H, W, 3).

    Returns:
        (id, JSON-safe record: directory, file, sha256, videos, shape).
    """
    from qvd_bench.evaluate.weights import sha256_of

    path = Path(directory).resolve() / REAL_VIDEOS_FILE
    digest = sha256_of(path)
    record = {
        "kind": "real",
        "directory": str(path.parent),
        "file": REAL_VIDEOS_FILE,
        "sha256": digest,
        "videos": int(videos.shape[0]),
        "shape": [int(n) for n in videos.shape],
    }
    return f"real:{path.parent.name}/sha256:{digest[:16]}", record


class WeightMetric:
    """A loaded network metric: features or scores of uint8 videos, with a protocol id."""

    def __init__(self, name: str, path: str):
        self.name = name
        if name in ("fvd", "fvd-cd"):
            from qvd_bench.evaluate.fvd import load_detector

            self.detector = load_detector("stylegan-v" if name == "fvd" else "cd-fvd-i3d400", path)
            self.protocol = self.detector.protocol_id
        elif name == "fid":
            from qvd_bench.evaluate.fid import inception_fid_metric, inception_protocol_id

            self.metric = inception_fid_metric(path)
            self.protocol = inception_protocol_id(path)
        else:
            from qvd_bench.evaluate.clipsim import clip_protocol_id, load_clip

            self.model, self.processor = load_clip(path)
            self.protocol = clip_protocol_id(path)

    def rows(self, videos: torch.Tensor, reference: torch.Tensor, prompts) -> list[dict]:
        n = videos.shape[0]
        if self.name in ("fvd", "fvd-cd"):
            from qvd_bench.evaluate.fvd import fvd

            value = fvd(self.detector.features(reference), self.detector.features(videos))
            return [_row(self.name, "distribution", "cfg", ALL_STEPS, self.protocol, value, n)]
        if self.name == "fid":
            from qvd_bench.evaluate.fid import frame_fid

            self.metric.reset()
            value = frame_fid(self.metric, reference, videos)
            return [_row("fid", "distribution", "cfg", ALL_STEPS, self.protocol, value, n)]
        from qvd_bench.evaluate.clipsim import clip_scores

        scores = clip_scores(self.model, self.processor, videos, list(prompts)).as_dict()
        return [
            _row(metric, "distribution", "cfg", ALL_STEPS, self.protocol, scores[metric], n)
            for metric in ("clipsim", "clip_temp")
        ]


def load_weight_metrics(config: EvalConfig, notices: list[str]) -> list[WeightMetric]:
    """The requested network metrics whose weights load; a notice for each one skipped."""
    loaded = []
    for name in config.metrics:
        spec = METRICS.get(name)
        if spec.kind != "weights":
            continue
        try:
            loaded.append(WeightMetric(name, config.weights.get(name)))
        except UserError as error:
            notices.append(f"{name} skipped: {error}")
    return loaded


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Shard:
    """This process's part of a (possibly multi-process) evaluation.

    Attributes:
        rank: this process's rank (0 for a single process).
        world: the number of processes.
    """

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """True on rank 0, the process that measures and writes."""
        return self.rank == 0

    def prompts(self, count: int) -> list[int]:
        """This process's prompt indices out of ``count``: i with i mod world == rank (the
        split ``collect`` uses)."""
        return [i for i in range(count) if i % self.world == self.rank]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, local: dict[int, Generation], count: int) -> list[Generation] | None:
        """Every process's generations, in prompt order, on rank 0 (None elsewhere).

        Args:
            local: prompt index -> this process's generation of it.
            count: the number of prompts (their indices are 0..count-1 across processes).
        """
        if self.world == 1:
            return [local[i] for i in range(count)]
        payload = {i: g.tensors() for i, g in local.items()}
        gathered: list[dict] | None = [{}] * self.world if self.main else None
        dist.gather_object(payload, gathered, dst=0)
        if not self.main:
            return None
        merged = {i: t for part in gathered for i, t in part.items()}
        return [Generation.from_tensors(merged[i]) for i in range(count)]

    def total(self, *values: int) -> tuple[int, ...]:
        """The sums over processes of some per-process counts."""
        if self.world == 1:
            return values
        summed = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(summed)
        return tuple(int(v) for v in summed)


# ----------------------------------------------------------------------------- the matrix


class _Videos:
    """Generates or loads videos through the cache, counting both."""

    def __init__(self, cache: GenerationCache, config: EvalConfig, bar):
        self.cache, self.config, self.bar = cache, config, bar
        self.generated = self.cached = 0

    def key(self, model: LoadedModel, method: str, bits: str, index: int, mode: str, context):
        return CacheKey(
            model=model.name,
            weight_seed=model.weight_seed,
            method=method,
            bits=bits,
            prompt_index=index,
            seed=self.config.settings.seed,
            mode=mode,
            context=gen.context_string(prompt=self.config.prompts[index], **context),
        )

    def get(self, key: CacheKey, make: Callable[[], Generation]) -> Generation:
        generation, made = self.cache.get_or_generate(key, make)
        if made:
            self.generated += 1
        else:
            self.cached += 1
        self.bar.update(1)
        return generation


def fresh_model(run, template: LoadedModel) -> LoadedModel:
    """An unquantized model of a statistics run, for one configuration to change in place.

    Building a zoo preset (random initialisation, outlier injection) costs far more than
    copying it, so each configuration gets a deep copy of the FP model ``template`` (built
    from ``run``, never quantized): the same parameters, bit for bit. A model with a
    pipeline is loaded again (the pipeline holds its own reference to the denoiser).
    """
    from qvd_bench.models import zoo

    if template.pipeline is not None:
        return zoo.load_run_model(run)
    return replace(template, denoiser=copy.deepcopy(template.denoiser))


class _Quantized:
    """A model quantized on first use (a configuration whose videos are all cached is
    never quantized: reruns are free)."""

    def __init__(self, run, quant, plans: dict, template: LoadedModel, mixed: bool = False):
        self.run, self.quant, self.plans, self.mixed = run, quant, plans, mixed
        self.template = template  # the FP model each configuration copies
        self.loaded: LoadedModel | None = None
        self.tracker = None
        self.record = None
        self.seconds = 0.0

    def model(self) -> LoadedModel:
        from qvd_bench.models.sampling import CallTracker
        from qvd_bench.quant.apply import make_plan_for, quantize_

        if self.loaded is None:
            started = time.perf_counter()
            bits = self.quant.bits
            if bits not in self.plans:  # one plan per bit-width, shared by the methods
                self.plans[bits] = make_plan_for(self.run, self.quant)
            # Quantization swaps modules in place: every configuration gets a fresh model.
            loaded = fresh_model(self.run, self.template)
            if self.mixed:
                from qvd_bench.evaluate.sensitivity import Budget, mixed_config, probe_for_run

                budget = Budget("a", float(self.quant.a_bits))
                probe = probe_for_run(loaded, self.run)
                self.quant, _ = mixed_config(
                    loaded, self.run, self.quant, budget, probe, plan=self.plans[bits]
                )
            self.tracker = CallTracker(loaded.denoiser).attach()
            self.record = quantize_(
                loaded, self.quant, stats=self.run, plan=self.plans[bits], tracker=self.tracker
            )
            self.loaded = loaded
            self.seconds = time.perf_counter() - started
        return self.loaded

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.detach()


def reference_videos(
    videos: _Videos,
    loaded: LoadedModel,
    settings: GenerationSettings,
    indices: Sequence[int] | None = None,
) -> dict[int, Generation]:
    """The FP model's free-running videos of some prompts (all by default), by index."""
    context = {"settings": settings.to_dict(), "knobs": loaded.knobs}
    prompts = videos.config.prompts
    indices = range(len(prompts)) if indices is None else indices
    return {
        i: videos.get(
            videos.key(loaded, REFERENCE_METHOD, FP_BITS, i, "free", context),
            lambda i=i: gen.generate(loaded, prompts[i], i, settings),
        )
        for i in indices
    }


def quantized_videos(
    videos: _Videos,
    fp_model: LoadedModel,
    reference: dict[int, Generation],
    quantized: _Quantized,
    context: dict[str, Any],
) -> tuple[dict[int, Generation], dict[int, Generation]]:
    """A configuration's teacher-forced and free-running videos of the reference's prompts.

    Args:
        videos: the cache and counters.
        fp_model: the FP model (names the cache entries).
        reference: prompt index -> the FP video it is teacher-forced on.
        quantized: the configuration, quantized on first use.
        context: what else decides the videos (for the cache key).

    Returns:
        (teacher-forced, free-running), each prompt index -> video. A configuration that
        quantizes no layer is the FP model: its videos are the reference's, and nothing is
        generated or cached.
    """
    config, settings = videos.config, videos.config.settings
    quant = quantized.quant
    # The scheme is part of what decides the videos (batch composition sets the rounding):
    # videos cached under another scheme are never mixed with these.
    context = {**context, "scheme": gen.FREE_AND_FORCED_SCHEME}
    keys = {
        (i, mode): videos.key(fp_model, quant.method, quant.bits, i, mode, context)
        for i in reference
        for mode in ("teacher", "free")
    }
    if not all(videos.cache.path(key).exists() for key in keys.values()):
        quantized.model()
        if not quantized.record.quantized:
            videos.bar.update(len(keys))
            return reference, reference

    pairs: dict[int, tuple[Generation, Generation]] = {}

    def made(i: int, mode: str) -> Generation:
        # A prompt's two videos share their forwards, so both are made at once; after an
        # interruption between their saves, the missing one is made the same way (and
        # the other again, the same).
        if i not in pairs:
            pairs[i] = gen.generate_free_and_forced(
                quantized.model(),
                config.prompts[i],
                i,
                settings,
                teacher=reference[i],
                tracker=quantized.tracker,
            )
        return pairs[i][0 if mode == "free" else 1]

    forced, free = {}, {}
    for i in reference:
        free[i] = videos.get(keys[(i, "free")], lambda i=i: made(i, "free"))
        forced[i] = videos.get(keys[(i, "teacher")], lambda i=i: made(i, "teacher"))
    return forced, free


def evaluate(
    config: EvalConfig, out_dir: str | Path, *, progress: bool = True, write_report: bool = True
) -> EvalResult | None:
    """Runs the methods × bit-widths × metrics matrix and writes the results.

    Under ``torchrun`` (WORLD_SIZE > 1) the prompts are sharded across the processes and
    rank 0 measures and writes (module doc); the process group is joined here when the
    caller has not, and left again at the end.

    Args:
        config: what to evaluate.
        out_dir: the output root: statistics go to ``stats/``, results (``results.parquet``,
            ``timings.parquet``, ``settings.json``, ``generations/``) to
            ``results/<model>/``, the report to ``reports/<model>/``.
        progress: show a progress bar over videos (rank 0's).
        write_report: also write the HTML + Markdown report.

    Returns:
        The EvalResult on rank 0 (the only process of a single-process run); None on the
        other ranks.
    """
    joined = not (dist.is_available() and dist.is_initialized())
    shard = Shard(*distributed.rank_and_world())
    try:
        return _evaluate(config, Path(out_dir), shard, progress, write_report)
    finally:
        if shard.world > 1 and joined:
            dist.destroy_process_group()


def _evaluate(
    config: EvalConfig, out_dir: Path, shard: Shard, progress: bool, write_report: bool
) -> EvalResult | None:
    from qvd_bench.models import zoo
    from qvd_bench.quant.config import QuantConfig
    from qvd_bench.store import StatsRun

    name = Path(config.model).name or "model"
    results_dir = out_dir / "results" / name
    notices: list[str] = []
    # Only rank 0 measures: the other processes load no metric network or reference set.
    weight_metrics = load_weight_metrics(config, notices) if shard.main else []
    real_videos, reference_id, reference_record = None, "fp", {"kind": "fp"}
    if config.reference != "fp" and shard.main:
        real_videos = load_real_videos(config.reference)
        reference_id, reference_record = real_reference(config.reference, real_videos)
        if not weight_metrics:
            notices.append(
                f"--reference {config.reference} is used by the Frechet metrics only; "
                "fidelity is always measured against the FP generations"
            )
    settings = config.settings
    prompts = len(config.prompts)
    mine = shard.prompts(prompts)
    per_seed = len(mine) * (1 + 2 * len(config.methods) * len(config.bits))
    bar = tqdm(
        total=len(config.weight_seeds) * per_seed,
        desc="evaluate",
        unit="video",
        disable=not (progress and shard.main),
    )
    videos = _Videos(GenerationCache(results_dir), config, bar)
    rows: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []
    stats_dirs: dict[int, Path] = {}
    try:
        for weight_seed in config.weight_seeds:
            started = time.perf_counter()
            run = StatsRun(ensure_stats(config, weight_seed, out_dir, progress, shard))
            stats_dirs[weight_seed] = run.path
            timings.append(_timing(weight_seed, "statistics", "", time.perf_counter() - started))
            fp_model = zoo.load_run_model(run)
            scheduler = gen.scheduler_for(fp_model, settings)
            layout = fp_model.family.layout
            started = time.perf_counter()
            reference_local = reference_videos(videos, fp_model, settings, mine)
            reference = shard.gather(reference_local, prompts)
            timings.append(
                _timing(weight_seed, REFERENCE_METHOD, FP_BITS, 0.0, time.perf_counter() - started)
            )
            if shard.main:
                value_range = latent_range(reference)
                ref_uint8 = (
                    real_videos
                    if real_videos is not None
                    else to_uint8_videos(_cat(reference, "latents"), layout, value_range)
                )
            stats_context = {"stats": run.manifest["config"], "settings": settings.to_dict()}
            plans: dict[str, Any] = {}
            for bits in config.bits:
                w_bits, a_bits, mixed = split_bits_spec(bits)
                for method in config.methods:
                    quant = QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits)
                    quantized = _Quantized(run, quant, plans, fp_model, mixed)
                    context = {**stats_context, "quant": quant.to_dict()}
                    if mixed:
                        context["mixed"] = bits
                    started = time.perf_counter()
                    try:
                        forced_local, free_local = quantized_videos(
                            videos, fp_model, reference_local, quantized, context
                        )
                    finally:
                        quantized.close()
                    forced = shard.gather(forced_local, prompts)
                    free = shard.gather(free_local, prompts)
                    elapsed = time.perf_counter() - started
                    timings.append(
                        _timing(
                            weight_seed,
                            method,
                            bits,
                            quantized.seconds,
                            elapsed - quantized.seconds,
                        )
                    )
                    if not shard.main:
                        continue
                    measured = teacher_forced_rows(reference, forced, scheduler)
                    measured += free_running_rows(reference, free, layout)
                    if weight_metrics:
                        test = to_uint8_videos(_cat(free, "latents"), layout, value_range)
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
    finally:
        bar.close()
    generated, cached = shard.total(videos.generated, videos.cached)
    if not shard.main:
        return None

    results = _results_frame(rows, config.metrics)
    check_protocols(results)
    timing_frame = pd.DataFrame(timings)
    store.write_parquet(results_dir / RESULTS_FILE, results)
    store.write_parquet(results_dir / TIMINGS_FILE, timing_frame)
    store.write_json(
        results_dir / SETTINGS_FILE,
        {
            "format": "qvd-bench-results",
            "config": _json_safe(config.to_dict()),
            "stats": {str(k): _portable(v, out_dir) for k, v in stats_dirs.items()},
            "reference": {"id": reference_id, **reference_record},
            "processes": shard.world,
            "notices": notices,
        },
    )
    result = EvalResult(results_dir, results, timing_frame, notices, stats_dirs, generated, cached)
    if write_report:
        from qvd_bench.report.results import build_results_report

        build_results_report(result, out_dir / "reports" / name, config=config)
    return result


def _results_frame(rows: list[dict[str, Any]], metrics: Sequence[str]) -> pd.DataFrame:
    """The rows of the requested metrics, in RESULT_COLUMNS order."""
    frame = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    wanted = set(metrics) | ({"clip_temp"} if "clipsim" in metrics else set())
    frame = frame[frame["metric"].isin(wanted)].reset_index(drop=True)
    return frame.astype({"step": np.int64, "n": np.int64, "value": np.float64})


def _timing(weight_seed, method, bits, quantize_s, generate_s=0.0) -> dict[str, Any]:
    # For "statistics" rows quantize_s holds the collection + analysis time.
    return {
        "weight_seed": weight_seed,
        "method": method,
        "bits": bits,
        "quantize_s": float(quantize_s),
        "generate_s": float(generate_s),
    }


def _portable(path: Path, out_dir: Path) -> str:
    """``path`` relative to the output root when it lies under it (the tree can move)."""
    try:
        return str(Path(path).resolve().relative_to(Path(out_dir).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def stats_paths(results_dir: Path, settings: dict[str, Any]) -> dict[int, Path]:
    """The statistics run of each weight seed, from ``settings.json`` of a results dir."""
    root = Path(results_dir).parent.parent  # <out>/results/<model>
    return {int(k): root / v for k, v in settings["stats"].items()}


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ----------------------------------------------------------------------------- summaries


def headline_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, bits): the headline fidelity figures, mean (± std) over seeds.

    Columns: method, bits, seeds, then per figure its mean and, with several seeds, its
    sample standard deviation (``<figure> sd``): teacher-forced SQNR and cosine over all
    steps (CFG output), free-running final SQNR, PSNR and SSIM.
    """
    figures = {
        "SQNR tf (dB)": ("sqnr", "teacher-forced"),
        "cos tf": ("cosine", "teacher-forced"),
        "SQNR final (dB)": ("sqnr", "free-running"),
        "PSNR final (dB)": ("psnr", "free-running"),
        "SSIM final": ("ssim", "free-running"),
    }
    sel = results[(results["step"] == ALL_STEPS) & (results["branch"] == "cfg")]
    order = {m: i for i, m in enumerate(dict.fromkeys(results["method"]))}
    bit_order = {b: i for i, b in enumerate(dict.fromkeys(results["bits"]))}
    out = []
    for (method, bits), group in sel.groupby(["method", "bits"], sort=False):
        row: dict[str, Any] = {
            "method": method,
            "bits": bits,
            "seeds": group["weight_seed"].nunique(),
        }
        for label, (metric, mode) in figures.items():
            values = group[(group["metric"] == metric) & (group["mode"] == mode)]["value"]
            row[label] = _mean(values)
            if row["seeds"] > 1:
                row[f"{label} sd"] = _sd(values)
        out.append(row)
    frame = pd.DataFrame(out)
    if frame.empty:
        return frame
    frame["_m"] = frame["method"].map(order)
    frame["_b"] = frame["bits"].map(bit_order)
    return frame.sort_values(["_b", "_m"]).drop(columns=["_m", "_b"]).reset_index(drop=True)


def _mean(values: pd.Series) -> float:
    values = values.to_numpy(dtype=np.float64)
    if len(values) == 0:
        return float("nan")
    if np.isposinf(values).all():
        return float("inf")
    return float(values.mean())


def _sd(values: pd.Series) -> float:
    values = values.to_numpy(dtype=np.float64)
    if len(values) < 2 or not np.isfinite(values).all():
        return float("nan")
    return float(values.std(ddof=1))
