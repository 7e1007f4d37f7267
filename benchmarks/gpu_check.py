"""The GPU check: half precision on a device agrees with float32 on the CPU, and what each
phase of a full-size run costs there.

1. **Agreement** (the pass criterion): the small presets of the two families checked
   below (``tiny-unet3d``, ``tiny-wan``) are collected in ``--dtype`` on ``--device`` and
   in float32 on the CPU, from the same weights, prompts and noise. The device run passes
   when, over every (layer, timestep, branch, channel) of the layer inputs, the median
   relative error of the per-channel mean and of the per-channel standard deviation is at
   most 1e-2, and the SQNR of the device model's x0 predictions (CFG-combined, every
   step, teacher-forced on the float32 trajectory) against the float32 model's is at
   least 30 dB or, when the dtype's own rounding on the CPU cannot reach that, at least
   that CPU figure less 3 dB (``agreement``, a pure function of the runs' figures). The
   second bar exists because bfloat16 keeps 8 significant bits: on ``tiny-unet3d`` its
   x0 is about 24 dB from float32 on the CPU itself, so a fixed 30 dB would fail every
   correct bfloat16 device; what a device must not do is round worse than the dtype
   does (3 dB: twice the CPU's error power).
2. **Phases** at ``--size`` (full: ``modelscope-t2v-arch`` and a random DiT of Wan
   2.1-1.3B's size): collect ``--prompts`` x ``--steps``, analyze, quantize ``qvd`` at
   W8A8 and W4A8 and measure each one's fidelity against the FP model; wall time and peak
   host and device memory per phase (``resources.measure_stage``).
3. **Offloading**: on CUDA, the same phases once more with the denoiser inside its
   family's diffusers pipeline under ``enable_model_cpu_offload()`` (collected through
   the pipeline). Skipped elsewhere: diffusers offloads to an accelerator only.

Exit code 0 when the agreement passes and every phase ran, 1 otherwise.

    python benchmarks/gpu_check.py                                  # CUDA, bf16, full size
    python benchmarks/gpu_check.py --device cpu --size tiny --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qvd_bench.analysis.summary import analyze
from qvd_bench.collect.collector import collect
from qvd_bench.config import CollectConfig
from qvd_bench.evaluate import fidelity
from qvd_bench.evaluate.generate import GenerationSettings, generate, scheduler_for
from qvd_bench.evaluate.sensitivity import probe_for_run, quantized
from qvd_bench.models import zoo
from qvd_bench.models.device import check_device
from qvd_bench.models.tiny_pipelines import pipeline_around
from qvd_bench.quant.config import QuantConfig
from qvd_bench.resources import StageCost, format_bytes, measure_stage
from qvd_bench.store import StatsRun

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json.
WAN21_1_3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
WAN21_ARCH = "wan2.1-1.3b-arch"
# Model and latent (frames, height, width) of each size's phases.
SIZES = {
    "full": (("modelscope-t2v-arch", (8, 32, 32)), (WAN21_ARCH, (5, 30, 52))),
    "tiny": (("tiny-unet3d", (4, 8, 8)), ("tiny-wan", (2, 8, 8))),
}
AGREEMENT_MODELS = (("tiny-unet3d", (4, 8, 8)), ("tiny-wan", (2, 8, 8)))
AGREEMENT_STEPS = 4
MAX_MEDIAN_RELATIVE_ERROR = 1e-2
MIN_X0_SQNR_DB = 30.0
# How far below the dtype's own CPU rounding a device's x0 SQNR may fall.
DTYPE_FLOOR_MARGIN_DB = 3.0
BITS = ("W8A8", "W4A8")
PROMPTS = ("a red fox running through snow", "a sailing boat on a calm sea at sunset")


def register_wan21_arch() -> None:
    """Adds the Wan 2.1-1.3B-size random DiT to the zoo of this process (once)."""
    if WAN21_ARCH not in zoo.MODELS:
        zoo.MODELS.register(
            WAN21_ARCH,
            zoo.ModelSpec(
                WAN21_ARCH, "wan", lambda: dict(WAN21_1_3B), "Wan 2.1-1.3B size, random weights"
            ),
        )


# ----------------------------------------------------------------------- the criterion


@dataclass(frozen=True)
class Agreement:
    """How a device run compares with the float32 CPU run.

    Attributes:
        mean_error: median over channels of |mean_dev − mean_cpu| / max(|mean_cpu|,
            std_cpu) (the channel's magnitude: a mean near zero has no relative error of
            its own).
        std_error: median over channels of |std_dev − std_cpu| / std_cpu (a channel
            constant in both runs: 0).
        x0_sqnr_db: SQNR of the device model's x0 predictions against the CPU model's.
        min_sqnr_db: the x0 SQNR it had to reach.
        failures: one line per criterion missed; empty when it passes.
    """

    mean_error: float
    std_error: float
    x0_sqnr_db: float
    min_sqnr_db: float
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


def channel_mean_std(channels: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, timestep, branch, channel) of the layer inputs: mean and std.

    Args:
        channels: a run's ``channels`` table (count, mean, m2 per channel and key).
    """
    inputs = channels[channels["tensor"] == "input"]
    count = inputs["count"].to_numpy(dtype=np.float64)
    frame = pd.DataFrame(
        {
            "mean": inputs["mean"].to_numpy(dtype=np.float64),
            "std": np.sqrt(inputs["m2"].to_numpy(dtype=np.float64) / np.maximum(count, 1)),
        },
        index=pd.MultiIndex.from_frame(
            inputs[["layer", "timestep", "branch", "channel"]].astype({"layer": str, "branch": str})
        ),
    )
    return frame.sort_index()


