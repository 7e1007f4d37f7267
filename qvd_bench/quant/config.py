"""How to quantize: ``QuantConfig``, the options of single methods, bit-width specs.

A config names a method — a handler registered in ``quant.methods`` — and what every
method reads: bits, clipping, activation granularity, mixed precision, the layers kept in
float. What only one method reads lives in that method's own frozen options dataclass,
passed as ``options`` (torchao's shape: a config type per handler, here keyed by the
method name because methods are chosen by name on the command line and in result tables)::

    QuantConfig("percentile", 8, 8, options=PercentileOptions(percentile=0.9999))
    QuantConfig("qvd", 4, 8, options=HtdqOptions(tolerance=0.2))

``METHOD_OPTIONS`` says which methods take which options class. A config without
``options`` gets the method's defaults; options of another method are refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from qvd_bench.config import SCHEMA_VERSION, check_schema_version, unknown_fields
from qvd_bench.errors import UserError
from qvd_bench.numerics.grid import check_bits

# Named bit-width presets; any WxAy with x, y in 2..16 is accepted too.
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


# --------------------------------------------------------------------------- method options


@dataclass(frozen=True)
class PercentileOptions:
    """Options of the ``percentile`` method.

    Attributes:
        percentile: the upper probability q of the activation range: the range runs from
            the (1 − q)- to the q-quantile of the merged histograms, in [0.5, 1].
    """

    percentile: float = 0.999

    def __post_init__(self) -> None:
        if not 0.5 <= self.percentile <= 1.0:
            raise UserError(f"percentile must be in [0.5, 1], got {self.percentile}")


@dataclass(frozen=True)
class HtdqOptions:
    """Options of HTDQ (``htdq`` and the ``qvd`` methods that use it).

    Attributes:
        tolerance: HTDQ accepts a level set whose relative MSE is at most
            (1 + tolerance) × that of the uniform MSE-clipped set; >= 0.
    """

    tolerance: float = 0.1

    def __post_init__(self) -> None:
        if not self.tolerance >= 0:
            raise UserError(f"tolerance must be >= 0, got {self.tolerance}")


# Method name -> the options class it reads; methods not listed take no options.
METHOD_OPTIONS: dict[str, type] = {
    "percentile": PercentileOptions,
    "htdq": HtdqOptions,
    "qvd": HtdqOptions,
    "qvd-htdq": HtdqOptions,
}


# --------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize.

    Attributes:
        method: a registered method name (``quant.methods.METHODS``).
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
        p: exponent of the Lp clipping search (2.4, Q-Diffusion), used wherever a range
            is "mse"-clipped: the weights of every method with MSE weight clipping and the
            activations of the MSE-based methods.
        options: the method's own options (``METHOD_OPTIONS``); None takes its defaults.
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
    options: PercentileOptions | HtdqOptions | None = None

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
            raise UserError(f"Lp exponent p must be a finite number > 0, got {self.p}")
        object.__setattr__(self, "options", _method_options(self.method, self.options))
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
        """JSON-ready: tuples as lists, ``options`` as a dict (or None), a schema version."""
        data = dataclasses.asdict(self)
        for key in ("keep_fp_roles", "keep_fp_layers", "attention_bits"):
            data[key] = list(getattr(self, key))
        for key in ("role_bits", "layer_bits"):
            data[key] = [list(entry) for entry in getattr(self, key)]
        return {"schema_version": SCHEMA_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """The config of ``to_dict``; also reads the unversioned dicts of older records.

        Raises:
            UserError: another schema version, unknown fields or options.
        """
        data = dict(data)
        version = data.pop("schema_version", None)
        if version is None:
            data = _upgrade_unversioned(data)
        else:
            check_schema_version(version, "quantization config", "quantize again with this version")
        unknown = unknown_fields(cls, data)
        if unknown:
            raise UserError(f"unknown quantization config fields: {', '.join(unknown)}")
        options = data.pop("options", None)
        method = data.get("method", cls.method)
        if options is not None:
            kind = METHOD_OPTIONS.get(method)
            if kind is None:
                raise UserError(f"options: method {method!r} takes no options, got {options!r}")
            extra = unknown_fields(kind, options)
            if extra:
                raise UserError(f"unknown options of method {method!r}: {', '.join(extra)}")
            options = kind(**options)
        return cls(**data, options=options)


def _method_options(method: str, options: Any) -> Any:
    """The options a method reads: ``options`` if of its class, its defaults when None.

    Raises:
        UserError: options given to a method that takes none, or of another class.
    """
    kind = METHOD_OPTIONS.get(method)
    if options is None:
        return None if kind is None else kind()
    if kind is None:
        raise UserError(f"options: method {method!r} takes no options, got {options!r}")
    if type(options) is not kind:
        raise UserError(
            f"options: method {method!r} takes {kind.__name__}, got {type(options).__name__}"
        )
    return options


def _upgrade_unversioned(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict written before configs had options and a schema version.

    Those carried ``percentile`` and ``htdq_tolerance`` at the top level for every
    method; they become the options of the method that reads them and are dropped
    elsewhere (no other method read them).
    """
    data = dict(data)
    legacy = {
        "percentile": data.pop("percentile", None),
        "tolerance": data.pop("htdq_tolerance", None),
    }
    kind = METHOD_OPTIONS.get(data.get("method", QuantConfig.method))
    if kind is not None:
        names = {f.name for f in dataclasses.fields(kind)}
        data["options"] = {k: v for k, v in legacy.items() if k in names and v is not None}
    return data


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
