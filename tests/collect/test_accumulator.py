"""The Accumulator base: state dicts of every accumulator, through safetensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from qvd_bench.collect.histogram import Histogram
from qvd_bench.collect.moments import ChannelMoments
from qvd_bench.collect.reservoir import Reservoir
from qvd_bench.collect.temporal import TemporalFeatures
from qvd_bench.numerics.edges import LinearEdges, SignedLogEdges
from tests.collect.helpers import (
    RES_C,
    embedding,
    fill,
)
from tests.references import (
    CONV_SHAPE,
    activations,
)


def filled_accumulators():
    x = activations(CONV_SHAPE, 1, seed=9)
    moments = ChannelMoments(5)
    moments.update(x, 1)
    hist = Histogram(SignedLogEdges())
    hist.update(x)
    temporal = TemporalFeatures()
    temporal.update(embedding(torch.tensor([3.0, 1.0])), torch.tensor([3.0, 1.0]))
    reservoir = fill(Reservoir(7, RES_C, seed=1), [0, 1, 2])
    empty = [
        ChannelMoments(2),
        Histogram(LinearEdges(0, 1, 3)),
        TemporalFeatures(),
        Reservoir(3, 2, 0),
    ]
    return [moments, hist, temporal, reservoir, *empty]


@pytest.mark.parametrize("index", range(8))
def test_state_dict_round_trips_through_safetensors(index, tmp_path):
    acc = filled_accumulators()[index]
    state = acc.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    path = tmp_path / "state.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = type(acc).from_state_dict(load_file(str(path)))
    for k, v in loaded.state_dict().items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    if isinstance(acc, Histogram):
        assert loaded.edges == acc.edges


def test_state_dict_dtypes():
    moments, hist, temporal, reservoir = filled_accumulators()[:4]
    s = moments.state_dict()
    assert all(s[k].dtype == torch.int64 for k in ("count", "nan_count", "inf_count"))
    assert all(s[k].dtype == torch.float64 for k in ("min", "max", "mean", "m2", "m3", "m4"))
    assert hist.counts.dtype == torch.int64
    assert temporal.vectors.dtype == torch.float64
    assert reservoir.rows.dtype == torch.float32 and reservoir.timesteps.dtype == torch.float64


def test_from_state_dict_rejects_incomplete_state():
    state = dict(ChannelMoments(3).state_dict())
    del state["m4"]
    with pytest.raises(ValueError, match="m4"):
        ChannelMoments.from_state_dict(state)
