"""Fused CPU kernels (numba) for the accumulators: per-channel power sums, and histogram
counts on the signed log grid.

**Power sums.** ``batch_moments`` needs, per channel, the minimum, the maximum and the sums
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

**Histogram counts.** ``Histogram.update`` on ``SignedLogEdges`` takes about ten PyTorch
passes per tensor: abs, log, scale, clamp, sign, the bin guess, the boundary lookup and
comparison, bincount, and the finiteness check. With histograms on every layer those
passes cost a collection more than the forward itself. ``signed_log_counts`` does it in
one pass over float32 values, without a logarithm:

- the bit patterns of non-negative float32 values sort as the values do, so comparing
  |x| with a boundary is an integer comparison with the bits of the boundary rounded up
  to float32 (for a float32 a, γ^k ≤ a exactly when round_up(γ^k) ≤ a);
- the top bits of |x| (exponent and a few mantissa bits) index a table of the number of
  boundaries at or below the start of that bit range; the ranges are narrow enough that
  each holds at most one boundary (checked when the table is built), so one integer
  comparison finishes the count;
- the count gives the bin on either side of zero (a negative value exactly at −γ^k opens
  its bin, where a positive one at γ^k starts the next), and the value is counted at
  once, NaN and ±Inf apart.

The counts equal ``np.searchsorted(edges, x, "right") − 1`` over the finite values, as
the PyTorch path's do (tests check both). Inputs it does not take (``covers_histogram``:
not float32, not contiguous, not on the CPU, or ``QVD_BENCH_KERNELS=torch``) take the
PyTorch path.

numba is imported lazily; ``available()`` is False when it is not installed, and the
kernels are then never called. They compile on first use (a few seconds, cached on disk
by numba afterwards).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qvd_bench.models.kernels import fast_kernels_enabled

# Above this many entries a bit-range table is not worth building (a grid finer than
# about 0.0005 % relative error); such grids take the PyTorch path.
MAX_TABLE_ENTRIES = 1 << 22


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


# --------------------------------------------------------------------------- histograms


@functools.cache
def _histogram_kernel() -> Any:
    """The compiled histogram counting kernel, or None without numba."""
    try:
        import numba
    except ImportError:
        return None

    # No fastmath: nothing here is floating-point arithmetic.
    @numba.njit(cache=True, nogil=True)
    def count(
        x, row_length, stride, shift, base, ranges, zero_bin, counts
    ):  # pragma: no cover - compiled
        # x: flat float32, rows of row_length, every stride-th row counted. ranges: flat
        # (ranges, 4): for bit range base + k, (boundaries below it, the bits at which the
        # next one is passed) for positive values, then the same for negative ones.
        # Returns (NaN count, ±Inf count).
        bits = x.view(np.uint32)
        last = ranges.size // 4 - 1
        nan = 0
        inf = 0
        for row in range(0, x.size // row_length, stride):
            start = row * row_length
            for i in range(start, start + row_length):
                b = bits[i]
                a = np.int64(b & np.uint32(0x7FFFFFFF))
                if a >= 0x7F800000:
                    if a == 0x7F800000:
                        inf += 1
                    else:
                        nan += 1
                    continue
                k = (a >> shift) - base
                k = 0 if k < 0 else (last if k > last else k)
                side = np.int64(b >> np.uint32(31)) * 2
                j = 4 * k + side
                c = np.int64(ranges[j]) + np.int64(a >= ranges[j + 1])
                counts[zero_bin + c - side * c] += 1
        return nan, inf

    return count


def covers_histogram(x: Tensor) -> bool:
    """Whether ``signed_log_counts`` takes ``x``: float32, contiguous, CPU, fast kernels
    on, numba present."""
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.is_contiguous()
        and fast_kernels_enabled()
        and available()
    )


@dataclass(frozen=True)
class BitTables:
    """The lookup table of one signed log grid (see the module doc, histogram counts).

    A positive float32 a passes boundary γ^k (counts it) when a ≥ γ^k, a negative one −a
    when a > γ^k: in bits, a ≥ the threshold ``positive[k]`` or ``negative[k]``.

    Attributes:
        shift: bits dropped from |x|'s pattern to get its bit range.
        base: the first bit range in ``ranges``.
        ranges: (ranges, 4) int32, per bit range: the thresholds of positive values below
            its start, the threshold inside it (or one no float reaches), then the same
            for negative values.
        zero_bin: index of the bin around zero.
    """

    shift: int
    base: int
    ranges: np.ndarray
    zero_bin: int


@functools.lru_cache(maxsize=16)
def bit_tables(edges: Any) -> BitTables | None:
    """The table of ``edges`` (``SignedLogEdges``), or None when it would be too large."""
    # Imported here: accumulators imports this module.
    from qvd_bench.collect.accumulators import _edge_table

    table = edges.edges().numpy()
    positive = (table > 0) & np.isfinite(table)  # γ^k_lo .. γ^k_hi
    # For float32 a: γ^k ≤ a exactly when the float32 at or above γ^k (the table's
    # float32 form) is ≤ a, and γ^k < a when the float32 above γ^k is ≤ a (for an
    # inexact γ^k, the same float).
    up = _edge_table(edges, torch.device("cpu"), torch.float32).numpy()[positive]
    exact = up.astype(np.float64) == table[positive]
    passed_positive = up.view(np.uint32).astype(np.int64)
    passed_negative = passed_positive + exact
    # Narrow the bit ranges until none holds two thresholds of a side: about
    # 2^-mantissa_bits of relative width against the grid's γ − 1.
    mantissa_bits = max(0, math.ceil(-math.log2(edges.gamma - 1.0)))
    while mantissa_bits <= 23:
        shift = 23 - mantissa_bits
        base = int(passed_positive[0] >> shift)
        end = int(passed_negative[-1] >> shift) + 1  # starts above every threshold
        if end - base + 1 > MAX_TABLE_ENTRIES:
            return None
        starts = np.arange(base, end + 1, dtype=np.int64) << shift
        columns, ok = [], True
        for thresholds in (passed_positive, passed_negative):
            below = np.searchsorted(thresholds, starts, side="right")
            inside = np.searchsorted(thresholds, starts + (1 << shift) - 1, side="right")
            ok = ok and int((inside - below).max()) <= 1
            unreachable = np.int64(0x7F800000)  # no finite float32 has these bits
            padded = np.append(thresholds, unreachable)
            columns += [below, padded[below]]
        if ok:
            return BitTables(
                shift=shift,
                base=base,
                ranges=np.stack(columns, axis=1).astype(np.int32),
                zero_bin=up.size,
            )
        mantissa_bits += 1
    return None


def signed_log_counts(x: Tensor, tables: BitTables, stride: int, counts: Tensor) -> tuple[int, int]:
    """Adds the bins of ``x``'s finite values to ``counts``; ``covers_histogram(x)`` must
    hold.

    Args:
        x: float32, contiguous, CPU, not empty; viewed as rows of its last axis.
        tables: ``bit_tables`` of the grid.
        stride: count every ``stride``-th row (``Histogram.update``'s token subsample).
        counts: (num_bins,) int64 CPU, contiguous: added to in place.

    Returns:
        (NaN count, ±Inf count) of the counted rows.
    """
    row_length = x.shape[-1] if x.ndim else 1
    nan, inf = _histogram_kernel()(
        x.detach().reshape(-1).numpy(),
        row_length,
        stride,
        tables.shift,
        tables.base,
        tables.ranges.reshape(-1),
        tables.zero_bin,
        counts.numpy(),
    )
    return int(nan), int(inf)
