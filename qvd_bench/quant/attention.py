"""Quantized attention matmuls: q, k, v and the softmax output, each with its own quantizer.

The diffusers attention processors of every supported denoiser (``AttnProcessor2_0`` of
``Attention`` in the UNets and Latte, ``CogVideoXAttnProcessor2_0``, ``WanAttnProcessor``)
compute the attention itself with ``torch.nn.functional.scaled_dot_product_attention``,
looked up on the module at call time (directly, or through diffusers' native attention
backend). ``QuantAttnProcessor`` wraps the original processor and, only while that
processor runs, routes this function to ``explicit_attention``:

    q̂, k̂, v̂ = Q_q(q), Q_k(k), Q_v(v)
    P = softmax(q̂·k̂ᵀ·scale + mask)        (B, H, L, S)
    out = Q_softmax(P)·v̂                   (B, H, L, Ev)

so everything else the processor does (projections, norms, rotary embeddings, masks,
output projection) is unchanged, and every tensor the two matmuls read goes through its
quantizer. A processor call in which no attention was intercepted raises RuntimeError
(another attention backend would silently bypass the quantizers).

The same processor observes instead of quantizing: ``AttentionStats`` installs it on every
attention module with a callback that feeds q, k, v and the softmax output into
accumulators keyed by (module, tensor, timestep value, CFG branch), as the layer hooks
key theirs (``qvd-bench collect --attention``; stored in ``attention.parquet``).

Quantization (``QuantConfig.attention_bits``) is static, per tensor and asymmetric, with
the min-max range over every stored timestep and branch (``attention_records``); the
softmax output's range is [0, max] as it is non-negative. The parameters live in
``AttentionRecord``s, exported with the rest of the quantization record and installed on
a fresh model by ``install_attention``; ``restore_processors`` puts the original
processors back.

The swap of ``scaled_dot_product_attention`` is process-global for the duration of one
processor call: attention modules must not run concurrently in several threads.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvd_bench.collect.accumulators import ChannelMoments, Histogram, SignedLogEdges
from qvd_bench.errors import UserError
from qvd_bench.quant.modules import ActQuantizer, StaticActQuant
from qvd_bench.quant.primitives import affine_qparams, check_bits

if TYPE_CHECKING:
    from qvd_bench.store import StatsRun

# The tensors the attention matmuls read, in the order of ``QuantConfig.attention_bits``.
ATTENTION_TENSORS: tuple[str, ...] = ("q", "k", "v", "softmax")

# Statistics keys: (attention module, tensor, timestep value, branch).
AttentionKey = tuple[str, str, float, str]

# observe(module name, tensor name, the tensor as the matmul reads it)
Observer = Callable[[str, str, Tensor], None]


# --------------------------------------------------------------------------- the kernel


def explicit_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    quantizers: dict[str, ActQuantizer] | None = None,
    observe: Callable[[str, Tensor], None] | None = None,
) -> Tensor:
    """Scaled dot-product attention as two explicit matmuls, with optional quantizers.

    Takes the arguments of ``torch.nn.functional.scaled_dot_product_attention`` (inference
    only: no dropout) and computes the same result.

    Args:
        query: (..., H, L, E).
        key: (..., Hkv, S, E); Hkv = H unless ``enable_gqa`` (then H is a multiple of it).
        value: (..., Hkv, S, Ev).
        attn_mask: broadcastable to (..., H, L, S): boolean (True = attend) or additive.
        dropout_p: must be 0.
        is_causal: a lower-triangular (L, S) mask; not together with ``attn_mask``.
        scale: the factor of q·kᵀ; 1/sqrt(E) when None.
        enable_gqa: grouped-query attention: each key/value head serves H/Hkv query heads.
        quantizers: tensor name ("q", "k", "v", "softmax") -> fake quantizer applied to
            that matmul operand; missing names stay in float.
        observe: called as ``observe(name, tensor)`` with each operand exactly as the
            matmul reads it (after its quantizer).

    Returns:
        (..., H, L, Ev), in the dtype of ``query``.

    Raises:
        ValueError: dropout, a mask together with ``is_causal``, or head counts that do
            not divide.
    """
    if dropout_p:
        raise ValueError("explicit attention computes inference only: dropout_p must be 0")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal cannot both be set")
    quantizers = quantizers or {}

    def operand(name: str, x: Tensor) -> Tensor:
        quantizer = quantizers.get(name)
        if quantizer is not None:
            x = quantizer(x)
        if observe is not None:
            observe(name, x)
        return x

    q, k, v = operand("q", query), operand("k", key), operand("v", value)
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if kv_heads != heads:
        if not enable_gqa or heads % kv_heads:
            raise ValueError(f"{heads} query heads cannot attend to {kv_heads} key/value heads")
        # Each key/value head serves a contiguous group of query heads (as torch does).
        k = k.repeat_interleave(heads // kv_heads, dim=-3)
        v = v.repeat_interleave(heads // kv_heads, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (..., H, L, S)
    if is_causal:
        length, source = scores.shape[-2:]
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    # Half-precision scores are normalised in float32, as fused kernels do.
    probabilities = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    probabilities = operand("softmax", probabilities)
    return torch.matmul(probabilities, v).to(query.dtype)


@contextlib.contextmanager
def routed_sdpa(replacement: Callable[..., Tensor]) -> Iterator[None]:
    """Makes ``torch.nn.functional.scaled_dot_product_attention`` call ``replacement``.

    diffusers' processors and its native attention backend look the function up on
    ``torch.nn.functional`` at every call, so replacing the attribute for the duration of
    one processor call reroutes exactly that call's attention.
    """
    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = replacement
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved


# --------------------------------------------------------------------------- the processor


class QuantAttnProcessor:
    """An attention processor that runs the original one with explicit, quantized attention.

    Args:
        original: the module's processor (kept as ``.original`` and never modified).
        module_name: the attention module's qualified name (for observers and errors).
        quantizers: tensor name -> quantizer (``ATTENTION_TENSORS``); empty for float.
        observe: ``observe(module_name, tensor, x)`` for each matmul operand, as read.

    Attributes:
        enabled: False calls the original processor untouched (exact passthrough).
        intercepted: how many attention computations went through ``explicit_attention``.
    """

    def __init__(
        self,
        original: Any,
        module_name: str,
        quantizers: dict[str, ActQuantizer] | None = None,
        observe: Observer | None = None,
    ):
        if isinstance(original, QuantAttnProcessor):
            raise UserError(f"attention module {module_name!r} already has a quantized processor")
        self.original = original
        self.module_name = module_name
        self.quantizers = dict(quantizers or {})
        unknown = sorted(set(self.quantizers) - set(ATTENTION_TENSORS))
        if unknown:
            raise ValueError(f"unknown attention tensors {unknown}; known: {ATTENTION_TENSORS}")
        self.observe = observe
        self.enabled = True
        self.intercepted = 0

        # diffusers' Attention.forward passes a processor only the keyword arguments its
        # __call__ declares (inspect.signature): this instance publishes the original's.
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._run(*args, **kwargs)

        self.__call__ = functools.update_wrapper(call, original.__call__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(*args, **kwargs)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.original(*args, **kwargs)
        before = self.intercepted
        with routed_sdpa(self._attention):
            out = self.original(*args, **kwargs)
        if self.intercepted == before:
            raise RuntimeError(
                f"attention module {self.module_name!r} ({type(self.original).__name__}) "
                "computed attention without scaled_dot_product_attention; its attention "
                "backend cannot be quantized or observed (use diffusers' native backend)"
            )
        return out

    def _attention(self, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any):
        self.intercepted += 1
        observe = None
        if self.observe is not None:
            observer, name = self.observe, self.module_name

            def observe(tensor: str, x: Tensor) -> None:
                observer(name, tensor, x)

        return explicit_attention(
            query, key, value, *args, quantizers=self.quantizers, observe=observe, **kwargs
        )

    def __repr__(self) -> str:
        bits = ", ".join(f"{t}={q.bits}" for t, q in self.quantizers.items())
        return f"QuantAttnProcessor({type(self.original).__name__}, {bits or 'float'})"


def attention_modules(denoiser: nn.Module) -> dict[str, nn.Module]:
    """The attention modules of a denoiser (those with a swappable processor), in order."""
    return {
        name: module
        for name, module in denoiser.named_modules()
        if callable(getattr(module, "set_processor", None))
        and getattr(module, "processor", None) is not None
    }


def attention_processors(denoiser: nn.Module) -> Iterator[tuple[str, QuantAttnProcessor]]:
    """(module name, processor) for every installed ``QuantAttnProcessor``."""
    for name, module in attention_modules(denoiser).items():
        if isinstance(module.processor, QuantAttnProcessor):
            yield name, module.processor


def install_processors(
    denoiser: nn.Module, make: Callable[[str, Any], QuantAttnProcessor], names: Sequence[str]
) -> dict[str, QuantAttnProcessor]:
    """Puts ``make(name, original processor)`` on the named attention modules.

    Raises:
        UserError: a name that is not an attention module of the denoiser, or a module
            that already has a ``QuantAttnProcessor``.
    """
    modules = attention_modules(denoiser)
    missing = [name for name in names if name not in modules]
    if missing:
        raise UserError(
            f"the model has no attention module {missing[0]!r}: the attention quantizers "
            "are for another model"
        )
    if any(isinstance(modules[name].processor, QuantAttnProcessor) for name in names):
        raise UserError("the model's attention is already quantized; load a fresh one")
    installed = {}
    for name in names:
        processor = make(name, modules[name].processor)
        modules[name].set_processor(processor)
        installed[name] = processor
    return installed


def restore_processors(denoiser: nn.Module) -> int:
    """Puts the original processor back on every attention module; returns how many."""
    restored = 0
    for name, processor in list(attention_processors(denoiser)):
        denoiser.get_submodule(name).set_processor(processor.original)
        restored += 1
    return restored


def set_attention_enabled(denoiser: nn.Module, enabled: bool) -> None:
    """Turns every installed attention processor on or off (off: exact passthrough)."""
    for _, processor in attention_processors(denoiser):
        processor.enabled = bool(enabled)


# --------------------------------------------------------------------------- statistics


class AttentionStats:
    """Statistics of q, k, v and the softmax output of every attention module.

    While attached (``with stats:``), every attention module runs a ``QuantAttnProcessor``
    without quantizers whose observer feeds each matmul operand into a one-channel
    ``ChannelMoments`` (count, NaN/Inf counts, min, max, moments of the whole tensor) and,
    with edges, a ``Histogram`` per (module, tensor, timestep value, branch). The key comes
    from the tracker's current denoiser call; a batched [uncond, cond] call is split along
    dim 0 (the batch stays outermost in the processors' reshapes); calls outside a tracked
    denoiser call are ignored.

    Args:
        denoiser: the denoiser.
        tracker: the ``CallTracker`` attached to it.
        histogram_edges: edges of per-tensor histograms; None for none.
        histogram_stride: count every k-th row (last axis) in the histograms.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        tracker: Any,
        *,
        histogram_edges: SignedLogEdges | None = None,
        histogram_stride: int = 1,
    ):
        self.denoiser = denoiser
        self.tracker = tracker
        self.histogram_edges = histogram_edges
        self.histogram_stride = histogram_stride
        self.modules = list(attention_modules(denoiser))
        if not self.modules:
            raise UserError(
                f"{type(denoiser).__name__} has no attention modules to collect statistics of"
            )
        self.moments: dict[AttentionKey, ChannelMoments] = {}
        self.histograms: dict[AttentionKey, Histogram] = {}
        self.processors: dict[str, QuantAttnProcessor] = {}

    def attach(self) -> AttentionStats:
        if not self.processors:
            self.processors = install_processors(
                self.denoiser,
                lambda name, original: QuantAttnProcessor(original, name, observe=self.observe),
                self.modules,
            )
        return self

    def detach(self) -> None:
        for name, processor in self.processors.items():
            self.denoiser.get_submodule(name).set_processor(processor.original)
        self.processors = {}

    def __enter__(self) -> AttentionStats:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    @torch.no_grad()
    def observe(self, module: str, tensor: str, x: Tensor) -> None:
        """Folds one matmul operand into the accumulators of the current call."""
        call = self.tracker.current
        if call is None:
            return
        x = x.detach()
        branches = call.branches
        chunks = x.chunk(len(branches), dim=0) if len(branches) > 1 else (x,)
        for branch, chunk in zip(branches, chunks):
            key = (module, tensor, call.timestep, branch)
            moments = self.moments.get(key)
            if moments is None:
                moments = self.moments[key] = ChannelMoments(1, device=chunk.device)
            # The whole tensor is one "channel": per-tensor statistics.
            moments.update(chunk.reshape(1, -1), channel_dim=0)
            if self.histogram_edges is not None:
                histogram = self.histograms.get(key)
                if histogram is None:
                    histogram = self.histograms[key] = Histogram(
                        self.histogram_edges, device=chunk.device
                    )
                histogram.update(chunk, stride=self.histogram_stride)


# --------------------------------------------------------------------------- quantization


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
