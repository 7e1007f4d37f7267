"""``qvd-bench run``: collect → analyze → quantize → evaluate fidelity → one report.

The defaults (``RUN_DEFAULTS``): the trained reference model shapes-wan, 6 held-out seen
dataset captions (every 25th of ``shapes.heldout_captions("seen")``, ``default_prompts``), latents of 8 frames
of 16×16, 10 flow-Euler steps with CFG 3, metrics fidelity and groundtruth (colour, shape,
motion, persistence and ``gt_fd`` against the captions), methods fp, minmax, mse,
smoothquant, os+, qvd, qvd-htdq, qvd-scri at W8A8, W4A8, W4A4, one weight seed
(``--seeds 3`` adds the spread). Another ``--model`` falls back to
``OTHER_MODEL_DEFAULTS`` (2 built-in prompts, 10 DDIM steps, CFG 7.5, fidelity only):
groundtruth scores shapes-wan's clips alone. They are
printed before anything runs, with the work they make in sampling steps (one denoiser step
of one video, both CFG branches). The job's one progress bar counts that work in units of
one sampling step's time, with collection, quantization and the report weighted by their
estimated cost (``evaluate.progress``); its total is known before the first step, and
before the first unit completes its ETA comes from one forward of the machine probe
(``evaluate.progress.probe_forward``) timed first. All are recorded in
``results/<model>/run.json`` with the wall time and the time each phase took.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qvd_bench.commands._args import add_device_args, csv, device_and_dtype, output_root
from qvd_bench.errors import UserError

RUN_DEFAULTS: dict[str, Any] = {
    "model": "shapes-wan",
    "num_prompts": 6,
    "frames": 8,
    "height": 16,
    "width": 16,
    "steps": 10,
    # The model was trained with caption dropout and is scored at CFG 3.
    "guidance_scale": 3.0,
    "scheduler": "flow-euler",
    "metrics": ("fidelity", "groundtruth"),
    "methods": ("fp", "minmax", "mse", "smoothquant", "os+", "qvd", "qvd-htdq", "qvd-scri"),
    "bits": ("W8A8", "W4A8", "W4A4"),
    "seeds": 1,
    "weight_seed": 0,
    "seed": 0,
    "device": "cpu",
    "dtype": "float32",
}
# The defaults that change when ``model`` is not the default one: the built-in prompts
# and the sampling of the random-weight presets; groundtruth needs dataset captions and
# the shapes-wan clip, so it is dropped.
OTHER_MODEL_DEFAULTS: dict[str, Any] = {
    "num_prompts": 2,
    "steps": 10,
    "guidance_scale": 7.5,
    "scheduler": "ddim",
    "metrics": ("fidelity",),
}
RUN_RECORD = "run.json"


def defaults_for(model: str | None) -> dict[str, Any]:
    """``RUN_DEFAULTS`` for ``model`` (None: the default model)."""
    defaults = dict(RUN_DEFAULTS)
    if model is not None and model != RUN_DEFAULTS["model"]:
        defaults.update(model=model, **OTHER_MODEL_DEFAULTS)
    return defaults


def default_prompts(model: str, count: int) -> tuple[str, ...]:
    """The job's prompts: for the default model, every k-th held-out seen dataset caption,
    k = 144 // count + 1 (the captions list motions fastest, so one past an even split
    steps through motions as well as colours and shapes; indices wrap past 144); for any
    other model the first ``count`` built-in prompts.

    Raises:
        UserError: ``count`` < 1.
    """
    from qvd_bench.prompts import select_prompts

    if model != RUN_DEFAULTS["model"]:
        return tuple(select_prompts(None, count))
    from qvd_bench.datasets.shapes import heldout_captions

    if count < 1:
        raise UserError(f"the number of prompts must be at least 1, got {count}")
    captions = heldout_captions("seen")
    every = len(captions) // count + 1
    return tuple(captions[(i * every) % len(captions)] for i in range(count))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("run", help="the default end-to-end job on the tiny model")
    parser.add_argument(
        "--out", default=".", help="output root for stats/, results/, reports/ (default: .)"
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="weight seeds; 3 adds the spread (default: 1)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model (default: shapes-wan, scored also against its held-out dataset captions "
        "with the groundtruth metrics; another model takes 2 built-in prompts, 10 DDIM steps, "
        "CFG 7.5 and fidelity only)",
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="prompts (default: 6 held-out dataset captions for shapes-wan, 2 otherwise)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps (default: 10, flow-Euler for shapes-wan, DDIM otherwise)",
    )
    parser.add_argument("--frames", type=int, default=None, help="latent frames (default: 8)")
    parser.add_argument("--height", type=int, default=None, help="latent height (default: 16)")
    parser.add_argument("--width", type=int, default=None, help="latent width (default: 16)")
    parser.add_argument(
        "--methods",
        type=csv,
        default=None,
        help="methods (default: fp,minmax,mse,smoothquant,os+,qvd,qvd-htdq,qvd-scri)",
    )
    parser.add_argument(
        "--bits", type=csv, default=None, help="bit-widths (default: W8A8,W4A8,W4A4)"
    )
    parser.add_argument(
        "--report-dir",
        default=None,
        help="write the report here (default: OUT/reports/MODEL); the committed example "
        "report is made with --report-dir reports/example",
    )
    add_device_args(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--config-of",
        metavar="BASELINE",
        default=None,
        help="run a regression baseline's configuration (stats/baselines/NAME.json) and "
        "write its figures for qvd-bench regress --results OUT --baseline BASELINE",
    )


def run(args: argparse.Namespace) -> int:
    if args.config_of is not None:
        from qvd_bench.commands.regress import run_config_of

        return run_config_of(
            args.config_of, output_root(args.out), progress=not args.no_progress, args=args
        )
    device, dtype = device_and_dtype(args)
    return run_job(
        output_root(args.out),
        args.seeds,
        model=args.model,
        num_prompts=args.num_prompts,
        frames=args.frames,
        height=args.height,
        width=args.width,
        steps=args.steps,
        methods=args.methods,
        bits=args.bits,
        device=device,
        dtype=dtype,
        progress=not args.no_progress,
        report_dir=args.report_dir,
    )


def run_settings(seeds: int = 1, **overrides: Any) -> dict[str, Any]:
    """The defaults of the model (``defaults_for``) with ``overrides`` applied (None means
    "keep the default").

    Raises:
        UserError: an unknown setting.
    """
    unknown = sorted(set(overrides) - set(RUN_DEFAULTS))
    if unknown:
        raise UserError(f"unknown run settings: {', '.join(unknown)}")
    settings = defaults_for(overrides.get("model"))
    settings["seeds"] = seeds
    for key, value in overrides.items():
        if value is not None:
            settings[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return settings


def format_settings(settings: dict[str, Any]) -> str:
    """One line per setting, marking those changed from the model's defaults."""
    defaults = defaults_for(settings["model"])
    lines = ["qvd-bench run settings (* = changed by a flag):"]
    for key, value in settings.items():
        shown = ",".join(value) if isinstance(value, tuple) else value
        mark = "*" if value != defaults[key] else " "
        lines.append(f" {mark} {key:<15} {shown}")
    return "\n".join(lines)


