"""Histogram grids, and counting a tensor's values on them.

A grid is ``LinearEdges`` (equal bins between two bounds) or ``SignedLogEdges`` (a
universal signed log grid with bounded relative error); both add open bins at the ends,
so every finite value has a bin. Bin i covers [edges[i], edges[i+1]), as
``np.searchsorted(edges, x, "right") − 1``.

``bin_counts`` counts a tensor's finite values on a grid, NaN and ±Inf apart. With
PyTorch operations that takes about ten passes per tensor on ``SignedLogEdges`` (abs, log,
scale, clamp, sign, the bin guess, the boundary lookup and comparison, bincount, the
finiteness check); with histograms on every layer those passes cost a collection more
than the forward itself. Contiguous float32 CPU tensors on a ``SignedLogEdges`` grid are
therefore counted by a compiled kernel (numba) in one pass, without a logarithm:

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

Both paths give the same counts (tests check both against ``np.searchsorted``). Inputs the
kernel does not take (``kernel_takes``: not float32, not contiguous, not on the CPU, or
``QVD_BENCH_KERNELS=torch``) and grids too fine for its table take the PyTorch path.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from qvd_bench.numerics.kernels import fast_kernels_enabled

F64 = torch.float64
I64 = torch.int64
I32 = torch.int32

# Above this many entries a bit-range table is not worth building (a grid finer than
# about 0.0005 % relative error); such grids take the PyTorch path.
MAX_TABLE_ENTRIES = 1 << 22


# --------------------------------------------------------------------------- grids


@functools.lru_cache(maxsize=64)
def edge_table(edges: Any, device: torch.device, dtype: torch.dtype = F64) -> Tensor:
    """The boundaries, for exact comparisons with values of ``dtype``.

    For float32 every boundary e is rounded up to the nearest float32 u: for a float32 x,
    x < e exactly when x < u, so comparing in float32 gives the float64 answer.
    """
    table = edges.edges()
    if dtype == torch.float32:
        t32 = table.to(torch.float32)
        up = t32.nextafter(torch.full_like(t32, math.inf))
        table = torch.where(t32.to(F64) < table, up, t32)
    return table.to(device)


def _exact_bins(x: Tensor, guess: Tensor, table: Tensor) -> Tensor:
    """Fixes an analytic bin guess that is the bin or the one below it.

    Bins are half-open [table[i], table[i+1]), as ``np.searchsorted(table, x, "right") - 1``.
    Callers take their guesses half a bin low, so rounding leaves them at most one bin
    low (never high), and one comparison with the guessed bin's upper boundary settles each.

    Args:
        x: (N,) values, same dtype as ``table``.
        guess: (N,) int32 guesses: the bin or the one below it.
        table: (num_bins + 1,) boundaries.

    Returns:
        (N,) int32 bin indices.
    """
    guess = guess.clamp_(0, table.numel() - 2)
    # Compared straight into int32: a comparison into bool is 2-3x slower on CPU.
    step = torch.ge(x, table[1:].index_select(0, guess), out=torch.empty_like(guess))
    return guess.add_(step)


@dataclass(frozen=True)
class LinearEdges:
    """``bins`` equal bins on [lo, hi), plus an underflow (−inf, lo) and overflow [hi, inf) bin.

    Bin i covers [edges[i], edges[i+1]); ``x == hi`` lands in the overflow bin.
    """

    lo: float
    hi: float
    bins: int

    KIND: ClassVar[str] = "linear"

    def __post_init__(self):
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"LinearEdges needs finite lo < hi, got {self.lo}, {self.hi}")
        if int(self.bins) != self.bins or self.bins < 1:
            raise ValueError(f"LinearEdges needs bins >= 1, got {self.bins}")

    @property
    def num_bins(self) -> int:
        return int(self.bins) + 2

    def edges(self) -> Tensor:
        """(num_bins + 1,) float64 boundaries, ±inf at the ends."""
        inner = torch.linspace(self.lo, self.hi, int(self.bins) + 1, dtype=F64)
        inf = torch.tensor([math.inf], dtype=F64)
        return torch.cat([-inf, inner, inf])

    def index(self, x: Tensor) -> Tensor:
        """Bin index of each finite element of ``x`` (int64, shape of ``x``)."""
        return self._bins(x.reshape(-1)).long().reshape(x.shape)

    def _bins(self, x: Tensor) -> Tensor:
        """(N,) finite values -> (N,) int32 bins."""
        # Float32 inputs are binned in float32 when its rounding (of x − lo, and of the
        # position, up to bins + 1) stays far below half a bin.
        f32_error = 2.0**-23 * max(abs(self.lo), abs(self.hi)) * self.bins / (self.hi - self.lo)
        f32_error += 2.0**-22 * self.bins
        work = F64 if x.dtype == F64 or f32_error > 0.25 else torch.float32
        x = x.to(work)
        scale = int(self.bins) / (self.hi - self.lo)
        # The bin of x is floor(p) + 1 for p = (x − lo)·scale clamped to [−1, bins]. The
        # guess floor(p + 1/2) is that bin or the one below while rounding errs by less
        # than half a bin. Clamping p + 1/2 to [0, bins + 1] keeps that, takes +inf to the
        # last bin (which _exact_bins moves past the +inf edge, as searchsorted does),
        # and makes the truncation to int the floor.
        pos = (x - self.lo).mul_(scale).add_(0.5).clamp_(0.0, self.bins + 1.0)
        return _exact_bins(x, pos.to(I32), edge_table(self, x.device, work))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "lo": self.lo, "hi": self.hi, "bins": int(self.bins)}

    def params(self) -> list[float]:
        return [0.0, float(self.lo), float(self.hi), float(self.bins)]


@dataclass(frozen=True)
class SignedLogEdges:
    """A universal signed log-spaced grid with bounded relative error (as DDSketch).

    With γ = (1 + α)/(1 − α) (α = ``relative_error``), k_lo = floor(log_γ min_abs) and
    k_hi = ceil(log_γ max_abs), the boundaries are

        −inf, −γ^k_hi, ..., −γ^k_lo, γ^k_lo, ..., γ^k_hi, +inf

    so bins are: one open bin below −γ^k_hi, m = k_hi − k_lo log bins on each side, a
    zero bin [−γ^k_lo, γ^k_lo) (|x| < ~min_abs) and one open bin from γ^k_hi (values
    beyond ~max_abs, clamped there by ``quantile``). Within a log bin any point is within
    relative error γ − 1 of any other. Bin i covers [edges[i], edges[i+1]).
    """

    relative_error: float = 0.01
    min_abs: float = 1e-6
    max_abs: float = 1e6

    KIND: ClassVar[str] = "signed_log"

    def __post_init__(self):
        if not 0.0 < self.relative_error < 1.0:
            raise ValueError(f"relative_error must be in (0, 1), got {self.relative_error}")
        if not 0.0 < self.min_abs < self.max_abs < math.inf:
            raise ValueError(
                f"need 0 < min_abs < max_abs < inf, got {self.min_abs}, {self.max_abs}"
            )

    @property
    def gamma(self) -> float:
        return (1.0 + self.relative_error) / (1.0 - self.relative_error)

    @property
    def _k_range(self) -> tuple[int, int]:
        log_gamma = math.log(self.gamma)
        return (
            math.floor(math.log(self.min_abs) / log_gamma),
            math.ceil(math.log(self.max_abs) / log_gamma),
        )

    @property
    def num_bins(self) -> int:
        k_lo, k_hi = self._k_range
        return 2 * (k_hi - k_lo) + 3

    def edges(self) -> Tensor:
        """(num_bins + 1,) float64 boundaries, ±inf at the ends."""
        k_lo, k_hi = self._k_range
        pos = torch.tensor(self.gamma, dtype=F64) ** torch.arange(k_lo, k_hi + 1, dtype=F64)
        inf = torch.tensor([math.inf], dtype=F64)
        return torch.cat([-inf, -pos.flip(0), pos, inf])

    def index(self, x: Tensor) -> Tensor:
        """Bin index of each finite element of ``x`` (int64, shape of ``x``)."""
        return self._bins(x.reshape(-1)).long().reshape(x.shape)

    def _bins(self, x: Tensor) -> Tensor:
        """(N,) finite values -> (N,) int32 bins."""
        k_lo, k_hi = self._k_range
        m = k_hi - k_lo
        zero_bin = m + 1
        log_gamma = math.log(self.gamma)
        # Float32 inputs are binned in float32 when its rounding (of log|x|, and of the
        # level, up to num_bins) stays far below half a bin.
        f32_error = 2.0**-22 * max(abs(math.log(self.min_abs)), abs(math.log(self.max_abs)))
        f32_error = f32_error / log_gamma + 2.0**-22 * self.num_bins
        work = F64 if x.dtype == F64 or f32_error > 0.25 else torch.float32
        x = x.to(work)
        # With l = log_γ|x| − k_lo clamped to [−1, m], the bin of x ≥ 0 is
        # zero_bin + 1 + floor(l) and that of x < 0 is zero_bin − max(ceil(l), 0)
        # (|x| = γ^k starts a positive bin and ends a negative one). The guess
        # zero_bin + floor(sign(x)·(l + 1/2)) is that bin or the one below while rounding
        # errs by less than half a bin. Clamping l + 1/2 to [−1/2, m + 1] keeps that,
        # takes +inf to the last bin (which _exact_bins moves past the +inf edge, as
        # searchsorted does), and leaves the guess at least 1/2, so the truncation to int
        # is the floor.
        level = x.abs().log_().mul_(1.0 / log_gamma).sub_(k_lo - 0.5)
        level = level.clamp_(-0.5, m + 1.0)
        guess = level.mul_(x.sign()).add_(zero_bin).to(I32)
        return _exact_bins(x, guess, edge_table(self, x.device, work))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "relative_error": self.relative_error,
            "min_abs": self.min_abs,
            "max_abs": self.max_abs,
        }

    def params(self) -> list[float]:
        return [1.0, float(self.relative_error), float(self.min_abs), float(self.max_abs)]


Edges = LinearEdges | SignedLogEdges


def edges_from_dict(data: dict[str, Any]) -> Edges:
    """Inverse of ``to_dict()`` of either edges type."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind == LinearEdges.KIND:
        return LinearEdges(float(data["lo"]), float(data["hi"]), int(data["bins"]))
    if kind == SignedLogEdges.KIND:
        return SignedLogEdges(**{k: float(v) for k, v in data.items()})
    raise ValueError(f"unknown histogram edges kind {kind!r}")


