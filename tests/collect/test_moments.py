"""ChannelMoments: updates, merges and folds against scipy."""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qvd_bench.collect.histogram import Histogram
from qvd_bench.collect.moments import ChannelMoments, fold_many
from qvd_bench.numerics.edges import LinearEdges
from qvd_bench.numerics.moments import (
    MOMENT_KEYS,
    batch_moments,
)
from tests.collect.helpers import (
    copy,
)
from tests.references import (
    CONV_SHAPE,
    LINEAR_SHAPE,
    PROPERTY,
    RTOL,
    activations,
    assert_channels_match,
    channel_columns,
)


@pytest.mark.parametrize(("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1)])
@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_moments_one_pass_match_scipy(shape, channel_dim, offset):
    x = activations(shape, channel_dim, offset=offset)
    acc = ChannelMoments(x.shape[channel_dim])
    acc.update(x, channel_dim)
    assert_channels_match(acc, channel_columns(x, channel_dim))


@pytest.mark.parametrize(("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1)])
def test_moments_of_splits_merged_in_any_order_match_scipy(shape, channel_dim):
    x = activations(shape, channel_dim, seed=1, dtype=torch.float64)
    rng = random.Random(0)
    axis = 0 if channel_dim == 1 else 1  # split along a non-channel axis
    for _ in range(4):
        cuts = sorted(rng.sample(range(1, x.shape[axis]), min(3, x.shape[axis] - 1)))
        chunks = torch.tensor_split(x, cuts, dim=axis)
        parts = []
        for chunk in chunks:
            acc = ChannelMoments(x.shape[channel_dim])
            acc.update(chunk, channel_dim)
            parts.append(acc)
        rng.shuffle(parts)
        merged = functools.reduce(lambda a, b: a.merge(b), parts)
        assert_channels_match(merged, channel_columns(x, channel_dim))


@pytest.mark.parametrize(("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1)])
def test_nan_and_inf_are_counted_and_excluded(shape, channel_dim):
    x = activations(shape, channel_dim, seed=2)
    flat = x.view(-1)
    g = torch.Generator().manual_seed(3)
    idx = torch.randperm(flat.numel(), generator=g)[:12]
    flat[idx[:5]] = math.nan
    flat[idx[5:9]] = math.inf
    flat[idx[9:]] = -math.inf
    acc = ChannelMoments(x.shape[channel_dim])
    half = x.shape[0] // 2
    acc.update(x[:half], channel_dim)
    acc.update(x[half:], channel_dim)
    got = acc.compute()
    assert int(got["nan_count"].sum()) == 5 and int(got["inf_count"].sum()) == 7
    assert all(torch.isfinite(got[k]).all() for k in ("min", "max", "mean", "variance"))
    assert_channels_match(acc, channel_columns(x, channel_dim))


def test_all_nonfinite_channel_has_no_data():
    x = torch.randn(10, 3)
    x[:, 1] = math.nan
    x[::2, 1] = math.inf
    acc = ChannelMoments(3)
    acc.update(x)
    got = acc.compute()
    assert got["count"].tolist() == [10, 0, 10]
    assert got["nan_count"].tolist() == [0, 5, 0] and got["inf_count"].tolist() == [0, 5, 0]
    assert all(math.isnan(float(got[k][1])) for k in ("min", "max", "mean", "variance"))
    assert_channels_match(acc, x.double().numpy())


@pytest.mark.parametrize("value", [0.1, -3.7e5, 0.0])
def test_constant_channels_give_nan_skew_and_kurtosis(value):
    x = activations(CONV_SHAPE, 1, seed=4, dtype=torch.float64)
    x[:, 2] = value
    parts = [ChannelMoments(5) for _ in range(2)]
    parts[0].update(x[:1], 1)
    parts[1].update(x[1:], 1)
    got = parts[0].merge(parts[1]).compute()
    assert float(got["mean"][2]) == value and float(got["variance"][2]) == 0.0
    assert math.isnan(float(got["skewness"][2])) and math.isnan(float(got["kurtosis"][2]))
    assert int(got["count"][2]) == x[:, 2].numel()
    assert torch.isfinite(got["skewness"][[0, 1, 3, 4]]).all()


def test_update_accepts_low_precision_and_noncontiguous_inputs():
    x = activations(CONV_SHAPE, 1, seed=5)
    acc = ChannelMoments(5)
    acc.update(x.to(torch.bfloat16), 1)
    assert_channels_match(acc, channel_columns(x.to(torch.bfloat16), 1))
    t = x.transpose(1, 4)  # channels now on axis 4, not contiguous
    acc = ChannelMoments(5)
    acc.update(t, 4)
    assert_channels_match(acc, channel_columns(x, 1))


def test_update_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="channels"):
        ChannelMoments(4).update(torch.zeros(2, 5))


def test_merge_rejects_other_shapes_and_types():
    with pytest.raises(ValueError):
        ChannelMoments(4).merge(ChannelMoments(5))
    with pytest.raises(ValueError):
        ChannelMoments(4).merge(Histogram(LinearEdges(0, 1, 4)))


@st.composite
def moment_batches(draw):
    """Three batches of (rows, C) float64 data, |x| <= 1e6, same channels.

    Large offsets relative to the spread (1e5 ± 1e-2) are where naive power sums fail.
    """
    channels = draw(st.integers(1, 4))
    offset = draw(st.sampled_from([0.0, 3.0, -1e3, 1e5, -1e5]))
    scale = draw(st.sampled_from([1e-2, 1.0, 1e2]))
    kind = draw(st.sampled_from(["normal", "exponential", "ints", "cubed"]))
    nonfinite = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    sizes = draw(st.lists(st.integers(0, 25), min_size=3, max_size=3))
    rng = np.random.default_rng(seed)
    batches = []
    for n in sizes:
        if kind == "normal":
            z = rng.standard_normal((n, channels))
        elif kind == "exponential":
            z = rng.exponential(size=(n, channels))
        elif kind == "ints":
            z = rng.integers(-2, 3, size=(n, channels)).astype(float)
        else:
            z = rng.standard_normal((n, channels)) ** 3
        x = offset + scale * z
        if nonfinite and n:
            x.flat[rng.integers(0, x.size, 2)] = [math.nan, -math.inf]
        batches.append(torch.from_numpy(x))
    return batches


def moments_of(batch: torch.Tensor) -> ChannelMoments:
    acc = ChannelMoments(batch.shape[1])
    acc.update(batch)
    return acc


def assert_moments_equivalent(a: ChannelMoments, b: ChannelMoments) -> None:
    """Counts and extrema exactly, moments to rtol 1e-8."""
    sa, sb = a.state_dict(), b.state_dict()
    for k in ("count", "nan_count", "inf_count", "min", "max"):
        assert torch.equal(sa[k], sb[k]), k
    ca, cb = a.compute(), b.compute()
    spread = cb["variance"].nan_to_num(0).sqrt()
    both_nan = torch.isnan(ca["mean"]) & torch.isnan(cb["mean"])
    diff = (ca["mean"] - cb["mean"]).abs()
    assert (both_nan | (diff <= RTOL * (cb["mean"].abs() + spread))).all()
    torch.testing.assert_close(ca["variance"], cb["variance"], rtol=RTOL, atol=0, equal_nan=True)
    for k in ("skewness", "kurtosis"):
        torch.testing.assert_close(ca[k], cb[k], rtol=RTOL, atol=RTOL, equal_nan=True)


@PROPERTY
@given(moment_batches())
def test_moments_merge_is_associative_commutative_and_matches_scipy(batches):
    a, b, c = (moments_of(x) for x in batches)
    left = copy(a).merge(copy(b)).merge(copy(c))
    right = copy(a).merge(copy(b).merge(copy(c)))
    swapped = copy(c).merge(copy(a)).merge(copy(b))
    assert_moments_equivalent(left, right)
    assert_moments_equivalent(left, swapped)
    assert_moments_equivalent(copy(a).merge(copy(b)), copy(b).merge(copy(a)))
    one_pass = moments_of(torch.cat(batches))
    assert_moments_equivalent(left, one_pass)
    assert_channels_match(left, torch.cat(batches).numpy())


def test_fold_many_equals_folding_one_by_one_bit_for_bit():
    generator = torch.Generator().manual_seed(21)

    def filled(channels: int, offset: float) -> ChannelMoments:
        acc = ChannelMoments(channels)
        acc.update(torch.randn(50, channels, generator=generator) * 3.0 + offset)
        return acc

    sizes = (1, 5, 320, 7, 64)
    accs = [filled(c, 10.0 * i) for i, c in enumerate(sizes)]
    accs.append(ChannelMoments(3))  # empty: takes the batch as it is
    accs.append(ChannelMoments.from_state_dict(filled(4, -2.0).state_dict()))
    batches = [
        batch_moments(torch.randn(30, acc.channels, generator=generator) + 1e3, -1) for acc in accs
    ]
    one_by_one = [ChannelMoments.from_state_dict(acc.state_dict()) for acc in accs]
    one_by_one[5] = ChannelMoments(3)
    for acc, batch in zip(one_by_one, batches):
        acc.fold(batch)
    fold_many(list(zip(accs, batches)))
    for got, want in zip(accs, one_by_one):
        for k in MOMENT_KEYS:
            assert torch.equal(getattr(got, k), getattr(want, k)), k
    with pytest.raises(ValueError, match="at most once"):
        fold_many([(accs[0], batches[0]), (accs[0], batches[0])])


def test_fold_rejects_statistics_of_another_width():
    with pytest.raises(ValueError, match="channels"):
        ChannelMoments(4).fold(batch_moments(torch.zeros(2, 5), -1))
