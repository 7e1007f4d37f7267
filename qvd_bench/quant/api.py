"""Quantize a denoiser in place from statistics, in the style of torchao's ``quantize_``.

    record = quantize_(loaded, QuantConfig(method="qvd", w_bits=8, a_bits=8), stats=run)
    record.save("out/")                       # record.safetensors + record.json
    fresh = load_model(...)
    apply_record(fresh, load_record("out/"))  # same outputs, no statistics needed
    unquantize_(fresh, record)                # the float model again, bit for bit

The method (``METHODS``, one module per method in ``quant/methods/``) turns statistics,
the plan and the config into one ``LayerRecord`` per in-scope layer; ``quantize_`` and
``apply_record`` both build the wrappers from those records alone, so a reloaded record
reproduces the quantized model exactly.

Scope: every leaf Linear / Conv layer of the denoiser (``roles.leaf_layers``); the
statistics must describe exactly those layers. By default everything is quantized
(``keep_fp_roles`` and ``keep_fp_layers`` are empty): DESIGN allows keeping the first and
last layers or any role in full precision, but the default stays the plain, comparable
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
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qvd_bench.config import SCHEMA_VERSION
from qvd_bench.errors import UserError
from qvd_bench.models.family import LoadedModel
from qvd_bench.models.roles import leaf_layers
from qvd_bench.quant.attention import (
    AttentionRecord,
    attention_modules,
    attention_processors,
    attention_records,
    attention_summary,
    install_attention,
)
from qvd_bench.quant.methods.base import (
    LayerRecord,
    QuantContext,
    act_quantizer,
    build_wrapper,
    get_method,
)
from qvd_bench.quant.modules import quant_wrappers, swap_module
from qvd_bench.quant.primitives import check_bits, quant_range
from qvd_bench.quant.split import split_summary
from qvd_bench.store import StatsRun, atomic_write, read_json_document, write_json

RECORD_FORMAT = "qvd-bench-quant-record"
RECORD_JSON = "record.json"
RECORD_TENSORS = "record.safetensors"

# Named bit-width presets (DESIGN section 5); any WxAy with x, y in 2..16 is accepted too.
PRESETS: dict[str, tuple[int, int]] = {
    "W8A8": (8, 8),
    "W6A6": (6, 6),
    "W4A8": (4, 8),
    "W4A6": (4, 6),
    "W4A4": (4, 4),
}
GRANULARITIES = ("tensor", "timestep_group", "token")
WEIGHT_CLIPPINGS = ("minmax", "mse")


def parse_bits(spec: str) -> tuple[int, int]:
    """``"W4A8"`` -> (4, 8). Any WxAy with x and y in 2..16 (case-insensitive).

    Raises:
        UserError: not of the form WxAy, or a bit-width out of range.
    """
    match = re.fullmatch(r"[wW](\d+)[aA](\d+)", str(spec).strip())
    if match is None:
        presets = ", ".join(PRESETS)
        raise UserError(f"bit-widths must look like W4A8 (presets: {presets}), got {spec!r}")
    return check_bits(int(match.group(1))), check_bits(int(match.group(2)))


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize.

    Attributes:
        method: a registered method name (``METHODS``).
        w_bits: weight bits (per output channel, symmetric), 2..16.
        a_bits: activation bits, 2..16.
        weight_clipping: "minmax" or "mse"; None takes the method's default (min-max for
            ``minmax`` / ``percentile``, MSE-clipped for the rest).
        granularity: activation granularity, "tensor" (static, all timesteps),
            "timestep_group" (``timestep_groups`` contiguous groups) or "token" (dynamic);
            None takes the method's default. Every method's uniform activation quantizers
            follow it; quantizers a method defines for temporal features keep their own
            form: HTDQ's level sets and fsc's one range per stored timestep.
        timestep_groups: number of groups for "timestep_group" quantizers (capped at the
            number of stored timesteps).
        keep_fp_roles: roles whose layers stay in full precision (default: none).
        keep_fp_layers: layer names that stay in full precision (default: none).
        role_bits: mixed precision by role, ``(role, w_bits, a_bits)`` triples overriding
            ``w_bits`` / ``a_bits`` for the layers of that role.
        layer_bits: mixed precision by layer, ``(layer, w_bits, a_bits)`` triples; they
            take precedence over ``role_bits``.
        attention_bits: bits of the attention matmul inputs (q, k, v, softmax output),
            quantized through ``quant/attention.py``: () leaves them in float, one value
            gives all four, four values give q, k, v and softmax in that order.
        split_skip: Q-Diffusion's split quantization of skip-connection concatenations:
            layers reading ``cat([h, skip])`` get one activation range and one set of
            weight scales per part (``quant/split.py``); nothing changes on a denoiser
            without skip concatenations (DiTs).
        p: exponent of the Lp clipping search (2.4, Q-Diffusion).
        percentile: upper probability of the ``percentile`` method.
        htdq_tolerance: HTDQ accepts a level set whose relative MSE is at most
            (1 + tolerance) × that of the uniform MSE-clipped set.
    """

    method: str = "minmax"
    w_bits: int = 8
    a_bits: int = 8
    weight_clipping: str | None = None
    granularity: str | None = None
    timestep_groups: int = 4
    keep_fp_roles: tuple[str, ...] = ()
    keep_fp_layers: tuple[str, ...] = ()
    role_bits: tuple[tuple[str, int, int], ...] = ()
    layer_bits: tuple[tuple[str, int, int], ...] = ()
    attention_bits: tuple[int, ...] = ()
    split_skip: bool = False
    p: float = 2.4
    percentile: float = 0.999
    htdq_tolerance: float = 0.1

    def __post_init__(self) -> None:
        check_bits(self.w_bits)
        check_bits(self.a_bits)
        if self.weight_clipping not in (None, *WEIGHT_CLIPPINGS):
            raise UserError(
                f"weight clipping must be one of {', '.join(WEIGHT_CLIPPINGS)}, "
                f"got {self.weight_clipping!r}"
            )
        if self.granularity not in (None, *GRANULARITIES):
            raise UserError(
                f"activation granularity must be one of {', '.join(GRANULARITIES)}, "
                f"got {self.granularity!r}"
            )
        if isinstance(self.timestep_groups, bool) or not (
            isinstance(self.timestep_groups, int) and self.timestep_groups >= 1
        ):
            raise UserError(f"timestep_groups must be an integer >= 1, got {self.timestep_groups}")
        if not (self.p > 0 and math.isfinite(self.p)):
            raise UserError(f"Lp exponent must be a finite number > 0, got {self.p}")
        if not 0.5 <= self.percentile <= 1.0:
            raise UserError(f"percentile must be in [0.5, 1], got {self.percentile}")
        if not self.htdq_tolerance >= 0:
            raise UserError(f"htdq_tolerance must be >= 0, got {self.htdq_tolerance}")
        # Lists from JSON become tuples: the config stays hashable and comparable.
        object.__setattr__(self, "keep_fp_roles", tuple(self.keep_fp_roles))
        object.__setattr__(self, "keep_fp_layers", tuple(self.keep_fp_layers))
        object.__setattr__(self, "role_bits", _bit_overrides(self.role_bits, "role"))
        object.__setattr__(self, "layer_bits", _bit_overrides(self.layer_bits, "layer"))
        attention = tuple(check_bits(int(b)) for b in self.attention_bits)
        if len(attention) not in (0, 1, 4):
            raise UserError(
                "attention bits take one value (q, k, v and softmax) or four "
                f"(q, k, v, softmax), got {len(attention)}"
            )
        object.__setattr__(self, "attention_bits", attention)

    @property
    def bits(self) -> str:
        """The default bit-widths, e.g. "W4A8" (mixed configs override them per layer)."""
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def is_mixed(self) -> bool:
        """True when some role or layer has its own bit-widths."""
        return bool(self.role_bits or self.layer_bits)

    def bits_for(self, layer: str, role: str) -> tuple[int, int]:
        """(w_bits, a_bits) of one layer: its layer entry, else its role's, else the default."""
        for name, w_bits, a_bits in self.layer_bits:
            if name == layer:
                return w_bits, a_bits
        for name, w_bits, a_bits in self.role_bits:
            if name == role:
                return w_bits, a_bits
        return self.w_bits, self.a_bits

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("keep_fp_roles", "keep_fp_layers", "attention_bits"):
            data[key] = list(getattr(self, key))
        for key in ("role_bits", "layer_bits"):
            data[key] = [list(entry) for entry in getattr(self, key)]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown quantization config fields: {', '.join(unknown)}")
        return cls(**data)


