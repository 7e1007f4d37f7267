"""Histogram grids and counting (compiled kernel and PyTorch path) against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qvd_bench.collect.histogram import Histogram
from qvd_bench.numerics import edges as edges_module
from qvd_bench.numerics.edges import LinearEdges, SignedLogEdges, edges_from_dict
from qvd_bench.numerics.kernels import KERNELS_ENV

EDGES = [LinearEdges(-1.5, 2.5, 10), SignedLogEdges(), SignedLogEdges(0.05, 1e-3, 1e3)]


@pytest.mark.parametrize("edges", EDGES, ids=lambda e: e.KIND)
def test_edges_index_matches_searchsorted_including_boundaries(edges):
    table = edges.edges()
    assert table.shape == (edges.num_bins + 1,) and table.dtype == torch.float64
    assert math.isinf(table[0]) and math.isinf(table[-1]) and bool((table.diff() > 0).all())
    inner = table[1:-1]
    x = torch.cat(
        [
            torch.randn(5000, dtype=torch.float64) * 3,
            torch.randn(1000, dtype=torch.float64).exp() * 1e-5,
            inner,
            inner.nextafter(torch.full_like(inner, math.inf)),
            inner.nextafter(torch.full_like(inner, -math.inf)),
            torch.tensor([0.0, -0.0, 1e-300, -1e-300, 1e300, -1e300]),
        ]
    )
    got = edges.index(x)
    ref = np.searchsorted(table.numpy(), x.numpy(), "right") - 1
    np.testing.assert_array_equal(got.numpy(), ref)


@pytest.mark.parametrize(
    "edges",
    [*EDGES, LinearEdges(1e6 + 0.01, 1e6 + 1.01, 1000), LinearEdges(0.1, 0.3, 7)],
    ids=lambda e: str(e.to_dict()),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_are_binned_exactly(edges, dtype):
    table = edges.edges()
    inner = table[1:-1].to(torch.float32)
    up = inner.nextafter(torch.full_like(inner, math.inf))
    down = inner.nextafter(torch.full_like(inner, -math.inf))
    lo, hi = float(table[1]), float(table[-2])
    spread = torch.rand(4000) * (hi - lo) * 1.2 + lo - 0.1 * (hi - lo)
    x = torch.cat([inner, up, down, spread, torch.randn(1000)]).to(dtype)
    ref = np.searchsorted(table.numpy(), x.double().numpy(), "right") - 1
    np.testing.assert_array_equal(edges.index(x).numpy(), ref)
    h = Histogram(edges)
    h.update(x)
    assert h.counts.tolist() == np.bincount(ref, minlength=edges.num_bins).tolist()


def _float32_grid_values(edges: SignedLogEdges, seed: int = 0) -> torch.Tensor:
    """float32 values at, just above and just below every boundary of both signs, spread
    over and beyond the grid, ±0, subnormals, the extremes, NaN and ±Inf."""
    table = edges.edges()[1:-1].to(torch.float32)
    up = table.nextafter(torch.full_like(table, math.inf))
    down = table.nextafter(torch.full_like(table, -math.inf))
    generator = torch.Generator().manual_seed(seed)
    spread = torch.randn(20000, generator=generator) * torch.exp(
        torch.randn(20000, generator=generator) * 8
    )
    tiny = torch.finfo(torch.float32).tiny
    special = torch.tensor(
        [0.0, -0.0, tiny / 8, -tiny / 8, tiny, 3.4e38, -3.4e38, 1.0, -1.0,
         math.nan, math.inf, -math.inf, math.nan]
    )  # fmt: skip
    return torch.cat([table, up, down, spread, special])


@pytest.mark.parametrize(
    "edges",
    [SignedLogEdges(), SignedLogEdges(0.05, 1e-3, 1e3), SignedLogEdges(0.001), SignedLogEdges(0.3)],
    ids=lambda e: f"{e.relative_error}-{e.min_abs}-{e.max_abs}",
)
def test_kernel_signed_log_counts_equal_searchsorted_and_the_torch_path(edges, monkeypatch):
    x = _float32_grid_values(edges)
    assert edges_module.kernel_takes(x) and edges_module.bit_tables(edges) is not None
    h = Histogram(edges)
    h.update(x)
    finite = x[torch.isfinite(x)].double().numpy()
    ref = np.searchsorted(edges.edges().numpy(), finite, "right") - 1
    assert h.counts.tolist() == np.bincount(ref, minlength=edges.num_bins).tolist()
    assert (int(h.nan_count), int(h.inf_count)) == (2, 2)
    monkeypatch.setenv(KERNELS_ENV, "torch")
    assert not edges_module.kernel_takes(x)
    slow = Histogram(edges)
    slow.update(x)
    for key in ("counts", "nan_count", "inf_count"):
        assert torch.equal(h.state_dict()[key], slow.state_dict()[key])


@pytest.mark.parametrize("stride", [1, 3])
def test_kernel_histogram_counts_strided_rows_and_accumulates(stride, monkeypatch):
    edges = SignedLogEdges()
    x = _float32_grid_values(edges, seed=1)[: 41 * 137].reshape(41, 137)
    h = Histogram(edges)
    h.update(x[:20], stride=stride)
    h.update(x[20:], stride=stride)
    monkeypatch.setenv(KERNELS_ENV, "torch")
    slow = Histogram(edges)
    slow.update(x[:20], stride=stride)
    slow.update(x[20:], stride=stride)
    assert torch.equal(h.counts, slow.counts) and h.total == slow.total
    assert int(h.nan_count) == int(slow.nan_count) and int(h.inf_count) == int(slow.inf_count)


def test_kernel_leaves_other_inputs_to_the_torch_path():
    edges = SignedLogEdges()
    x = torch.randn(6, 5)
    assert not edges_module.kernel_takes(x.t())  # not contiguous
    assert not edges_module.kernel_takes(x.double())
    for other in (x.t(), x.double(), x.bfloat16()):
        h = Histogram(edges)
        h.update(other)
        ref = np.searchsorted(edges.edges().numpy(), other.double().numpy().ravel(), "right") - 1
        assert h.counts.tolist() == np.bincount(ref, minlength=edges.num_bins).tolist()
    # A grid too fine for a table of bit ranges is counted by the torch path.
    fine = SignedLogEdges(1e-6)
    assert edges_module.bit_tables(fine) is None
    h = Histogram(fine)
    h.update(x)
    assert h.total == 30


def test_signed_log_edges_have_bounded_relative_width():
    edges = SignedLogEdges(0.01, 1e-6, 1e6)
    table = edges.edges().numpy()
    pos = table[table > 0][:-1]
    ratio = pos[1:] / pos[:-1]
    np.testing.assert_allclose(ratio, edges.gamma, rtol=1e-12)
    assert pos[0] <= 1e-6 < pos[1] and pos[-2] < 1e6 <= pos[-1]
    half = len(table) // 2
    np.testing.assert_array_equal(table[:half], -table[half:][::-1])


@pytest.mark.parametrize("edges", EDGES, ids=lambda e: e.KIND)
def test_edges_dict_round_trip(edges):
    assert edges_from_dict(edges.to_dict()) == edges
    with pytest.raises(ValueError):
        edges_from_dict({"kind": "nope"})


def test_edges_validate_arguments():
    for bad in (lambda: LinearEdges(1, 0, 4), lambda: LinearEdges(0, 1, 0)):
        with pytest.raises(ValueError):
            bad()
    for bad in (lambda: SignedLogEdges(1.5), lambda: SignedLogEdges(0.01, 1.0, 0.5)):
        with pytest.raises(ValueError):
            bad()
