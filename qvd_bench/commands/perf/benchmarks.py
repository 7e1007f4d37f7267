"""The performance benchmarks behind ``qvd-bench perf``.

Every figure is a ratio measured side by side in one run: the variants are interleaved
(each repeat runs every variant once, in turn) and medians are reported, so drift of the
machine affects all of them alike. ``run`` times the main job once instead, as a user
runs it (a fresh process), in units of the FP forward timed just before and just after
it by the benchmark's process (``bench_run``).
Benchmarks run on one thread.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qvd_bench.errors import UserError
from qvd_bench.evaluate.progress import PROBE_LATENT, probe_forward

# Latent sizes (frames, height, width): tiny-unet3d at its stated size; the
# full-size architecture at a small latent so that a run takes minutes, not hours.
PERF_LATENTS = {"modelscope-t2v-arch": (4, 16, 16)}
DEFAULT_LATENT = (8, 32, 32)


def interleaved(
    variants: dict[str, Callable[[], None]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Times each variant ``repeats`` times, interleaved; returns seconds per run."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


@dataclass
class Row:
    """One measured variant."""

    variant: str
    median_s: float
    ratio: float
    bytes: int | None = None
    note: str = ""
    # Spread of the per-repeat ratios (each repeat's time over the same repeat's base),
    # where the benchmark states it.
    ratio_min: float | None = None
    ratio_max: float | None = None


@dataclass
class Table:
    title: str
    rows: list[Row] = field(default_factory=list)

    def render(self) -> str:
        # Wider than 34 characters only when a variant's name is (perf run's phases).
        width = max([34, *(len(r.variant) for r in self.rows)])
        spread = any(r.ratio_min is not None for r in self.rows)
        header = f"  {'variant':<{width}} {'median':>10} {'ratio':>8}"
        if spread:
            header += f" {'ratio min-max':>14}"
        lines = [self.title, f"{header} {'memory':>12}  note"]
        for r in self.rows:
            memory = f"{r.bytes / 2**20:,.2f} MiB" if r.bytes is not None else ""
            line = f"  {r.variant:<{width}} {r.median_s * 1e3:>8.1f}ms {r.ratio:>7.2f}x"
            if spread:
                span = f"{r.ratio_min:.2f}-{r.ratio_max:.2f}x" if r.ratio_min is not None else ""
                line += f" {span:>14}"
            lines.append(f"{line} {memory:>12}  {r.note}".rstrip())
        return "\n".join(lines)


def denoiser_call(
    loaded, batch: int, frames: int, height: int, width: int
) -> Callable[[], torch.Tensor]:
    """One denoiser call on fixed random inputs at t=500, ready to time (it holds the model).

    Random text states stand in for the text encoder's: only their shape matters here.

    Args:
        loaded: the LoadedModel.
        batch: the batch size.
        frames, height, width: the latent size.
    """
    denoiser, family = loaded.denoiser.eval(), loaded.family
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(
        family.latent_shape(denoiser, batch, frames, height, width), generator=generator
    )
    length, dim = family.text_embedding_shape(denoiser)
    text = torch.randn(batch, length, dim, generator=generator)
    conditioning = family.conditioning(denoiser, batch, frames, height, width, generator)
    timestep = torch.full((batch,), 500.0)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return family.forward(denoiser, latents, timestep, text, conditioning)

    return forward


def _state_bytes(accumulators) -> int:
    return sum(
        t.numel() * t.element_size() for acc in accumulators for t in acc.state_dict().values()
    )


class _RawKeeper:
    """Copies every layer input, as Q-Diffusion-style calibration tools keep them.

    The copies are timed and their bytes counted, then dropped at once (``keep=False``)
    so that a large latent fits in memory: a tool that keeps them needs that much more.
    """

    def __init__(self, layers: dict[str, nn.Module], keep: bool = False):
        self.layers = layers
        self.keep = keep
        self.kept: list[torch.Tensor] = []
        self.bytes = 0
        self.handles: list = []

    def __enter__(self):
        self.kept.clear()
        self.bytes = 0
        for module in self.layers.values():
            self.handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def _hook(self, module, args, kwargs):
        copy = (args[0] if args else kwargs["input"]).detach().clone()
        self.bytes += copy.numel() * copy.element_size()
        if self.keep:
            self.kept.append(copy)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


class _TorchAoObservers:
    """torch.ao.quantization's PerChannelMinMaxObserver + HistogramObserver on each input."""

    def __init__(self, layers: dict[str, nn.Module], channel_dims: dict[str, int]):
        from torch.ao.quantization.observer import HistogramObserver, PerChannelMinMaxObserver

        self.layers = layers
        self.observers = {
            name: (
                PerChannelMinMaxObserver(ch_axis=channel_dims[name]),
                HistogramObserver(),
            )
            for name in layers
        }
        self.handles: list = []

    def __enter__(self):
        for name, module in self.layers.items():
            self.handles.append(
                module.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            )
        return self

    def _hook(self, name):
        per_channel, histogram = self.observers[name]

        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach()
            per_channel(x)
            histogram(x)

        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