def _bit_overrides(entries: Any, what: str) -> tuple[tuple[str, int, int], ...]:
    """Validated ``(name, w_bits, a_bits)`` triples (lists from JSON become tuples)."""
    out = []
    for entry in entries:
        if len(entry) != 3 or not isinstance(entry[0], str):
            raise UserError(f"{what} bits must be (name, w_bits, a_bits) triples, got {entry!r}")
        name, w_bits, a_bits = entry
        out.append((name, check_bits(int(w_bits)), check_bits(int(a_bits))))
    names = [name for name, _, _ in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{what} {repeated[0]!r} is given bits more than once")
    return tuple(out)


# --------------------------------------------------------------------------- the record


@dataclass
class QuantRecord:
    """Every quantizer's parameters, per layer, and what produced them.

    Attributes:
        config: the config, with the method's defaults filled in.
        model: identity of the model (name, weight seed, knobs) when known.
        layers: one LayerRecord per in-scope layer, in module order.
        tracker: the CallTracker the per-timestep quantizers read (not saved).
        attention: one AttentionRecord per attention module when
            ``config.attention_bits`` is set (q, k, v and softmax quantizers), else empty.
        originals: the values the layers' folds overwrote in the model, by ``state_dict``
            name (in memory, not saved): what ``unquantize_`` writes back.
        owns_tracker: True when ``tracker`` was made by ``quantize_`` / ``apply_record``
            (``unquantize_`` then detaches it).
    """

    config: QuantConfig
    model: dict[str, Any]
    layers: list[LayerRecord]
    tracker: Any = field(default=None, repr=False, compare=False)
    attention: list[AttentionRecord] = field(default_factory=list)
    originals: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)
    owns_tracker: bool = field(default=False, repr=False, compare=False)

    def __getitem__(self, layer: str) -> LayerRecord:
        for record in self.layers:
            if record.layer == layer:
                return record
        raise KeyError(layer)

    @property
    def quantized(self) -> list[str]:
        """Layers with a quantizer (not kept in full precision)."""
        return [r.layer for r in self.layers if not r.is_fp]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "config": self.config.to_dict(),
            "model": self.model,
            "layers": [_json_safe(r.meta()) for r in self.layers],
            "attention": [_json_safe(r.meta()) for r in self.attention],
        }

    def tensors(self) -> dict[str, Tensor]:
        """Flat safetensors dict: ``layers/<layer>/<key>``, ``folded/<layer>/<param>`` and
        ``attention/<module>/<tensor>_scale`` / ``_zero_point``."""
        out: dict[str, Tensor] = {}
        for record in self.layers:
            for key, value in record.tensors.items():
                out[f"layers/{record.layer}/{key}"] = value.detach().cpu().contiguous().clone()
            for name, value in record.folded.items():
                out[f"folded/{record.layer}/{name}"] = value.detach().cpu().contiguous().clone()
        for record in self.attention:
            for key, value in record.tensors.items():
                out[f"attention/{record.module}/{key}"] = value.detach().cpu().contiguous().clone()
        return out

    def save(self, directory: str | Path) -> Path:
        """Writes ``record.safetensors`` and ``record.json`` into ``directory`` (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.tensors()
        atomic_write(directory / RECORD_TENSORS, lambda p: save_file(tensors, str(p)))
        write_json(directory / RECORD_JSON, self.to_json())
        return directory

    def summary(self) -> dict[str, Any]:
        """Counts of layers per activation quantizer kind, and the config."""
        kinds: dict[str, int] = {}
        for record in self.layers:
            kinds[record.act] = kinds.get(record.act, 0) + 1
        return {
            "method": self.config.method,
            "bits": self.config.bits,
            "layers": len(self.layers),
            "quantized": len(self.quantized),
            "activation_quantizers": kinds,
            "attention": attention_summary(self.attention),
            **({"split_skip": split_summary(self.layers)} if self.config.split_skip else {}),
        }


def _json_safe(value: Any) -> Any:
    """Python scalars and lists only; NaN and infinities become None."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (Tensor, np.ndarray)):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def load_record(directory: str | Path) -> QuantRecord:
    """Reads a record written by ``QuantRecord.save``.

    Raises:
        UserError: missing, unreadable or foreign files.
    """
    directory = Path(directory)
    json_path, tensor_path = directory / RECORD_JSON, directory / RECORD_TENSORS
    data = read_json_document(
        json_path,
        format=RECORD_FORMAT,
        what="quantization record",
        redo="quantize again with this version",
        missing=f"no quantization record at {directory} ({RECORD_JSON} missing)",
    )
    try:
        flat = load_file(str(tensor_path))
    except FileNotFoundError:
        raise UserError(f"{tensor_path} is missing from the quantization record") from None
    except (OSError, SafetensorError) as error:
        raise UserError(f"{tensor_path} is corrupt: {' '.join(str(error).split())}") from None
    tensors: dict[str, dict[str, Tensor]] = {}
    folded: dict[str, dict[str, Tensor]] = {}
    attention: dict[str, dict[str, Tensor]] = {}
    groups = {"layers": tensors, "folded": folded, "attention": attention}
    for name, value in flat.items():
        kind, layer, key = name.split("/", 2)
        if kind not in groups:
            raise UserError(f"{tensor_path} holds an unknown tensor {name!r}")
        groups[kind].setdefault(layer, {})[key] = value
    layers = []
    for meta in data["layers"]:
        name = meta["layer"]
        layers.append(
            LayerRecord(
                layer=name,
                role=meta["role"],
                kind=meta["kind"],
                w_bits=meta["w_bits"],
                weight_clipping=meta["weight_clipping"],
                act=meta["act"],
                a_bits=meta["a_bits"],
                tensors=tensors.get(name, {}),
                folded=folded.get(name, {}),
                info=meta["info"],
                builder=meta.get("builder", "standard"),
            )
        )
    attention_layers = [
        AttentionRecord.from_meta(meta, attention.get(meta["module"], {}))
        for meta in data.get("attention", [])
    ]
    return QuantRecord(
        QuantConfig.from_dict(data["config"]), data["model"], layers, attention=attention_layers
    )


