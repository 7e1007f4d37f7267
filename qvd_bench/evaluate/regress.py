"""Regression benchmarks: stable figures of one configuration, compared with a baseline.

A *configuration* (``REGRESS_CONFIG``: model, weight seed, prompts, sampling settings,
methods, bit-widths) is measured by ``measure`` in stages, each reusable by the next:

1. ``collect_stage``: statistics of the FP model while it samples (``collect``);
2. ``analysis_stage``: ``analyze`` on them (``analysis.parquet``, ``plan.json``);
3. ``reference_stage``: the FP model's free-running videos (every step recorded);
4. ``method_figures``: per (method, bits), a fresh copy of the FP model quantized with
   ``quantize_`` and run teacher-forced on the FP trajectory.

A configuration without methods (a zoo preset with random weights:
``RANDOM_WEIGHTS_CONFIG``) stops after the statistics.

Figures (names ``kind/...``):

- statistics, per role (medians over layers, means over the run): ``skew``, ``kurtosis``
  (excess), ``coverage_a<b>`` (mean level coverage at b bits) and ``cfg_skew_gap``
  (median over layers and timesteps of the cond branch's tensor skewness minus the
  uncond branch's);
- quantization records, per (method, bits): ``layers_quantized``, ``w_bits`` and
  ``a_bits`` (means over the quantized layers), ``weight_sqnr`` (mean over layers of the
  SQNR of the fake-quantized weight against the float one, dB), ``tdscore`` (mean TDScore
  of the HTDQ level sets) and ``scri_coverage`` (mean level coverage SCRI reached);
- teacher-forced fidelity, per (method, bits): ``sqnr_tf`` (dB, from the energies over
  every step and prompt) and ``cosine_tf`` (mean over steps and prompts) of the
  CFG-combined output in x0-space, and ``sqnr_tf_gain`` / ``cosine_tf_gain``: the same
  minus the configuration's first method's (``paired_figures``).

Tolerances come from measured spread: ``write_baseline`` measures the configuration
once as stated and once under each of ``ROUNDING_CHANGES`` (changes that must not count
as regressions); a figure's spread is its largest deviation over them, and its
tolerance ``tolerance_for`` = max(floor, ``SPREAD_MULTIPLE`` × spread), lowered to half
the gap to another method's same figure (same bits) where that gap exceeds 3 × their
spread, so that the two methods stay distinguishable. A figure passes when
|current − baseline| <= tolerance. The baseline file records spreads, multiple, floor,
the method pairs it tells apart (``distinct_pairs``), package versions and the machine.

Results of another configuration are never compared (``check_configuration``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import platform
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from qvd_bench import store
from qvd_bench.errors import UserError

BASELINE_FORMAT = "qvd-bench-baseline"
FIGURES_FORMAT = "qvd-bench-regress-figures"
FIGURES_FILE = "figures.json"
REGRESS_DIR = "regress"
BASELINE_VERSION = 2
# The configuration of the committed baselines: small enough for CI on one thread (every
# figure averages over all its layers, steps and prompts); ``model`` is the one setting a
# new baseline usually changes.
REGRESS_CONFIG: dict[str, Any] = {
    "model": "tiny-unet3d",
    "weight_seed": 0,
    "num_prompts": 2,
    "frames": 2,
    "height": 16,
    "width": 16,
    "steps": 4,
    "guidance_scale": 7.5,
    "scheduler": "ddim",
    "seed": 0,
    "methods": ("mse", "qvd", "qvd-htdq", "qvd-scri"),
    "bits": ("W8A8", "W4A4"),
    "dtype": "float32",
    # None: the built-in prompts (``prompts.select_prompts``); "shapes-seen": captions of
    # the shapes dataset (``PROMPT_SETS``).
    "prompts": None,
}
# Per model, the settings its baseline configuration changes: a trained model is measured
# where it was trained (its prompts, latent size, CFG scale and scheduler), with enough
# prompts and steps that its fidelity figures settle.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "shapes-wan": {
        "prompts": "shapes-seen",
        "num_prompts": 12,
        "frames": 8,
        "height": 16,
        "width": 16,
        "steps": 10,
        "guidance_scale": 3.0,
        "scheduler": "flow-euler",
    },
}
# A preset with random weights keeps statistics figures only (skewness, kurtosis, coverage,
# CFG gap), which are stable on it; its fidelity and record figures barely tell methods
# apart, so their checks belong on a trained model.
RANDOM_WEIGHTS_CONFIG: dict[str, Any] = {"methods": (), "bits": ()}
# Named prompt sources of a configuration's "prompts" setting.
PROMPT_SETS = ("shapes-seen",)
# Statistics collection settings of a measurement (the temporal grid every 10 timesteps,
# 64 reservoir rows per layer: what ``evaluate`` collects with).
TEMPORAL_STRIDE = 10
RESERVOIR = 64
COVERAGE_BITS = (8, 4)
# Tolerance = max(floor, SPREAD_MULTIPLE x spread), capped at half the gap to a method
# that differs by more than DISTINCT_MULTIPLE x spread; floor = FLOOR_REL x |value| +
# FLOOR_ABS (spreads of exactly 0, e.g. layer counts, still allow last-bit differences).
SPREAD_MULTIPLE = 3.0
DISTINCT_MULTIPLE = 3.0
FLOOR_REL = 1e-6
FLOOR_ABS = 1e-9
# Figure kinds compared across methods (the acceptance pairs of the README).
METHOD_KINDS = (
    "sqnr_tf",
    "cosine_tf",
    "weight_sqnr",
    "tdscore",
    "scri_coverage",
    "sqnr_tf_gain",
    "cosine_tf_gain",
)
# Teacher-forced figures also compared pairwise with the configuration's first method
# (``paired_figures``): another sampling seed moves every method's figure alike, so the
# difference settles where the figures themselves do not.
PAIRED_KINDS = {"sqnr_tf": "sqnr_tf_gain", "cosine_tf": "cosine_tf_gain"}


@dataclass(frozen=True)
class Rounding:
    """A change that must not count as a regression.

    Attributes:
        threads: torch intra-op threads (None: as set).
        batch_cfg: False runs the CFG branches of the quantized models as separate forwards.
        seed_offset: added to the sampling seed (another sampling seed).
        reference_dtype: dtype of the FP reference trajectory ("float64": a float64 FP
            reference, cast to the model's dtype for teacher forcing).
        processes: the statistics collected by this many processes (torch.distributed,
            gloo), each on its share of the prompts, merged as ``collect`` merges them
            under ``torchrun``. Only the collection is sharded: a sharded evaluation
            computes each video alone from its own seeds, exactly as one process does.
    """

    threads: int | None = None
    batch_cfg: bool | None = None
    seed_offset: int = 0
    reference_dtype: str | None = None
    processes: int = 1

    @property
    def changes_statistics(self) -> bool:
        """Whether the statistics differ under it (else a measurement can reuse them)."""
        return self.threads is not None or self.seed_offset != 0 or self.processes > 1

    @property
    def changes_generations(self) -> bool:
        """Whether the FP reference and the quantized runs differ under it given the same
        statistics (sharded generations are computed alone from their own seeds, exactly
        as one process computes them, so ``processes`` changes only the statistics)."""
        return (
            self.threads is not None
            or self.seed_offset != 0
            or self.batch_cfg is not None
            or self.reference_dtype is not None
        )


AS_STATED = Rounding()
ROUNDING_CHANGES: dict[str, Rounding] = {
    "threads-2": Rounding(threads=2),
    "cfg-separate": Rounding(batch_cfg=False),
    "seed+1": Rounding(seed_offset=1),
    "fp64-reference": Rounding(reference_dtype="float64"),
    "gloo-2": Rounding(processes=2),
}


def configuration(**overrides: Any) -> dict[str, Any]:
    """``REGRESS_CONFIG`` with ``MODEL_CONFIGS`` of the model (``RANDOM_WEIGHTS_CONFIG``
    for a zoo preset with random weights: statistics figures only), then ``overrides``
    (None keeps the default).

    Raises:
        UserError: an unknown setting or prompt set.
    """
    unknown = sorted(set(overrides) - set(REGRESS_CONFIG))
    if unknown:
        raise UserError(f"unknown regression settings: {', '.join(unknown)}")
    prompt_set = overrides.get("prompts")
    if prompt_set is not None and prompt_set not in PROMPT_SETS:
        raise UserError(f"unknown prompt set {prompt_set!r}; known: {', '.join(PROMPT_SETS)}")
    model = overrides.get("model") or REGRESS_CONFIG["model"]
    config = {**REGRESS_CONFIG, **MODEL_CONFIGS.get(model, _random_weights_config(model))}
    for key, value in overrides.items():
        if value is not None:
            config[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return config


def _random_weights_config(model: str) -> dict[str, Any]:
    from qvd_bench.models.zoo import MODELS

    if model in MODELS and not MODELS.get(model).trained:
        return RANDOM_WEIGHTS_CONFIG
    return {}


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


# ---------------------------------------------------------------------------- stages


@dataclass
class Measurement:
    """The stages of one measurement, kept so that a later stage can be rerun alone.

    Attributes:
        config: the configuration (``configuration``).
        work_dir: where statistics go (``<work_dir>/stats/<name>``).
        rounding: the rounding change it runs under.
        run_dir: the analyzed statistics run.
        reference: per prompt, the FP free-running Generation.
    """

    config: dict[str, Any]
    work_dir: Path
    rounding: Rounding = field(default_factory=Rounding)
    run_dir: Path | None = None
    reference: list[Any] | None = None

    @property
    def settings(self):
        from qvd_bench.evaluate.generate import GenerationSettings

        c = self.config
        return GenerationSettings(
            steps=c["steps"],
            guidance_scale=c["guidance_scale"],
            seed=c["seed"] + self.rounding.seed_offset,
            frames=c["frames"],
            height=c["height"],
            width=c["width"],
            scheduler=c["scheduler"],
        )

    @property
    def prompts(self) -> list[str]:
        return configuration_prompts(self.config)


def configuration_prompts(config: dict[str, Any]) -> list[str]:
    """The ``num_prompts`` prompts of a configuration: the first built-in prompts, or
    for "shapes-seen" captions spread evenly over the dataset's seen combinations (so
    that colours, shapes and motions all occur)."""
    from qvd_bench.prompts import select_prompts

    count = config["num_prompts"]
    if config.get("prompts") is None:
        return select_prompts(None, count)
    from qvd_bench.datasets.shapes import heldout_captions

    captions = heldout_captions("seen")
    if count < 1:
        raise UserError(f"the number of prompts must be at least 1, got {count}")
    # Evenly spaced (the captions run colour-major), shifted by one more each time so
    # that shapes and motions vary as well.
    stride = max(1, len(captions) // count)
    return [captions[(i * stride + i) % len(captions)] for i in range(count)]


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def collect_stage(m: Measurement, progress: bool = False) -> Path:
    """Collects the statistics of the configuration's FP model into ``m.work_dir``."""
    from qvd_bench.collect.collector import collect
    from qvd_bench.config import CollectConfig

    s = m.settings
    name = Path(m.config["model"]).name or "model"
    run_dir = m.work_dir / "stats" / f"{name}-w{m.config['weight_seed']}"
    config = CollectConfig(
        model=m.config["model"],
        weight_seed=m.config["weight_seed"],
        prompts=tuple(m.prompts),
        steps=s.steps,
        guidance_scale=s.guidance_scale,
        seed=s.seed,
        frames=s.frames,
        height=s.height,
        width=s.width,
        sampler="denoiser",
        temporal_stride=TEMPORAL_STRIDE,
        reservoir_capacity=RESERVOIR,
        dtype=m.config["dtype"],
    )
    if m.rounding.processes > 1:
        _collect_in_processes(config, run_dir, m.rounding.processes)
    else:
        collect(config, run_dir, overwrite=True, progress=progress)
    m.run_dir = run_dir
    return run_dir


