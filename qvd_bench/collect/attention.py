"""Observing attention: q, k, v and the softmax output of every attention module.

The diffusers attention processors of every supported denoiser (``AttnProcessor2_0`` of
``Attention`` in the UNets and Latte, ``CogVideoXAttnProcessor2_0``, ``WanAttnProcessor``,
``LTXVideoAttnProcessor``, ``HunyuanVideoAttnProcessor2_0``, ``MochiAttnProcessor2_0``)
compute the attention itself with ``torch.nn.functional.scaled_dot_product_attention``,
looked up on the module at call time (directly, or through diffusers' native attention
backend). ``ExplicitAttnProcessor`` wraps the original processor and, only while that
processor runs, intercepts this function's calls (a ``torch.overrides.TorchFunctionMode``,
PyTorch's own interception API: nothing is reassigned, and the mode is active on the
calling thread alone) and computes ``explicit_attention`` instead:

    q̂, k̂, v̂ = Q_q(q), Q_k(k), Q_v(v)
    P = softmax(q̂·k̂ᵀ·scale + mask)        (B, H, L, S)
    out = Q_softmax(P)·v̂                   (B, H, L, Ev)

so everything else the processor does (projections, norms, rotary embeddings, masks,
output projection) is unchanged, and every tensor the two matmuls read can be observed
(and, by ``quant.attention.QuantAttnProcessor``, quantized: the Q above; identities
here). A processor call in which no attention was intercepted raises RuntimeError
(another attention backend would silently bypass it).

``AttentionStats`` installs the processor on every attention module with a callback that
feeds q, k, v and the softmax output into accumulators keyed by (module, tensor, timestep
value, CFG branch), as the layer hooks key theirs (``CollectConfig.attention``; stored in
``attention.parquet``). ``restore_processors`` puts the original processors back.

"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from qvd_bench.collect.accumulator import RowCount
from qvd_bench.collect.histogram import Histogram, count_into
from qvd_bench.collect.moments import ChannelMoments
from qvd_bench.errors import UserError
from qvd_bench.models.sampling import other_level_rows
from qvd_bench.numerics.edges import SignedLogEdges

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
    quantizers: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
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
            that matmul operand (``quant.attention``); missing names stay in float.
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
    # Half-precision scores are normalised in float32, as PyTorch's fused kernels do.
    probabilities = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    probabilities = operand("softmax", probabilities)
    return torch.matmul(probabilities, v).to(query.dtype)


class _InterceptedSdpa(TorchFunctionMode):
    """Hands every ``scaled_dot_product_attention`` call made under it to ``replacement``;
    every other torch function runs as usual."""

    def __init__(self, replacement: Callable[..., Tensor]):
        super().__init__()
        self.replacement = replacement

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.replacement(*args, **kwargs)
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- the processor


class ExplicitAttnProcessor:
    """An attention processor that runs the original one with explicit attention.

    Only while the original processor runs, ``scaled_dot_product_attention`` computes
    ``explicit_attention``: each matmul operand goes through ``quantizers`` (none here:
    ``quant.attention.QuantAttnProcessor`` sets them) and is shown to ``observe``.

    Args:
        original: the module's processor (kept as ``.original`` and never modified).
        module_name: the attention module's qualified name (for observers and errors).
        observe: ``observe(module_name, tensor, x)`` for each matmul operand, as read.

    Attributes:
        quantizers: tensor name (``ATTENTION_TENSORS``) -> quantizer; empty for float.
        enabled: False calls the original processor untouched (exact passthrough).
        intercepted: how many attention computations went through ``explicit_attention``.
    """

    def __init__(
        self,
        original: Any,
        module_name: str,
        observe: Observer | None = None,
    ):
        if isinstance(original, ExplicitAttnProcessor):
            raise UserError(f"attention module {module_name!r} already has a quantized processor")
        self.original = original
        self.module_name = module_name
        self.quantizers: dict[str, Callable[[Tensor], Tensor]] = {}
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
        with _InterceptedSdpa(self._attention):
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


def _at_step_level(call: Any, chunk: Tensor) -> tuple[Tensor, int]:
    """One branch's attention operand without the tokens at another noise level than the
    call's step (an image-to-video conditioning frame, diffusion forcing's other frames),
    as the layer hooks leave them out.

    Args:
        call: the current ``DenoiserCall``.
        chunk: (samples, heads, L, E) q; (samples, heads, S, E) k, v; (samples, heads,
            L, S) softmax, in the layout scaled_dot_product_attention takes.

    Returns:
        (the operand's values at the step's level — rows of query tokens for q and the
        softmax, whose columns are the probabilities those queries give every key; rows
        of key tokens for k and v — flattened to (rows, heads, ·), the rows left out),
        or (chunk, 0) when the operand's token axis is not the video tokens (joint text
        and video attention, per-sample processors) or every token is at the step's level.
    """
    if chunk.dim() != 4 or chunk.shape[0] != len(call.sample_ids):
        return chunk, 0
    other = other_level_rows(call, chunk.shape[2])
    if other is None:
        return chunk, 0
    keep = ~other.to(chunk.device)
    return chunk.transpose(1, 2)[keep], int(other.sum())


def attention_modules(denoiser: nn.Module) -> dict[str, nn.Module]:
    """The attention modules of a denoiser (those with a swappable processor), in order:
    diffusers' ``Attention`` classes with ``set_processor``, and those that only call a
    ``processor`` attribute (``MochiAttention``)."""
    return {
        name: module
        for name, module in denoiser.named_modules()
        if getattr(module, "processor", None) is not None
        and (callable(getattr(module, "set_processor", None)) or callable(module.processor))
    }


def _set_processor(module: nn.Module, processor: Any) -> None:
    """Puts a processor on an attention module, with ``set_processor`` where it has one."""
    if callable(getattr(module, "set_processor", None)):
        module.set_processor(processor)
    else:
        module.processor = processor


def attention_processors(denoiser: nn.Module) -> Iterator[tuple[str, ExplicitAttnProcessor]]:
    """(module name, processor) for every installed ``ExplicitAttnProcessor`` (quantizing
    or observing)."""
    for name, module in attention_modules(denoiser).items():
        if isinstance(module.processor, ExplicitAttnProcessor):
            yield name, module.processor


def install_processors(
    denoiser: nn.Module, make: Callable[[str, Any], ExplicitAttnProcessor], names: Sequence[str]
) -> dict[str, ExplicitAttnProcessor]:
    """Puts ``make(name, original processor)`` on the named attention modules.

    Raises:
        UserError: a name that is not an attention module of the denoiser, or a module
            that already has an ``ExplicitAttnProcessor``.
    """
    modules = attention_modules(denoiser)
    missing = [name for name in names if name not in modules]
    if missing:
        raise UserError(
            f"the model has no attention module {missing[0]!r}: the attention quantizers "
            "are for another model"
        )
    if any(isinstance(modules[name].processor, ExplicitAttnProcessor) for name in names):
        raise UserError("the model's attention is already quantized; load a fresh one")
    installed = {}
    for name in names:
        processor = make(name, modules[name].processor)
        _set_processor(modules[name], processor)
        installed[name] = processor
    return installed


def restore_processors(denoiser: nn.Module) -> int:
    """Puts the original processor back on every attention module; returns how many."""
    restored = 0
    for name, processor in list(attention_processors(denoiser)):
        _set_processor(denoiser.get_submodule(name), processor.original)
        restored += 1
    return restored


def set_attention_enabled(denoiser: nn.Module, enabled: bool) -> None:
    """Turns every installed attention processor on or off (off: exact passthrough)."""
    for _, processor in attention_processors(denoiser):
        processor.enabled = bool(enabled)


# --------------------------------------------------------------------------- statistics


class AttentionStats:
    """Statistics of q, k, v and the softmax output of every attention module.

    While attached (``with stats:``), every attention module runs an
    ``ExplicitAttnProcessor`` whose observer feeds each matmul operand into a one-channel
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
        self.processors: dict[str, ExplicitAttnProcessor] = {}
        # (module, tensor) -> rows of the call's batch already seen, for processors
        # that run the attention one sample at a time.
        self._offsets: dict[tuple[str, str], int] = {}
        self._offsets_call: Any = None
        # "module:tensor" -> token rows left out (of every head): tokens at another noise
        # level than their call's step (``_at_step_level``).
        self.excluded_rows: dict[str, RowCount] = {}

    def _branch_chunks(
        self, call: Any, module: str, tensor: str, x: Tensor
    ) -> list[tuple[str, Tensor]]:
        """(branch, part of ``x``) pairs of one observed operand.

        The whole batch of the call (branches × samples, frames or pixels folded in after
        it) is split into its branches. A processor that runs the attention on less than
        the batch at a time (Mochi's,
        one sample per call: its samples keep different numbers of text tokens) hands
        the slices in batch order; each is placed by how many rows of the call this
        module's operand has already seen.
        """
        branches = call.branches
        total = len(branches) * len(call.sample_ids)
        if x.shape[0] >= total:
            # The whole batch, frames or pixels folded in after it (batch outermost).
            return list(zip(branches, x.chunk(len(branches), dim=0)))
        if call is not self._offsets_call:
            self._offsets, self._offsets_call = {}, call
        start = self._offsets.get((module, tensor), 0)
        stop = start + x.shape[0]
        if stop > total:
            raise RuntimeError(
                f"attention {module} read {tensor} for {stop} rows of a batch of {total}"
            )
        self._offsets[(module, tensor)] = stop % total
        per_branch = total // len(branches)
        parts = []
        for index, branch in enumerate(branches):
            low, high = max(start, index * per_branch), min(stop, (index + 1) * per_branch)
            if low < high:
                parts.append((branch, x[low - start : high - start]))
        return parts

    def attach(self) -> AttentionStats:
        if not self.processors:
            self.processors = install_processors(
                self.denoiser,
                lambda name, original: ExplicitAttnProcessor(original, name, observe=self.observe),
                self.modules,
            )
        return self

    def detach(self) -> None:
        for name, processor in self.processors.items():
            _set_processor(self.denoiser.get_submodule(name), processor.original)
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
        for branch, chunk in self._branch_chunks(call, module, tensor, x):
            chunk, excluded = _at_step_level(call, chunk)
            if excluded:
                self.excluded_rows.setdefault(f"{module}:{tensor}", RowCount()).update(excluded)
            key = (module, tensor, call.timestep, branch)
            moments = self.moments.get(key)
            if moments is None:
                moments = self.moments[key] = ChannelMoments(1, device=chunk.device)
            # The whole tensor is one "channel": per-tensor statistics.
            moments.update(chunk.reshape(1, -1), channel_dim=0)
            if self.histogram_edges is not None:
                count_into(self.histograms, key, self.histogram_edges, chunk, self.histogram_stride)
