"""Histogram: counts, merges and quantiles against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qvd_bench.collect.histogram import Histogram
from qvd_bench.numerics.edges import LinearEdges, SignedLogEdges
from tests.collect.helpers import (
    copy,
)
from tests.references import (
    PROPERTY,
)


@st.composite
def histogram_batches(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    sizes = draw(st.lists(st.integers(0, 200), min_size=3, max_size=3))
    scale = draw(st.sampled_from([1e-7, 1e-3, 1.0, 1e4, 1e7]))
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        x = rng.standard_normal(n) * scale
        if n > 3:
            x[:3] = [math.nan, math.inf, 0.0]
        out.append(torch.from_numpy(x))
    return out


@PROPERTY
@given(histogram_batches(), st.sampled_from([LinearEdges(-2.0, 3.0, 16), SignedLogEdges(0.05)]))
def test_histogram_merge_is_exact_in_any_order(batches, edges):
    parts = []
    for x in batches:
        h = Histogram(edges)
        h.update(x)
        parts.append(h)
    a, b, c = parts
    left = copy(a).merge(copy(b)).merge(copy(c))
    right = copy(c).merge(copy(b).merge(copy(a)))
    whole = Histogram(edges)
    whole.update(torch.cat(batches))
    for other in (right, whole):
        for k in ("counts", "nan_count", "inf_count"):
            assert torch.equal(left.state_dict()[k], other.state_dict()[k])
    x = torch.cat(batches).numpy()
    finite = x[np.isfinite(x)]
    ref = np.bincount(
        np.searchsorted(edges.edges().numpy(), finite, "right") - 1, minlength=edges.num_bins
    )
    assert left.counts.tolist() == ref.tolist()


def test_linear_histogram_matches_numpy_histogram():
    x = torch.randn(3, 50, 7) * 2
    x[0, 0, 0], x[1, 1, 1], x[2, 2, 2] = math.nan, math.inf, -math.inf
    edges = LinearEdges(-2.0, 2.0, 8)
    h = Histogram(edges)
    h.update(x[:2])
    h.update(x[2:])
    v = x.double().numpy().ravel()
    v = v[np.isfinite(v)]
    inner, _ = np.histogram(v, bins=edges.edges().numpy()[1:-1])
    assert h.counts[1:-1].tolist() == inner.tolist()  # no value is exactly hi here
    assert int(h.counts[0]) == (v < -2).sum() and int(h.counts[-1]) == (v >= 2).sum()
    assert int(h.nan_count) == 1 and int(h.inf_count) == 2
    assert h.total == v.size


def test_histogram_stride_counts_every_strideth_token():
    x = torch.randn(4, 30, 5)
    h = Histogram(LinearEdges(-3, 3, 12))
    h.update(x, stride=3)
    ref = Histogram(LinearEdges(-3, 3, 12))
    ref.update(x.reshape(-1, 5)[::3])
    assert torch.equal(h.counts, ref.counts) and h.total == 40 * 5


@pytest.mark.parametrize("alpha", [0.01, 0.05])
def test_signed_log_quantile_within_relative_error(alpha):
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.lognormal(0, 2, 20000), -rng.lognormal(1, 1, 5000)])
    edges = SignedLogEdges(alpha)
    h = Histogram(edges)
    for part in np.array_split(x, 4):
        h.update(torch.from_numpy(part))
    qs = np.array([0.001, 0.01, 0.1, 0.3, 0.5, 0.8, 0.9, 0.99, 0.999])
    got = h.quantile(torch.from_numpy(qs)).numpy()
    want = np.quantile(x, qs)
    np.testing.assert_array_less(np.abs(got - want), (edges.gamma - 1) * np.abs(want))
    # The estimate always lies between the bin starts/ends of the bracketing order statistics.
    table = edges.edges().numpy()
    s = np.sort(x)
    pos = qs * (len(x) - 1)
    lo_bin = np.searchsorted(table, s[np.floor(pos).astype(int)], "right") - 1
    hi_bin = np.searchsorted(table, s[np.ceil(pos).astype(int)], "right") - 1
    assert (table[lo_bin] <= got).all() and (got <= table[hi_bin + 1]).all()


def test_quantile_edge_cases():
    h = Histogram(LinearEdges(0.0, 1.0, 4))
    assert math.isnan(float(h.quantile(0.5)))
    h.update(torch.tensor([5.0, 6.0, -3.0]))
    assert h.quantile(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]  # clamped to the range
    with pytest.raises(ValueError):
        h.quantile(1.5)


def test_histogram_merge_rejects_other_edges():
    with pytest.raises(ValueError):
        Histogram(LinearEdges(0, 1, 4)).merge(Histogram(LinearEdges(0, 1, 5)))
    with pytest.raises(ValueError):
        Histogram(SignedLogEdges(0.01)).merge(Histogram(SignedLogEdges(0.02)))