def _collect_in_processes(config, run_dir: Path, processes: int) -> None:
    """``collect`` by ``processes`` gloo processes (as under ``torchrun``), each with this
    process's thread count."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="qvd-regress-gloo-") as rendezvous:
        mp.spawn(
            _collect_shard,
            args=(processes, f"file://{rendezvous}/init", config, str(run_dir),
                  torch.get_num_threads()),
            nprocs=processes,
            join=True,
        )  # fmt: skip


def _collect_shard(rank: int, world: int, init_method: str, config, run_dir: str, threads: int):
    import torch.distributed as dist

    from qvd_bench.collect.collector import collect

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        collect(config, Path(run_dir), overwrite=True, progress=False)
    finally:
        dist.destroy_process_group()


def analysis_stage(m: Measurement, into: Path | None = None) -> Path:
    """Analyzes ``m.run_dir`` (after copying it to ``into``, without its analysis, when
    given: the statistics stay, the analysis is redone)."""
    from qvd_bench.analysis.summary import ANALYSIS_FILE, PLAN_FILE, analyze

    if into is not None:
        if into.exists():
            shutil.rmtree(into)
        shutil.copytree(m.run_dir, into, ignore=shutil.ignore_patterns(ANALYSIS_FILE, PLAN_FILE))
        m.run_dir = into
    analyze(m.run_dir, bits=COVERAGE_BITS)
    return m.run_dir


def _fp_model(m: Measurement, dtype: str | None = None):
    from qvd_bench.models import zoo
    from qvd_bench.store import StatsRun

    # A torch dtype: load_run_model takes any floating one (names only for DTYPES).
    return zoo.load_run_model(StatsRun(m.run_dir), dtype=getattr(torch, dtype or m.config["dtype"]))


def reference_stage(m: Measurement) -> list[Any]:
    """The FP model's free-running videos, one per prompt (float64 ones cast back to the
    model's dtype under ``Rounding(reference_dtype="float64")``)."""
    from qvd_bench.evaluate import generate as gen

    dtype = m.rounding.reference_dtype
    loaded = _fp_model(m, dtype)
    with _threads(m.rounding.threads):
        # A pipeline's video keeps its denoiser calls: teacher forcing replays them.
        videos = [
            gen.generate(loaded, p, i, m.settings, keep_calls=loaded.pipeline is not None)
            for i, p in enumerate(m.prompts)
        ]
    if dtype is not None:
        target = getattr(torch, m.config["dtype"])
        keep = ("timesteps", "x0_coefficients")
        videos = [
            gen.Generation.from_tensors(
                {
                    k: v.to(target) if v.is_floating_point() and k not in keep else v
                    for k, v in g.tensors().items()
                },
                g.metadata(),
            )
            for g in videos
        ]
    m.reference = videos
    return videos