# --------------------------------------------------------------------------- applying


def _denoiser(model: LoadedModel | nn.Module) -> tuple[LoadedModel | None, nn.Module]:
    if isinstance(model, LoadedModel):
        return model, model.denoiser
    if isinstance(model, nn.Module):
        return None, model
    raise UserError(f"expected a LoadedModel or an nn.Module, got {type(model).__name__}")


def _model_identity(loaded: LoadedModel | None) -> dict[str, Any]:
    if loaded is None:
        return {}
    return {"name": loaded.name, "weight_seed": loaded.weight_seed, "knobs": loaded.knobs}


def _ensure_tracker(denoiser: nn.Module, records: list[LayerRecord], tracker: Any) -> Any:
    """The given tracker, or a new attached CallTracker when a record needs one."""
    if tracker is not None or not any(r.act == "group" for r in records):
        return tracker
    from qvd_bench.models.sampling import CallTracker

    return CallTracker(denoiser).attach()


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


def apply_record(
    model: LoadedModel | nn.Module, record: QuantRecord, tracker: Any = None
) -> QuantRecord:
    """Quantizes a fresh model with a record's parameters (no statistics needed).

    Args:
        model: a LoadedModel or its denoiser, unquantized.
        record: from ``load_record`` (or ``quantize_``).
        tracker: a CallTracker attached to the denoiser; made when a per-timestep
            quantizer needs one and none is given.

    Returns:
        The record, its ``tracker`` set.
    """
    _, denoiser = _denoiser(model)
    _check_unquantized(denoiser)
    _check_record_fits(denoiser, record)
    made = _ensure_tracker(denoiser, record.layers, tracker)
    record.originals = _apply_layers(denoiser, record.layers, made)
    install_attention(denoiser, record.attention)
    record.tracker, record.owns_tracker = made, made is not tracker
    return record


