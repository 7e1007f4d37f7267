"""``scri``: QVD's scattered channel range integration, and the machinery OS+ and
SmoothQuant share with it.

Per input channel c with range [lo_c, hi_c] (all timesteps) and half range h_c:
z_c = (hi_c + lo_c)/2, s_c = max(1, h_c/t), X̃ = (X − z)/s, W̃ = W·diag(s), b̃ = b + W·z.
SCRI picks t among quantiles of h (``T_QUANTILES``; t = max h is
the shift alone) to maximise the mean level coverage of X̃ (against the
calibrated per-tensor range) subject to layer-output SQNR on held-out reservoir rows no
worse than the ``mse`` baseline's; when no t qualifies the layer stays plain ``mse``.
Reservoir rows are split by key parity: even keys calibrate the activation range, odd
keys are held out. Layers fed by one norm share one (z, s) (q, k, v), decided on their
common input with the SQNR bound checked for every one of them.

The layer output is computed on reservoir rows (tokens / pixels): a Linear exactly; a
conv as every kernel tap's contribution (rows as pixels), since rows carry no
neighbourhoods. After the choice, layers quantize like ``mse``: weights per output
channel on W̃, activations per tensor (or per the configured granularity) on X̃,
clipped by the Lp search on all rows. Transforms fold where ``transforms.fold_sites``
finds an exact site, else they stay explicit; what a partial fold leaves (the scale after
a shift fold into a modulation table, the shift after a scale fold into a GEGLU
projection) and an explicit transform are the record's ``input_shift`` / ``input_scale``.
A record's ``folded`` holds the final value of every parameter it rewrote, after every
fold of the method (two sites may fold into one modulation table).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from qvd_bench.numerics.grid import affine_qparams, quant_levels, quant_range
from qvd_bench.quant.methods.base import (
    Method,
    QuantContext,
    content_key,
    fp_record,
    memoised,
    memoised_batch,
    register_method,
    set_uniform_act,
    temporal_rows,
    uniform_record,
    weight_record,
)
from qvd_bench.quant.modules import CONV_TYPES
from qvd_bench.quant.observers import (
    SEARCH_ELEMENTS,
    minmax_channel_range,
    mse_range,
    mse_ranges,
    weight_qparams,
)
from qvd_bench.quant.primitives import fake_quant, fake_quant_affine, sqnr_db
from qvd_bench.quant.record import LayerRecord
from qvd_bench.quant.transforms import (
    FoldSite,
    TransformRecord,
    fold_order,
    fold_sites,
    plan_transform,
)

F64 = torch.float64

# Candidate t: these quantiles of the channels' half ranges (1.0: shift only).
T_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# The Lp search grid used while choosing t (the final quantizer uses the default grid).
SEARCH_GRID = 50


# --------------------------------------------------------------------------- layer data


@dataclass
class GroupData:
    """What deciding a transform for a group of layers (one shared input) needs.

    Attributes:
        layers: the layer names.
        lo, hi: (C,) per-channel input range over all timesteps (float64, NaN -> 0).
        rows: (N, C) all reservoir rows; ``calibration`` / ``held_out``: the even- /
            odd-key rows.
        weights: layer -> float weight (folded values where another fold rewrote it).
        biases: layer -> bias or None.
    """

    layers: tuple[str, ...]
    lo: Tensor
    hi: Tensor
    rows: Tensor
    calibration: Tensor
    held_out: Tensor
    weights: dict[str, Tensor]
    biases: dict[str, Tensor | None]

    @property
    def shift(self) -> Tensor:
        """z (C,): the channel midpoints."""
        return (self.hi + self.lo) / 2

    @property
    def half_range(self) -> Tensor:
        """h (C,)."""
        return (self.hi - self.lo) / 2


def _param(ctx: QuantContext, name: str, attr: str, params: dict[str, Tensor]) -> Tensor | None:
    value = params.get(f"{name}.{attr}")
    module = ctx.layers[name]
    return (getattr(module, attr) if value is None else value) if hasattr(module, attr) else None


def group_data(
    ctx: QuantContext, layers: Sequence[str], params: dict[str, Tensor] | None = None
) -> GroupData:
    """Statistics and weights of a group of layers sharing one input (the first's rows)."""
    params = params or {}
    first = layers[0]
    lo, hi = _channel_range(ctx, first)
    lo, hi = torch.nan_to_num(lo), torch.nan_to_num(hi)
    data = ctx.run.reservoir[first]
    rows = data["rows"].to(F64)
    rows = torch.where(torch.isfinite(rows), rows, 0.0)
    even = data["keys"].to(torch.int64) % 2 == 0
    weights = {n: _param(ctx, n, "weight", params).detach().to(F64).cpu() for n in layers}
    biases = {}
    for name in layers:
        bias = _param(ctx, name, "bias", params)
        biases[name] = None if bias is None else bias.detach().to(F64).cpu()
    calibration, held_out = rows[even], rows[~even] if bool((~even).any()) else rows
    grid = temporal_rows(ctx, first)
    if grid is not None and grid.shape[1] == lo.numel():
        # Timestep-only inputs: the schedule's rows repeat a few timesteps, so (z, s) are
        # fit to the whole grid and judged on grid timesteps the calibration did not see.
        lo, hi = torch.minimum(lo, grid.min(0).values), torch.maximum(hi, grid.max(0).values)
        rows = torch.cat([rows, grid])
        calibration = torch.cat([calibration, grid[0::2]])
        held_out = torch.cat([held_out, grid[1::2]])
    return GroupData(tuple(layers), lo, hi, rows, calibration, held_out, weights, biases)


def _channel_range(ctx: QuantContext, name: str) -> tuple[Tensor, Tensor]:
    """``minmax_channel_range(ctx.run, name)``: (C,) float64 per-channel min and max, NaN
    for channels without data, from the context's per-layer split of the statistics
    (numpy scatter-reductions instead of a groupby per layer)."""
    rows = ctx.input_channels.get(name)
    if rows is None or rows.empty:
        return minmax_channel_range(ctx.run, name)  # its UserError names what is missing
    channel = rows["channel"].to_numpy(np.int64)
    lo = np.full(int(channel.max()) + 1, np.inf)
    hi = np.full_like(lo, -np.inf)
    np.minimum.at(lo, channel, rows["min"].to_numpy(np.float64))
    np.maximum.at(hi, channel, rows["max"].to_numpy(np.float64))
    seen = np.zeros(lo.shape, dtype=bool)
    seen[channel] = True
    lo[~seen], hi[~seen] = np.nan, np.nan
    return torch.from_numpy(lo), torch.from_numpy(hi)


def _tap_matrix(weight: Tensor, module: nn.Module) -> Tensor:
    """(O·K, C) matrix of a layer's per-tap weights (a Linear: (O, C))."""
    if not isinstance(module, CONV_TYPES) or weight.ndim == 2:
        return weight
    out, per_group = weight.shape[:2]
    groups = module.groups
    taps = weight.reshape(out, per_group, -1).permute(0, 2, 1)  # (O, K, C/groups)
    if groups == 1:
        return taps.reshape(-1, per_group)
    # Grouped conv: each output reads its own group's channels; zeros elsewhere.
    dense = torch.zeros(out, taps.shape[1], per_group * groups, dtype=weight.dtype)
    for o in range(out):
        g = o // (out // groups)
        dense[o, :, g * per_group : (g + 1) * per_group] = taps[o]
    return dense.reshape(-1, per_group * groups)


def _act_ranges(
    fit: Tensor, candidates: Sequence[tuple], bits: int, p: float, grid: int
) -> list[tuple[float, float]]:
    """``mse_range`` (lo, hi) of the rows (fit − z)/s of each candidate (t, z, s), memoised;
    those not searched before are searched together (``mse_ranges``)."""
    fit_key = content_key(fit)
    keys = [
        ("act", fit_key, content_key(shift), content_key(scale), bits, float(p), grid)
        for _, shift, scale in candidates
    ]

    def search(indices: list[int]) -> list[tuple[float, float]]:
        chosen = [candidates[i] for i in indices]
        x = torch.stack([((fit - shift) / scale).reshape(-1) for _, shift, scale in chosen])
        if not bool(torch.isfinite(x).all()):  # mse_range leaves non-finite values out
            return [tuple(float(v) for v in mse_range(row, bits, p, grid)) for row in x]
        lo, hi = mse_ranges(x, bits, p, grid)
        return list(zip(lo.tolist(), hi.tolist(), strict=True))

    return memoised_batch(keys, search, SEARCH_ELEMENTS // max(1, fit.numel()))


def _transformed_weight(weight: Tensor, module: nn.Module, scale: Tensor) -> Tensor:
    """W̃ = W·diag(s): (O, I, ...) with each input channel scaled by s (C,)."""
    # Per conv group the input channels repeat; the scale follows the input axis.
    groups = module.groups if isinstance(module, CONV_TYPES) else 1
    s_in = scale.reshape(groups, -1).repeat_interleave(weight.shape[0] // groups, 0)
    return weight * s_in.reshape(weight.shape[0], -1, *([1] * (weight.ndim - 2)))


def _weight_scales(
    weight: Tensor,
    module: nn.Module,
    scales: Sequence[Tensor],
    transformed: Sequence[Tensor],
    bits: int,
    clipping: str,
    p: float,
    grid: int,
) -> list[Tensor]:
    """``weight_qparams`` scales (O,) of each W·diag(s), memoised; those not searched
    before are searched together (one ``weight_qparams`` on their rows).

    Args:
        weight: W, the layer's weight (keys the memo with each s: hashing W once is
            cheaper than hashing every W·diag(s)).
        module: its layer (conv groups).
        scales: the candidates' s (C,).
        transformed: W·diag(s) for each s (``_transformed_weight``).
        bits, clipping, p, grid: as ``weight_qparams``.
    """
    weight_key = content_key(weight)
    groups = module.groups if isinstance(module, CONV_TYPES) else 1
    keys = [
        ("weight", weight_key, groups, content_key(s), bits, clipping, float(p), grid)
        for s in scales
    ]

    def search(indices: list[int]) -> list[Tensor]:
        stacked = torch.cat([transformed[i] for i in indices])
        scale, _ = weight_qparams(stacked, bits, clipping, p=p, grid=grid)
        return list(scale.split(weight.shape[0]))

    found = memoised_batch(keys, search, SEARCH_ELEMENTS // max(1, weight.numel()))
    return [scale.clone() for scale in found]


def _fake_quant_rows(x: Tensor, lo: float, hi: float, bits: int) -> Tensor:
    # float32 bounds: the qparams are computed in float32.
    scale, zero_point = affine_qparams(torch.tensor(lo), torch.tensor(hi), bits)
    # Python numbers take fake_quant's per-tensor path: the same numbers, fewer ops.
    return fake_quant(x, float(scale), int(zero_point), *quant_range(bits))


def mean_coverage(lo_c: Tensor, hi_c: Tensor, lo: float, hi: float, bits: int) -> float:
    """Mean over channels of the level coverage under [lo, hi]."""
    # One quant_levels call for both ends of every channel: half the small ops.
    ends = torch.cat([torch.clamp(lo_c, min=lo), torch.clamp(hi_c, max=hi)])
    level_min, level_max = quant_levels(ends, lo, hi, bits).split(lo_c.numel())
    overlap = (hi_c >= lo) & (lo_c <= hi)
    share = torch.where(overlap, (level_max - level_min + 1).to(F64) / 2.0**bits, 0.0)
    return float(share.mean())


@dataclass
class Candidate:
    """The figures of one (z, s) on a group."""

    t: float | None
    shift: Tensor
    scale: Tensor
    coverage: float
    sqnr_db: dict[str, float]
    output_mse: dict[str, float]


def evaluate(
    ctx: QuantContext,
    data: GroupData,
    candidates: Sequence[tuple[float | None, Tensor, Tensor]],
    *,
    fit_rows: Tensor | None = None,
    eval_rows: Tensor | None = None,
) -> list[Candidate]:
    """Coverage and layer-output SQNR / MSE of quantizing a group under each (z, s).

    The clipping searches of all candidates run together (``_act_ranges``,
    ``_weight_scales``): one search of several small tensors costs far less than one each.

    Args:
        ctx: the context (bits, clipping, p).
        data: the group.
        candidates: (t, z (C,), s (C,)) each: the threshold that gave them (recorded; None
            for zeros and ones, the plain ``mse`` baseline), the shift and the scale.
        fit_rows: rows the activation range is calibrated on (``data.calibration``).
        eval_rows: rows the output error is measured on (``data.held_out``).

    Returns:
        One Candidate per (t, z, s), in order.
    """
    config = ctx.config
    fit = data.calibration if fit_rows is None else fit_rows
    rows = data.held_out if eval_rows is None else eval_rows
    # Layers sharing one input transform may have their own bits (mixed precision): the
    # shared (z, s) is judged at the fewest of them, the most demanding.
    a_bits = min(ctx.a_bits(name) for name in data.layers)
    scored, inputs = [], []
    for (t, shift, scale), (lo, hi) in zip(
        candidates, _act_ranges(fit, candidates, a_bits, config.p, SEARCH_GRID), strict=True
    ):
        inputs.append(_fake_quant_rows((rows - shift) / scale, lo, hi, a_bits))
        coverage = mean_coverage((data.lo - shift) / scale, (data.hi - shift) / scale, lo, hi,
                                 a_bits)  # fmt: skip
        scored.append(Candidate(t, shift, scale, coverage, {}, {}))
    clipping = config.weight_clipping or "mse"
    for name in data.layers:
        module, weight, w_bits = ctx.layers[name], data.weights[name], ctx.w_bits(name)
        scales = [c.scale for c in scored]
        transformed = [_transformed_weight(weight, module, s) for s in scales]
        w_scales = _weight_scales(weight, module, scales, transformed, w_bits, clipping,
                                  config.p, SEARCH_GRID)  # fmt: skip
        taps = _tap_matrix(weight, module)
        reference = rows @ taps.T
        for cand, xq, w_t, w_scale in zip(scored, inputs, transformed, w_scales, strict=True):
            zero = torch.zeros_like(w_scale, dtype=torch.int32)
            w_q = fake_quant_affine(w_t, w_scale, zero, w_bits, 0, symmetric=True)
            test = xq @ _tap_matrix(w_q.to(F64), module).T + (taps @ cand.shift)
            cand.sqnr_db[name] = float(sqnr_db(reference, test))
            cand.output_mse[name] = float((reference - test).pow(2).mean())
    return scored


def threshold_candidates(data: GroupData, quantiles: Sequence[float] = T_QUANTILES) -> list:
    """(t, z, s) for each candidate t: quantiles of the half ranges of channels with data."""
    h = data.half_range
    live = h[h > 0]
    if live.numel() == 0:
        return []
    out = []
    for t in torch.quantile(live, torch.tensor(quantiles, dtype=F64)).unique().tolist():
        out.append((t, data.shift, torch.clamp(h / t, min=1.0)))
    return out


def choose_scri(ctx: QuantContext, data: GroupData) -> tuple[Candidate, Candidate, int]:
    """SCRI's choice on a group: (chosen, mse baseline, number of candidates that met the bound).

    The chosen candidate is the baseline itself when none meets the SQNR bound.
    """
    channels = data.lo.numel()
    plain = (None, torch.zeros(channels, dtype=F64), torch.ones(channels, dtype=F64))
    baseline, *scored = evaluate(ctx, data, [plain, *threshold_candidates(data)])
    best, passing = baseline, 0
    for cand in scored:
        if any(cand.sqnr_db[n] < baseline.sqnr_db[n] for n in data.layers):
            continue
        passing += 1
        key = (cand.coverage, min(cand.sqnr_db.values()))
        if best is baseline or key > (best.coverage, min(best.sqnr_db.values())):
            best = cand
    return best, baseline, passing


# --------------------------------------------------------------------------- records


def usable_sites(
    ctx: QuantContext, layers: Sequence[str], sites: dict[str, FoldSite]
) -> dict[str, FoldSite]:
    """The fold sites a transform of ``layers`` may use, by layer.

    A site is usable only when every layer it feeds is in ``layers`` and its source, if it
    is itself an in-scope layer, is in ``layers`` too: its record is then computed with
    the rewritten rows. Otherwise its layers are transformed explicitly (exact, and
    nothing outside ``layers`` changes).
    """
    chosen = set(layers)
    return {
        name: site
        for name, site in sites.items()
        if name in chosen
        and set(site.layers) <= chosen
        and (site.source not in ctx.layers or site.source in chosen)
    }


def _groups(layers: Sequence[str], usable: dict[str, FoldSite]) -> list[tuple[str, ...]]:
    """Layer groups sharing one transform: usable fold sites first, in ``fold_order`` (a
    site whose source is a layer — a modulation Linear, a GEGLU projection — goes before
    that layer, which must be transformed with its folded rows), then single layers."""
    folded = [site.layers for site in fold_order(usable)]
    return folded + [(name,) for name in layers if name not in usable]


def transform_records(
    ctx: QuantContext,
    layers: Sequence[str],
    choose: Callable[[QuantContext, GroupData], tuple[Tensor, Tensor, dict] | None],
    method: str,
) -> dict[str, LayerRecord]:
    """Records of ``layers`` under the per-group transforms ``choose`` picks.

    Args:
        ctx: the context.
        layers: in-scope layers to transform (others are untouched).
        choose: (ctx, group) -> (z (C,), s (C,), JSON-safe figures), or None to leave
            the group untransformed (plain ``mse``).
        method: the method's name (recorded).

    Returns:
        layer -> record, in the order of ``layers``.
    """
    sites = fold_sites(ctx.denoiser)
    usable = usable_sites(ctx, layers, sites)
    params: dict[str, Tensor] = {}  # parameters rewritten by folds so far
    records: dict[str, LayerRecord] = {}
    for group in _groups(layers, usable):
        data = group_data(ctx, group, params)
        decision = choose(ctx, data)
        if decision is None:
            for name in group:
                records[name] = _plain_record(ctx, name, params)
            continue
        shift, scale, figures = decision
        # Only usable sites: a layer of an unusable one must not bring its site along.
        placed = plan_transform(ctx.denoiser, group, shift, scale, sites=usable, params=params)
        if placed.explicit and group[0] in sites:
            site = sites[group[0]]
            placed.reason = (
                f"not folded into {site.source}: that fold needs {site.source} (when it is "
                f"a layer) and all of {', '.join(site.layers)} transformed by this method"
            )
        params.update(placed.folded)
        for index, name in enumerate(placed.layers):
            records[name] = _transformed_record(ctx, name, placed, figures, method, index == 0)
    for record in records.values():
        # Final values: records are applied in module order, which need not be the order
        # the folds were made in, and two sites may rewrite one parameter.
        record.folded = {key: params[key].detach().cpu() for key in record.folded}
    return {name: records[name] for name in layers}


def _plain_record(ctx: QuantContext, name: str, params: dict[str, Tensor]) -> LayerRecord:
    """``mse`` quantization; a fold source takes the rows an earlier fold rewrote."""
    weight, bias = params.get(f"{name}.weight"), params.get(f"{name}.bias")
    if weight is None:
        return uniform_record(ctx, name, "mse")
    record = weight_record(ctx, name, weight=weight, bias=bias)
    return set_uniform_act(ctx, record, "mse")


def _transformed_record(
    ctx: QuantContext,
    name: str,
    placed: TransformRecord,
    figures: dict,
    method: str,
    carries_fold: bool,
) -> LayerRecord:
    record = weight_record(ctx, name, weight=placed.weights[name], bias=placed.biases.get(name))
    if placed.input_shift is not None:
        record.tensors["input_shift"] = placed.input_shift.to(torch.float32)
    if placed.input_scale is not None:
        record.tensors["input_scale"] = placed.input_scale.to(torch.float32)
    if carries_fold:
        record.folded = {k: v.detach().cpu() for k, v in placed.folded.items()}
    record.info["transform"] = {
        "method": method,
        "placement": placed.kind,
        # What the wrapper still computes before its quantizer (the rest is folded).
        "explicit_part": [
            part
            for part, value in (("shift", placed.input_shift), ("scale", placed.input_scale))
            if value is not None
        ],
        "group": list(placed.layers),
        "reason": placed.reason,
        **figures,
    }
    # The same Lp search as ``mse`` (reservoir rows plus the exact per-channel extrema),
    # on X̃: the rows alone miss the extreme tokens and would clip them even at 16 bits.
    return set_uniform_act(ctx, record, "mse", transform=(placed.shift, placed.scale))


def _choice_key(ctx: QuantContext, data: GroupData) -> tuple:
    """A memo key of everything ``choose_scri`` reads: the group's statistics and weights,
    its layers' module kinds and bits, and the search settings."""
    layers = tuple(
        (
            name,
            type(ctx.layers[name]),
            getattr(ctx.layers[name], "groups", 1),
            ctx.a_bits(name),
            ctx.w_bits(name),
            content_key(data.weights[name]),
        )
        for name in data.layers
    )
    tensors = (data.lo, data.hi, data.calibration, data.held_out)
    config = ctx.config
    return ("scri", layers, *map(content_key, tensors), float(config.p), config.weight_clipping)


def _scri_choice(ctx: QuantContext, data: GroupData) -> tuple[Tensor, Tensor, dict] | None:
    # qvd and qvd-scri transform the same groups: they make the same choice.
    best, baseline, passing = memoised(_choice_key(ctx, data), lambda: choose_scri(ctx, data))
    if best is baseline:
        return None
    decision = (
        best.shift,
        best.scale,
        {
            "t": best.t,
            "coverage": best.coverage,
            "coverage_mse": baseline.coverage,
            "sqnr_db": best.sqnr_db,
            "sqnr_mse_db": baseline.sqnr_db,
            "candidates_meeting_bound": passing,
            "held_out_rows": int(data.held_out.shape[0]),
        },
    )
    return copy.deepcopy(decision)  # the records' own, not the memoised values


def scri_records(ctx: QuantContext, layers: Sequence[str]) -> dict[str, LayerRecord]:
    """SCRI on a subset of layers (``qvd`` calls this with the plan's choice).

    A layer no t helps keeps a plain ``mse`` record with ``info["transform"]`` absent.
    """
    records = transform_records(ctx, layers, _scri_choice, "scri")
    for record in records.values():
        if "transform" not in record.info:
            record.info["scri"] = "no threshold met the mse SQNR bound on held-out rows"
    return records


def apply_scri(ctx: QuantContext, layers: Sequence[str]) -> list[LayerRecord]:
    """``scri_records`` as a list in the order of ``layers``."""
    return list(scri_records(ctx, layers).values())


def method_records(ctx: QuantContext, transform: Callable) -> list[LayerRecord]:
    """Every in-scope layer: kept-FP ones FP, the rest through ``transform(ctx, layers)``."""
    quantized = transform(ctx, ctx.quantized_layers)
    return [quantized.get(n) or fp_record(ctx, n) for n in ctx.layers]


@register_method("scri")
class Scri(Method):
    description = "SCRI: midpoint shift + range scaling for coverage, SQNR no worse than mse"

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        return method_records(ctx, scri_records)