def format_work(planned: dict[str, int], steps: int, work: dict[str, int] | None = None) -> str:
    """The work of the job before it starts: sampling steps per stage and videos, and (given
    ``work``, the progress bar's units per stage) what the progress bar counts."""
    shown = ", ".join(f"{stage} {count}" for stage, count in planned.items())
    videos = (planned["fp reference"] + planned["quantized"]) // steps
    line = f"work: {sum(planned.values())} sampling steps ({shown}) for {videos} videos"
    if work is None:
        return line
    units = ", ".join(f"{stage} {count}" for stage, count in work.items())
    return (
        f"{line}; the progress bar counts {sum(work.values())} units of one sampling "
        f"step's time ({units})"
    )


def job_config(settings: dict[str, Any], pipeline_kwargs: Mapping[str, Any] | None = None):
    """The ``EvalConfig`` of the job with ``settings`` (``run_settings``); its statistics
    and videos are sampled with ``pipeline_kwargs``, the pipeline call's further keyword
    arguments."""
    from qvd_bench.evaluate.config import EvalConfig
    from qvd_bench.evaluate.generate import GenerationSettings

    return EvalConfig(
        model=settings["model"],
        weight_seeds=tuple(
            range(settings["weight_seed"], settings["weight_seed"] + settings["seeds"])
        ),
        methods=settings["methods"],
        bits=settings["bits"],
        metrics=tuple(m for m in settings["metrics"] if m != "fidelity"),
        prompts=default_prompts(settings["model"], settings["num_prompts"]),
        settings=GenerationSettings(
            steps=settings["steps"],
            guidance_scale=settings["guidance_scale"],
            seed=settings["seed"],
            frames=settings["frames"],
            height=settings["height"],
            width=settings["width"],
            scheduler=settings["scheduler"],
        ),
        device=settings["device"],
        dtype=settings["dtype"],
        pipeline_kwargs=pipeline_kwargs or {},
    )


