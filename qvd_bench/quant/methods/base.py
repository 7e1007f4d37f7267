"""The method interface: one handler per quantization method, one record per layer.

A method is a ``Method`` subclass registered by name in ``METHODS``::

    @register_method("minmax")
    class MinMax(Method):
        description = "per-tensor min-max activations, min-max weights"

        def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
            return [minmax_record(ctx, name) for name in ctx.quantized_layers]

``prepare`` reads statistics (``ctx.run``), the plan (``ctx.plan``) and the config
(``ctx.config``) and returns one ``LayerRecord`` per layer of ``ctx.layers`` — every
in-scope layer, kept-FP ones included (``fp_record``). It must not change the model:
``quantize_`` builds the wrappers from the records (``build_wrapper``) and swaps them in,
and ``apply_record`` does exactly the same on a fresh model, so a record reloaded from
disk reproduces the quantized model bit for bit. Anything a method changes lives in a
record:

- ``LayerRecord.tensors``: the layer's own tensors, under the keys of
  ``record.TENSOR_KEYS``;
- ``LayerRecord.folded``: parameters of *other* modules rewritten by an exact fold
  (e.g. a preceding GroupNorm's ``weight``/``bias`` for SCRI), keyed by their qualified
  name in ``denoiser.state_dict()``; written into the model before the wrappers are built;
- ``LayerRecord.info``: JSON-safe facts (timestep groups, the chosen level set, the
  figures behind a choice, how a transform was placed).

A layer whose input needs a non-standard wrapper names a builder of ``quant.builders``
in ``LayerRecord.builder``; ``"standard"`` covers weights and the activation quantizers of
``quant/modules.py`` plus an explicit input transform (the ``input_shift`` /
``input_scale`` tensors, handed to ``QuantWrapper.set_input_transform`` when present).

Method-specific options (``QuantConfig.options``, e.g. ``HtdqOptions``) are declared in
``quant.config.METHOD_OPTIONS``; a method reads them as ``ctx.config.options``. Besides the
interface this module holds what methods share: the memoised searches and the uniform
calibration rules (``uniform_range``, ``set_uniform_act``, ``set_split_act``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from qvd_bench.errors import UserError
from qvd_bench.numerics.grid import affine_qparams
from qvd_bench.quant.modules import zero_pads
from qvd_bench.quant.observers import weight_qparams
from qvd_bench.quant.primitives import timestep_groups
from qvd_bench.quant.record import LayerRecord
from qvd_bench.quant.split import SPLIT_RULES, skip_splits, split_parts
from qvd_bench.registry import Registry

if TYPE_CHECKING:
    from qvd_bench.analysis.plan import QuantPlan
    from qvd_bench.models.family import LoadedModel
    from qvd_bench.quant.config import QuantConfig
    from qvd_bench.store import StatsRun


@dataclass
class QuantContext:
    """What a method's ``prepare`` reads.

    Attributes:
        loaded: the model (not to be changed by ``prepare``); None when ``quantize_`` was
            given a bare denoiser.
        denoiser: the denoiser module.
        run: its statistics.
        plan: the plan, or None (methods that need one make it with ``analyze``).
        config: the QuantConfig.
        tracker: the CallTracker attached to the denoiser (for per-timestep quantizers).
        layers: in-scope layer name -> module (every leaf Linear/Conv, in module order).
        roles: layer name -> role.
    """

    loaded: LoadedModel | None
    denoiser: nn.Module
    run: StatsRun
    plan: QuantPlan | None
    config: QuantConfig
    tracker: Any
    layers: dict[str, nn.Module]
    roles: dict[str, str]

    @cached_property
    def keep_fp(self) -> set[str]:
        """Layers the config keeps in full precision (by role or by name)."""
        roles = set(self.config.keep_fp_roles)
        names = set(self.config.keep_fp_layers)
        return {n for n in self.layers if n in names or self.roles.get(n) in roles}

    def w_bits(self, name: str) -> int:
        """Weight bits of a layer (``QuantConfig.bits_for``: mixed precision aware)."""
        return self.config.bits_for(name, self.roles.get(name, ""))[0]

    def a_bits(self, name: str) -> int:
        """Activation bits of a layer (``QuantConfig.bits_for``: mixed precision aware)."""
        return self.config.bits_for(name, self.roles.get(name, ""))[1]

    @property
    def quantized_layers(self) -> list[str]:
        """In-scope layers that get quantizers, in module order."""
        return [n for n in self.layers if n not in self.keep_fp]

    @cached_property
    def temporal_layers(self) -> list[str]:
        """In-scope layers with temporal features stored in the run (their inputs depend
        on the timestep only), in module order."""
        temporal = self.run.temporal
        have = set(temporal["layer"].astype(str).unique()) if not temporal.empty else set()
        return [n for n in self.layers if n in have]

    @cached_property
    def skip_splits(self) -> dict[str, int]:
        """Layer -> C_h for the layers reading a skip concatenation ``cat([h, skip])``
        (``quant.split.skip_splits``); empty unless ``config.split_skip``."""
        if not self.config.split_skip:
            return {}
        return {name: c for name, c in skip_splits(self.denoiser).items() if name in self.layers}

    @cached_property
    def input_channels(self) -> dict[str, Any]:
        """Layer -> its input-channel statistics rows (one pandas split, shared by layers)."""
        frame = self.run.channels
        if "tensor" in frame.columns:
            frame = frame[frame["tensor"] == "input"]
        frame = frame[frame["count"] > 0]
        return {str(k): v for k, v in frame.groupby("layer", observed=True)}

    def weight(self, name: str) -> Tensor:
        """The float weight of a layer (detached)."""
        return self.layers[name].weight.detach()


class Method:
    """A quantization method: a name, a description and ``prepare``.

    Class attributes:
        name: the registry name (set by ``register_method``).
        description: one line for listings.
        granularity: the default activation granularity, "tensor", "timestep_group" or
            "token" (``QuantConfig.granularity`` may override it where the method allows).
        weight_clipping: the default weight clipping, "minmax" or "mse".
        uses_plan: True when ``prepare`` reads ``ctx.plan`` (made with ``analyze`` when
            none is given).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    granularity: ClassVar[str] = "tensor"
    weight_clipping: ClassVar[str] = "mse"
    uses_plan: ClassVar[bool] = False

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        """One record per layer of ``ctx.layers``; never changes the model."""
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: registers a ``Method`` subclass under ``name``."""

    def decorate(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS.register(name, cls)
        return cls

    return decorate


# --------------------------------------------------------------------------- records


def layer_kind(module: nn.Module) -> str:
    return "linear" if isinstance(module, nn.Linear) else "conv"


def fp_record(ctx: QuantContext, name: str, reason: str = "kept in full precision") -> LayerRecord:
    """A layer kept in full precision (no wrapper is built for it).

    Args:
        ctx: the context.
        name: the layer.
        reason: why (stored as ``info["fp_reason"]``); a method that keeps an in-scope
            layer FP on purpose (``fp``, ``fp-temporal``) must say so.
    """
    return LayerRecord(
        layer=name,
        role=ctx.roles.get(name, ""),
        kind=layer_kind(ctx.layers[name]),
        w_bits=None,
        weight_clipping="none",
        act="none",
        a_bits=None,
        info={"fp_reason": reason},
    )


# Searches memoised by the content of their inputs: methods share most of them (every
# ``mse``-based method searches the same weight clipping and the same activation ranges),
# and bit-widths that share the weight or the activation bits repeat them exactly.
_SEARCHES: dict[tuple, Any] = {}
_SEARCH_CACHE_SIZE = 16384


def content_key(x: Tensor) -> tuple[str, str, tuple[int, ...]]:
    """A hashable key of a tensor's exact content (digest, dtype, shape)."""
    data = x.detach().cpu().contiguous()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16)
    return digest.hexdigest(), str(data.dtype), tuple(data.shape)


