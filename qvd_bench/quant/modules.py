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

``wrapper.enabled = False`` (or ``set_enabled``) makes the wrapper an exact passthrough to
the original module. ``swap_module`` puts a module at a dotted name and ``unwrap``
restores every original.

The forward stays cheap: static qparams are cached as Python numbers (no per-call
recomputation or host sync), per-tensor fake quantization takes four elementwise passes
(``primitives.fake_quant_constants``; on CPU several times faster than
``torch.fake_quantize_per_tensor_affine``, with identical results), and the quantized
weight is precomputed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvd_bench.errors import UserError
from qvd_bench.quant.observers import weight_qparams
from qvd_bench.quant.primitives import (
    TimestepLookup,
    check_bits,
    fake_quant_affine,
    fake_quant_constants,
    fake_quant_dynamic_per_token,
    fake_quant_levels,
    level_midpoints,
    per_tensor_constants,
    quant_range,
)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- activations


def _per_tensor(x: Tensor, constants: dict[torch.dtype, tuple]) -> Tensor:
    """Per-tensor fake quant from precomputed constants (float32 and float64 entries)."""
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

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={len(self.groups)}"


class DynamicTokenActQuant(ActQuantizer):
    """Dynamic per-token asymmetric fake quantization (``fake_quant_dynamic_per_token``).

    Args:
        bits: b, an integer in 2..16.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)

    def forward(self, x: Tensor, channel_dim: int = -1) -> Tensor:
        return fake_quant_dynamic_per_token(x, self.bits, channel_dim)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


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
        if bias is not None:
            bias = bias.detach().to(device=module.weight.device, dtype=module.weight.dtype)
        self.register_buffer("bias_override", bias)

    @property
    def original(self) -> nn.Module:
        """The wrapped module (same as ``.module``)."""
        return self.module

    def forward(self, input: Tensor) -> Tensor:
        if not self.enabled:
            return self.module(input)
        x = input if self.act is None else self.act(input, self.channel_dim)
        weight = self.module.weight if self.qweight is None else self.qweight
        bias = self.module.bias if self.bias_override is None else self.bias_override
        if self.is_conv:
            return self.module._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        state = "" if self.enabled else ", disabled"
        return f"weight_bits={self.weight_bits}{state}"


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
    """Turns quantization of every wrapper in ``model`` on or off (off: exact passthrough)."""
    for _, wrapper in quant_wrappers(model):
        wrapper.enabled = bool(enabled)


def unwrap(model: nn.Module) -> nn.Module:
    """Restores the original module of every ``QuantWrapper`` in ``model``, in place.

    Returns:
        ``model``, or its original module when ``model`` itself is a wrapper.
    """
    if isinstance(model, QuantWrapper):
        return unwrap(model.module)
    for name, _ in list(quant_wrappers(model)):
        wrapper = model.get_submodule(name)
        swap_module(model, name, wrapper.module)
    return model
