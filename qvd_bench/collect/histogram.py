"""``Histogram``: counts of a tensor's values on a fixed grid, streaming and mergeable.

The grids and the counting are in ``numerics.edges``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, MutableMapping

import torch
from torch import Tensor

from qvd_bench.collect.accumulator import Accumulator
from qvd_bench.numerics.edges import Edges, bin_counts, edge_table, edges_from_params

F64 = torch.float64
I64 = torch.int64


class Histogram(Accumulator):
    """Counts of a tensor's values on fixed edges; merges add the counts.

    Args:
        edges: ``LinearEdges`` or ``SignedLogEdges``, fixed before counting.
        device: where the state starts; it follows the inputs of ``update``.

    State: edges_spec (4,) float64 (the edges' parameters), counts (num_bins,) int64,
    nan_count and inf_count () int64.
    """

    STATE = ("edges_spec", "counts", "nan_count", "inf_count")

    def __init__(self, edges: Edges, device: torch.device | str | None = None):
        self.edges = edges
        self.edges_spec = torch.tensor(edges.params(), dtype=F64, device=device)
        self.counts = torch.zeros(edges.num_bins, dtype=I64, device=device)
        self.nan_count = torch.zeros((), dtype=I64, device=device)
        self.inf_count = torch.zeros((), dtype=I64, device=device)

    def _validate(self) -> None:
        self.edges = edges_from_params(self.edges_spec)
        if self.counts.shape != (self.edges.num_bins,):
            raise ValueError(
                f"Histogram counts shape {tuple(self.counts.shape)} does not match its edges "
                f"({self.edges.num_bins} bins)"
            )

    @property
    def total(self) -> int:
        """Number of finite values counted."""
        return int(self.counts.sum())

    def update(self, x: Tensor, stride: int = 1) -> None:
        """Counts the finite values of ``x``; NaN and ±Inf are counted apart
        (``numerics.edges.bin_counts``).

        Args:
            x: any shape, any float dtype.
            stride: token subsample: ``x`` is viewed as rows of its last axis,
                (−1, x.shape[-1]), and every ``stride``-th row is counted with all its
                elements (for a Linear input (..., C): every stride-th token). Record the
                stride with the results: counts are then of a subsample.
        """
        if x.device != self.device:
            self.to(x.device)
        counts, nan, inf = bin_counts(self.edges, x, stride)
        # The state is replaced, never written in place.
        self.counts = self.counts + counts
        self.nan_count = self.nan_count + nan
        self.inf_count = self.inf_count + inf

    def merge(self, other: Histogram) -> Histogram:
        """Adds ``other``'s counts (edges must be equal); returns self."""
        other = self._mergeable(other)
        if other.edges != self.edges:
            raise ValueError(f"cannot merge histograms on {other.edges} into {self.edges}")
        self.counts = self.counts + other.counts
        self.nan_count = self.nan_count + other.nan_count
        self.inf_count = self.inf_count + other.inf_count
        return self

    def bin_edges(self) -> Tensor:
        """(num_bins + 1,) float64 boundaries on the state's device."""
        return edge_table(self.edges, self.device)

    def quantile(self, q: float | Tensor) -> Tensor:
        """Quantiles estimated from the counts.

        The q-quantile is taken at order-statistic position r = q·(N − 1) (numpy's
        "linear" convention): the bin holding that position is found from the cumulative
        counts, and the count values of a bin are taken as spread evenly across it,
        value i of c at lo + (i + 0.5)/c·(hi − lo). Open end bins return their finite
        boundary. The estimate lies in the bin of the order statistic below r, or at its
        upper edge, so for ``SignedLogEdges`` it is within relative error γ − 1 of the
        exact quantile when the neighbouring order statistics share a log bin.

        Args:
            q: scalar or tensor of probabilities in [0, 1].

        Returns:
            float64 tensor shaped like ``q``; NaN when the histogram is empty.
        """
        q = torch.as_tensor(q, dtype=F64, device=self.device)
        if bool(((q < 0) | (q > 1)).any()):
            raise ValueError("quantile probabilities must lie in [0, 1]")
        counts = self.counts.to(F64)
        total = counts.sum()
        if total == 0:
            return torch.full_like(q, math.nan)
        cum = counts.cumsum(0)
        r = q * (total - 1.0)
        b = torch.searchsorted(cum, r.reshape(-1), right=True).clamp_(max=counts.numel() - 1)
        edges = self.bin_edges()
        lo, hi = edges[b], edges[b + 1]
        before = cum[b] - counts[b]
        frac = ((r.reshape(-1) - before + 0.5) / counts[b]).clamp_(0.0, 1.0)
        inside = lo + frac * (hi - lo)
        value = torch.where(torch.isinf(lo), hi, torch.where(torch.isinf(hi), lo, inside))
        return value.reshape(q.shape)


def count_into(
    histograms: MutableMapping[Hashable, Histogram],
    key: Hashable,
    edges: Edges,
    x: Tensor,
    stride: int = 1,
) -> None:
    """Counts ``x`` into ``histograms[key]``, a new ``Histogram`` on ``edges`` and on
    ``x``'s device the first time ``key`` is seen (``Histogram.update`` for ``stride``)."""
    histogram = histograms.get(key)
    if histogram is None:
        histogram = histograms[key] = Histogram(edges, device=x.device)
    histogram.update(x, stride=stride)
