"""One-pass CPU kernels (numba) for the activation side of a fake-quantized layer.

A fake-quantized layer's input goes through several elementwise PyTorch passes before
the layer runs: per-tensor fake quantization takes four (``fake_quant_constants``: scale,
round, clamp, rescale), and an explicit input transform (SmoothQuant, OS+, SCRI) adds a
subtraction and a division per channel before them, and a padded copy for a zero-padded
conv ("pad, then shift"), each pass a fresh tensor. The kernels here do all of it in one
pass that reads the input once and writes the layer's input once:

- ``fake_quant``: clamp(round(x · (1/Δ)), q_min − z, q_max − z) · Δ per element;
- ``transform``: x̃ = (x − z_c) / s_c per input channel, then the same fake quantization
  (or none), written into the interior of a padded buffer whose border takes a fill value
  per channel.

They compute the float32 operations of the PyTorch path in the same order, each rounded
to float32 (no fused multiply-add, no reciprocal for the division: numba's default
floating-point semantics, with NumPy's error model so that divisions vectorise), so the
results are the PyTorch path's bit for bit, NaN and ±Inf included (tests check it).

``covers`` says which inputs they take: float32, contiguous, on the CPU, no autograd, and
fast kernels not turned off (``QVD_BENCH_KERNELS=torch``, ``numerics.kernels``). Everything
else takes the PyTorch path. numba is imported lazily and the kernels compile on first use
(numba caches them on disk afterwards).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qvd_bench.numerics.kernels import fast_kernels_enabled

# (step Δ, 1/Δ, q_min − z, q_max − z) as ``primitives.per_tensor_constants`` makes them.
Constants = tuple[float, float, int, int]


@functools.cache
def _kernels() -> tuple[Any, Any, Any] | None:
    """The compiled kernels (flat, planes, rows), or None without numba."""
    try:
        import numba
    except ImportError:
        return None
    # No fastmath: every operation rounds as PyTorch's does. error_model="numpy": a
    # division by zero gives inf/NaN instead of raising, which lets divisions vectorise.
    jit = numba.njit(cache=True, nogil=True, error_model="numpy")

    @jit
    def flat(x, inverse, step, low, high, out):  # pragma: no cover - compiled
        # x, out: (N,) float32; the scalars are float32.
        for i in range(x.size):
            v = np.rint(x[i] * inverse)
            if v < low:  # comparisons keep NaN, as clamp_ does
                v = low
            elif v > high:
                v = high
            out[i] = v * step

    @numba.njit(inline="always", error_model="numpy")
    def segment(x, i, out, o, n, z, s, quant, inverse, step, low, high):  # pragma: no cover
        # out[o:o + n] = fake_quant((x[i:i + n] − z) / s), flat float32 arrays. Unsigned
        # indices: numba then skips its negative-index wraparound, and the loops vectorise.
        i, o = np.uint64(i), np.uint64(o)
        if quant:
            for r in range(n):
                k = np.uint64(r)
                v = np.rint(((x[i + k] - z) / s) * inverse)
                if v < low:  # comparisons keep NaN, as clamp_ does
                    v = low
                elif v > high:
                    v = high
                out[o + k] = v * step
        else:
            for r in range(n):
                k = np.uint64(r)
                out[o + k] = (x[i + k] - z) / s

    @numba.njit(inline="always", error_model="numpy")
    def segment_rows(x, i, out, shift, scale, quant, inverse, step, low, high):  # pragma: no cover
        # One row: out[i + c] = fake_quant((x[i + c] − shift[c]) / scale[c]).
        i = np.uint64(i)
        if quant:
            for c in range(shift.size):
                k = np.uint64(c)
                v = np.rint(((x[i + k] - shift[c]) / scale[c]) * inverse)
                if v < low:
                    v = low
                elif v > high:
                    v = high
                out[i + k] = v * step
        else:
            for c in range(shift.size):
                k = np.uint64(c)
                out[i + k] = (x[i + k] - shift[c]) / scale[c]

    @jit
    def planes(
        x, dims, shift, scale, quant, inverse, step, low, high, fill, out, pads
    ):  # pragma: no cover - compiled
        # x: flat (A·C·P·Q·R,) float32 with dims = (A, C, P, Q, R); out: flat, its planes
        # (P', Q', R') = (P, Q, R) plus pads = (p0, p1, q0, q1, r0, r1) around them, x's
        # values (transformed) inside and fill[c] in the border; shift, scale, fill: (C,).
        outer, channels, depth, rows, length = dims[0], dims[1], dims[2], dims[3], dims[4]
        p0, q0, r0 = pads[0], pads[2], pads[4]
        out_depth = depth + p0 + pads[1]
        out_rows = rows + q0 + pads[3]
        out_length = length + r0 + pads[5]
        plane, out_plane = depth * rows * length, out_depth * out_rows * out_length
        for a in range(outer):
            for c in range(channels):
                z = shift[c]
                s = scale[c]
                border = fill[c]
                i = (a * channels + c) * plane
                o = (a * channels + c) * out_plane
                for p in range(out_depth):
                    for q in range(out_rows):
                        if p0 <= p < p0 + depth and q0 <= q < q0 + rows:
                            for r in range(r0):
                                out[o + r] = border
                            j = i + ((p - p0) * rows + (q - q0)) * length
                            segment(
                                x, j, out, o + r0, length, z, s, quant, inverse, step, low, high
                            )
                            for r in range(r0 + length, out_length):
                                out[o + r] = border
                        else:
                            for r in range(out_length):
                                out[o + r] = border
                        o += out_length

    @jit
    def rows(x, shift, scale, quant, inverse, step, low, high, out):  # pragma: no cover - compiled
        # x, out: (N·C,) float32, channels innermost; shift, scale: (C,).
        channels = shift.size
        for base in range(0, x.size, channels):
            segment_rows(x, base, out, shift, scale, quant, inverse, step, low, high)

    return flat, planes, rows


def available() -> bool:
    """Whether numba is installed (the kernels can be used)."""
    return _kernels() is not None


def covers(x: Tensor) -> bool:
    """Whether the kernels take ``x``: float32, contiguous, CPU, no autograd, kernels on."""
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.is_contiguous()
        and x.numel() > 0
        and not (x.requires_grad and torch.is_grad_enabled())
        and fast_kernels_enabled()
        and available()
    )


def _scalars(constants: Constants | None) -> tuple[bool, np.float32, ...]:
    if constants is None:
        one = np.float32(1.0)
        return False, one, one, one, one
    step, inverse, low, high = constants
    return True, np.float32(inverse), np.float32(step), np.float32(low), np.float32(high)


def fake_quant(x: Tensor, constants: Constants) -> Tensor:
    """``primitives.fake_quant_constants`` in one pass (``covers(x)`` must hold).

    Args:
        x: any shape, float32, contiguous, CPU.
        constants: the float32 constants of ``primitives.per_tensor_constants``.

    Returns:
        A new tensor like ``x``, equal bit for bit to the PyTorch path's.
    """
    flat, _, _ = _kernels()
    _, inverse, step, low, high = _scalars(constants)
    out = torch.empty_like(x)
    flat(x.detach().view(-1).numpy(), inverse, step, low, high, out.view(-1).numpy())
    return out


def transform(
    x: Tensor,
    channel_dim: int,
    shift: Tensor,
    scale: Tensor,
    constants: Constants | None,
    pads: Sequence[int] | None = None,
    fill: Tensor | None = None,
) -> Tensor:
    """(x − z)/s per channel, fake-quantized by ``constants``, zero-padded by ``pads``.

    ``covers(x)`` must hold. The PyTorch path this equals, bit for bit:
    ``fake_quant_constants((x - z) / s, constants)`` (without the quantization when
    ``constants`` is None), then ``F.pad``-like padding by ``pads`` with ``fill[c]`` in
    channel c's border.

    Args:
        x: (B, C, *spatial) with ``channel_dim`` 1 (conv inputs, at most 3 spatial
            dims), or (..., C) with ``channel_dim`` -1 (Linear inputs; no padding).
        channel_dim: 1 or -1.
        shift, scale: (C,) float32 z and s.
        constants: float32 ``per_tensor_constants``, or None for no quantization.
        pads: ``F.pad`` widths over the spatial dims (last dim first), or None.
        fill: (C,) float32 border values (required with ``pads``).

    Returns:
        A new contiguous float32 tensor: x's shape, or padded.
    """
    _, planes, rows = _kernels()
    quant, inverse, step, low, high = _scalars(constants)
    z = shift.detach().to(torch.float32).reshape(-1).contiguous().numpy()
    s = scale.detach().to(torch.float32).reshape(-1).contiguous().numpy()
    if channel_dim == -1 or channel_dim == x.ndim - 1:
        if pads:
            raise ValueError("padding is for conv inputs (channel_dim 1)")
        out = torch.empty_like(x)
        rows(
            x.detach().view(-1).numpy(), z, s, quant, inverse, step, low, high, out.view(-1).numpy()
        )
        return out
    if channel_dim != 1 or not 3 <= x.ndim <= 5:
        raise ValueError(f"channel_dim 1 with 0-3 spatial dims expected, got {tuple(x.shape)}")
    spatial = list(x.shape[2:])
    widths = [(0, 0)] * len(spatial)
    if pads:
        # F.pad order: the last dim's (left, right) first.
        given = [(pads[2 * j], pads[2 * j + 1]) for j in range(len(pads) // 2)][::-1]
        widths[len(spatial) - len(given) :] = given
    padded = [size + left + right for size, (left, right) in zip(spatial, widths)]
    out = x.new_empty(*x.shape[:2], *padded)
    # An unpadded last dim merges into the one before it (its rows are contiguous in the
    # input and the output alike), so the kernel's inner loop runs as long as it can.
    sizes, edges = list(spatial), list(widths)
    while len(sizes) > 1 and edges[-1] == (0, 0):
        last = sizes.pop()
        edges.pop()
        sizes[-1] *= last
        edges[-1] = (edges[-1][0] * last, edges[-1][1] * last)
    # Five dims (A, C, P, Q, R) for the kernel.
    sizes = [1] * (3 - len(sizes)) + sizes
    edges = [(0, 0)] * (3 - len(edges)) + edges
    if fill is None:
        if pads:
            raise ValueError("padding needs the fill values")
        fill = torch.zeros(x.shape[1])
    planes(
        x.detach().reshape(-1).numpy(),
        np.array([*x.shape[:2], *sizes], dtype=np.int64),
        z,
        s,
        quant,
        inverse,
        step,
        low,
        high,
        fill.detach().to(torch.float32).reshape(-1).contiguous().numpy(),
        out.view(-1).numpy(),
        np.array([w for edge in edges for w in edge], dtype=np.int64),
    )
    return out
