"""Quantize a denoiser in place from statistics, in the style of torchao's ``quantize_``.

    record = quantize_(loaded, QuantConfig(method="qvd", w_bits=8, a_bits=8), stats=run)
    record.save("out/")                       # record.safetensors + record.json
    fresh = load_model(...)
    apply_record(fresh, load_record("out/"))  # same outputs, no statistics needed
    unquantize_(fresh, record)                # the float model again, bit for bit

The method (a handler in ``quant.methods.METHODS``, one module per method in
``quant/methods/``, picked by ``QuantConfig.method``) turns statistics, the plan and the
config into one ``LayerRecord`` per in-scope layer; ``quantize_`` and ``apply_record``
both build the wrappers from those records alone (``quant.builders``), so a reloaded
record reproduces the quantized model exactly.

Scope: every leaf Linear / Conv layer of the denoiser (``roles.leaf_layers``); the
statistics must describe exactly those layers. By default everything is quantized
(``keep_fp_roles`` and ``keep_fp_layers`` are empty): keeping the first and
last layers or any role in full precision is a choice, and the default stays the plain, comparable
"quantize everything" so that methods differ only in how they quantize.

Attention matmuls (``QuantConfig.attention_bits``): q, k, v and the softmax output of every
attention module get static per-tensor quantizers through ``quant/attention.py``, calibrated
on statistics collected with ``--attention``; the record carries them (``record.attention``).

Per-timestep quantizers read the timestep of the current denoiser call from a
``CallTracker`` (``record.tracker``, attached to the denoiser): pass it to
``sample_denoiser(..., tracker=record.tracker)`` so batches and CFG branches are announced.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qvd_bench.collect.attention import attention_modules, attention_processors
from qvd_bench.errors import UserError
from qvd_bench.models.family import LoadedModel
from qvd_bench.models.roles import leaf_layers
from qvd_bench.quant.attention import attention_records, install_attention
from qvd_bench.quant.builders import build_wrapper
from qvd_bench.quant.config import QuantConfig
from qvd_bench.quant.methods import Method, QuantContext, get_method
from qvd_bench.quant.modules import quant_wrappers, swap_module, unwrap
from qvd_bench.quant.record import LayerRecord, QuantRecord
from qvd_bench.quant.transforms import restore_parameters
from qvd_bench.store import StatsRun

# --------------------------------------------------------------------------- applying


def _denoiser(model: Any) -> tuple[LoadedModel | None, nn.Module]:
    """(the LoadedModel or None, the module whose qualified names are the layer names:
    the denoiser, or with several experts a ModuleDict of them, ``LoadedModel.layer_root``).

    ``model`` is a LoadedModel, a denoiser, or a diffusers pipeline object."""
    if isinstance(model, LoadedModel):
        return model, model.layer_root
    if isinstance(model, nn.Module):
        return None, model
    if hasattr(model, "components"):
        # A diffusers pipeline object: its denoisers, quantized where they are.
        from qvd_bench.models.zoo import pipeline_model

        loaded = pipeline_model(model)
        return loaded, loaded.layer_root
    raise UserError(
        f"expected a diffusers pipeline, a LoadedModel or an nn.Module, got {type(model).__name__}"
    )


def _model_identity(loaded: LoadedModel | None) -> dict[str, Any]:
    if loaded is None:
        return {}
    return {"name": loaded.name, "weight_seed": loaded.weight_seed, "knobs": loaded.knobs}


def _ensure_tracker(
    loaded: LoadedModel | None, denoiser: nn.Module, records: list[LayerRecord], tracker: Any
) -> Any:
    """The given tracker, or a new attached CallTracker (on every expert) when a record
    needs one."""
    if tracker is not None or not any(r.act == "group" for r in records):
        return tracker
    from qvd_bench.models.sampling import CallTracker

    return CallTracker(loaded.experts if loaded is not None else denoiser).attach()


def _apply_layers(
    denoiser: nn.Module, records: list[LayerRecord], tracker: Any
) -> dict[str, Tensor]:
    """Writes folded parameters, then swaps a wrapper in for every non-FP record.

    Returns:
        The values the folds overwrote (copies, before any fold), by ``state_dict`` name.
    """
    state = denoiser.state_dict(keep_vars=True)
    originals: dict[str, Tensor] = {}
    with torch.no_grad():
        for record in records:
            for name, value in record.folded.items():
                if name not in state:
                    raise UserError(f"record folds into {name!r}, which the model does not have")
                target = state[name]
                if target.shape != value.shape:
                    raise UserError(
                        f"record folds a {tuple(value.shape)} tensor into {name!r} of shape "
                        f"{tuple(target.shape)}: the record is for another model"
                    )
                originals.setdefault(name, target.detach().clone())
                target.copy_(value.to(device=target.device, dtype=target.dtype))
    layers = leaf_layers(denoiser)
    for record in records:
        if record.is_fp:
            continue
        module = layers[record.layer]
        wrapper = build_wrapper(module, record, tracker)
        device = module.weight.device
        swap_module(denoiser, record.layer, wrapper.to(device))
    return originals


def _check_record_fits(denoiser: nn.Module, record: QuantRecord) -> None:
    layers = leaf_layers(denoiser)
    for layer in record.layers:
        module = layers.get(layer.layer)
        if module is None:
            raise UserError(
                f"the record quantizes layer {layer.layer!r}, which the model does not have: "
                "the record is for another model"
            )
        scale = layer.tensors.get("weight_scale")
        # (O,) scales, or (2, O) for a split layer (one row per part of its inputs).
        if scale is not None and scale.shape[-1] != module.weight.shape[0]:
            raise UserError(
                f"layer {layer.layer!r} has {module.weight.shape[0]} output channels, the record "
                f"{scale.shape[-1]}: the record is for another model"
            )
    modules = attention_modules(denoiser)
    for attention in record.attention:
        if attention.module not in modules:
            raise UserError(
                f"the record quantizes attention module {attention.module!r}, which the model "
                "does not have: the record is for another model"
            )


def _check_unquantized(denoiser: nn.Module) -> None:
    """Raises UserError when layers or attention of the denoiser are already quantized."""
    if (
        next(quant_wrappers(denoiser), None) is not None
        or next(attention_processors(denoiser), None) is not None
    ):
        raise UserError(
            "the model is already quantized; load a fresh one (or undo it with unquantize_)"
        )


def apply_record(model: Any, record: QuantRecord, tracker: Any = None) -> QuantRecord:
    """Quantizes a fresh model with a record's parameters (no statistics needed).

    Args:
        model: a LoadedModel, its denoiser or a diffusers pipeline, unquantized.
        record: from ``load_record`` (or ``quantize_``).
        tracker: a CallTracker attached to the denoiser; made when a per-timestep
            quantizer needs one and none is given.

    Returns:
        The record, its ``tracker`` set.
    """
    loaded, denoiser = _denoiser(model)
    _check_unquantized(denoiser)
    _check_record_fits(denoiser, record)
    made = _ensure_tracker(loaded, denoiser, record.layers, tracker)
    record.originals = _apply_layers(denoiser, record.layers, made)
    install_attention(denoiser, record.attention)
    record.tracker, record.owns_tracker = made, made is not tracker
    return record


def unquantize_(model: Any, record: QuantRecord) -> None:
    """Takes back ``quantize_`` / ``apply_record``: the original layers, attention
    processors and parameters, bit for bit (the state dict equals the one before).

    Folds (SCRI, OS+, SmoothQuant) rewrite parameters of other modules — norm affines,
    modulation Linears and tables, GEGLU projections — which unwrapping alone would leave
    changed; the record remembers their values from before.

    Args:
        model: the LoadedModel, denoiser or pipeline the record was applied to.
        record: its record, from the same ``quantize_`` / ``apply_record`` call.

    Raises:
        UserError: the record holds values of parameters the model does not have.
    """
    _, denoiser = _denoiser(model)
    unwrap(denoiser)
    restore_parameters(denoiser, record.originals)
    if record.owns_tracker and hasattr(record.tracker, "detach"):
        record.tracker.detach()
    record.tracker, record.owns_tracker = None, False


# --------------------------------------------------------------------------- quantize_


def check_stats_match(denoiser: nn.Module, run: StatsRun) -> dict[str, nn.Module]:
    """The in-scope layers, after checking the statistics describe exactly this model.

    Raises:
        UserError: "statistics from another model", naming the first mismatch.
    """
    layers = leaf_layers(denoiser)
    stored = {row["name"]: row for row in run.manifest["layers"]}
    where = f"statistics {run.path} are from another model"
    for name, module in layers.items():
        row = stored.get(name)
        if row is None:
            raise UserError(f"{where}: they have no layer {name!r}")
        weight = module.weight
        shape = (weight.shape[1] * getattr(module, "groups", 1), weight.shape[0])
        if (row.get("in_channels"), row.get("out_channels")) != shape:
            raise UserError(
                f"{where}: layer {name!r} has {shape[0]} input / {shape[1]} output channels, "
                f"the statistics {row.get('in_channels')} / {row.get('out_channels')}"
            )
    extra = [name for name in stored if name not in layers]
    if extra:
        raise UserError(f"{where}: the model has no layer {extra[0]!r}")
    return layers


def check_config_names(config: QuantConfig, roles: dict[str, str]) -> None:
    """Every layer and role a config names exists in the model.

    Args:
        config: the config.
        roles: in-scope layer name -> role.

    Raises:
        UserError: naming the first unknown layer or role, with suggestions.
    """
    from qvd_bench.registry import did_you_mean

    known_roles = set(roles.values())
    for role in [*config.keep_fp_roles, *(r for r, _, _ in config.role_bits)]:
        if role not in known_roles:
            raise UserError(
                f"unknown role {role!r}{did_you_mean(role, sorted(known_roles))}; "
                f"this model's roles: {', '.join(sorted(known_roles))}"
            )
    for layer in [*config.keep_fp_layers, *(n for n, _, _ in config.layer_bits)]:
        if layer not in roles:
            raise UserError(
                f"the model has no layer {layer!r}{did_you_mean(layer, list(roles))} "
                "(models.roles.classify lists them)"
            )


def _check_plan(plan: Any, layers: dict[str, nn.Module]) -> None:
    for entry in plan.layers:
        if entry.layer not in layers:
            raise UserError(
                f"the plan names layer {entry.layer!r}, which the model does not have; "
                "rerun qvd-bench analyze on statistics of this model"
            )


def _resolve(config: QuantConfig, method: Method) -> QuantConfig:
    """The config with the method's default weight clipping and granularity filled in."""
    return dataclasses.replace(
        config,
        weight_clipping=config.weight_clipping or method.weight_clipping,
        granularity=config.granularity or method.granularity,
    )