def run_job(
    out: str | Path = ".",
    seeds: int = 1,
    *,
    model: str | None = None,
    num_prompts: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    scheduler: str | None = None,
    methods: Sequence[str] | None = None,
    bits: Sequence[str] | None = None,
    weight_seed: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    report_dir: str | Path | None = None,
    pipeline_kwargs: Mapping[str, Any] | None = None,
) -> int:
    """Runs the whole pipeline with the defaults (flags change them) and prints where.

    Writes ``stats/<model>-w<seed>/`` (statistics, ``analysis.parquet``, ``plan.json``),
    ``results/<model>/`` (``results.parquet``, ``timings.parquet``, ``run.json``, the
    generation cache) and ``reports/<model>/index.html`` under ``out``.

    Args:
        out: the output root (default: the current directory).
        seeds: number of weight seeds; more than one reports mean ± sd.
        The rest: overrides of ``RUN_DEFAULTS`` (None keeps the default); ``device`` and
            ``dtype`` say where and in which dtype every model runs (statistics are
            accumulated in float64 whatever the dtype).
        progress: show the job's progress bar (its ETA before the first step comes from
            one machine probe forward, timed first).
        report_dir: where the report goes (default: ``out/reports/<model>/``).
        pipeline_kwargs: further keyword arguments of the pipeline call (a model with a
            diffusers pipeline), one set for the collection and every video
            (``EvalConfig.pipeline_kwargs``); recorded in ``run.json``.

    Returns:
        0.
    """
    from qvd_bench import store
    from qvd_bench.commands.evaluate import print_summary, write_report
    from qvd_bench.evaluate.matrix import evaluate, planned_steps, planned_work
    from qvd_bench.evaluate.progress import REPORT_COST, JobBar, probe_seconds, seconds_per_unit
    from qvd_bench.evaluate.shard import Shard
    from qvd_bench.models.device import check_device

    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    settings = run_settings(
        seeds,
        model=model,
        num_prompts=num_prompts,
        frames=frames,
        height=height,
        width=width,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        methods=methods,
        bits=bits,
        weight_seed=weight_seed,
        seed=seed,
        device=device,
        dtype=dtype,
    )
    check_device(settings["device"], settings["dtype"])
    out = store.check_output_directory(out)
    if report_dir is not None:
        store.check_output_directory(report_dir)
    config = job_config(settings, pipeline_kwargs)
    planned = planned_steps(config, out)
    # Under torchrun rank 0 prints, records and shows the bar, which counts its own prompts.
    shard = Shard(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    work = planned_work(config, out, len(shard.prompts(len(config.prompts))))
    work["report"] = REPORT_COST
    if shard.main:
        print(format_settings(settings))
        print(format_work(planned, settings["steps"], work), flush=True)
    shown = progress and shard.main
    prior = seconds_per_unit(probe_seconds()) if shown else None  # the ETA before any step
    started = time.perf_counter()
    bar = JobBar(
        total=sum(work.values()),
        desc="qvd-bench run",
        unit="step",
        disable=not shown,
        seconds_per_unit=prior,
    )
    try:
        result = evaluate(config, out, progress=progress, bar=bar)
        if result is None:  # not rank 0 of a multi-process run: rank 0 records and reports
            return 0
        name = Path(settings["model"]).name or "model"
        write_report(result, config, out, name, report_dir=report_dir)
        bar.update(REPORT_COST)
    finally:
        bar.close()
    wall = time.perf_counter() - started
    timings = result.timings
    per_method = (
        timings[timings["bits"] != ""]
        .groupby("method", sort=False)[["quantize_s", "generate_s"]]
        .sum()
        .round(2)
    )
    record = {
        "defaults": _jsonable(defaults_for(settings["model"])),
        "settings": _jsonable(settings),
        "pipeline_kwargs": dict(config.pipeline_kwargs),
        "wall_seconds": round(wall, 2),
        "statistics_seconds": round(
            float(timings.loc[timings["method"] == "statistics", "quantize_s"].sum()), 2
        ),
        "seconds_per_method": per_method.to_dict(orient="index"),
        "videos_generated": result.generated,
        "videos_cached": result.cached,
        "planned_steps": planned,
        "planned_work": work,
    }
    store.write_json(result.results_dir / RUN_RECORD, record)
    print_summary(result, out, name, report_dir)
    print(
        f"sampling steps: {sum(planned.values())} for {result.generated + result.cached} "
        f"videos and the statistics; the progress bar's count: {sum(work.values())} units"
    )
    print(f"statistics in {', '.join(str(p) for p in result.stats_dirs.values())}")
    print(f"wall time {wall:.1f} s; seconds per method (quantize, generate):")
    for method, row in per_method.iterrows():
        print(f"  {method:<12} {row['quantize_s']:8.1f} {row['generate_s']:8.1f}")
    return 0


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
