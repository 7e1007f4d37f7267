"""Faster CPU computations of two operations that PyTorch runs slowly on tiny video models.

Both give the same result as the PyTorch operation they stand in for, up to float rounding
(the order of the sums differs), and both leave the module tree, its parameters and every
layer's input untouched, so hooks, statistics and quantization see exactly what they would
without them.

- **Short attention.** Temporal attention attends over the frames: sequences of 8 keys,
  with heads of 4–8 channels in the tiny presets. PyTorch's CPU attention kernels (flash
  and math alike) pay per (batch, head) problem and normalise rows of 8 scores one at a
  time, which made attention half of a tiny-unet3d forward. ``short_attention`` lays the
  problems side by side instead — every operand as (L or S, E, batch·heads), batch·heads
  innermost — so each step is one vectorised pass over all problems. It takes the
  arguments of ``torch.nn.functional.scaled_dot_product_attention`` and hands every call
  it does not cover (masks, dropout, longer sequences, wider heads, autograd, other
  devices) to PyTorch's function. One of those it helps: narrow heads over a key count
  that is not a multiple of 16 (cross-attention's 77 text tokens), which PyTorch's flash
  kernel runs about twice as fast padded to the next multiple with masked keys.
- **Frame convolutions.** A Conv3d whose kernel spans frames only (k×1×1, the temporal
  convolutions of UNet3D-family models) is a 2-D convolution over (frames, height·width);
  PyTorch's CPU Conv3d falls back to a slow unfused kernel for it. ``FrameConv3d`` is a
  Conv3d subclass whose forward computes that 2-D convolution.

``use_fast_kernels(denoiser)`` installs both on a model: its k×1×1 Conv3d modules become
``FrameConv3d`` (same class otherwise, same state dict), and while the denoiser runs,
``torch.nn.functional.scaled_dot_product_attention`` is ``short_attention``. diffusers'
attention processors look that function up at every call; a processor that reroutes it
for its own call (``quant.attention.QuantAttnProcessor``, for quantized or observed
attention) still does, because its reroute is the inner one. The swap is process-global
while a denoiser runs: denoisers must not run concurrently in several threads.

``QVD_BENCH_KERNELS=torch`` in the environment turns both off (``load_model`` then leaves
the model as diffusers built it).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# PyTorch's own function, captured before anything reroutes it.
TORCH_SDPA = F.scaled_dot_product_attention

# short_attention covers sequences of at most this many keys with heads of at most this
# many channels: there it measured 2-3x faster than PyTorch's kernels (8 keys, 4-8
# channels); at 16 keys or 16+ channels PyTorch's kernels are as fast or faster.
SHORT_KEYS = 8
SHORT_HEAD_CHANNELS = 8

# PyTorch's CPU flash kernel runs narrow heads (at most SHORT_HEAD_CHANNELS channels) over a
# key count that is not a multiple of KEY_BLOCK 1.5-3x slower than over the next multiple
# (the 77 text tokens of cross-attention: 11.4 ms against 6.0 ms padded to 80 with a mask,
# (16, 8, 256, 4) queries), so such calls get masked padding keys up to that multiple. Past
# PADDED_KEYS_MAX keys padding measured no faster.
KEY_BLOCK = 16
PADDED_KEYS_MAX = 320

KERNELS_ENV = "QVD_BENCH_KERNELS"


def fast_kernels_enabled() -> bool:
    """False when ``QVD_BENCH_KERNELS=torch`` asks for PyTorch's kernels only."""
    return os.environ.get(KERNELS_ENV, "").strip().lower() != "torch"


# --------------------------------------------------------------------------- attention