def make_plan_for(run: StatsRun, config: QuantConfig):
    """The plan ``analyze`` would decide at the config's bits (nothing written)."""
    from qvd_bench.analysis.plan import make_plan
    from qvd_bench.analysis.summary import stored_layer_summary

    table = stored_layer_summary(run, (config.a_bits,))
    return make_plan(run, table, w_bits=config.w_bits, a_bits=config.a_bits)


def quantize_(
    model: Any,
    config: QuantConfig,
    *,
    stats: StatsRun | str | Path,
    plan: Any = None,
    tracker: Any = None,
) -> QuantRecord:
    """Quantizes every in-scope Linear/Conv layer of a model in place.

    The model keeps its own device and dtype (choose them when loading it:
    ``load_model(..., device=, dtype=)``): each quantized layer runs on its layer's device
    and fake-quantizes in the model's dtype, with scales and their arithmetic in float32.
    The record keeps every quantizer parameter on the CPU.

    Args:
        model: a LoadedModel, its denoiser, or a diffusers pipeline object (every denoiser
            of it: ``transformer`` and ``transformer_2`` of a two-expert Wan 2.2), unquantized.
        config: the QuantConfig.
        stats: the statistics of this model (a StatsRun or its directory).
        plan: a QuantPlan for methods that read one; decided from ``stats`` when None.
        tracker: a CallTracker attached to the denoiser, for per-timestep quantizers
            (made when needed and None).

    Returns:
        The QuantRecord of every quantizer's parameters (``record.tracker`` set).

    Raises:
        UserError: unknown method, statistics of another model, a plan naming layers the
            model does not have, or an already quantized model.
    """
    loaded, denoiser = _denoiser(model)
    method = get_method(config.method)
    config = _resolve(config, method)
    run = stats if isinstance(stats, StatsRun) else StatsRun(stats)
    _check_unquantized(denoiser)
    layers = check_stats_match(denoiser, run)
    roles = {name: run.roles.get(name, "") for name in layers}
    check_config_names(config, roles)
    if plan is not None:
        _check_plan(plan, layers)
    elif method.uses_plan:
        plan = make_plan_for(run, config)
    # Before any layer is touched: missing attention statistics fail with the model intact.
    attention = attention_records(denoiser, run, config.attention_bits)
    ctx = QuantContext(loaded, denoiser, run, plan, config, tracker, layers, roles)
    records = method.prepare(ctx)
    _check_records(ctx, records)
    made = _ensure_tracker(loaded, denoiser, records, tracker)
    originals = _apply_layers(denoiser, records, made)
    _check_wrapped(denoiser, ctx, records)
    install_attention(denoiser, attention)
    record = QuantRecord(config, _model_identity(loaded), records, made, attention=attention)
    record.originals, record.owns_tracker = originals, made is not tracker
    return record