def statistics_figures(run_dir: Path) -> dict[str, float]:
    """Per-role statistics figures of an analyzed run (module doc)."""
    from qvd_bench.analysis.distribution import tensor_skew
    from qvd_bench.analysis.summary import ANALYSIS_FILE
    from qvd_bench.store import StatsRun

    table = pd.read_parquet(run_dir / ANALYSIS_FILE)
    table["role"] = table["role"].astype(str)
    figures: dict[str, float] = {}
    for role, rows in table.groupby("role", sort=True):
        figures[f"skew/{role}"] = _median(rows["skew_median"].abs())
        figures[f"kurtosis/{role}"] = _median(rows["kurtosis_median"])
        for b in COVERAGE_BITS:
            figures[f"coverage_a{b}/{role}"] = _median(rows[f"coverage_mean_a{b}"])
    channels = StatsRun(run_dir).channels
    if "tensor" in channels.columns:
        channels = channels[channels["tensor"] == "input"]
    per_branch = tensor_skew(channels)
    per_branch["layer"] = per_branch["layer"].astype(str)
    per_branch["role"] = per_branch["role"].astype(str)
    per_branch["branch"] = per_branch["branch"].astype(str)
    wide = per_branch.pivot_table(
        index=["role", "layer", "timestep"], columns="branch", values="skewness", observed=True
    )
    if {"cond", "uncond"} <= set(wide.columns):
        gap = (wide["cond"] - wide["uncond"]).groupby(level="role").median()
        figures.update({f"cfg_skew_gap/{role}": float(v) for role, v in gap.items()})
    return figures


