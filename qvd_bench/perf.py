"""Performance benchmarks behind ``qvd-bench perf``.

Every figure is a ratio measured side by side in one run: the variants are interleaved
(each repeat runs every variant once, in turn) and medians are reported, so drift of the
machine affects all of them alike. Benchmarks run on one thread.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qvd_bench.errors import UserError

# Latent sizes (frames, height, width): tiny-unet3d as DESIGN.md section 7 states; the
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


@dataclass
class Table:
    title: str
    rows: list[Row] = field(default_factory=list)

    def render(self) -> str:
        lines = [self.title, f"  {'variant':<34} {'median':>10} {'ratio':>8} {'memory':>12}  note"]
        for r in self.rows:
            memory = f"{r.bytes / 2**20:,.2f} MiB" if r.bytes is not None else ""
            lines.append(
                f"  {r.variant:<34} {r.median_s * 1e3:>8.1f}ms {r.ratio:>7.2f}x {memory:>12}  {r.note}"
            )
        return "\n".join(lines)


def _state_bytes(accumulators) -> int:
    return sum(
        t.numel() * t.element_size() for acc in accumulators for t in acc.state_dict().values()
    )


class _RawKeeper:
    """Keeps every layer input, as Q-Diffusion-style calibration tools do."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.kept: list[torch.Tensor] = []
        self.handles: list = []

    def __enter__(self):
        for module in self.layers.values():
            self.handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def _hook(self, module, args, kwargs):
        self.kept.append((args[0] if args else kwargs["input"]).detach().clone())

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kept)


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


def bench_collect(model_name: str, repeats: int) -> Table:
    """Collection overhead on one model: each accumulator alone, all of them, and peers."""
    from qvd_bench.collect.accumulators import SignedLogEdges
    from qvd_bench.collect.hooks import StatsCollector, describe_layer
    from qvd_bench.models import roles, zoo
    from qvd_bench.models.sampling import CallTracker, DenoiserCall

    loaded = zoo.load_model(model_name)
    denoiser, family = loaded.denoiser.eval(), loaded.family
    frames, height, width = PERF_LATENTS.get(model_name, DEFAULT_LATENT)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(
        family.latent_shape(denoiser, 1, frames, height, width), generator=generator
    )
    length, dim = family.text_embedding_shape(denoiser)
    text = torch.randn(1, length, dim, generator=generator)
    conditioning = family.conditioning(denoiser, 1, frames, height, width, generator)
    timestep = torch.tensor([500.0])
    decisions = roles.classify(loaded)
    layers = roles.leaf_layers(denoiser)
    infos = {
        n: describe_layer(n, m, decisions[n].role, decisions[n].decided_by)
        for n, m in layers.items()
    }
    tracker = CallTracker(denoiser)
    tracker.current = DenoiserCall(500.0, ("cond",), (0,))  # one conditional call, no sampler

    def forward():
        with torch.no_grad():
            family.forward(denoiser, latents, timestep, text, conditioning)

    def with_hooks(make):
        def run():
            with make():
                forward()

        return run

    edges = SignedLogEdges()
    collectors = {
        "moments": StatsCollector(layers, infos, tracker),
        "histogram": StatsCollector(layers, infos, tracker, moments=False, histogram_edges=edges),
        "reservoir": StatsCollector(layers, infos, tracker, moments=False, reservoir_capacity=256),
        "all (moments+histogram+reservoir)": StatsCollector(
            layers, infos, tracker, histogram_edges=edges, reservoir_capacity=256
        ),
    }
    raw = _RawKeeper(layers)

    def keep_raw():
        raw.kept.clear()
        with raw:
            forward()

    channel_dims = {n: i.channel_dim for n, i in infos.items()}
    ao = _TorchAoObservers(layers, channel_dims)
    variants: dict[str, Callable[[], None]] = {"plain forward": forward}
    variants.update({name: with_hooks(lambda c=c: c) for name, c in collectors.items()})
    variants["keep raw inputs (Q-Diffusion style)"] = keep_raw
    variants["torch.ao PerChannelMinMax+Histogram"] = with_hooks(lambda: ao)
    times = interleaved(variants, repeats)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians["plain forward"]
    table = Table(
        f"perf collect: {model_name}, latent {frames}x{height}x{width}, {len(layers)} layers, "
        f"{loaded.param_count / 1e6:,.1f} M parameters, {repeats} interleaved repeats, medians"
    )
    per_forward_raw = raw.bytes
    for name, median in medians.items():
        row = Row(name, median, median / base)
        if name in collectors:
            acc = collectors[name]
            groups = [acc.moments.values(), acc.histograms.values(), acc.reservoirs.values()]
            row.bytes = sum(_state_bytes(g) for g in groups)
            if name.startswith("moments"):
                row.note = (
                    f"raw inputs / moments state = {per_forward_raw / max(row.bytes, 1):,.0f}x"
                )
        elif name.startswith("keep raw"):
            row.bytes = per_forward_raw
            row.note = "per forward; grows with every call"
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


BENCHMARKS = {"collect": bench_collect, "frechet": bench_frechet}

# What ``--models`` means per benchmark when the user gives none.
BENCHMARK_DEFAULT_MODELS = {
    "collect": ("tiny-unet3d", "modelscope-t2v-arch"),
    "frechet": ("400", "1024", "2048"),
}


def main(benchmark: str, *, models: Sequence[str], repeats: int, out: str | None = None) -> int:
    """Runs one benchmark on each model and prints the tables; returns the exit code."""
    if benchmark not in BENCHMARKS:
        raise UserError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    torch.set_num_threads(1)
    tables = []
    for model in models:
        table = BENCHMARKS[benchmark](model, repeats)
        print(table.render(), flush=True)
        print()
        tables.append(table)
    if out:
        data = [{"title": t.title, "rows": [r.__dict__ for r in t.rows]} for t in tables]
        Path(out).write_text(json.dumps(data, indent=2))
    return 0