def agreement(
    reference: pd.DataFrame,
    test: pd.DataFrame,
    x0_sqnr_db: float,
    *,
    max_error: float = MAX_MEDIAN_RELATIVE_ERROR,
    min_sqnr_db: float = MIN_X0_SQNR_DB,
    dtype_floor_db: float | None = None,
    margin_db: float = DTYPE_FLOOR_MARGIN_DB,
) -> Agreement:
    """Whether a run (``test``) agrees with the float32 CPU run (``reference``).

    Args:
        reference, test: ``channel_mean_std`` of the two runs.
        x0_sqnr_db: SQNR (dB) of the test model's x0 predictions against the reference's.
        max_error: the largest median relative error of the means and of the stds.
        min_sqnr_db: the smallest x0 SQNR.
        dtype_floor_db: the x0 SQNR of the test dtype on the CPU against float32, when
            known; the bar is then min(min_sqnr_db, dtype_floor_db − margin_db).
        margin_db: how far below ``dtype_floor_db`` the test run may fall.

    Returns:
        The errors and the criteria missed (keys present in one run only miss one).
    """
    failures = []
    if not reference.index.equals(test.index):
        failures.append(
            f"the runs hold different statistics keys ({len(reference)} against {len(test)})"
        )
        test = test.reindex(reference.index)
    mean_r, std_r = reference["mean"].to_numpy(), reference["std"].to_numpy()
    mean_t, std_t = test["mean"].to_numpy(), test["std"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.maximum(np.abs(mean_r), std_r)
        mean_rel = np.where(mean_t == mean_r, 0.0, np.abs(mean_t - mean_r) / scale)
        std_rel = np.where(std_t == std_r, 0.0, np.abs(std_t - std_r) / std_r)
    # A key missing from the test run (NaN) counts as the largest error.
    mean_error = float(np.median(np.nan_to_num(mean_rel, nan=np.inf)))
    std_error = float(np.median(np.nan_to_num(std_rel, nan=np.inf)))
    if not mean_error <= max_error:
        failures.append(f"per-channel mean: median relative error {mean_error:.2e} > {max_error:g}")
    if not std_error <= max_error:
        failures.append(f"per-channel std: median relative error {std_error:.2e} > {max_error:g}")
    bar = min_sqnr_db
    if dtype_floor_db is not None and dtype_floor_db - margin_db < bar:
        bar = dtype_floor_db - margin_db
    if not x0_sqnr_db >= bar:
        why = "" if bar == min_sqnr_db else f" (the dtype's CPU rounding less {margin_db:g} dB)"
        failures.append(f"FP x0 SQNR {x0_sqnr_db:.1f} dB < {bar:.1f} dB{why}")
    return Agreement(mean_error, std_error, float(x0_sqnr_db), float(bar), tuple(failures))


# ----------------------------------------------------------------------------- running


def collect_config(model: str, latent, *, steps: int, prompts: int, device, dtype, **extra):
    frames, height, width = latent
    return CollectConfig(
        model=model,
        prompts=PROMPTS[:prompts],
        steps=steps,
        frames=frames,
        height=height,
        width=width,
        device=device,
        dtype=dtype,
        temporal_stride=extra.pop("temporal_stride", 50),
        **extra,
    )


def x0_predictions(loaded, settings, prompts, teacher=None) -> tuple[torch.Tensor, list]:
    """(S, N, ...) CFG x0 predictions of every step of every prompt, and the generations;
    with ``teacher`` (generations), fed the teacher's inputs."""
    scheduler = scheduler_for(loaded, settings)
    made = [
        generate(loaded, prompt, i, settings, teacher=None if teacher is None else teacher[i])
        for i, prompt in enumerate(prompts)
    ]
    x0 = [
        g.x0(scheduler, "cfg", None if teacher is None else teacher[i].model_inputs)
        for i, g in enumerate(made)
    ]
    return torch.cat(x0, dim=1), made


def check_agreement(
    model: str, latent, *, device: str, dtype: str, prompts: int, out: Path, **thresholds
) -> tuple[Agreement, list[float]]:
    """Collects ``model`` small on the CPU in float32 and on ``device`` in ``dtype``.

    Returns:
        The ``agreement`` (``thresholds``: its keywords; its dtype floor is the x0 SQNR
        of ``dtype`` on the CPU, from the same weights and trajectory) and the x0 SQNR of
        each step.
    """
    runs = {}
    for name, (where, kind) in {"cpu": ("cpu", "float32"), "test": (device, dtype)}.items():
        config = collect_config(
            model, latent, steps=AGREEMENT_STEPS, prompts=prompts, device=where, dtype=kind,
            temporal_stride=0, reservoir_capacity=0,
        )  # fmt: skip
        collect(config, out / f"{model}-{name}", overwrite=True, progress=False)
        runs[name] = StatsRun(out / f"{model}-{name}")
    reference = zoo.load_run_model(runs["cpu"], device="cpu", dtype="float32")
    test = zoo.load_run_model(runs["cpu"], device=device, dtype=dtype)
    frames, height, width = latent
    settings = GenerationSettings(
        steps=AGREEMENT_STEPS, frames=frames, height=height, width=width, seed=1
    )
    texts = PROMPTS[:prompts]
    ref_x0, teacher = x0_predictions(reference, settings, texts)
    test_x0, _ = x0_predictions(test, settings, texts, teacher=teacher)
    if torch.device(device).type == "cpu":
        floor_x0 = test_x0
    else:
        same_dtype = zoo.load_run_model(runs["cpu"], device="cpu", dtype=dtype)
        floor_x0, _ = x0_predictions(same_dtype, settings, texts, teacher=teacher)
    result = agreement(
        channel_mean_std(runs["cpu"].channels),
        channel_mean_std(runs["test"].channels),
        float(fidelity.sqnr(ref_x0, test_x0)),
        dtype_floor_db=float(fidelity.sqnr(ref_x0, floor_x0.to(ref_x0.device))),
        **thresholds,
    )
    return result, [float(fidelity.sqnr(r, t)) for r, t in zip(ref_x0, test_x0)]


def run_phases(
    model: str,
    latent,
    *,
    device: str,
    dtype: str,
    steps: int,
    prompts: int,
    out: Path,
    offload: bool = False,
) -> list[StageCost]:
    """collect, analyze, then per bit-width quantize qvd and measure fidelity."""
    costs: list[StageCost] = []

    def phase(name: str, work: Callable[[], object]):
        with measure_stage(name, device) as cost:
            value = work()
        costs.append(cost)
        print(f"  {line(cost)}", flush=True)
        return value

    run_dir = out / (model + ("-offload" if offload else ""))
    loaded = None
    if offload:
        # The pipeline's components start on the CPU; diffusers moves each to the device
        # for its forward and back.
        def offloaded():
            model_cpu = pipeline_around(zoo.load_model(model, device="cpu", dtype=dtype))
            model_cpu.pipeline.enable_model_cpu_offload(device=device)
            return model_cpu

        loaded = phase("load (offloaded)", offloaded)
    config = collect_config(
        model, latent, steps=steps, prompts=prompts, device=device, dtype=dtype,
        sampler="pipeline" if offload else "denoiser",
    )  # fmt: skip
    phase(
        "collect",
        lambda: collect(config, run_dir, overwrite=True, progress=False, loaded=loaded),
    )
    run = StatsRun(run_dir)
    phase("analyze", lambda: analyze(run_dir))
    if loaded is None:
        loaded = phase("load", lambda: zoo.load_run_model(run, device=device, dtype=dtype))
    probe = phase("FP reference", lambda: probe_for_run(loaded, run, num_prompts=1))
    for bits in BITS:
        config = QuantConfig("qvd", int(bits[1]), int(bits[3]))
        with contextlib.ExitStack() as stack:  # quantized for the block, then restored
            record = phase(
                f"quantize qvd {bits}",
                lambda: stack.enter_context(quantized(loaded, config, run)),  # noqa: B023
            )
            sqnr = phase(f"fidelity qvd {bits}", lambda: probe.sqnr_db(record.tracker))  # noqa: B023
        print(f"    qvd {bits}: teacher-forced x0 SQNR {sqnr:.1f} dB", flush=True)
    return costs


def line(cost: StageCost) -> str:
    device = "–" if cost.peak_device_bytes is None else format_bytes(cost.peak_device_bytes)
    return (
        f"{cost.stage:<22} {cost.wall_s:8.1f} s   peak host "
        f"{format_bytes(cost.peak_host_bytes or 0):>10}   peak device {device:>10}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="device under test (default: cuda)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--size", default="full", choices=tuple(SIZES), help="of the phases")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps of the phases")
    parser.add_argument("--prompts", type=int, default=2, choices=(1, 2))
    parser.add_argument("--out", default=None, help="where runs go (default: a temporary dir)")
    parser.add_argument(
        "--max-error",
        type=float,
        default=MAX_MEDIAN_RELATIVE_ERROR,
        help="largest median relative error of per-channel means and stds (default: 1e-2)",
    )
    parser.add_argument(
        "--min-sqnr-db",
        type=float,
        default=MIN_X0_SQNR_DB,
        help="smallest FP x0 SQNR against float32, lowered to the dtype's own CPU "
        "figure less 3 dB where that is below it (default: 30)",
    )
    args = parser.parse_args(argv)
    check_device(args.device, args.dtype)
    register_wan21_arch()
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    ok = True
    print(f"agreement: {args.dtype} on {args.device} against float32 on the CPU", flush=True)
    for model, latent in AGREEMENT_MODELS:
        result, per_step = check_agreement(
            model, latent, device=args.device, dtype=args.dtype, prompts=args.prompts,
            out=out, max_error=args.max_error, min_sqnr_db=args.min_sqnr_db,
        )  # fmt: skip
        steps = ", ".join(f"{value:.1f}" for value in per_step)
        print(
            f"  {model}: mean error {result.mean_error:.2e}, std error {result.std_error:.2e}, "
            f"x0 SQNR {result.x0_sqnr_db:.1f} dB (by step: {steps}; bar "
            f"{result.min_sqnr_db:.1f} dB): " + ("pass" if result.passed else "FAIL"),
            flush=True,
        )
        for failure in result.failures:
            print(f"    {failure}", flush=True)
        ok &= result.passed
    passes = [False]
    if torch.device(args.device).type == "cuda":
        passes.append(True)
    for offload in passes:
        for model, latent in SIZES[args.size]:
            what = " under enable_model_cpu_offload()" if offload else ""
            print(f"{model}{what}, {args.dtype} on {args.device}, latent {latent}:", flush=True)
            try:
                run_phases(
                    model, latent, device=args.device, dtype=args.dtype, steps=args.steps,
                    prompts=args.prompts, out=out, offload=offload,
                )  # fmt: skip
            except Exception:  # noqa: BLE001 (report it and go on with the next phase)
                traceback.print_exc()
                ok = False
    if len(passes) == 1:
        print("enable_model_cpu_offload(): skipped (offloads to CUDA only)")
    print("gpu check: " + ("pass" if ok else "FAIL"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