def _median(values: pd.Series) -> float:
    array = values.to_numpy(dtype=np.float64)
    array = array[np.isfinite(array)]
    return float(np.median(array)) if array.size else float("nan")


def record_figures(record, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Figures of a QuantRecord (module doc); parts the record lacks (no HTDQ layer, no
    SCRI transform) are left out.

    Args:
        record: the QuantRecord.
        weights: layer name -> its float weight before quantization (a record's own
            replacement weight, e.g. SCRI's, is used where it holds one).
    """
    from qvd_bench.quant.primitives import sqnr_db

    quantized = [r for r in record.layers if not r.is_fp]
    figures = {"layers_quantized": float(len(quantized))}
    w_bits = [r.w_bits for r in quantized if r.w_bits is not None]
    a_bits = [r.a_bits for r in quantized if r.a_bits is not None]
    if w_bits:
        figures["w_bits"] = float(np.mean(w_bits))
    if a_bits:
        figures["a_bits"] = float(np.mean(a_bits))
    weight_sqnr = []
    for r in quantized:
        scale = r.tensors.get("weight_scale")
        if scale is None or r.w_bits is None or scale.dim() != 1:
            continue  # split layers keep two scale rows; their halves are left out
        weight = r.tensors.get("weight", weights[r.layer]).detach().to(torch.float64).cpu()
        s = scale.to(torch.float64).reshape(-1, *([1] * (weight.dim() - 1)))
        q_max = 2 ** (r.w_bits - 1) - 1
        fake = torch.clamp(torch.round(weight / s), -q_max, q_max) * s
        weight_sqnr.append(float(sqnr_db(weight, fake)))
    if weight_sqnr:
        figures["weight_sqnr"] = float(np.mean(weight_sqnr))
    tdscores = [float(r.info["htdq"]["tdscore"]) for r in quantized if "htdq" in r.info]
    tdscores = [t for t in tdscores if math.isfinite(t)]
    if tdscores:
        figures["tdscore"] = float(np.mean(tdscores))
    coverage = [
        float(r.info["transform"]["coverage"])
        for r in quantized
        if "coverage" in r.info.get("transform", {})
    ]
    if coverage:
        figures["scri_coverage"] = float(np.mean(coverage))
    return figures


def method_figures(
    m: Measurement, methods: Sequence[str] | None = None, bits: Sequence[str] | None = None
) -> dict[str, float]:
    """Record and teacher-forced figures of every (method, bits) of the configuration."""
    from qvd_bench.evaluate import generate as gen
    from qvd_bench.evaluate.config import split_bits_spec
    from qvd_bench.evaluate.results import ALL_STEPS, teacher_forced_rows
    from qvd_bench.models.sampling import CallTracker
    from qvd_bench.quant.apply import make_plan_for, quantize_
    from qvd_bench.quant.config import QuantConfig
    from qvd_bench.store import StatsRun

    run = StatsRun(m.run_dir)
    template = _fp_model(m)
    scheduler = gen.scheduler_for(template, m.settings)
    figures: dict[str, float] = {}
    for spec in bits or m.config["bits"]:
        w_bits, a_bits, _ = split_bits_spec(spec)
        plan = None
        for method in methods or m.config["methods"]:
            quant = QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits)
            plan = plan or make_plan_for(run, quant)
            loaded = replace(template, denoiser=copy.deepcopy(template.denoiser))
            weights = {n: mod.weight.detach().clone() for n, mod in _weighted(loaded.denoiser)}
            tracker = CallTracker(loaded.denoiser).attach()
            try:
                record = quantize_(loaded, quant, stats=run, plan=plan, tracker=tracker)
                with _threads(m.rounding.threads):
                    forced = [
                        gen.generate(
                            loaded,
                            prompt,
                            i,
                            m.settings,
                            tracker=tracker,
                            teacher=m.reference[i],
                            batch_cfg=m.rounding.batch_cfg,
                        )
                        for i, prompt in enumerate(m.prompts)
                    ]
            finally:
                tracker.detach()
            for name, value in record_figures(record, weights).items():
                figures[f"{name}/{method}/{spec}"] = value
            for row in teacher_forced_rows(m.reference, forced, scheduler):
                if row["branch"] == "cfg" and row["step"] == ALL_STEPS:
                    kind = {"sqnr": "sqnr_tf", "cosine": "cosine_tf"}[row["metric"]]
                    figures[f"{kind}/{method}/{spec}"] = float(row["value"])
    return figures


def _weighted(denoiser: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    for name, module in denoiser.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            yield name, module


def measure(
    config: dict[str, Any],
    work_dir: str | Path,
    rounding: Rounding = AS_STATED,
    *,
    progress: bool = False,
) -> tuple[dict[str, float], Measurement]:
    """Every figure of ``config`` (module doc), every stage run (the statistics alone for
    a configuration without methods or bits).

    Args:
        config: a configuration (``configuration``).
        work_dir: a directory for the statistics.
        rounding: the rounding change to run under.
        progress: show the collection's progress bar.

    Returns:
        (figure name -> value, the Measurement, whose stages can be rerun).
    """
    m = Measurement(config, Path(work_dir), rounding)
    with _threads(rounding.threads):
        collect_stage(m, progress)
        analysis_stage(m)
    figures = statistics_figures(m.run_dir)
    if config["methods"] and config["bits"]:
        reference_stage(m)
        figures.update(method_figures(m))
        figures.update(paired_figures(figures, config))
    return figures, m


def paired_figures(figures: dict[str, float], config: dict[str, Any]) -> dict[str, float]:
    """``<kind>_gain/<method>/<bits>``: a teacher-forced figure (``PAIRED_KINDS``) of each
    method minus that of the configuration's first method at the same bits, measured on
    the same prompts, noise and reference."""
    if not config["methods"]:
        return {}
    first = config["methods"][0]
    out = {}
    for kind, gain in PAIRED_KINDS.items():
        for spec in config["bits"]:
            base = figures.get(f"{kind}/{first}/{spec}")
            for method in config["methods"][1:]:
                value = figures.get(f"{kind}/{method}/{spec}")
                if base is not None and value is not None:
                    out[f"{gain}/{method}/{spec}"] = value - base
    return out


# --------------------------------------------------------------------------- files


def environment() -> dict[str, Any]:
    """Package versions and the machine (recorded with every figure set)."""
    import diffusers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "system": platform.system(),
        "cpu_threads": torch.get_num_threads(),
    }


def write_figures(out_dir: str | Path, config: dict[str, Any], figures: dict[str, float]) -> Path:
    """Writes ``<out>/regress/<model>/figures.json`` (what ``regress`` compares)."""
    name = Path(config["model"]).name or "model"
    path = Path(out_dir) / REGRESS_DIR / name / FIGURES_FILE
    store.write_json(
        path,
        {
            "format": FIGURES_FORMAT,
            "configuration": _jsonable(config),
            "environment": environment(),
            "figures": {k: _to_json(v) for k, v in figures.items()},
        },
    )
    return path


def run_configuration(
    config: dict[str, Any], out_dir: str | Path, *, progress: bool = False
) -> tuple[Path, dict[str, float]]:
    """Measures ``config`` under ``out_dir`` and writes its figures (``write_figures``)."""
    out_dir = Path(out_dir)
    figures, _ = measure(config, out_dir, progress=progress)
    return write_figures(out_dir, config, figures), figures


def find_figures(path: str | Path) -> Path:
    """The figures file: ``path`` itself, ``path/figures.json`` or the one
    ``path/regress/<model>/figures.json``.

    Raises:
        UserError: none (naming results of ``qvd-bench run`` when that is what is there),
            or several.
    """
    path = Path(path)
    if path.is_file():
        return path
    if (path / FIGURES_FILE).is_file():
        return path / FIGURES_FILE
    found = sorted(path.glob(f"{REGRESS_DIR}/*/{FIGURES_FILE}"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise UserError(
            f"{path} holds several figure sets ({', '.join(map(str, found))}); pass one"
        )
    raise UserError(f"no {FIGURES_FILE} in {path} or {path / REGRESS_DIR}/*/")


def load_figures(path: str | Path) -> tuple[dict[str, Any], dict[str, float]]:
    """(configuration, figures) of a figures file, or of the results of ``qvd-bench run``
    (configuration only, figures empty: such results are of another configuration)."""
    path = Path(path)
    results_config = _results_configuration(path)
    if results_config is not None:
        return results_config, {}
    data = _read_json(find_figures(path))
    if data.get("format") != FIGURES_FORMAT:
        raise UserError(f"{path} is not a qvd-bench figures file")
    return data["configuration"], {k: _from_json(v) for k, v in data["figures"].items()}


def _results_configuration(path: Path) -> dict[str, Any] | None:
    """The configuration of a ``qvd-bench run`` / ``evaluate`` results directory, in the
    terms of ``REGRESS_CONFIG``; None when ``path`` holds no such results."""
    from qvd_bench.evaluate.results import RESULTS_FILE, SETTINGS_FILE

    if not path.is_dir() or (path / FIGURES_FILE).is_file() or list(path.glob(f"{REGRESS_DIR}/*")):
        return None
    found = (
        [path]
        if (path / RESULTS_FILE).is_file()
        else [f.parent for f in sorted(path.glob(f"results/*/{RESULTS_FILE}"))]
    )
    if len(found) != 1:
        return None
    config = _read_json(found[0] / SETTINGS_FILE)["config"]
    s = config["settings"]
    return {
        "model": config["model"],
        "weight_seed": config["weight_seeds"][0],
        "num_prompts": len(config["prompts"]),
        **{k: s[k] for k in ("frames", "height", "width", "steps", "guidance_scale")},
        "scheduler": s["scheduler"],
        "seed": s["seed"],
        "methods": list(config["methods"]),
        "bits": list(config["bits"]),
        "dtype": config.get("dtype") or "float32",
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no file at {path}") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is unreadable: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a qvd-bench file")
    return data


def load_baseline(path: str | Path) -> dict[str, Any]:
    """A baseline file (``write_baseline``).

    Raises:
        UserError: missing, unreadable, foreign, or of the format before tolerances were
            measured (regenerate it).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no baseline at {path}; write one with write_baseline")
    data = _read_json(path)
    if data.get("format") != BASELINE_FORMAT:
        raise UserError(f"{path} is not a qvd-bench baseline")
    if data.get("version") != BASELINE_VERSION:
        raise UserError(f"{path} is a baseline of an older format; regenerate it")
    return data


def differing_settings(baseline: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'name (baseline X, results Y)' for each setting that differs."""
    out = []
    for key in sorted(set(baseline) | set(current)):
        a, b = baseline.get(key), current.get(key)
        if a != b:
            out.append(f"{key} (baseline {_show(a)}, results {_show(b)})")
    return out


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


class OtherConfiguration(UserError):
    """Results that are not of a baseline's configuration (``check_configuration``).

    Attributes:
        baseline: the baseline's path.
        differences: ``differing_settings``; empty when the results hold no regression
            figures at all (results of a plain evaluation).
    """

    def __init__(self, baseline: str | Path, differences: list[str]):
        self.baseline, self.differences = str(baseline), differences
        what = (
            f"are of another configuration than {baseline}: {'; '.join(differences)}"
            if differences
            else "hold no regression figures"
        )
        super().__init__(
            f"the results {what}; measure the baseline's configuration with "
            f"run_configuration(load_baseline_configuration({str(baseline)!r}), out_dir)"
        )


def check_configuration(baseline_path: str | Path, baseline: dict[str, Any], current: dict) -> None:
    """Raises ``OtherConfiguration`` (a one-line UserError naming the differing settings)
    when ``current`` is not the baseline's configuration."""
    diff = differing_settings(baseline["configuration"], _jsonable(current))
    if diff:
        raise OtherConfiguration(baseline_path, diff)


# ------------------------------------------------------------------- tolerances


def spreads(base: dict[str, float], changed: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per figure, the largest |value under a change − value as stated| (0 when equal,
    inf when a change makes it non-finite or drops it)."""
    out = {}
    for name, value in base.items():
        deviations = []
        for figures in changed.values():
            other = figures.get(name)
            if other is None:
                deviations.append(float("inf"))
            elif value == other or (math.isnan(value) and math.isnan(other)):
                deviations.append(0.0)
            else:
                deviations.append(abs(other - value))
        out[name] = max(deviations, default=0.0)
    return out


def floor_for(value: float) -> float:
    return FLOOR_REL * (abs(value) if math.isfinite(value) else 0.0) + FLOOR_ABS


def tolerances(values: dict[str, float], spread: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Per figure: tolerance, and what decided it ("spread", "floor" or "gap to <figure>").

    The tolerance is max(floor, SPREAD_MULTIPLE x spread); where another method's figure
    of the same kind and bits differs by more than DISTINCT_MULTIPLE x the larger of the
    two spreads, it is at most half that difference (never below 1.5 x the spread then).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        s = spread[name]
        tol, rule = max(floor_for(value), SPREAD_MULTIPLE * s), "spread"
        if tol == floor_for(value):
            rule = "floor"
        kind, *rest = name.split("/")
        if kind in METHOD_KINDS and len(rest) == 2 and math.isfinite(value):
            method, bits = rest
            for other_name, other in values.items():
                o_kind, *o_rest = other_name.split("/")
                if o_kind != kind or len(o_rest) != 2 or o_rest[1] != bits or o_rest[0] == method:
                    continue
                gap = abs(other - value)
                distinct = gap > DISTINCT_MULTIPLE * max(s, spread[other_name])
                if math.isfinite(gap) and distinct and gap / 2 < tol:
                    tol, rule = max(gap / 2, floor_for(value)), f"gap to {o_rest[0]}"
        out[name] = {"tolerance": tol, "rule": rule}
    return out


def write_baseline(
    path: str | Path,
    config: dict[str, Any],
    work_dir: str | Path,
    *,
    changes: dict[str, Rounding] | None = None,
    on_change: Callable[[str], None] | None = None,
    regenerate_with: str | None = None,
) -> dict[str, Any]:
    """Measures ``config`` as stated and under each rounding change and writes the
    baseline: values, spreads, tolerances, the configuration and the environment.

    Args:
        path: the baseline JSON to write.
        config: the configuration (``configuration``).
        work_dir: scratch directory (one subdirectory per measurement).
        changes: the rounding changes (``ROUNDING_CHANGES`` by default).
        on_change: called with each measurement's name before it runs (progress).
        regenerate_with: the command that regenerates the baseline, recorded in it.

    Returns:
        The baseline written.
    """
    changes = ROUNDING_CHANGES if changes is None else changes
    work_dir = Path(work_dir)
    notify = on_change or (lambda name: None)
    measured = {}
    for name, rounding in {"stated": AS_STATED, **changes}.items():
        notify(name)
        measured[name] = _measure_once(config, work_dir / name, rounding)
    base = measured.pop("stated")
    changed = measured
    spread = spreads(base, changed)
    tols = tolerances(base, spread)
    data = {
        "format": BASELINE_FORMAT,
        "version": BASELINE_VERSION,
        "configuration": _jsonable(config),
        **({"regenerate": regenerate_with} if regenerate_with else {}),
        "environment": environment(),
        "rounding_changes": {name: _jsonable(r.__dict__) for name, r in changes.items()},
        "tolerance_rule": (
            f"|current - baseline| <= tolerance = max(floor, {SPREAD_MULTIPLE:g} x spread), "
            f"at most half the gap to another method's same figure where that gap exceeds "
            f"{DISTINCT_MULTIPLE:g} x spread; floor = {FLOOR_REL:g} x |baseline| + {FLOOR_ABS:g}"
        ),
        "spread_multiple": SPREAD_MULTIPLE,
        "figures": {
            name: {
                "value": _to_json(value),
                "spread": _to_json(spread[name]),
                "tolerance": _to_json(tols[name]["tolerance"]),
                "rule": tols[name]["rule"],
                "by_change": {c: _to_json(changed[c].get(name, float("nan"))) for c in changed},
            }
            for name, value in base.items()
        },
    }
    data["distinct_pairs"] = distinct_pairs(data)
    store.write_json(Path(path), data)
    return data


def distinct_pairs(baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """The method pairs a baseline tells apart (``method_pairs`` rows whose difference
    exceeds DISTINCT_MULTIPLE x the larger spread), as recorded in the baseline file:
    figure kind, bits, the two methods, difference, spread and the larger tolerance (at
    most half the difference)."""
    pairs = method_pairs(baseline)
    return [
        {
            "kind": row.kind,
            "bits": row.bits,
            "methods": [row.method_a, row.method_b],
            "difference": float(row.difference),
            "spread": float(row.spread),
            "tolerance": float(row.tolerance),
        }
        for row in pairs[pairs["distinct"]].itertuples()
    ]


def _measure_once(config: dict[str, Any], work_dir: Path, rounding: Rounding) -> dict[str, float]:
    """``measure``, or the figures it left in ``work_dir`` for the same configuration and
    rounding change (a baseline interrupted half way resumes)."""
    done = work_dir / "measured.json"
    key = {"configuration": _jsonable(config), "rounding": rounding.__dict__}
    if done.is_file():
        data = json.loads(done.read_text())
        if data.get("key") == json.loads(json.dumps(key)):
            figures = {k: _from_json(v) for k, v in data["figures"].items()}
            return {**figures, **paired_figures(figures, config)}
    figures, _ = measure(config, work_dir, rounding)
    store.write_json(done, {"key": key, "figures": {k: _to_json(v) for k, v in figures.items()}})
    return figures


# --------------------------------------------------------------------------- compare


def compare(
    current: dict[str, float], baseline: dict[str, dict[str, Any]]
) -> tuple[pd.DataFrame, bool]:
    """The diff table and whether every baseline figure is within its tolerance.

    Columns: figure, baseline, current, delta, tolerance, detects (the smallest change
    that fails whatever the rounding: tolerance + spread), status ("ok", "REGRESSION",
    "MISSING" or "new").
    """
    rows, ok = [], True
    for name, entry in baseline.items():
        base = _from_json(entry["value"])
        allowed = _from_json(entry["tolerance"])
        detects = allowed + _from_json(entry.get("spread", 0.0))
        value = current.get(name)
        if value is None:
            status, delta = "MISSING", float("nan")
        elif math.isinf(base) or math.isinf(value):
            delta = 0.0 if value == base else float("inf")
            status = "ok" if value == base else "REGRESSION"
        elif math.isnan(base) or math.isnan(value):
            delta = float("nan")
            status = "ok" if math.isnan(base) and math.isnan(value) else "REGRESSION"
        else:
            delta = value - base
            status = "ok" if abs(delta) <= allowed else "REGRESSION"
        ok &= status == "ok"
        rows.append((name, base, value, delta, allowed, detects, status))
    for name in sorted(set(current) - set(baseline)):
        nan = float("nan")
        rows.append((name, nan, current[name], nan, nan, nan, "new"))
    columns = ["figure", "baseline", "current", "delta", "tolerance", "detects", "status"]
    return pd.DataFrame(rows, columns=columns), ok


def _to_json(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _from_json(value: float | str | None) -> float:
    return float("nan") if value is None else float(value)


def compare_with_baseline(results: str | Path, baseline: str | Path) -> tuple[pd.DataFrame, bool]:
    """Compares the figures of ``results`` with a stored baseline.

    Args:
        results: a figures file, or a directory holding one (``find_figures``).
        baseline: the baseline JSON (``write_baseline``).

    Returns:
        (the diff table of ``compare``, whether every baseline figure is within its
        tolerance).

    Raises:
        UserError: unreadable results or baseline.
        OtherConfiguration: results of another configuration, or without regression
            figures.
    """
    reference = load_baseline(baseline)
    config, figures = load_figures(results)
    check_configuration(baseline, reference, config)
    if not figures:
        raise OtherConfiguration(baseline, [])
    return compare(figures, reference["figures"])


def method_pairs(baseline: dict[str, Any]) -> pd.DataFrame:
    """Per (kind, bits, method pair) of ``METHOD_KINDS`` figures: the difference, the larger
    spread, whether they are distinct (difference > DISTINCT_MULTIPLE x spread) and the
    larger of their tolerances (at most half the difference where distinct)."""
    figures = baseline["figures"]
    rows = []
    names = sorted(figures)
    for i, a in enumerate(names):
        kind, *rest = a.split("/")
        if kind not in METHOD_KINDS or len(rest) != 2:
            continue
        for b in names[i + 1 :]:
            b_kind, *b_rest = b.split("/")
            if b_kind != kind or len(b_rest) != 2 or b_rest[1] != rest[1]:
                continue
            va, vb = _from_json(figures[a]["value"]), _from_json(figures[b]["value"])
            spread = max(_from_json(figures[a]["spread"]), _from_json(figures[b]["spread"]))
            tol = max(_from_json(figures[a]["tolerance"]), _from_json(figures[b]["tolerance"]))
            diff = abs(va - vb)
            rows.append(
                (kind, rest[1], rest[0], b_rest[0], diff, spread,
                 bool(diff > DISTINCT_MULTIPLE * spread), tol)
            )  # fmt: skip
    return pd.DataFrame(
        rows,
        columns=["kind", "bits", "method_a", "method_b", "difference", "spread", "distinct",
                 "tolerance"],
    )  # fmt: skip


def load_baseline_configuration(path: str | Path) -> dict[str, Any]:
    """The configuration a baseline was measured with (``configuration``'s terms).

    Raises:
        UserError: see ``load_baseline``, or settings this version does not know.
    """
    return configuration(**load_baseline(path)["configuration"])