# The token stride of the subsampled variant: histograms count 1 row in this many.
SUBSAMPLED_HISTOGRAM_STRIDE = 8

# Short names of bench_collect's variants (the plain forward always runs).
COLLECT_VARIANTS = {
    "moments": "moments",
    "histogram": "histogram",
    "reservoir": "reservoir",
    "all": "all (moments+histogram+reservoir)",
    "all-stride": f"all, histogram stride {SUBSAMPLED_HISTOGRAM_STRIDE}",
    "raw": "keep raw inputs (Q-Diffusion style)",
    "torch.ao": "torch.ao PerChannelMinMax+Histogram",
}


def bench_collect(
    model_name: str,
    repeats: int,
    latent: tuple[int, int, int] | None = None,
    variants: tuple[str, ...] | None = None,
) -> Table:
    """Collection overhead on one model: each accumulator alone, all of them, and peers.

    Args:
        model_name: the model preset.
        repeats: interleaved repeats (after one warm-up round).
        latent: (frames, height, width) of the latent; ``PERF_LATENTS`` or
            ``DEFAULT_LATENT`` when None.
        variants: short names (``COLLECT_VARIANTS``) of the variants to time beside the
            plain forward; all when None. The raw inputs' bytes are counted in any case.

    Returns:
        The table: per variant the median time, its ratio to the plain forward and the
        spread of the per-repeat ratios; statistics state bytes beside the bytes of the
        raw inputs of one forward.
    """
    from qvd_bench.collect.hooks import StatsCollector, describe_layer
    from qvd_bench.config import CollectConfig
    from qvd_bench.models import roles, zoo
    from qvd_bench.models.sampling import CallTracker, DenoiserCall
    from qvd_bench.numerics.edges import SignedLogEdges

    if latent is not None and (len(latent) != 3 or min(latent) < 1):
        raise UserError(
            f"latent must be three positive sizes (frames, height, width), got {latent}"
        )
    unknown = sorted(set(variants or ()) - set(COLLECT_VARIANTS))
    if unknown:
        raise UserError(
            f"unknown collect variants {', '.join(unknown)}; known: {', '.join(COLLECT_VARIANTS)}"
        )
    chosen = {COLLECT_VARIANTS[v] for v in (variants or COLLECT_VARIANTS)}
    loaded = zoo.load_model(model_name)
    denoiser = loaded.denoiser.eval()
    frames, height, width = latent or PERF_LATENTS.get(model_name, DEFAULT_LATENT)
    forward = denoiser_call(loaded, 1, frames, height, width)
    decisions = roles.classify(loaded)
    layers = roles.leaf_layers(denoiser)
    infos = {
        n: describe_layer(n, m, decisions[n].role, decisions[n].decided_by)
        for n, m in layers.items()
    }
    tracker = CallTracker(denoiser)
    samples = itertools.count()

    def with_hooks(make):
        def run():
            # One conditional call at t=500, no sampler. Each forward is another sample, as
            # in a collection: the moments keys stay the same, and the reservoir sees new
            # rows (a row seen again would be a duplicate, which no collection offers).
            tracker.current = DenoiserCall(500.0, ("cond",), (next(samples),))
            with make():
                forward()

        return run

    # As a collection configures them by default (CollectConfig's field defaults).
    edges = SignedLogEdges(relative_error=CollectConfig.histogram_relative_error)
    stride, capacity = CollectConfig.histogram_stride, CollectConfig.reservoir_capacity
    histogram = {"histogram_edges": edges, "histogram_stride": stride}
    subsampled = {"histogram_edges": edges, "histogram_stride": SUBSAMPLED_HISTOGRAM_STRIDE}
    collectors = {
        COLLECT_VARIANTS["moments"]: StatsCollector(layers, infos, tracker),
        COLLECT_VARIANTS["histogram"]: StatsCollector(
            layers, infos, tracker, moments=False, **histogram
        ),
        COLLECT_VARIANTS["reservoir"]: StatsCollector(
            layers, infos, tracker, moments=False, reservoir_capacity=capacity
        ),
        COLLECT_VARIANTS["all"]: StatsCollector(
            layers, infos, tracker, reservoir_capacity=capacity, **histogram
        ),
        COLLECT_VARIANTS["all-stride"]: StatsCollector(
            layers, infos, tracker, reservoir_capacity=capacity, **subsampled
        ),
    }
    raw = _RawKeeper(layers)

    def keep_raw():
        with raw:
            forward()

    channel_dims = {n: i.channel_dim for n, i in infos.items()}
    ao = _TorchAoObservers(layers, channel_dims)
    runs: dict[str, Callable[[], None]] = {"plain forward": forward}
    runs.update({name: with_hooks(lambda c=c: c) for name, c in collectors.items()})
    runs[COLLECT_VARIANTS["raw"]] = keep_raw
    runs[COLLECT_VARIANTS["torch.ao"]] = with_hooks(lambda: ao)
    runs = {name: run for name, run in runs.items() if name == "plain forward" or name in chosen}
    times = interleaved(runs, repeats)
    if COLLECT_VARIANTS["raw"] not in chosen:
        keep_raw()  # once, untimed: the bytes of one forward's raw inputs
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians["plain forward"]
    table = Table(
        f"perf collect: {model_name}, latent {frames}x{height}x{width}, {len(layers)} layers, "
        f"{loaded.param_count / 1e6:,.1f} M parameters, {repeats} interleaved repeats, "
        "medians; ratio min-max: each repeat over the same repeat's plain forward; "
        f"collection defaults: histogram stride {stride}, reservoir {capacity} rows a layer"
    )
    per_forward_raw = raw.bytes
    for name, median in medians.items():
        ratios = [t / b for t, b in zip(times[name], times["plain forward"], strict=True)]
        row = Row(name, median, median / base, ratio_min=min(ratios), ratio_max=max(ratios))
        if name in collectors:
            acc = collectors[name]
            groups = [acc.moments.values(), acc.histograms.values(), acc.reservoirs.values()]
            row.bytes = sum(_state_bytes(g) for g in groups)
            row.note = (
                f"raw inputs of one forward / state = {per_forward_raw / max(row.bytes, 1):,.0f}x"
            )
        elif name.startswith("keep raw"):
            row.bytes = per_forward_raw
            row.note = "per forward (copied, counted, dropped); grows with every call"
        table.rows.append(row)
    return table