def _check_records(ctx: QuantContext, records: list[LayerRecord]) -> None:
    """A method returns exactly one record per in-scope layer, FP only where kept FP."""
    names = [r.layer for r in records]
    if sorted(names) != sorted(ctx.layers):
        missing = [n for n in ctx.layers if n not in names]
        extra = [n for n in names if n not in ctx.layers or names.count(n) > 1]
        raise RuntimeError(
            f"method {ctx.config.method!r} returned records for the wrong layers "
            f"(missing {missing[:3]}, unexpected or repeated {extra[:3]})"
        )
    order = {name: i for i, name in enumerate(ctx.layers)}
    records.sort(key=lambda r: order[r.layer])


def _check_wrapped(denoiser: nn.Module, ctx: QuantContext, records: list[LayerRecord]) -> None:
    """Every layer not kept FP by the config has a quantizer, unless its method keeps it FP
    on purpose and says why (``fp``, ``fp-temporal``)."""
    wrapped = {name for name, _ in quant_wrappers(denoiser)}
    by_name = {r.layer: r for r in records}
    for name in ctx.quantized_layers:
        record = by_name[name]
        on_purpose = record.is_fp and record.info.get("fp_reason")
        assert name in wrapped or on_purpose, f"{ctx.config.method}: layer {name} has no quantizer"
