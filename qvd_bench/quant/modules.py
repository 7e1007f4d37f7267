"""Fake-quantized Linear / Conv layers: a wrapper around the original module.

``QuantWrapper`` wraps an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (subclasses included) and
computes the layer with

- its weight fake-quantized per output channel, symmetric (``weight_qparams``), once at
  construction (the ``qweight`` buffer), or the float weight when ``weight_bits`` is None;
- its input passed through an activation quantizer, or left as is when ``act`` is None
  (weights only).

Activation quantizers (``nn.Module``s whose parameters are buffers, so they follow
``.to(device)`` and appear in ``state_dict``):

- ``StaticActQuant``: per tensor, one (scale, zero point) calibrated beforehand;
- ``GroupActQuant``: per timestep group, a table of (scale, zero point), the row picked
  from the timestep of the current denoiser call (``tracker.current.timestep``, as
  ``qvd_bench.models.sampling.CallTracker`` publishes it) through ``TimestepLookup``;
- ``DynamicTokenActQuant``: per token, from each token's own min/max at run time;
- ``LevelActQuant``: nearest level of a level set (HTDQ's codebooks).

An optional per-input-channel transform (``set_input_transform``: SCRI, OS+, SmoothQuant
applied explicitly) computes the layer as W̃·X̃ + b̃ with X̃ = (X − z)/s taken before the
input quantizer, the float weight already W̃ = W·diag(s) (the ``weight`` argument) and
b̃ = b + W·z added by the wrapper (per timestep group when z is a (G, C) table). A conv
with zero padding is computed "pad, then shift": zero padding of X is −z/s in the
shifted domain, so X̃ is padded with −z/s (quantized like X̃) and the conv runs unpadded.

``wrapper.enabled = False`` (or ``set_enabled``) turns the quantizers off: the wrapper then
computes the float layer — the original module itself when nothing replaces its weight,
bias or input, so an exact passthrough; otherwise the replaced weight and bias in float,
with the input transform (which is what a model with folded transforms needs). ``swap_module`` puts a module at a dotted name and ``unwrap``
restores every original.

The forward stays cheap: static qparams are cached as Python numbers (no per-call
recomputation or host sync), per-tensor fake quantization takes four elementwise passes
(``primitives.fake_quant_constants``; cheaper on CPU than
``torch.fake_quantize_per_tensor_affine``, with identical results), and the quantized
weight is precomputed. On contiguous float32 CPU inputs, the per-tensor quantizers and
the input transform (with its padding) run as one compiled pass instead
(``quant.fused``), with the same numbers bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvd_bench.collect.attention import restore_processors, set_attention_enabled
from qvd_bench.errors import UserError
from qvd_bench.numerics.grid import check_bits, fake_quant_levels, level_midpoints, quant_range
from qvd_bench.quant import fused
from qvd_bench.quant.observers import weight_qparams
from qvd_bench.quant.primitives import (
    TimestepLookup,
    fake_quant_affine,
    fake_quant_constants,
    fake_quant_dynamic_per_token,
    per_tensor_constants,
)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- activations


def _per_tensor(x: Tensor, constants: dict[torch.dtype, tuple]) -> Tensor:
    """Per-tensor fake quant from precomputed constants (float32 and float64 entries)."""
    if fused.covers(x):
        return fused.fake_quant(x, constants[torch.float32])
    if x.dtype in constants:
        return fake_quant_constants(x, constants[x.dtype])
    # Half precision: computed in float32, as the primitives do.
    return fake_quant_constants(x.float(), constants[torch.float32]).to(x.dtype)


def _constants(scale: float, zero_point: int, q_min: int, q_max: int) -> dict:
    return {
        dtype: per_tensor_constants(scale, zero_point, q_min, q_max, dtype)
        for dtype in (torch.float32, torch.float64)
    }


class ActQuantizer(nn.Module):
    """Base of the activation quantizers: ``forward(x, channel_dim)`` returns x̂ like x."""

    bits: int

    def forward(self, x: Tensor, channel_dim: int = -1) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def current_constants(self) -> tuple | None:
        """The float32 ``per_tensor_constants`` this call quantizes with, when the
        quantizer is per tensor (the fused input transform then applies them); else None.
        """
        return None


class StaticActQuant(ActQuantizer):
    """Static per-tensor asymmetric fake quantization.

    The qparams are read once into Python numbers; change them through
    ``load_state_dict`` (which refreshes them) or a new quantizer, not in place.

    Args:
        scale: 0-d (or 1-element) scale Δ.
        zero_point: 0-d integer zero point z in [0, 2^b − 1].
        bits: b, an integer in 2..16.
    """

    def __init__(self, scale: Tensor | float, zero_point: Tensor | int, bits: int):
        super().__init__()
        self.bits = check_bits(bits)
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(()))
        zp = torch.as_tensor(zero_point).reshape(())
        self.register_buffer("zero_point", zp.to(torch.int32))
        self._refresh()
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh())

    def _refresh(self) -> None:
        self.q_min, self.q_max = quant_range(self.bits)
        self._scale, self._zero_point = float(self.scale), int(self.zero_point)
        if not self.q_min <= self._zero_point <= self.q_max:
            raise UserError(f"zero point {self._zero_point} outside [0, {self.q_max}]")
        self._constants = _constants(self._scale, self._zero_point, self.q_min, self.q_max)

    def forward(self, x: Tensor, channel_dim: int = -1) -> Tensor:
        return _per_tensor(x, self._constants)

    def current_constants(self) -> tuple | None:
        # A subclass with its own forward quantizes otherwise: no constants stand for it.
        if type(self).forward is not StaticActQuant.forward:
            return None
        return self._constants[torch.float32]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self._scale:.4g}, zero_point={self._zero_point}"


class GroupActQuant(ActQuantizer):
    """Per-timestep-group static fake quantization.

    Args:
        scale: (G,) one scale per group.
        zero_point: (G,) integer zero points.
        bits: b, an integer in 2..16.
        groups: the G lists of timestep values (``timestep_groups``), in the row order of
            ``scale``; a call at another timestep uses the group of the nearest one.
        tracker: any object whose ``current`` is None or has a ``timestep`` (a
            ``CallTracker`` attached to the denoiser).
        name: the layer, for error messages.
    """

    def __init__(
        self,
        scale: Tensor,
        zero_point: Tensor,
        bits: int,
        groups: Sequence[Sequence[float]],
        tracker: Any,
        name: str = "",
    ):
        super().__init__()
        self.bits = check_bits(bits)
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        zero_point = torch.as_tensor(zero_point).reshape(-1).to(torch.int32)
        if not scale.numel() == zero_point.numel() == len(groups):
            raise UserError(
                f"{len(groups)} timestep groups need as many scales and zero points, got "
                f"{scale.numel()} and {zero_point.numel()}"
            )
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.groups = [[float(t) for t in part] for part in groups]
        self.lookup = TimestepLookup(self.groups)
        self.tracker = tracker
        self.name = name
        self._refresh()
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh())

    def _refresh(self) -> None:
        self.q_min, self.q_max = quant_range(self.bits)
        self._table = [
            _constants(scale, zero_point, self.q_min, self.q_max)
            for scale, zero_point in zip(self.scale.tolist(), self.zero_point.tolist())
        ]

    def group(self) -> int:
        """The group of the current denoiser call."""
        call = getattr(self.tracker, "current", None)
        if call is None:
            where = f" of layer {self.name!r}" if self.name else ""
            raise RuntimeError(
                f"per-timestep-group activation quantizer{where} called outside a denoiser "
                "call: attach a CallTracker (qvd_bench.models.sampling) to the denoiser, or "
                "run the model through the sampler"
            )
        return self.lookup(call.timestep)

    def forward(self, x: Tensor, channel_dim: int = -1) -> Tensor:
        return _per_tensor(x, self._table[self.group()])

    def current_constants(self) -> tuple | None:
        if type(self).forward is not GroupActQuant.forward:
            return None
        return self._table[self.group()][torch.float32]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={len(self.groups)}"


class DynamicTokenActQuant(ActQuantizer):
    """Dynamic per-token asymmetric fake quantization (``fake_quant_dynamic_per_token``).

    Args:
        bits: b, an integer in 2..16.
        clip_ratio: share of each token's range kept, in (0, 1].
    """

    def __init__(self, bits: int, clip_ratio: float = 1.0):
        super().__init__()
        self.bits = check_bits(bits)
        if not 0.0 < clip_ratio <= 1.0:
            raise UserError(f"a per-token clip ratio must be in (0, 1], got {clip_ratio}")
        self.clip_ratio = float(clip_ratio)

    def forward(self, x: Tensor, channel_dim: int = -1) -> Tensor:
        return fake_quant_dynamic_per_token(x, self.bits, channel_dim, self.clip_ratio)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, clip_ratio={self.clip_ratio:g}"


class LevelActQuant(ActQuantizer):
    """Level-set (codebook) fake quantization: each value to its nearest level.

    Args:
        levels: (L,) sorted ascending (e.g. ``signed_log_levels``). Kept in float64 (the
            ``levels`` buffer, used for float64 inputs) and as float32 levels and midpoints
            (for everything else), so neither is rounded for the other.
    """

    def __init__(self, levels: Tensor):
        super().__init__()
        values, _ = level_midpoints(levels, torch.float64)
        self.register_buffer("levels", values)
        self.register_buffer("levels_f32", values, persistent=False)
        self.register_buffer("midpoints_f32", values[:0], persistent=False)
        self._refresh()
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh())
        # Nominal bits: the fewest that index every level.
        self.bits = max(1, (values.numel() - 1).bit_length())

    def _refresh(self) -> None:
        self.levels_f32, self.midpoints_f32 = level_midpoints(self.levels, torch.float32)

    def forward(self, x: Tensor, channel_dim: int = -1) -> Tensor:
        if x.dtype == torch.float64:
            return fake_quant_levels(x, self.levels)
        return fake_quant_levels(x, self.levels_f32, self.midpoints_f32)

    def extra_repr(self) -> str:
        return f"levels={self.levels.numel()}"


# --------------------------------------------------------------------------- the wrapper


class QuantWrapper(nn.Module):
    """A Linear or Conv layer computed with fake-quantized weights and inputs.

    Args:
        module: the original ``nn.Linear`` / ``nn.Conv1d/2d/3d``; kept as ``.module``
            (also ``.original``) and never modified.
        weight_bits: bits of the per-output-channel symmetric weight quantizer; None keeps
            the float weight.
        act: the input quantizer; None leaves inputs in float (weights only).
        weight_method: "minmax" or "mse" (``weight_qparams``), when ``weight_scale`` is None.
        weight_scale: (O,) precomputed per-output-channel scales.
        weight: a float weight to use instead of ``module.weight`` (a transformed layer,
            e.g. with folded smoothing); quantized like it.
        bias: a bias to use instead of ``module.bias``.

    Attributes:
        enabled: False makes ``forward`` call the original module (exact passthrough).
        channel_dim: the channel axis of the input (−1 Linear, 1 Conv), for per-token
            quantization.
    """

    def __init__(
        self,
        module: nn.Module,
        weight_bits: int | None = None,
        act: ActQuantizer | None = None,
        *,
        weight_method: str = "minmax",
        weight_scale: Tensor | None = None,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
    ):
        super().__init__()
        if isinstance(module, QuantWrapper):
            raise UserError("the module is already quantized; unwrap it first")
        if not isinstance(module, (nn.Linear, *CONV_TYPES)):
            raise UserError(
                f"only Linear and Conv1d/2d/3d layers can be quantized, got {type(module).__name__}"
            )
        self.module = module
        self.is_conv = isinstance(module, CONV_TYPES)
        self.channel_dim = 1 if self.is_conv else -1
        self.act = act
        self.enabled = True
        self.weight_bits = None if weight_bits is None else check_bits(weight_bits)
        source = module.weight if weight is None else weight
        source = source.detach().to(device=module.weight.device, dtype=module.weight.dtype)
        if source.shape != module.weight.shape:
            raise UserError(
                f"replacement weight has shape {tuple(source.shape)}, the layer "
                f"{tuple(module.weight.shape)}"
            )
        qweight, scale = None, None
        if self.weight_bits is not None:
            if weight_scale is None:
                scale, _ = weight_qparams(source, self.weight_bits, weight_method)
            else:
                scale = torch.as_tensor(weight_scale, dtype=torch.float32).reshape(-1)
            scale = scale.to(source.device)
            zero = torch.zeros_like(scale, dtype=torch.int32)
            qweight = fake_quant_affine(source, scale, zero, self.weight_bits, 0, symmetric=True)
        elif weight is not None:
            qweight = source
        # The float weight stays the module's own unless something replaces it.
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", scale)
        # The float replacement weight, for the unquantized path (enabled = False).
        self.register_buffer("fweight", None if weight is None else source, persistent=False)
        if bias is not None:
            bias = bias.detach().to(device=module.weight.device, dtype=module.weight.dtype)
        self.register_buffer("bias_override", bias)
        # Explicit input transform (set_input_transform): (G, C) shift and (C,) scale
        # tables (G = 1 without timestep groups), the (G, O) bias with W·z folded in.
        self.register_buffer("input_shift", None)
        self.register_buffer("input_scale", None)
        self.register_buffer("transform_bias", None)
        self.shift_lookup: TimestepLookup | None = None
        self.shift_tracker: Any = None

    @property
    def original(self) -> nn.Module:
        """The wrapped module (same as ``.module``)."""
        return self.module

    @property
    def has_transform(self) -> bool:
        """True when an explicit input transform is set."""
        return self.input_scale is not None

    @torch.no_grad()
    def set_input_transform(
        self,
        shift: Tensor | None,
        scale: Tensor | None,
        groups: Sequence[Sequence[float]] | None = None,
        tracker: Any = None,
    ) -> None:
        """Computes the layer on X̃ = (X − z)/s, quantized, instead of on X.

        The wrapper's float weight must already be W̃ = W·diag(s) (the ``weight``
        argument); the bias b̃ = b + W·z = b + W̃·(z/s) (summed over a conv's kernel) is
        computed here from that float weight.

        Args:
            shift: z, (C,) or (G, C) one row per timestep group; None for no shift.
            scale: s, (C,) positive; None for no scale.
            groups: the G timestep groups of a (G, C) shift; taken from the activation
                quantizer when it is a ``GroupActQuant``.
            tracker: the ``CallTracker`` that publishes the current timestep (same source).

        Raises:
            UserError: wrong shapes, non-positive scales, or a shift table without groups.
        """
        weight = self.module.weight if self.fweight is None else self.fweight
        channels = weight.shape[1] * (self.module.groups if self.is_conv else 1)
        f64 = dict(dtype=torch.float64, device=weight.device)
        s = torch.ones(channels, **f64) if scale is None else torch.as_tensor(scale).to(**f64)
        z = torch.zeros(channels, **f64) if shift is None else torch.as_tensor(shift).to(**f64)
        z = z.reshape(-1, z.shape[-1]) if z.ndim else z.reshape(1, 1)
        if s.shape != (channels,) or z.shape[-1] != channels:
            raise UserError(
                f"input transform needs ({channels},) scale and shift, got "
                f"{tuple(s.shape)} and {tuple(z.shape)}"
            )
        if not bool((s > 0).all()) or not bool(torch.isfinite(z).all()):
            raise UserError("input transform needs finite shifts and positive scales")
        if z.shape[0] > 1:
            if groups is None and isinstance(self.act, GroupActQuant):
                groups, tracker = self.act.groups, self.act.tracker
            if groups is None or len(groups) != z.shape[0]:
                raise UserError(
                    f"a ({z.shape[0]}, {channels}) shift table needs as many timestep groups"
                )
            self.shift_lookup, self.shift_tracker = TimestepLookup(groups), tracker
        bias = self.module.bias if self.bias_override is None else self.bias_override
        base = torch.zeros(weight.shape[0], **f64) if bias is None else bias.to(**f64)
        correction = _fold_shift(weight.to(torch.float64), z / s, self.module)  # (G, O)
        dtype = weight.dtype
        self.input_shift = z.to(dtype)
        self.input_scale = s.to(dtype)
        self.transform_bias = (base + correction).to(dtype)

    def _shift_row(self) -> int:
        if self.shift_lookup is None:
            return 0
        call = getattr(self.shift_tracker, "current", None)
        if call is None:
            raise RuntimeError(
                "per-timestep-group input shift called outside a denoiser call: attach a "
                "CallTracker (qvd_bench.models.sampling) to the denoiser"
            )
        return self.shift_lookup(call.timestep)

    def _transformed(self, x: Tensor, act: ActQuantizer | None) -> tuple[Tensor, Tensor]:
        """(X̃ quantized by ``act``, padded "pad, then shift" for a zero-padded conv; bias)."""
        row = self._shift_row()
        bias = self.transform_bias[row].to(x.dtype)
        shape = [1] * x.ndim
        shape[self.channel_dim] = -1
        z = self.input_shift[row].to(x.dtype).reshape(shape)
        s = self.input_scale.to(x.dtype).reshape(shape)
        pads = self._zero_pads()
        value = None
        if pads is not None:
            # Zero padding of X is −z/s in the shifted domain; it is quantized like X̃ is
            # (elementwise quantizers give exactly what quantizing the padded tensor would).
            value = -z / s
            if act is not None:
                value = act(value, self.channel_dim)
        constants = None if act is None else act.current_constants()
        if fused.covers(x) and (act is None or constants is not None):
            x = fused.transform(x, self.channel_dim, z, s, constants, pads, value)
            return x, bias
        x = (x - z) / s
        if act is not None:
            x = act(x, self.channel_dim)
        if pads is not None:
            x = _pad_with(x, pads, value)
        return x, bias

    def _zero_pads(self) -> list[int] | None:
        """F.pad widths of a zero-padded conv (None when it needs no explicit padding)."""
        return zero_pads(self.module)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, padded: bool) -> Tensor:
        m = self.module
        if not padded:
            return m._conv_forward(x, weight, bias)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.ndim - 2]
        return conv(x, weight, bias, m.stride, 0, m.dilation, m.groups)

    def forward(self, input: Tensor) -> Tensor:
        if not self.enabled:
            if self.fweight is None and self.bias_override is None and not self.has_transform:
                return self.module(input)
            weight = self.module.weight if self.fweight is None else self.fweight
            act = None
        else:
            weight = self.module.weight if self.qweight is None else self.qweight
            act = self.act
        if self.has_transform:
            x, bias = self._transformed(input, act)
            padded = self._zero_pads() is not None
        else:
            x = input if act is None else act(input, self.channel_dim)
            bias = self.module.bias if self.bias_override is None else self.bias_override
            padded = False
        if self.is_conv:
            return self._conv(x, weight, bias, padded)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        state = "" if self.enabled else ", disabled"
        transform = ", input_transform" if self.has_transform else ""
        return f"weight_bits={self.weight_bits}{transform}{state}"


def zero_pads(module: nn.Module) -> list[int] | None:
    """F.pad widths of a zero-padded conv; None for a Linear or an unpadded conv."""
    if not isinstance(module, CONV_TYPES) or module.padding_mode != "zeros":
        return None
    pads = list(module._reversed_padding_repeated_twice)
    return pads if any(pads) else None


def _fold_shift(weight: Tensor, shift: Tensor, module: nn.Module) -> Tensor:
    """W·u for each row u of ``shift``, summed over a conv's kernel positions.

    Args:
        weight: (O, C) Linear or (O, C/groups, k...) conv weight.
        shift: (G, C) per-input-channel values.
        module: the layer (for a conv's ``groups``).

    Returns:
        (G, O).
    """
    out = weight.shape[0]
    summed = weight.reshape(out, weight.shape[1], -1).sum(-1)  # (O, C/groups)
    groups = getattr(module, "groups", 1) if isinstance(module, CONV_TYPES) else 1
    # Input channels of each output's conv group, aligned with the summed weight.
    u = shift.reshape(shift.shape[0], groups, -1).repeat_interleave(out // groups, dim=1)
    return (summed[None] * u).sum(-1)


def _pad_with(x: Tensor, pads: Sequence[int], value: Tensor) -> Tensor:
    """``F.pad(x, pads)`` with a per-channel fill value instead of zero.

    Args:
        x: (B, C, *spatial).
        pads: F.pad widths (last dimension first).
        value: (1, C, 1, ...) fill values.
    """
    shape = list(x.shape)
    index = [slice(None)] * x.ndim
    for j in range(len(pads) // 2):
        dim = x.ndim - 1 - j
        left, right = pads[2 * j], pads[2 * j + 1]
        shape[dim] += left + right
        index[dim] = slice(left, left + x.shape[dim])
    out = x.new_empty(shape)
    out[tuple(index)] = x
    # Only the border slabs take the fill (they overlap at the corners, with equal values).
    fill = value.to(x.dtype)
    for dim, inside in enumerate(index):
        if inside.start is None:
            continue
        for border in (slice(0, inside.start), slice(inside.stop, shape[dim])):
            if border.stop > border.start:
                slab = [slice(None)] * x.ndim
                slab[dim] = border
                out[tuple(slab)] = fill
    return out


# --------------------------------------------------------------------------- model surgery


def swap_module(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Puts ``new_module`` at the dotted ``name`` inside ``model``.

    Args:
        model: the root module.
        name: a name from ``model.named_modules()`` (not "" — the root cannot be swapped).
        new_module: the replacement.

    Returns:
        The module that was there.

    Raises:
        UserError: no submodule of that name.
    """
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        parent = None
    if not name or parent is None or child not in parent._modules:
        raise UserError(f"model has no submodule {name!r}")
    old = parent._modules[child]
    setattr(parent, child, new_module)
    return old


def quant_wrappers(model: nn.Module) -> Iterator[tuple[str, QuantWrapper]]:
    """(name, wrapper) for every ``QuantWrapper`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QuantWrapper):
            yield name, module


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Turns quantization of every wrapper and quantized attention processor in ``model`` on
    or off (off: exact passthrough)."""
    for _, wrapper in quant_wrappers(model):
        wrapper.enabled = bool(enabled)
    set_attention_enabled(model, enabled)


def unwrap(model: nn.Module) -> nn.Module:
    """Restores the original module of every ``QuantWrapper`` in ``model``, and the original
    processor of every quantized attention module, in place.

    Parameters that folds rewrote (norm affines, modulation rows and tables, GEGLU
    projections) stay as they are: ``quant.apply.unquantize_`` restores those too.

    Returns:
        ``model``, or its original module when ``model`` itself is a wrapper.
    """
    if isinstance(model, QuantWrapper):
        return unwrap(model.module)
    restore_processors(model)
    for name, _ in list(quant_wrappers(model)):
        wrapper = model.get_submodule(name)
        swap_module(model, name, wrapper.module)
    return model