def _narrow_heads(query: Tensor, key: Tensor, value: Tensor, dtypes: tuple) -> bool:
    """CPU inference operands of one of ``dtypes``, the same leading (batch, head) dims on
    query, key and value, and heads of at most ``SHORT_HEAD_CHANNELS`` channels."""
    if query.device.type != "cpu" or query.dtype not in dtypes:
        return False
    if query.dim() < 3 or key.dim() != query.dim() or value.dim() != query.dim():
        return False
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    lead = query.shape[:-2]
    if key.shape[:-2] != lead or value.shape[:-2] != lead or key.shape[-2] != value.shape[-2]:
        return False
    if key.shape[-1] != query.shape[-1]:
        return False
    if max(query.shape[-1], value.shape[-1]) > SHORT_HEAD_CHANNELS:
        return False
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return not grad and query.numel() > 0 and key.shape[-2] > 0


def _is_short(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Whether ``short_attention``'s own kernel covers these operands."""
    dtypes = (torch.float32, torch.float64)
    return _narrow_heads(query, key, value, dtypes) and key.shape[-2] <= SHORT_KEYS


def _needs_key_padding(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Narrow float32 heads over SHORT_KEYS < S <= PADDED_KEYS_MAX keys, S not a multiple
    of KEY_BLOCK."""
    if not _narrow_heads(query, key, value, (torch.float32,)):
        return False
    keys = key.shape[-2]
    return SHORT_KEYS < keys <= PADDED_KEYS_MAX and keys % KEY_BLOCK != 0


def _padded_keys_attention(query: Tensor, key: Tensor, value: Tensor, scale: float | None):
    """PyTorch's attention with the keys padded to a multiple of KEY_BLOCK and masked out."""
    keys = key.shape[-2]
    pad = -keys % KEY_BLOCK
    key = F.pad(key, (0, 0, 0, pad))
    value = F.pad(value, (0, 0, 0, pad))
    mask = (torch.arange(keys + pad, device=query.device) < keys)[None]  # (1, S') for (..., L, S')
    return TORCH_SDPA(query, key, value, attn_mask=mask, scale=scale)


def short_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Scaled dot-product attention, fast for short sequences with narrow heads on CPU.

    Same arguments and result as ``torch.nn.functional.scaled_dot_product_attention``;
    calls it for everything but unmasked, dropout-free inference on CPU float32/float64
    operands with at most ``SHORT_KEYS`` keys and ``SHORT_HEAD_CHANNELS`` channels per head
    and the same leading (batch, head) dims on query, key and value. Narrow float32 heads
    over more keys whose count is not a multiple of ``KEY_BLOCK`` go to PyTorch's function
    with masked padding keys up to that multiple (``KEY_BLOCK`` comment).

    Args:
        query: (..., L, E).
        key: (..., S, E).
        value: (..., S, Ev).
        attn_mask, dropout_p, is_causal, scale, enable_gqa: as PyTorch's function.

    Returns:
        (..., L, Ev).
    """
    plain = attn_mask is None and not dropout_p and not is_causal and not enable_gqa
    if plain and _needs_key_padding(query, key, value):
        return _padded_keys_attention(query, key, value, scale)
    if not plain or not _is_short(query, key, value):
        return TORCH_SDPA(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    *lead, length, channels = query.shape
    keys, value_channels = key.shape[-2], value.shape[-1]
    scale = channels**-0.5 if scale is None else scale
    # (L, E, N) with the N = prod(lead) problems innermost: every op below is one
    # vectorised pass over all problems at once. One copy per operand, straight from
    # whatever strides it has (diffusers hands over transposed views).
    q, k, v = (
        t.movedim((-2, -1), (0, 1)).contiguous().view(t.shape[-2], t.shape[-1], -1)
        for t in (query, key, value)
    )
    q.mul_(scale)
    scores = torch.mul(q[:, None, 0], k[None, :, 0])  # (L, S, N)
    for e in range(1, channels):
        scores.addcmul_(q[:, None, e], k[None, :, e])
    weights = torch.softmax(scores, dim=1)
    out = torch.mul(weights[:, 0, None], v[None, 0])  # (L, Ev, N)
    for j in range(1, keys):
        out.addcmul_(weights[:, j, None], v[None, j])
    return out.permute(2, 0, 1).reshape(*lead, length, value_channels)


# How many denoiser calls are running, and whether the outermost one rerouted attention.
_route = {"depth": 0, "routed": False}


def _enter_route(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: reroutes PyTorch's attention function at the outermost call."""
    if _route["depth"] == 0:
        # Someone else's reroute, already in place, wins over ours.
        _route["routed"] = F.scaled_dot_product_attention is TORCH_SDPA
        if _route["routed"]:
            F.scaled_dot_product_attention = short_attention
    _route["depth"] += 1


def _leave_route(module: nn.Module, args: tuple, output: object) -> None:
    """Forward hook (also on exceptions): restores the function when the outermost call ends."""
    _route["depth"] = max(0, _route["depth"] - 1)
    if _route["depth"] == 0 and _route["routed"]:
        F.scaled_dot_product_attention = TORCH_SDPA
        _route["routed"] = False


# --------------------------------------------------------------------------- convolutions


def is_frame_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a zero-padded Conv3d whose kernel spans frames only (k×1×1)."""
    return (
        isinstance(module, nn.Conv3d)
        and tuple(module.kernel_size[1:]) == (1, 1)
        and tuple(module.stride[1:]) == (1, 1)
        and tuple(module.dilation[1:]) == (1, 1)
        and not isinstance(module.padding, str)
        and tuple(module.padding[1:]) == (0, 0)
        and module.padding_mode == "zeros"
    )


def frame_conv3d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
) -> Tensor:
    """A Conv3d with a (k, 1, 1) kernel, computed as a 2-D conv over (frames, height·width).

    Args:
        x: (B, C, F, H, W) or unbatched (C, F, H, W).
        weight: (C_out, C/groups, k, 1, 1).
        bias: (C_out,) or None.
        stride, padding, dilation: along the frame axis.
        groups: as Conv3d.

    Returns:
        (B, C_out, F_out, H, W), or (C_out, F_out, H, W) for an unbatched x.
    """
    *lead, frames, height, width = x.shape
    out = F.conv2d(
        x.reshape(*lead, frames, height * width),
        weight.reshape(*weight.shape[:3], 1),
        bias,
        (stride, 1),
        (padding, 0),
        (dilation, 1),
        groups,
    )
    return out.reshape(*out.shape[:-1], height, width)


class FrameConv3d(nn.Conv3d):
    """A Conv3d with a k×1×1 kernel whose forward runs ``frame_conv3d`` (module doc)."""

    def frame_conv(self, input: Tensor, weight: Tensor, bias: Tensor | None, padding: int):
        """This layer's convolution with another frame padding (CPU: ``frame_conv3d``).

        Args:
            input: (B, C, F, H, W) or (C, F, H, W).
            weight, bias: as the layer's (possibly quantized or transformed).
            padding: zero padding along the frame axis.
        """
        if input.device.type != "cpu":
            pads = (padding, 0, 0)
            return F.conv3d(input, weight, bias, self.stride, pads, self.dilation, self.groups)
        return frame_conv3d(
            input, weight, bias, self.stride[0], padding, self.dilation[0], self.groups
        )

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self.frame_conv(input, weight, bias, self.padding[0])


# --------------------------------------------------------------------------- installing


def use_fast_kernels(denoiser: nn.Module) -> int:
    """Installs the fast kernels on a denoiser (module doc); idempotent.

    Returns:
        How many Conv3d modules this call made ``FrameConv3d``.
    """
    convs = 0
    for module in denoiser.modules():
        if type(module) is nn.Conv3d and is_frame_conv(module):
            module.__class__ = FrameConv3d
            convs += 1
    # Module-level hook functions: deep copies of the denoiser share them (and the state).
    if _enter_route not in denoiser._forward_pre_hooks.values():
        denoiser.register_forward_pre_hook(_enter_route, prepend=True)
        denoiser.register_forward_hook(_leave_route, always_call=True)
    return convs
