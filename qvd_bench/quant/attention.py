"""Quantized attention matmuls: q, k, v and the softmax output, each with its own quantizer.

``QuantAttnProcessor`` is ``collect.attention.ExplicitAttnProcessor`` (the original
diffusers processor run with explicit attention) with a quantizer on each matmul operand:

    q̂, k̂, v̂ = Q_q(q), Q_k(k), Q_v(v)
    P = softmax(q̂·k̂ᵀ·scale + mask)        (B, H, L, S)
    out = Q_softmax(P)·v̂                   (B, H, L, Ev)

Quantization (``QuantConfig.attention_bits``) is static, per tensor and asymmetric, with
the min-max range over every stored timestep and branch (``attention_records``); the
softmax output's range is [0, max] as it is non-negative. The parameters live in
``AttentionRecord``s, exported with the rest of the quantization record and installed on
a fresh model by ``install_attention``; ``collect.attention.restore_processors`` puts the
original processors back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor, nn

from qvd_bench.collect.attention import (
    ATTENTION_TENSORS,
    ExplicitAttnProcessor,
    Observer,
    attention_modules,
    install_processors,
)
from qvd_bench.errors import UserError
from qvd_bench.numerics.grid import affine_qparams, check_bits
from qvd_bench.quant.modules import ActQuantizer, StaticActQuant

if TYPE_CHECKING:
    from qvd_bench.store import StatsRun


class QuantAttnProcessor(ExplicitAttnProcessor):
    """An attention processor that runs the original one with explicit, quantized attention.

    Its attributes are those of ``ExplicitAttnProcessor``, ``quantizers`` set from the
    argument.

    Args:
        original, module_name, observe: as ``ExplicitAttnProcessor``.
        quantizers: tensor name -> quantizer (``ATTENTION_TENSORS``); empty for float.
    """

    def __init__(
        self,
        original: Any,
        module_name: str,
        quantizers: dict[str, ActQuantizer] | None = None,
        observe: Observer | None = None,
    ):
        super().__init__(original, module_name, observe)
        self.quantizers = dict(quantizers or {})
        unknown = sorted(set(self.quantizers) - set(ATTENTION_TENSORS))
        if unknown:
            raise ValueError(f"unknown attention tensors {unknown}; known: {ATTENTION_TENSORS}")

    def __repr__(self) -> str:
        bits = ", ".join(f"{t}={q.bits}" for t, q in self.quantizers.items())
        return f"QuantAttnProcessor({type(self.original).__name__}, {bits or 'float'})"


def attention_bit_map(bits: Sequence[int]) -> dict[str, int]:
    """``QuantConfig.attention_bits`` as tensor -> bits ({} when off).

    Raises:
        UserError: not 0, 1 or 4 values, or a value outside 2..16.
    """
    values = [check_bits(int(b)) for b in bits]
    if len(values) == 1:
        values = values * len(ATTENTION_TENSORS)
    if len(values) not in (0, len(ATTENTION_TENSORS)):
        raise UserError(
            f"attention bits take one value or four (q, k, v, softmax), got {len(values)}"
        )
    return dict(zip(ATTENTION_TENSORS, values))


@dataclass
class AttentionRecord:
    """The quantizers of one attention module's matmul operands.

    Attributes:
        module: qualified name of the attention module in the denoiser.
        bits: tensor ("q", "k", "v", "softmax") -> bits.
        tensors: "<tensor>_scale" () float32 and "<tensor>_zero_point" () int32 per tensor.
        info: JSON-safe facts: the calibration rule and each tensor's range [lo, hi].
    """

    module: str
    bits: dict[str, int]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """The JSON part (everything but tensors)."""
        return {
            "module": self.module,
            "bits": dict(self.bits),
            "tensors": sorted(self.tensors),
            "info": self.info,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> AttentionRecord:
        """Rebuilds a record from ``meta()`` and its tensors.

        Raises:
            UserError: a tensor the metadata names is missing.
        """
        missing = [key for key in meta["tensors"] if key not in tensors]
        if missing:
            raise UserError(
                f"attention quantizers of {meta['module']!r} lack {', '.join(missing)}: "
                "the record is incomplete"
            )
        bits = {str(t): check_bits(int(b)) for t, b in meta["bits"].items()}
        return cls(meta["module"], bits, dict(tensors), dict(meta.get("info", {})))

    def quantizers(self) -> dict[str, StaticActQuant]:
        """Tensor -> its static per-tensor quantizer."""
        return {
            tensor: StaticActQuant(
                self.tensors[f"{tensor}_scale"], self.tensors[f"{tensor}_zero_point"], bits
            )
            for tensor, bits in self.bits.items()
        }


def attention_ranges(run: StatsRun) -> dict[tuple[str, str], tuple[float, float]]:
    """(module, tensor) -> (min, max) over every stored timestep and branch.

    Raises:
        UserError: the run has no attention statistics.
    """
    frame = run.attention
    if frame.empty:
        raise UserError(
            f"{run.path} has no attention statistics; collect them with "
            "attention=True to quantize attention (attention_bits)"
        )
    frame = frame[frame["count"] > 0]
    grouped = frame.groupby(["module", "tensor"], observed=True)
    lows, highs = grouped["min"].min(), grouped["max"].max()
    return {
        (str(module), str(tensor)): (float(lows[(module, tensor)]), float(highs[(module, tensor)]))
        for module, tensor in lows.index
    }


def attention_records(
    denoiser: nn.Module, run: StatsRun, bits: Sequence[int]
) -> list[AttentionRecord]:
    """Static per-tensor min-max quantizers for every attention module of a denoiser.

    Args:
        denoiser: the (unquantized) denoiser the statistics describe.
        run: statistics collected with ``--attention``.
        bits: ``QuantConfig.attention_bits``; () gives no records.

    Returns:
        One record per attention module, in module order.

    Raises:
        UserError: no attention statistics, statistics of another model's attention, or
            a tensor without finite values.
    """
    bit_map = attention_bit_map(bits)
    if not bit_map:
        return []
    modules = list(attention_modules(denoiser))
    if not modules:
        raise UserError(f"{type(denoiser).__name__} has no attention modules to quantize")
    ranges = attention_ranges(run)
    stored = sorted({module for module, _ in ranges})
    where = f"the attention statistics in {run.path} are from another model"
    extra = [name for name in stored if name not in modules]
    if extra:
        raise UserError(f"{where}: the model has no attention module {extra[0]!r}")
    records = []
    for name in modules:
        tensors: dict[str, Tensor] = {}
        spans: dict[str, list[float]] = {}
        for tensor, tensor_bits in bit_map.items():
            span = ranges.get((name, tensor))
            if span is None:
                raise UserError(f"{where}: they have no {tensor} of attention module {name!r}")
            lo, hi = span
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise UserError(
                    f"attention module {name!r}: {tensor} has no finite values to calibrate on"
                )
            if tensor == "softmax":
                lo = 0.0  # probabilities: the range starts at 0 whatever the data's minimum
            scale, zero_point = affine_qparams(lo, hi, tensor_bits)
            tensors[f"{tensor}_scale"] = scale.reshape(())
            tensors[f"{tensor}_zero_point"] = zero_point.reshape(())
            spans[tensor] = [lo, hi]
        records.append(
            AttentionRecord(name, dict(bit_map), tensors, {"clipping": "minmax", "range": spans})
        )
    return records


def install_attention(denoiser: nn.Module, records: Sequence[AttentionRecord]) -> None:
    """Installs the quantized processors the records describe (nothing for no records).

    Raises:
        UserError: a record for a module the model does not have, or attention that is
            already quantized.
    """
    by_name = {record.module: record for record in records}
    install_processors(
        denoiser,
        lambda name, original: QuantAttnProcessor(original, name, by_name[name].quantizers()),
        list(by_name),
    )


def attention_summary(records: Sequence[AttentionRecord]) -> dict[str, Any]:
    """Module count, bits and the median range width of each tensor (for printing)."""
    if not records:
        return {"modules": 0}
    widths = {
        tensor: float(np.median([hi - lo for lo, hi in (r.info["range"][tensor] for r in records)]))
        for tensor in records[0].bits
    }
    return {"modules": len(records), "bits": dict(records[0].bits), "median_range": widths}