def memoised(key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, or the value it returned before for the same ``key``.

    Callers must not change the returned value in place (clone tensors first).
    """
    value = _SEARCHES.get(key)
    if value is None:
        value = compute()
        _remember(key, value)
    return value


def memoised_batch(
    keys: Sequence[tuple], compute: Callable[[list[int]], Sequence[Any]], batch: int
) -> list[Any]:
    """``memoised`` for several keys: the values not seen before are computed together.

    Args:
        keys: one key per value.
        compute: the indices (into ``keys``) of at most ``batch`` missing values -> those
            values, in that order (one call per batch: a search of several inputs at once
            costs far less than one search each when they are small).
        batch: the most values one ``compute`` call gets (bounds its memory).

    Returns:
        The values, in the order of ``keys``.
    """
    values = {i: _SEARCHES[key] for i, key in enumerate(keys) if key in _SEARCHES}
    missing = [i for i in range(len(keys)) if i not in values]
    batch = max(1, batch)
    for start in range(0, len(missing), batch):
        indices = missing[start : start + batch]
        for i, value in zip(indices, compute(indices), strict=True):
            values[i] = value
            _remember(keys[i], value)
    return [values[i] for i in range(len(keys))]


def _remember(key: tuple, value: Any) -> None:
    """Stores a search's value, dropping the oldest one when the cache is full."""
    if len(_SEARCHES) >= _SEARCH_CACHE_SIZE:
        _SEARCHES.pop(next(iter(_SEARCHES)))
    _SEARCHES[key] = value


def cached_weight_scale(weight: Tensor, bits: int, clipping: str, p: float) -> Tensor:
    """``weight_qparams`` scales (O,), memoised by the weight's content.

    Methods share weight quantization (every ``mse``-based method searches the same
    clipping), so a weight seen before with the same settings is not searched again.
    """
    key = ("weight_scale", content_key(weight), bits, clipping, float(p))
    scale = memoised(key, lambda: weight_qparams(weight, bits, clipping, p=p)[0].cpu())
    return scale.clone()


def weight_record(
    ctx: QuantContext,
    name: str,
    *,
    clipping: str | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> LayerRecord:
    """A record with the layer's weight quantized and no activation quantizer yet.

    Args:
        ctx: the context.
        name: the layer.
        clipping: "minmax" or "mse"; ``ctx.config.weight_clipping`` when None.
        weight: a replacement float weight (quantized instead of the layer's).
        bias: a replacement bias.

    Returns:
        The record; callers set ``act``, ``a_bits`` and the activation tensors.
    """
    module = ctx.layers[name]
    clipping = clipping or ctx.config.weight_clipping
    source = module.weight.detach() if weight is None else weight.detach()
    scale = cached_weight_scale(source, ctx.w_bits(name), clipping, ctx.config.p)
    tensors: dict[str, Tensor] = {"weight_scale": scale.cpu()}
    if weight is not None:
        tensors["weight"] = weight.detach().cpu()
    if bias is not None:
        tensors["bias"] = bias.detach().cpu()
    return LayerRecord(
        layer=name,
        role=ctx.roles.get(name, ""),
        kind=layer_kind(module),
        w_bits=ctx.w_bits(name),
        weight_clipping=clipping,
        act="none",
        a_bits=None,
        tensors=tensors,
    )


# --------------------------------------------------------------------------- calibration


def stack_scalars(values: list[Tensor], dtype: torch.dtype) -> Tensor:
    """(G,) from G 0-d tensors."""
    return torch.stack([torch.as_tensor(v).reshape(()) for v in values]).to(dtype)


UNIFORM_RULES = ("minmax", "percentile", "mse")


def activation_timesteps(ctx: QuantContext, layer: str | None = None) -> list[float]:
    """The timestep values with activation statistics, descending (sampler order).

    Args:
        ctx: the context.
        layer: with several experts, only the timesteps its expert ran (the manifest's
            ``timestep_experts``; a layer's name starts with its expert's attribute).
    """
    values = ctx.run.manifest.get("schedule") or ctx.run.channels["timestep"].unique().tolist()
    ran = ctx.run.manifest.get("timestep_experts")
    if layer is not None and ran:
        expert = layer.partition(".")[0]
        values = [t for t, owner in ran if owner == expert]
    return sorted({float(t) for t in values}, reverse=True)


def _rows_at(ctx: QuantContext, name: str, timesteps: list[float] | None) -> Tensor:
    """Reservoir rows of a layer at some timesteps (all when None); may be empty."""
    data = ctx.run.reservoir.get(name)
    if data is None:
        raise UserError(
            f"layer {name!r} has no reservoir rows in {ctx.run.path}; collect with "
            "reservoir_capacity > 0"
        )
    rows = data["rows"]
    if timesteps is not None:
        wanted = torch.tensor(timesteps, dtype=torch.float64)
        rows = rows[torch.isin(data["timesteps"].to(torch.float64), wanted)]
    return rows


def _transform_f64(transform: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(z, s) of X̃ = (X − z)/s as flat float64 CPU tensors."""
    shift, scale = transform
    return (v.to(torch.float64).reshape(-1).cpu() for v in (shift, scale))


def calibration_rows(
    ctx: QuantContext,
    name: str,
    timesteps: list[float] | None,
    transform: tuple[Tensor, Tensor] | None = None,
    channels: Any = None,
) -> Tensor:
    """Finite reservoir rows of a layer, as its quantizer sees them.

    Args:
        ctx: the context.
        name: the layer.
        timesteps: the timestep values to take (all when None).
        transform: (z, s) (C,) each: rows of X̃ = (X − z)/s instead of X.
        channels: a column selection (one part of a split layer), all when None.

    Returns:
        (N, C') rows, float64 when transformed; may be empty.
    """
    rows = _rows_at(ctx, name, timesteps)
    if channels is not None:
        rows = rows[:, channels]
    rows = rows[torch.isfinite(rows).all(1)] if rows.numel() else rows
    if transform is not None:
        shift, scale = _transform_f64(transform)
        rows = (rows.to(torch.float64) - shift) / scale
    return rows


def temporal_rows(ctx: QuantContext, name: str) -> Tensor | None:
    """(T, C) float64 inputs of a temporal-feature layer on the stored timestep grid, or None.

    Such inputs depend on the timestep alone, so the sampling schedule's statistics hold
    only a few distinct rows; the grid spans every timestep a sampler may use.
    """
    if name not in ctx.temporal_layers:
        return None
    _, vectors = ctx.run.temporal_matrix(name)
    return torch.from_numpy(np.asarray(vectors, dtype=np.float64))


def _extremes(
    ctx: QuantContext,
    name: str,
    timesteps: list[float] | None,
    transform: tuple[Tensor, Tensor] | None = None,
    part: slice | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Per-channel min (C,), max (C,) and the number of input rows (tokens) they cover.

    With ``transform`` = (z, s) the extrema are those of X̃ = (X − z)/s (s > 0 keeps
    each channel's min below its max), over the temporal-feature grid too: z and s narrow
    each channel to its calibrated range, so a timestep outside the schedule would
    otherwise be clipped. With ``part`` only those input channels are returned (the
    token count is the layer's).
    """
    rows = ctx.input_channels.get(name)
    if rows is None or rows.empty:
        raise UserError(f"layer {name!r} has no input statistics in {ctx.run.path}")
    if timesteps is not None:
        rows = rows[rows["timestep"].isin([float(t) for t in timesteps])]
    # numpy scatter-reductions: several times faster than a categorical groupby.
    channel = rows["channel"].to_numpy(np.int64)
    channels = int(channel.max()) + 1
    if transform is not None:
        channels = max(channels, transform[0].numel())
    lo = np.full(channels, np.inf)
    hi = np.full(channels, -np.inf)
    np.minimum.at(lo, channel, rows["min"].to_numpy(np.float64))
    np.maximum.at(hi, channel, rows["max"].to_numpy(np.float64))
    keep = np.isfinite(lo) & np.isfinite(hi)
    # Every channel of a (timestep, branch) sees the same rows: total count / channels.
    tokens = int(rows["count"].to_numpy(np.int64).sum() // max(1, int(keep.sum())))
    lo, hi = torch.from_numpy(lo), torch.from_numpy(hi)
    grid = temporal_rows(ctx, name) if transform is not None else None
    if grid is not None and grid.shape[1] == channels:
        lo, hi = torch.minimum(lo, grid.min(0).values), torch.maximum(hi, grid.max(0).values)
    if transform is not None:
        shift, scale = _transform_f64(transform)
        lo, hi = (lo - shift) / scale, (hi - shift) / scale
    keep = torch.from_numpy(keep)
    if part is not None:
        lo, hi, keep = lo[part], hi[part], keep[part]
    return lo[keep], hi[keep], max(tokens, 1)


def lp_clip_search(
    rows: Tensor,
    channel_lo: Tensor,
    channel_hi: Tensor,
    tokens: int,
    bits: int,
    p: float,
    *,
    cover: Tensor | None = None,
    grid: int = 100,
) -> tuple[Tensor, Tensor]:
    """Per-tensor range [α·lo, α·hi] minimising the Lp error of the whole calibration data.

    The error of all ``tokens`` rows is estimated from the reservoir sample plus the two
    exact extreme rows (per-channel min and max), weighted by their share of the data:
    a sample of a few rows rarely holds the extreme tokens, and a search on the sample
    alone would clip them unseen (at 16 bits it clips where no clipping is right).

    Args:
        rows: (N, C) reservoir rows (finite).
        channel_lo, channel_hi: (C,) exact per-channel extrema over the same data.
        tokens: how many rows the data has in all (≥ N + 2 normally).
        bits: activation bits.
        p: the Lp exponent.
        cover: values the range must contain (never clipped): the padding −z/s of a
            zero-padded conv computed on X̃ = (X − z)/s, which the quantizer sees at every
            border position but the statistics do not.
        grid: see ``observers.shrink_factors``.

    Returns:
        (lo, hi) 0-d float64 tensors: the extrema's min and max times the best α (the
        grid of ``observers.shrink_factors``; ties keep the least clipping).
    """
    # Every mse-based method searches the same ranges, and W8A8 / W4A8 share them.
    key = (
        "lp_clip",
        content_key(rows),
        content_key(channel_lo),
        content_key(channel_hi),
        int(tokens),
        bits,
        float(p),
        None if cover is None else content_key(cover),
        grid,
    )

    def search() -> tuple[Tensor, Tensor]:
        from qvd_bench.numerics.grid import affine_qparams, quant_range
        from qvd_bench.quant.observers import (
            SCREEN_ELEMENTS,
            could_be_least,
            screened_errors,
            shrink_factors,
        )
        from qvd_bench.quant.primitives import fake_quant, lp_error

        q_min, q_max = quant_range(bits)
        lo, hi = channel_lo.min().to(torch.float64), channel_hi.max().to(torch.float64)
        alpha = shrink_factors(grid)  # (G,)
        if cover is not None and cover.numel():
            low, high = cover.min().to(torch.float64), cover.max().to(torch.float64)
            lo, hi = torch.minimum(lo, low), torch.maximum(hi, high)
            # α = 1 always qualifies (lo ≤ 0 ≤ hi once the quantizer includes zero).
            fits = (alpha * lo.clamp(max=0) <= low) & (alpha * hi.clamp(min=0) >= high)
            alpha = alpha[fits | (alpha == 1.0)]

        def qparams(factors: Tensor) -> tuple[Tensor, Tensor]:  # (g, 1) each
            return affine_qparams(factors * lo, factors * hi, bits)

        scale, zero_point = qparams(alpha[:, None])

        def error(x: Tensor, keep: Tensor) -> Tensor:  # (K,) mean |x − x̂|^p per kept candidate
            return lp_error(x, fake_quant(x, scale[keep], zero_point[keep], q_min, q_max), p, dim=1)

        def flat(x: Tensor) -> Tensor:  # (1, L) float32
            return x.reshape(1, -1).to(torch.float32)

        keep = torch.ones_like(alpha, dtype=torch.bool)
        err_extreme = error(flat(torch.stack([channel_lo, channel_hi])), keep)
        share = min(1.0, 2.0 / tokens)
        sample = flat(rows) if rows.numel() else None
        if sample is not None and sample.numel() * alpha.numel() > SCREEN_ELEMENTS and share < 1:
            # The sample's float64 errors only for the candidates its float32 screen keeps:
            # the weighted sum of its estimates has at most their relative error.
            estimate = screened_errors(sample, alpha, qparams, q_min, q_max, p)[:, 0]
            combined = (1.0 - share) * estimate + share * err_extreme
            keep = could_be_least(combined[:, None], p)[:, 0]
        err_sample = error(sample, keep) if sample is not None else err_extreme[keep]
        total = torch.full_like(err_extreme, math.inf)
        total[keep] = (1.0 - share) * err_sample + share * err_extreme[keep]
        best = int(total.argmin())
        return alpha[best] * lo, alpha[best] * hi

    lo, hi = memoised(key, search)
    return lo.clone(), hi.clone()


def uniform_range(
    ctx: QuantContext,
    name: str,
    rule: str,
    timesteps: list[float] | None = None,
    transform: tuple[Tensor, Tensor] | None = None,
    channels: slice | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-tensor [lo, hi] of a layer's inputs by a clipping rule, over some timesteps.

    Args:
        ctx: the context.
        name: the layer.
        rule: "minmax" (exact extrema), "percentile" (``PercentileOptions.percentile`` of the merged
            histograms) or "mse" (``lp_clip_search`` on the reservoir rows and the exact
            extrema of those timesteps).
        timesteps: the timestep values to calibrate on (all when None).
        transform: (z, s) (C,) each: the range of X̃ = (X − z)/s instead of X ("mse"
            only), for a layer computed on transformed inputs.
        channels: only these input channels (the reservoir columns and channel extrema
            of a part of the input, e.g. one side of a skip concatenation); "minmax" and
            "mse" only, without ``transform``.

    Returns:
        (lo, hi) 0-d float64 tensors.
    """
    from qvd_bench.quant.observers import minmax_range, percentile_range

    if transform is not None and rule != "mse":
        raise UserError(f"a transformed input is calibrated with 'mse', not {rule!r}")
    if channels is not None:
        if rule == "percentile" or transform is not None:
            # Histograms merge every channel of the layer: no range of a channel subset.
            raise UserError(
                f"a range of some input channels needs the 'minmax' or 'mse' rule and no "
                f"transform, got {rule!r}"
            )
        if rule == "minmax":
            channel_lo, channel_hi, _ = _extremes(ctx, name, timesteps, part=channels)
            return channel_lo.min(), channel_hi.max()
    if rule == "minmax":
        return minmax_range(ctx.run, name, timesteps)
    if rule == "percentile":
        return percentile_range(ctx.run, name, ctx.config.options.percentile, timesteps)
    if rule == "mse":
        rows = calibration_rows(ctx, name, timesteps, transform, channels)
        channel_lo, channel_hi, tokens = _extremes(ctx, name, timesteps, transform, channels)
        cover = None
        if transform is not None and zero_pads(ctx.layers[name]) is not None:
            shift, scale = _transform_f64(transform)
            cover = -shift / scale
        return lp_clip_search(
            rows, channel_lo, channel_hi, tokens, ctx.a_bits(name), ctx.config.p, cover=cover
        )
    raise UserError(f"unknown clipping rule {rule!r}; use one of {', '.join(UNIFORM_RULES)}")


def set_uniform_act(
    ctx: QuantContext,
    record: LayerRecord,
    rule: str,
    granularity: str | None = None,
    transform: tuple[Tensor, Tensor] | None = None,
) -> LayerRecord:
    """Fills a record's uniform activation quantizer (per tensor, group or token).

    Args:
        ctx: the context.
        record: a record from ``weight_record`` (changed in place and returned).
        rule: the clipping rule of ``uniform_range``.
        granularity: "tensor", "timestep_group" or "token"; ``ctx.config.granularity``
            when None.
        transform: see ``uniform_range``.

    With ``config.split_skip``, a layer reading a skip-connection concatenation gets one
    quantizer per part instead (``set_split_act``).
    """
    granularity = granularity or ctx.config.granularity or "tensor"
    bits = ctx.a_bits(record.layer)
    record.a_bits = bits
    record.info["clipping"] = rule
    if ctx.config.split_skip and set_split_act(ctx, record, rule, granularity, transform):
        return record
    if granularity == "token":
        record.act = "dynamic"
        if rule == "mse":
            from qvd_bench.quant.observers import token_clip_ratio

            rows = calibration_rows(ctx, record.layer, None, transform)
            record.info["clip_ratio"] = token_clip_ratio(rows, bits, ctx.config.p)
        return record
    if granularity == "tensor":
        lo, hi = uniform_range(ctx, record.layer, rule, transform=transform)
        scale, zero_point = affine_qparams(lo, hi, bits)
        record.act = "static"
    elif granularity == "timestep_group":
        steps = activation_timesteps(ctx, record.layer)
        groups = timestep_groups(steps, min(ctx.config.timestep_groups, len(steps)))
        qparams = [
            affine_qparams(*uniform_range(ctx, record.layer, rule, group, transform), bits)
            for group in groups
        ]
        scale = stack_scalars([s for s, _ in qparams], torch.float32)
        zero_point = stack_scalars([z for _, z in qparams], torch.int32)
        record.act = "group"
        record.info["groups"] = groups
    else:
        raise UserError(f"unknown activation granularity {granularity!r}")
    record.tensors["act_scale"] = scale.reshape(scale.shape).cpu()
    record.tensors["act_zero_point"] = zero_point.cpu()
    return record


def set_split_act(
    ctx: QuantContext,
    record: LayerRecord,
    rule: str,
    granularity: str,
    transform: tuple[Tensor, Tensor] | None = None,
) -> bool:
    """Fills a record with one quantizer per part when its layer reads a skip concatenation.

    Called by ``set_uniform_act`` when ``config.split_skip`` is set; ``record`` comes from
    ``weight_record`` with ``a_bits`` and ``info["clipping"]`` set.

    Args:
        ctx: the context.
        record: the layer's record (changed in place).
        rule: "minmax" or "mse" (see ``uniform_range``); any rule for "token".
        granularity: "tensor", "timestep_group" or "token".
        transform: the explicit input transform, if any (such layers are not split).

    Returns:
        True when the record now holds split quantizers; False when the layer is not split
        (not a concatenation reader, or ``info["split_skipped"]`` says why).
    """
    split = ctx.skip_splits.get(record.layer)
    if split is None:
        return False
    if transform is not None or "weight" in record.tensors:
        record.info["split_skipped"] = "explicit input transform (channel ranges integrated)"
        return False
    if rule not in SPLIT_RULES and granularity != "token":  # dynamic ranges need no rule
        record.info["split_skipped"] = f"the {rule!r} rule has no per-channel ranges"
        return False
    name, bits, parts = record.layer, record.a_bits, split_parts(split)
    if granularity == "token":
        record.act = "dynamic"
    elif granularity == "tensor":
        qparams = [affine_qparams(*uniform_range(ctx, name, rule, channels=p), bits) for p in parts]
        record.tensors["act_scale"] = stack_scalars([s for s, _ in qparams], torch.float32)
        record.tensors["act_zero_point"] = stack_scalars([z for _, z in qparams], torch.int32)
        record.act = "static"
    elif granularity == "timestep_group":
        steps = activation_timesteps(ctx, name)
        groups = timestep_groups(steps, min(ctx.config.timestep_groups, len(steps)))
        table = [
            [affine_qparams(*uniform_range(ctx, name, rule, g, channels=p), bits) for g in groups]
            for p in parts
        ]
        record.tensors["act_scale"] = torch.stack(
            [stack_scalars([s for s, _ in row], torch.float32) for row in table]
        )
        record.tensors["act_zero_point"] = torch.stack(
            [stack_scalars([z for _, z in row], torch.int32) for row in table]
        )
        record.act = "group"
        record.info["groups"] = groups
    else:
        raise UserError(f"unknown activation granularity {granularity!r}")
    if record.w_bits is not None:
        weight = ctx.weight(name)
        clipping, p = record.weight_clipping, ctx.config.p
        record.tensors["weight_scale"] = torch.stack(
            [cached_weight_scale(weight[:, part], record.w_bits, clipping, p) for part in parts]
        )
    record.info["split"] = split
    record.builder = "split"
    return True


def uniform_record(ctx: QuantContext, name: str, rule: str) -> LayerRecord:
    """Weights by ``config.weight_clipping``, inputs by a uniform clipping rule."""
    return set_uniform_act(ctx, weight_record(ctx, name), rule)


def uniform_method_records(ctx: QuantContext, rule: str) -> list[LayerRecord]:
    """Every layer uniform by ``rule``; kept-FP layers FP."""
    return [
        fp_record(ctx, name) if name in ctx.keep_fp else uniform_record(ctx, name, rule)
        for name in ctx.layers
    ]