def unquantize_(model: LoadedModel | nn.Module, record: QuantRecord) -> None:
    """Takes back ``quantize_`` / ``apply_record``: the original layers, attention
    processors and parameters, bit for bit (the state dict equals the one before).

    Folds (SCRI, OS+, SmoothQuant) rewrite parameters of other modules — norm affines,
    modulation Linears and tables, GEGLU projections — which unwrapping alone would leave
    changed; the record remembers their values from before.

    Args:
        model: the LoadedModel or denoiser the record was applied to.
        record: its record, from the same ``quantize_`` / ``apply_record`` call.

    Raises:
        UserError: the record holds values of parameters the model does not have.
    """
    from qvd_bench.quant.modules import unwrap
    from qvd_bench.quant.transforms import restore_parameters

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


def _resolve(config: QuantConfig, method: Any) -> QuantConfig:
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
    model: LoadedModel | nn.Module,
    config: QuantConfig,
    *,
    stats: StatsRun | str | Path,
    plan: Any = None,
    tracker: Any = None,
) -> QuantRecord:
    """Quantizes every in-scope Linear/Conv layer of a model in place.

    Args:
        model: a LoadedModel or its denoiser (unquantized).
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
    made = _ensure_tracker(denoiser, records, tracker)
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


# --------------------------------------------------------------------------- reporting


def act_range(record: LayerRecord) -> tuple[float, float] | None:
    """The [lo, hi] an activation quantizer covers (union over groups); None if dynamic/none."""
    t = record.tensors
    if record.act in ("static", "group"):
        q_min, q_max = quant_range(record.a_bits)
        scale = t["act_scale"].to(torch.float64)
        zero = t["act_zero_point"].to(torch.float64)
        return float(((q_min - zero) * scale).min()), float(((q_max - zero) * scale).max())
    if record.act == "levels":
        return float(t["levels"].min()), float(t["levels"].max())
    return None


def quantize_features(record: LayerRecord, timesteps: np.ndarray, features: Tensor) -> Tensor:
    """Temporal features as the layer's quantizer sees them, back in the input domain.

    Args:
        record: the layer's record.
        timesteps: (T,) the timestep of each row (a per-group quantizer picks its row's group).
        features: (T, D) float64.

    Returns:
        (T, D) float64: z + s·Q((e − z)/s) with the record's input transform (identity
        when none), e where the layer keeps float inputs.
    """
    call = SimpleNamespace(current=None)
    quantizer = act_quantizer(record, call)
    if quantizer is None:
        return features
    shift = record.tensors.get("input_shift")
    scale = record.tensors.get("input_scale")
    rows = []
    for t, e in zip(np.asarray(timesteps).tolist(), features):
        call.current = SimpleNamespace(timestep=float(t))
        z = torch.zeros(()) if shift is None else shift.to(torch.float64)
        if z.ndim == 2:  # a bias table per timestep group
            z = z[quantizer.group()] if hasattr(quantizer, "group") else z[0]
        s = torch.ones(()) if scale is None else scale.to(torch.float64)
        rows.append(z + s * quantizer((e - z) / s))
    return torch.stack(rows)


def temporal_report(run: StatsRun, record: QuantRecord, layers: dict[str, nn.Module]) -> list:
    """TDScore, relative MSE and collisions of each temporal-feature layer's quantizer."""
    from qvd_bench.analysis.temporal import tdscore

    temporal = run.temporal
    if temporal.empty:
        return []
    out = []
    for name in sorted(set(temporal["layer"].astype(str))):
        if name not in layers:
            continue
        layer = record[name]
        timesteps, vectors = run.temporal_matrix(name)
        features = torch.from_numpy(np.asarray(vectors, dtype=np.float64))
        weight = layers[name].weight.detach()
        scores = tdscore(
            features, weight, lambda e, r=layer, t=timesteps: quantize_features(r, t, e)
        )
        out.append({"layer": name, "act": layer.act, **layer.info.get("htdq", {}), **scores})
    return out