def edges_from_params(params: Tensor) -> Edges:
    """Inverse of ``params()`` of either edges type (a (4,) tensor)."""
    kind, a, b, c = params.tolist()
    if kind == 0.0:
        return LinearEdges(a, b, int(c))
    if kind == 1.0:
        return SignedLogEdges(a, b, c)
    raise ValueError(f"unknown histogram edges code {kind}")


# --------------------------------------------------------------------------- counting


def bin_counts(edges: Edges, x: Tensor, stride: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Counts of ``x``'s finite values in the bins of ``edges``; NaN and ±Inf apart.

    Contiguous float32 CPU tensors on a ``SignedLogEdges`` grid are counted in one pass by
    the compiled kernel (``signed_log_counts``, the same counts); everything else by
    PyTorch.

    Args:
        edges: the grid.
        x: any shape, any float dtype.
        stride: token subsample: ``x`` is viewed as rows of its last axis,
            (−1, x.shape[-1]), and every ``stride``-th row is counted with all its
            elements (for a Linear input (..., C): every stride-th token).

    Returns:
        (num_bins,) int64 counts, and the NaN and ±Inf counts as () int64 tensors, on
        ``x.device``.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    x = x.detach()
    if x.numel() == 0:
        zero = torch.zeros((), dtype=I64, device=x.device)
        return torch.zeros(edges.num_bins, dtype=I64, device=x.device), zero, zero.clone()
    tables = bit_tables(edges) if isinstance(edges, SignedLogEdges) and kernel_takes(x) else None
    if tables is not None:
        counts = torch.zeros(edges.num_bins, dtype=I64)
        nan, inf = signed_log_counts(x, tables, stride, counts)
        return counts, torch.tensor(nan, dtype=I64), torch.tensor(inf, dtype=I64)
    rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    values = (rows[::stride] if stride > 1 else rows).reshape(-1)
    nan = torch.zeros((), dtype=I64, device=x.device)
    inf = torch.zeros((), dtype=I64, device=x.device)
    # NaN and ±Inf propagate into the sum (an overflowing sum only takes the slow path).
    total = values.sum(dtype=F64 if values.dtype == F64 else torch.float32)
    if not bool(torch.isfinite(total)):
        finite = torch.isfinite(values)
        nan = torch.isnan(values).sum()
        inf = values.numel() - finite.sum() - nan
        values = values[finite]
    counts = torch.bincount(edges._bins(values), minlength=edges.num_bins)
    return counts, nan, inf


@functools.cache
def _histogram_kernel() -> Any:
    """The compiled histogram counting kernel."""
    import numba

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


def kernel_takes(x: Tensor) -> bool:
    """Whether ``signed_log_counts`` takes ``x``: float32, contiguous, CPU, fast kernels
    on."""
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.is_contiguous()
        and fast_kernels_enabled()
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
    table = edges.edges().numpy()
    positive = (table > 0) & np.isfinite(table)  # γ^k_lo .. γ^k_hi
    # For float32 a: γ^k ≤ a exactly when the float32 at or above γ^k (the table's
    # float32 form) is ≤ a, and γ^k < a when the float32 above γ^k is ≤ a (for an
    # inexact γ^k, the same float).
    up = edge_table(edges, torch.device("cpu"), torch.float32).numpy()[positive]
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
    """Adds the bins of ``x``'s finite values to ``counts``; ``kernel_takes(x)`` must
    hold.

    Args:
        x: float32, contiguous, CPU, not empty; viewed as rows of its last axis.
        tables: ``bit_tables`` of the grid.
        stride: count every ``stride``-th row (``bin_counts``'s token subsample).
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