def _random_covariance(d: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (divided by N) of 2·d samples with per-dimension scales."""
    scales = torch.rand(d, generator=generator, dtype=torch.float64) * 2.0 + 0.05
    x = torch.randn(2 * d, d, generator=generator, dtype=torch.float64) * scales
    x = x @ (
        torch.eye(d, dtype=torch.float64)
        + 0.1 * torch.randn(d, d, generator=generator, dtype=torch.float64)
    )
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.mT @ centred / x.shape[0]


def bench_frechet(model: str, repeats: int) -> Table:
    """Frechet distance at feature dimension ``int(model)``: ours against the usual forms.

    ``model`` is a feature dimension (``qvd-bench perf frechet --models 400,1024,2048``;
    see ``BENCHMARK_DEFAULT_MODELS``). Variants: ours (Cholesky + eigvalsh), the eigh
    square-root form, ``scipy.linalg.sqrtm(Σ1Σ2)`` as pytorch-fid, clean-fid and StyleGAN-V
    compute it, and torchmetrics' ``eigvals(Σ1Σ2)``. Ratios are times over ours; notes give
    each value's distance from the sqrtm one against the 1e-6·(trΣ1 + trΣ2) tolerance.
    """
    import numpy as np
    import scipy.linalg
    from torchmetrics.image.fid import _compute_fid

    from qvd_bench.evaluate import frechet

    try:
        d = int(model)
    except ValueError:
        raise UserError(
            f"perf frechet takes feature dimensions as --models (e.g. 400,1024,2048), got {model!r}"
        ) from None
    if d < 2:
        raise UserError(f"perf frechet needs a feature dimension >= 2, got {d}")
    generator = torch.Generator().manual_seed(d)
    mu1, cov1 = _random_covariance(d, generator)
    mu2, cov2 = _random_covariance(d, generator)
    mu2 = mu2 + 0.1
    m1, c1, m2, c2 = (t.numpy() for t in (mu1, cov1, mu2, cov2))

    def sqrtm_form() -> float:
        # pytorch-fid / clean-fid / StyleGAN-V: real part of sqrtm(Σ1·Σ2), then its trace.
        root = scipy.linalg.sqrtm(c1.dot(c2)).real
        diff = m1 - m2
        return float(diff.dot(diff) + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(root))

    def eigh_form() -> float:
        diff = mu1 - mu2
        trace = float(cov1.trace() + cov2.trace())
        return float(diff @ diff) + trace - 2.0 * frechet.trace_sqrt_product_eigh(cov1, cov2)

    forms = {
        "ours: cholesky + eigvalsh": lambda: frechet.frechet_distance(mu1, cov1, mu2, cov2),
        "eigh square root + eigvalsh": eigh_form,
        "scipy sqrtm(S1 S2) (pytorch-fid)": sqrtm_form,
        "torchmetrics eigvals(S1 S2)": lambda: float(_compute_fid(mu1, cov1, mu2, cov2)),
    }
    values = {name: run() for name, run in forms.items()}
    times = interleaved(forms, repeats)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians["ours: cholesky + eigvalsh"]
    reference = values["scipy sqrtm(S1 S2) (pytorch-fid)"]
    tolerance = 1e-6 * float(cov1.trace() + cov2.trace())
    table = Table(
        f"perf frechet: d={d}, covariances of 2·d samples, float64, {repeats} interleaved "
        f"repeats, medians; ratio = time / ours; FD(sqrtm) = {reference:.6f}, "
        f"tolerance 1e-6·(trS1+trS2) = {tolerance:.2e}"
    )
    for name, median in medians.items():
        table.rows.append(
            Row(
                name,
                median,
                median / base,
                note=f"|FD - FD(sqrtm)| = {abs(values[name] - reference):.2e}",
            )
        )
    return table


class _PeerFakeQuant(nn.Module):
    """The usual simulator layer: ``torch.fake_quantize_per_tensor_affine`` on the input
    and ``torch.fake_quantize_per_channel_affine`` on the weight, both at every call (as
    Q-Diffusion / PTQ4DiT-style ``QuantModule``s do), with the given qparams."""

    def __init__(self, module: nn.Module, act, weight_scale: torch.Tensor, w_bits: int):
        from qvd_bench.numerics.grid import quant_range

        super().__init__()
        self.module = module
        self.act_scale, self.act_zero = act._scale, act._zero_point
        self.act_min, self.act_max = act.q_min, act.q_max
        self.w_min, self.w_max = quant_range(w_bits, symmetric=True)
        self.register_buffer("w_scale", weight_scale.to(torch.float32))
        self.register_buffer("w_zero", torch.zeros_like(self.w_scale, dtype=torch.int32))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        m = self.module
        x = torch.fake_quantize_per_tensor_affine(
            input, self.act_scale, self.act_zero, self.act_min, self.act_max
        )
        w = torch.fake_quantize_per_channel_affine(
            m.weight, self.w_scale, self.w_zero, 0, self.w_min, self.w_max
        )
        if isinstance(m, nn.Linear):
            return nn.functional.linear(x, w, m.bias)
        return m._conv_forward(x, w, m.bias)


def bench_quant(model_name: str, repeats: int) -> Table:
    """Fake-quantized forward against the FP forward, on one model instance.

    Statistics come from a minimal collection (1 prompt, 1 step, no CFG) into a
    temporary directory, collected before the benchmark's model is loaded (never two
    copies in memory). ``quantize_`` with ``minmax`` at W8A8 swaps in ``QuantWrapper``s
    (per-channel weights fake-quantized once, static per-tensor inputs); the other
    variants switch references only: each wrapper's original module (FP), its input
    quantizer replaced by the ``DynamicTokenActQuant`` that
    ``QuantConfig(granularity="token")`` builds (dynamic per token) or by None (weights
    only), and a peer simulator layer with the same qparams that fake-quantizes input
    and weight with torch's ops at every call. Notes give each output's relative L2
    error against the FP output.
    """
    import gc
    import tempfile

    from qvd_bench.collect.collector import collect
    from qvd_bench.config import CollectConfig
    from qvd_bench.models import zoo
    from qvd_bench.quant.apply import quantize_
    from qvd_bench.quant.config import QuantConfig
    from qvd_bench.quant.modules import DynamicTokenActQuant, quant_wrappers, swap_module
    from qvd_bench.store import StatsRun

    frames, height, width = PERF_LATENTS.get(model_name, DEFAULT_LATENT)
    config = QuantConfig(method="minmax", w_bits=8, a_bits=8)
    with tempfile.TemporaryDirectory(prefix="qvd-perf-quant-") as tmp:
        stats_dir = Path(tmp) / "stats"
        collect(
            CollectConfig(
                model=model_name,
                prompts=("a calibration prompt",),
                steps=1,
                guidance_scale=1.0,
                frames=frames,
                height=height,
                width=width,
                histograms=False,
                reservoir_capacity=32,
                temporal_stride=100,
            ),
            stats_dir,
            progress=False,
        )
        gc.collect()  # the collection's model copy is gone before ours is loaded
        loaded = zoo.load_model(model_name)
        record = quantize_(loaded, config, stats=StatsRun(stats_dir))
    denoiser = loaded.denoiser.eval()
    wrappers = dict(quant_wrappers(denoiser))
    static_acts = {name: w.act for name, w in wrappers.items()}
    token_acts = {name: DynamicTokenActQuant(config.a_bits) for name in wrappers}
    peers = {
        name: _PeerFakeQuant(w.module, w.act, w.weight_scale, config.w_bits)
        for name, w in wrappers.items()
    }

    forward = denoiser_call(loaded, 1, frames, height, width)

    def use(modules: dict[str, nn.Module], acts: dict | None = None):
        def run():
            for name, module in modules.items():
                if acts is not None:
                    module.act = acts[name]
                swap_module(denoiser, name, module)
            return forward()

        return run

    fp_modules = {name: w.module for name, w in wrappers.items()}
    none_acts = dict.fromkeys(wrappers)
    static = "W8A8 minmax (static per-tensor)"
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "FP forward": use(fp_modules),
        static: use(wrappers, static_acts),
        "W8A8 dynamic per-token": use(wrappers, token_acts),
        "W8 weights only": use(wrappers, none_acts),
        "peer: torch fake_quant every call": use(peers),
    }
    outputs = {name: run().detach().clone() for name, run in variants.items()}
    reference = outputs["FP forward"]

    def relative_error(out: torch.Tensor) -> float:
        return float((out - reference).norm() / reference.norm().clamp_min(1e-30))

    peer_gap = float((outputs["peer: torch fake_quant every call"] - outputs[static]).abs().max())
    times = interleaved(variants, repeats)
    variants[static]()  # leave the model quantized
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians["FP forward"]
    table = Table(
        f"perf quant: {model_name}, latent {frames}x{height}x{width}, {len(wrappers)} "
        f"quantized layers ({record.summary()['activation_quantizers']}), "
        f"{loaded.param_count / 1e6:,.1f} M parameters, {repeats} interleaved repeats, "
        "medians; one conditional call at t=500; ratio = time / FP forward"
    )
    for name, median in medians.items():
        note = f"rel. L2 error vs FP {relative_error(outputs[name]):.2e}"
        if name.startswith("peer"):
            note += f"; max |peer - ours static| = {peer_gap:.2e}"
        table.rows.append(Row(name, median, median / base, note=note))
    return table


# Where the 5-minute target of ``qvd-bench run`` is checked.
RUN_TARGET_S = 300.0

# The machine probe: a forward whose time on the 2-core machine the target names was
# recorded when the target was set (113 ms): diffusers' UNet3DConditionModel at the
# tiny-unet3d config with PyTorch's own kernels, batch 1, 8 frames of 16×16 latents, one
# thread. The same machine has since measured it up to twice as slow from one day to the
# next, so the job's time is also given at the recorded speed (wall × recorded / probe).
PROBE_RECORDED_S = 0.113


def _time_unit_and_probe(
    model_name: str, repeats: int, weight_seed: int, frames: int, height: int, width: int
) -> dict[str, list[float]]:
    """Loads the model, times ``repeats`` unit forwards and probe forwards, interleaved
    (after one warm-up each), and frees both models.

    Returns:
        {"unit": seconds per run, "probe": seconds per run}.
    """
    import gc

    from qvd_bench.models import zoo

    # One batched-CFG call (batch 2: the uncond and cond copies of one sample).
    forwards = {
        "unit": denoiser_call(
            zoo.load_model(model_name, weight_seed=weight_seed), 2, frames, height, width
        ),
        "probe": probe_forward(),
    }
    times = interleaved(forwards, repeats)
    del forwards  # the closures hold the only references to the models
    gc.collect()
    return times


def _run_job_process(model_name: str, out: Path, arguments: list[str]) -> float:
    """Runs ``python -m qvd_bench run`` with ``arguments`` (flags and values) into ``out``
    in a fresh process, as a user runs it (its output discarded), on as many threads as
    this process uses; returns its wall time in seconds.

    Raises:
        UserError: the job rejected its input (exit code 2), with its message.
        RuntimeError: the job failed otherwise.
    """
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "qvd_bench", "run", "--model", model_name]
    command += ["--out", str(out), "--no-progress", *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    last = (result.stderr.strip().splitlines() or ["no error output"])[-1]
    if result.returncode == 2:  # bad input: the job's own one-line error
        raise UserError(f"perf run: {last.removeprefix('qvd-bench: error: ')}")
    if result.returncode != 0:
        raise RuntimeError(f"qvd-bench run failed with exit code {result.returncode}: {last}")
    return wall


def bench_run(model_name: str, repeats: int, **overrides: Any) -> Table:
    """The main job (``qvd-bench run``) end to end, its phases in units of the FP forward.

    Unlike the other benchmarks this one cannot interleave its variants: the job runs
    once, as a user runs it (``python -m qvd_bench run`` in a fresh process, so that its
    wall time includes the start-up imports), and its phases are what it recorded itself
    (``timings.parquet``: statistics collection + analysis, the FP reference videos, each
    configuration's quantization and generation). What makes its figures ratios
    measured side by side is the unit: the FP forward the job runs most (one
    batched-CFG call, batch 2, at the job's latent size, t=500), timed ``repeats`` times
    just before and ``repeats`` times just after the job by this process; the unit is
    the median of all of them, and the two medians are reported apart so that drift of
    the machine during the job shows. A phase's ratio reads "this phase costs as much
    as R FP forwards".

    The machine probe (``PROBE_RECORDED_S``) is timed interleaved with the unit. Its
    recorded time over its time now says how fast the machine runs against the day the
    5-minute target was set, and the total's note gives the job's wall time at that
    speed: an estimate (phases bound by memory and by arithmetic need not slow down
    alike), printed beside the measured time, which alone says whether the target is met.

    The model for the unit forward is loaded before the job and deleted before it
    starts, then loaded again after it, so that it and the job's own model copy are
    never in memory together. The job writes into a temporary directory that is
    removed afterwards; its printing is discarded.

    Args:
        model_name: the model of the job (``--model`` of ``qvd-bench run``).
        repeats: unit forwards timed before the job, and again after it.
        **overrides: settings that ``qvd-bench run`` takes as flags
            (``command_flags(run_command.add_parser)``: ``num_prompts``, ``frames``, ``height``,
            ``width``, ``steps``, ``methods``, ``bits``, ``seeds``); None or absent keeps
            the default.

    Returns:
        The table: the unit forward, the machine probe, statistics, quantize, FP
        reference generation, quantized generation, the rest of the wall time, and the
        total.

    Raises:
        UserError: ``repeats`` below 1, an unknown setting, one the command has no flag
            for, or a value the job rejects.
        RuntimeError: the job failed otherwise (its last line of error output is given).
    """
    import gc
    import tempfile

    import pandas as pd

    from qvd_bench.commands import run as run_command
    from qvd_bench.commands._args import command_flags
    from qvd_bench.evaluate.results import TIMINGS_FILE
    from qvd_bench.evaluate.videos import REFERENCE_METHOD

    if repeats < 1:
        raise UserError(f"perf run needs at least 1 repeat, got {repeats}")
    if "model" in overrides:
        raise UserError("perf run takes the model as its first argument (--models), not a setting")
    # The model's own defaults; raises UserError on unknown settings.
    settings = run_command.run_settings(model=model_name, **overrides)
    flags = command_flags(run_command.add_parser)
    unflagged = sorted(k for k, v in overrides.items() if v is not None and k not in flags)
    if unflagged:
        raise UserError(
            f"perf run times the qvd-bench run command, which has no flag for: "
            f"{', '.join(unflagged)}"
        )
    arguments = []
    for key, value in overrides.items():
        if value is not None:
            shown = ",".join(value) if isinstance(value, (list, tuple)) else str(value)
            arguments += [flags[key], shown]
    frames, height, width = settings["frames"], settings["height"], settings["width"]
    unit_args = {
        "model_name": model_name,
        "repeats": repeats,
        "weight_seed": settings["weight_seed"],
        "frames": frames,
        "height": height,
        "width": width,
    }

    before = _time_unit_and_probe(**unit_args)  # frees its model before the job starts
    with tempfile.TemporaryDirectory(prefix="qvd-perf-run-") as tmp:
        wall = _run_job_process(model_name, Path(tmp), arguments)
        results_dir = Path(tmp) / "results" / (Path(model_name).name or "model")
        timings = pd.read_parquet(results_dir / TIMINGS_FILE)
        record = json.loads((results_dir / run_command.RUN_RECORD).read_text())
    gc.collect()  # the job's model copies are gone before ours is loaded again
    after = _time_unit_and_probe(**unit_args)

    unit = statistics.median(before["unit"] + after["unit"])
    probe = statistics.median(before["probe"] + after["probe"])
    method = timings["method"]
    is_config = ~method.isin(["statistics", REFERENCE_METHOD])
    configs = timings[is_config]
    n_configs = len(configs[["method", "bits"]].drop_duplicates())
    seeds = timings["weight_seed"].nunique()
    count = f"{n_configs} configurations" + (f" x {seeds} weight seeds" if seeds > 1 else "")
    phases = {
        "statistics": float(timings.loc[method == "statistics", "quantize_s"].sum()),
        f"quantize ({count})": float(configs["quantize_s"].sum()),
        "generate: FP reference": float(
            timings.loc[method == REFERENCE_METHOD, "generate_s"].sum()
        ),
        f"generate: quantized ({count})": float(configs["generate_s"].sum()),
    }
    other = wall - sum(phases.values())

    changed = [
        f"{key}={','.join(value) if isinstance(value, tuple) else value}"
        for key, value in settings.items()
        if key != "model" and value != run_command.defaults_for(model_name)[key]
    ]
    table = Table(
        f"perf run: qvd-bench run on {model_name}, "
        + (f"settings changed: {' '.join(changed)}" if changed else "default settings")
        + f", {torch.get_num_threads()} thread(s); FP forward timed {repeats} times before "
        f"and {repeats} after the job, unit = median of all {2 * repeats}; "
        "ratio = seconds / FP forward measured in the same run"
    )
    table.rows.append(
        Row(
            f"FP forward (batch 2, {frames}x{height}x{width})",
            unit,
            1.0,
            note=f"median before the job {statistics.median(before['unit']) * 1e3:.1f} ms, "
            f"after {statistics.median(after['unit']) * 1e3:.1f} ms",
        )
    )
    table.rows.append(
        Row(
            f"machine probe (diffusers UNet3D, batch 1, {'x'.join(map(str, PROBE_LATENT))})",
            probe,
            probe / unit,
            note=f"recorded {PROBE_RECORDED_S * 1e3:.0f} ms where the target was set: "
            f"this machine runs at {PROBE_RECORDED_S / probe:.2f}x that speed now",
        )
    )
    for name, seconds in phases.items():
        table.rows.append(Row(name, seconds, seconds / unit))
    table.rows.append(
        Row(
            "other (start-up, report, I/O)",
            other,
            other / unit,
            note=f"wall - the phases above; before the job's own clock started "
            f"(interpreter, imports, argument parsing): "
            f"{wall - record['wall_seconds']:.1f} s",
        )
    )
    met = "met" if wall < RUN_TARGET_S else "not met"
    table.rows.append(
        Row(
            "total (wall)",
            wall,
            wall / unit,
            note=f"target < {RUN_TARGET_S:.0f} s on one CPU core; {met}; "
            f"about {wall * PROBE_RECORDED_S / probe:.0f} s at the probe's recorded speed; "
            f"{record['videos_generated']} videos generated",
        )
    )
    return table


BENCHMARKS = {
    "collect": bench_collect,
    "frechet": bench_frechet,
    "quant": bench_quant,
    "run": bench_run,
}

# What ``--models`` means per benchmark when the user gives none.
BENCHMARK_DEFAULT_MODELS = {
    "collect": ("tiny-unet3d", "modelscope-t2v-arch"),
    "frechet": ("400", "1024", "2048"),
    "quant": ("tiny-unet3d", "modelscope-t2v-arch"),
    "run": ("shapes-wan",),
}
