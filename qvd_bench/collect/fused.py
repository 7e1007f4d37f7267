"""Per-channel power sums of a float32 CPU tensor in two fused passes (numba).

``batch_moments`` needs, per channel, the minimum, the maximum and the sums
S_p = Σ(x − c)^p for p = 1..4 about a centre c, in float64. Composed of PyTorch
operations that takes about ten passes over a float64 copy of the data; on a full-size
video UNet's layer inputs (millions of elements per call) those passes, not the number of
calls, are the cost of collecting moments. The kernels here read the float32 data twice
and keep everything else in registers:

1. per channel: the float64 sum (its mean is the centre c);
2. per channel: d = x − c in float64 and Σd, Σd², Σd³, Σd⁴.

The minimum and maximum come from PyTorch's vectorised reductions (two more reads of the
float32 data, still far cheaper than the float64 passes).

The sums run in float64 in a different order than PyTorch's (numba may split them into
vector lanes), so results agree with the PyTorch path to float64 rounding, not bit for
bit. A NaN or ±Inf anywhere makes a channel's sums non-finite (powers of float32 values
cannot overflow float64), and the caller then takes the general path that counts and
excludes them.

numba is imported lazily; ``available()`` is False when it is not installed, and
``power_sums`` is then never called. Kernels compile on first use (a few seconds, cached
on disk by numba afterwards).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor


@functools.cache
def _kernels() -> tuple[Any, Any, Any] | None:
    """The compiled kernels (rows, planes, finish), or None without numba."""
    try:
        import numba
    except ImportError:
        return None
    # reassoc: sums may be split into vector lanes; no nnan/ninf, so NaN and ±Inf still
    # propagate into the sums and are seen by the caller.
    jit = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})

    @jit
    def planes(x, out):  # pragma: no cover - compiled
        # x: (A, C, L) float32; out: (5, C) float64 rows c, S1, S2, S3, S4.
        outer, channels, inner = x.shape
        count = outer * inner
        for c in range(channels):
            total = 0.0
            for a in range(outer):
                for i in range(inner):
                    total += np.float64(x[a, c, i])
            center = total / count
            s1 = 0.0
            s2 = 0.0
            s3 = 0.0
            s4 = 0.0
            for a in range(outer):
                for i in range(inner):
                    d = np.float64(x[a, c, i]) - center
                    d2 = d * d
                    s1 += d
                    s2 += d2
                    s3 += d2 * d
                    s4 += d2 * d2
            out[0, c] = center
            out[1, c] = s1
            out[2, c] = s2
            out[3, c] = s3
            out[4, c] = s4

    @jit
    def rows(x, out):  # pragma: no cover - compiled
        # x: (R, C) float32; out: (5, C) as in planes. Channels are innermost, so each row
        # updates every channel's running sums (rows of out) in one vector pass.
        count, channels = x.shape
        center, s1, s2, s3, s4 = out[0], out[1], out[2], out[3], out[4]
        out[:] = 0.0
        for r in range(count):
            row = x[r]
            for c in range(channels):
                center[c] += np.float64(row[c])
        for c in range(channels):
            center[c] /= count
        for r in range(count):
            row = x[r]
            for c in range(channels):
                d = np.float64(row[c]) - center[c]
                d2 = d * d
                s1[c] += d
                s2[c] += d2
                s3[c] += d2 * d
                s4[c] += d2 * d2

    @jit
    def finish(sums, count, spread, moments):  # pragma: no cover - compiled
        # sums: (5, C) centre c, S1..S4 about it; moments: (4, C) mean, M2, M3, M4.
        # The correction by the residual mean δ = S1/n of accumulators._moments_from_sums.
        # Returns False when some S4 is not finite or some centre lies too far off.
        n = np.float64(count)
        ok = True
        for c in range(sums.shape[1]):
            s1, s2, s3, s4 = sums[1, c], sums[2, c], sums[3, c], sums[4, c]
            delta = s1 / n
            dd = delta * delta
            m2 = s2 - n * dd
            moments[0, c] = sums[0, c] + delta
            moments[1, c] = m2
            moments[2, c] = s3 - 3.0 * delta * (s2 - 2.0 * n / 3.0 * dd)
            moments[3, c] = s4 - 4.0 * delta * (s3 - 1.5 * delta * (s2 - n / 2.0 * dd))
            if not np.isfinite(s4) or dd > m2 * (spread * spread / n):
                ok = False
        return ok

    return rows, planes, finish


def available() -> bool:
    """Whether numba is installed (the kernels can be used)."""
    return _kernels() is not None


def covers(x3: Tensor) -> bool:
    """Whether ``channel_moments`` takes this (A, C, L) tensor: float32 on the CPU."""
    return (
        x3.dtype == torch.float32
        and x3.device.type == "cpu"
        and x3.numel() > 0
        and not x3.requires_grad
        and available()
    )


def power_sums(x3: Tensor) -> np.ndarray:
    """Per-channel centre and power sums about it.

    Args:
        x3: (A, C, L) float32 CPU tensor (``covers``), any strides.

    Returns:
        (5, C) float64: the centre c (the float64 mean) and S_1..S_4 = Σ(x − c)^p.
        Channels holding NaN or ±Inf get non-finite entries.
    """
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("the fused moments need numba (pip install numba)")
    rows, planes, _ = kernels
    outer, channels, inner = x3.shape
    sums = np.empty((5, channels), dtype=np.float64)
    data = x3.detach().numpy()
    if inner == 1:
        rows(data[:, :, 0], sums)
    else:
        planes(data, sums)
    return sums


def channel_moments(x3: Tensor, center_spread: float) -> dict[str, Tensor] | None:
    """``accumulators.batch_moments`` of a float32 CPU (A, C, L) tensor, or None.

    Args:
        x3: (A, C, L) float32 CPU tensor (``covers``), any strides.
        center_spread: the largest distance, in standard deviations, of the centre from
            a channel's mean that keeps the sums (``accumulators.CENTER_SPREAD``).

    Returns:
        ``MOMENT_KEYS`` -> (C,) tensors; None when the input holds NaN or ±Inf (the
        caller's general path counts and excludes them).
    """
    _, _, finish = _kernels()
    outer, channels, inner = x3.shape
    count = outer * inner
    sums = power_sums(x3)
    moments = np.empty((4, channels), dtype=np.float64)
    if not finish(sums, count, center_spread, moments):
        return None
    # Extrema by PyTorch: its vectorised min/max reductions are several times faster than
    # a compiled loop (which does not vectorise a min/max that must keep NaN).
    dims = 0 if inner == 1 else (0, 2)
    source = x3[:, :, 0] if inner == 1 else x3
    full = torch.full((channels,), count, dtype=torch.int64)
    mean, m2, m3, m4 = torch.from_numpy(moments)
    return {
        "count": full,
        "nan_count": torch.zeros_like(full),
        "inf_count": torch.zeros_like(full),
        "min": source.amin(dims).to(torch.float64),
        "max": source.amax(dims).to(torch.float64),
        "mean": mean,
        "m2": m2,
        "m3": m3,
        "m4": m4,
    }