def coverage_report(run: StatsRun, record: QuantRecord) -> dict[str, Any]:
    """Level coverage of the calibrated per-tensor ranges (DESIGN section 4).

    Layers with an explicit input transform, dynamic or no activation quantizer are left
    out: their calibrated range is not on the stored input statistics' scale.

    Returns:
        layers (count), mean (of the per-layer mean coverage) and table (per layer:
        mean_coverage, median_coverage, share_below_threshold).
    """
    from qvd_bench.analysis.channels import channel_ranges, coverage, coverage_summary

    ranges = {}
    for layer in record.layers:
        span = act_range(layer) if layer.a_bits is not None else None
        # A transformed layer's range is on X̃ = (X − z)/s, not on the stored X.
        if (
            span is not None
            and "transform" not in layer.info
            and "input_shift" not in layer.tensors
        ):
            ranges[layer.layer] = span
    if not ranges:
        return {"layers": 0, "mean": float("nan"), "table": None}
    frame = channel_ranges(run.channels)
    frame = frame[frame["tensor"] == "input"] if "tensor" in frame.columns else frame
    frame = frame[frame["layer"].astype(str).isin(list(ranges))]
    table = coverage_summary(coverage(frame, record.config.a_bits, ranges))
    return {
        "layers": int(len(table)),
        "mean": float(table["mean_coverage"].mean()),
        "table": table,
    }
