"""Quantized replacements of layers, built from their records alone.

``build_wrapper(module, record, tracker)`` calls the builder a record names
(``LayerRecord.builder``), from ``BUILDERS``: "standard" (``QuantWrapper``: weights, the
activation quantizers of ``quant/modules.py`` and an optional explicit input transform,
the ``input_shift`` / ``input_scale`` tensors) and "split" (``SplitQuantWrapper``: one
quantizer per part of a skip concatenation, ``quant/split.py``); ``register_builder``
adds others. ``quantize_`` and ``apply_record`` both build through here, so a record
reloaded from disk reproduces the quantized model exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from qvd_bench.errors import UserError
from qvd_bench.quant.modules import (
    ActQuantizer,
    DynamicTokenActQuant,
    GroupActQuant,
    LevelActQuant,
    QuantWrapper,
    StaticActQuant,
)
from qvd_bench.quant.record import LayerRecord
from qvd_bench.quant.split import SplitActQuant, SplitQuantWrapper
from qvd_bench.registry import Registry


def act_quantizer(record: LayerRecord, tracker: Any) -> ActQuantizer | None:
    """The activation quantizer a record describes (None for "none")."""
    t = record.tensors
    if record.act == "none":
        return None
    if record.act == "static":
        return StaticActQuant(t["act_scale"], t["act_zero_point"], record.a_bits)
    if record.act == "group":
        groups = record.info["groups"]
        return GroupActQuant(
            t["act_scale"], t["act_zero_point"], record.a_bits, groups, tracker, record.layer
        )
    if record.act == "dynamic":
        return DynamicTokenActQuant(record.a_bits, record.info.get("clip_ratio", 1.0))
    if record.act == "levels":
        return LevelActQuant(t["levels"])
    raise UserError(f"layer {record.layer!r}: unknown activation quantizer {record.act!r}")


def standard_builder(module: nn.Module, record: LayerRecord, tracker: Any) -> QuantWrapper:
    """Weights, activations and an optional explicit input transform from a record."""
    t = record.tensors
    wrapper = QuantWrapper(
        module,
        record.w_bits,
        act_quantizer(record, tracker),
        weight_scale=t.get("weight_scale"),
        weight=t.get("weight"),
        bias=t.get("bias"),
    )
    if "input_shift" in t or "input_scale" in t:
        setter = getattr(wrapper, "set_input_transform", None)
        if setter is None:
            raise UserError(
                f"layer {record.layer!r} needs an explicit input transform, which this "
                "version of QuantWrapper does not support"
            )
        setter(t.get("input_shift"), t.get("input_scale"))
    return wrapper


BUILDERS: Registry[Callable[[nn.Module, LayerRecord, Any], nn.Module]] = Registry("builder")
BUILDERS.register("standard", standard_builder)


def register_builder(name: str) -> Callable:
    """Function decorator: registers ``builder(module, record, tracker) -> nn.Module``."""

    def decorate(fn: Callable) -> Callable:
        BUILDERS.register(name, fn)
        return fn

    return decorate


def build_wrapper(module: nn.Module, record: LayerRecord, tracker: Any) -> nn.Module:
    """The quantized replacement of ``module`` described by ``record``."""
    return BUILDERS.get(record.builder)(module, record, tracker)


@register_builder("split")
def split_builder(module: nn.Module, record: LayerRecord, tracker: Any) -> SplitQuantWrapper:
    """The wrapper of a split record: part quantizers from rows 0 and 1 of its qparams."""
    if "input_shift" in record.tensors or "input_scale" in record.tensors:
        raise UserError(f"layer {record.layer!r}: a split input cannot have an input transform")
    split = int(record.info["split"])
    act = None
    if record.act != "none":
        keys = [k for k in ("act_scale", "act_zero_point") if k in record.tensors]
        parts = [
            act_quantizer(
                dataclasses.replace(record, tensors={k: record.tensors[k][i] for k in keys}),
                tracker,
            )
            for i in range(2)
        ]
        act = SplitActQuant(parts, split)
    return SplitQuantWrapper(
        module, split, record.w_bits, act, weight_scale=record.tensors.get("weight_scale")
    )
