"""TemporalFeatures: the union of timesteps and its conflicts."""

from __future__ import annotations

import functools

import pytest
import torch

from qvd_bench.collect.temporal import TemporalFeatures
from tests.collect.helpers import (
    copy,
    embedding,
)


def test_temporal_features_union_sorted_and_order_free():
    ts = torch.tensor([999.0, 0.0, 500.0, 250.0, 750.0, 1.0])
    shards = [
        (ts[:2], embedding(ts[:2])),
        (ts[2:], embedding(ts[2:])),
        (ts[1:4], embedding(ts[1:4])),
    ]
    results = []
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        parts = []
        for i in order:
            f = TemporalFeatures()
            f.update(shards[i][1].float(), shards[i][0])
            parts.append(f)
        results.append(functools.reduce(lambda a, b: a.merge(b), parts).as_matrix())
    times, vectors = results[0]
    assert times.tolist() == sorted(ts.tolist())
    torch.testing.assert_close(vectors, embedding(times).float().double())
    for t, v in results[1:]:
        assert torch.equal(t, times) and torch.equal(v, vectors)


def test_temporal_features_reject_conflicts_and_dimension_changes():
    f = TemporalFeatures()
    f.update(embedding(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))
    f.update(embedding(torch.tensor([2.0])) * (1 + 1e-8), torch.tensor([2.0]))  # within rtol
    with pytest.raises(ValueError, match="timestep 2.0"):
        f.update(embedding(torch.tensor([2.0])) * 1.01, torch.tensor([2.0]))
    g = TemporalFeatures()
    g.update(embedding(torch.tensor([1.0])) + 1, torch.tensor([1.0]))
    with pytest.raises(ValueError):
        copy(f).merge(g)
    h = TemporalFeatures()
    h.update(embedding(torch.tensor([3.0]), dim=4), torch.tensor([3.0]))
    with pytest.raises(ValueError):
        copy(f).merge(h)
    with pytest.raises(ValueError):
        f.update(embedding(torch.tensor([1.0])), torch.tensor([1.0, 2.0]))
