"""The moment formulas and the moments engine (compiled kernel and PyTorch path) against
scipy and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qvd_bench.collect.moments import ChannelMoments
from qvd_bench.numerics import moments
from qvd_bench.numerics.kernels import KERNELS_ENV
from qvd_bench.numerics.moments import (
    MOMENT_KEYS,
    batch_moments,
    combine_moments,
    moments_summary,
    reduce_moments,
    weight_channel_stats,
)
from tests.references import (
    CONV_SHAPE,
    LINEAR_SHAPE,
    activations,
    assert_channels_match,
    assert_matches_float64_path,
    assert_stats_close,
    channel_columns,
    reference,
)


@pytest.mark.parametrize(("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1)])
@pytest.mark.parametrize("chunk", [7, 40, 200])
def test_moments_in_pieces_match_scipy(shape, channel_dim, chunk, monkeypatch):
    monkeypatch.setattr(moments, "CHUNK_ELEMENTS", chunk)
    x = activations(shape, channel_dim, seed=8, offset=1e5)
    x.view(-1)[::97] = math.nan
    acc = ChannelMoments(x.shape[channel_dim])
    acc.update(x, channel_dim)
    assert_channels_match(acc, channel_columns(x, channel_dim))


def _as_acl(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """The (A, C, L) view batch_moments works on."""
    d = channel_dim % x.ndim
    return x.reshape(math.prod(x.shape[:d]), x.shape[d], -1)


@pytest.fixture
def torch_path(monkeypatch):
    """float32 CPU inputs take the PyTorch path, as with ``QVD_BENCH_KERNELS=torch``."""
    monkeypatch.setenv(KERNELS_ENV, "torch")


@pytest.mark.parametrize(("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1)])
@pytest.mark.parametrize("piece", [1, 7, 40, 200, 10_000])
@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_torch_path_pieces_match_scipy(shape, channel_dim, piece, offset, monkeypatch, torch_path):
    """float32 inputs on the PyTorch path: any piece size, rtol 1e-8 vs scipy."""
    monkeypatch.setattr(moments, "CHUNK_ELEMENTS", piece)
    x = activations(shape, channel_dim, seed=9, offset=offset)
    assert not moments.kernel_takes(_as_acl(x, channel_dim))
    acc = ChannelMoments(x.shape[channel_dim])
    acc.update(x, channel_dim)
    assert_channels_match(acc, channel_columns(x, channel_dim))


@pytest.mark.parametrize(("shape", "channel_dim"), [((64, 4, 40), -1), ((2, 24, 8, 4), 1)])
@pytest.mark.parametrize("margin", [-1, 0, 1])
def test_torch_path_piece_boundaries(shape, channel_dim, margin, monkeypatch, torch_path):
    """Inputs just below, at and just above the piece size, and a row split in two."""
    x = activations(shape, channel_dim, seed=10, offset=3.0)
    x3 = _as_acl(x, channel_dim)
    for limit in (x.numel() + margin, x3[0].numel() + margin):
        monkeypatch.setattr(moments, "CHUNK_ELEMENTS", limit)
        acc = ChannelMoments(x.shape[channel_dim])
        acc.update(x, channel_dim)
        assert_channels_match(acc, channel_columns(x, channel_dim))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1)])
def test_half_precision_inputs_match_scipy_on_their_values(dtype, shape, channel_dim):
    x = activations(shape, channel_dim, seed=11, offset=100.0).to(dtype)
    acc = ChannelMoments(x.shape[channel_dim])
    acc.update(x, channel_dim)
    assert_channels_match(acc, channel_columns(x, channel_dim))


@pytest.mark.parametrize(("shape", "channel_dim"), [((96, 4, 320), -1), ((2, 64, 4, 8, 8), 1)])
def test_torch_path_agrees_with_float64_path(shape, channel_dim, monkeypatch, torch_path):
    """Same data as float32 and as float64: the two agree far below rtol 1e-8."""
    monkeypatch.setattr(moments, "CHUNK_ELEMENTS", 4096)
    x = activations(shape, channel_dim, seed=12, offset=1e3)
    assert_matches_float64_path(x, channel_dim)


def test_torch_path_takes_far_off_pieces_and_nonfinite_input(monkeypatch, torch_path):
    """A first piece far from the channel mean, then ±Inf and NaN: still scipy's figures."""
    monkeypatch.setattr(moments, "CHUNK_ELEMENTS", 64)
    x = torch.randn(4096, 3, generator=torch.Generator().manual_seed(13)) + 50.0
    x[:16, 1] += 1e4  # the first piece (21 rows) of channel 1: its mean lies ~12 σ off
    acc = ChannelMoments(3)
    acc.update(x)
    assert_channels_match(acc, x.double().numpy())
    y = x.clone()
    y[:16, 1] -= 1e4
    y[7, 2] = math.inf
    acc = ChannelMoments(3)
    acc.update(y)
    assert int(acc.inf_count[2]) == 1
    assert_channels_match(acc, y.double().numpy())
    y[9, 0] = math.nan
    acc = ChannelMoments(3)
    acc.update(y)
    assert int(acc.nan_count[0]) == 1
    assert_channels_match(acc, y.double().numpy())


@pytest.mark.parametrize("path", ["torch", "kernel"])
def test_float32_constant_channels_are_exact(path, monkeypatch):
    if path == "torch":
        monkeypatch.setenv(KERNELS_ENV, "torch")
        monkeypatch.setattr(moments, "CHUNK_ELEMENTS", 10)
    x = torch.randn(40, 4)
    x[:, 1] = 0.1
    x[:, 3] = -3.7e5
    got = batch_moments(x, -1)
    for c, value in ((1, 0.1), (3, -3.7e5)):
        v = float(torch.tensor(value, dtype=torch.float32))
        assert float(got["mean"][c]) == v and float(got["min"][c]) == v
        assert all(float(got[k][c]) == 0.0 for k in ("m2", "m3", "m4"))


@pytest.mark.parametrize(
    ("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1), ((96, 4, 320), -1)]
)
@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_kernel_power_sums_match_numpy(shape, channel_dim, offset):
    """Centre = the mean; S_p about it, min and max against numpy in long double."""
    x = activations(shape, channel_dim, seed=14, offset=offset)
    x3 = _as_acl(x, channel_dim)
    assert moments.kernel_takes(x3)
    center, s1, s2, s3, s4 = moments.power_sums(x3)
    columns = channel_columns(x, channel_dim).astype(np.longdouble)
    np.testing.assert_allclose(center, columns.mean(0), rtol=1e-15)
    deviations = columns - center
    sigma = columns.std(0)
    n = columns.shape[0]
    for p, got in ((1, s1), (2, s2), (3, s3), (4, s4)):
        want = (deviations**p).sum(0)
        # relative to n·σ^p, the natural size of S_p (S_1 and S_3 can be near zero)
        err = np.abs(got - want) / (n * sigma**p)
        assert float(err.max()) < 1e-13, p


@pytest.mark.parametrize(
    ("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1), ((2, 64, 4, 8, 8), 1)]
)
@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_kernel_matches_scipy_and_the_float64_path(shape, channel_dim, offset):
    x = activations(shape, channel_dim, seed=15, offset=offset)
    x3 = _as_acl(x, channel_dim)
    assert moments.kernel_moments(x3) is not None
    acc = ChannelMoments(x.shape[channel_dim])
    acc.update(x, channel_dim)
    assert_channels_match(acc, channel_columns(x, channel_dim))
    assert_matches_float64_path(x, channel_dim)


@pytest.mark.parametrize(("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1)])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_kernel_hands_nonfinite_input_to_the_torch_path(shape, channel_dim, bad):
    x = activations(shape, channel_dim, seed=16)
    x.view(-1)[5] = bad
    x3 = _as_acl(x, channel_dim)
    sums = moments.power_sums(x3)
    assert not np.isfinite(sums[4]).all()
    assert moments.kernel_moments(x3) is None
    acc = ChannelMoments(x.shape[channel_dim])
    acc.update(x, channel_dim)
    assert_channels_match(acc, channel_columns(x, channel_dim))


@pytest.mark.parametrize(("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1)])
def test_kernel_takes_strided_inputs(shape, channel_dim):
    """A transposed view (channels not in their contiguous place) gives the same result."""
    x = activations(shape, channel_dim, seed=17, offset=10.0)
    x3 = _as_acl(x, channel_dim)
    strided = x3.transpose(0, 1).contiguous().transpose(0, 1)  # (A, C, L), C outermost
    assert not strided.is_contiguous() and torch.equal(strided, x3)
    got = moments.kernel_moments(strided)
    want = moments.kernel_moments(x3.contiguous())
    for k in MOMENT_KEYS:
        torch.testing.assert_close(got[k], want[k], rtol=1e-13, atol=0)
    acc = ChannelMoments(x.shape[channel_dim])
    acc.fold(batch_moments(strided, 1))
    assert_channels_match(acc, channel_columns(x, channel_dim))


def test_kernel_takes_float32_cpu_tensors_only(monkeypatch):
    x = torch.randn(3, 4, 5)
    assert moments.kernel_takes(x)
    assert moments.kernel_takes(x.transpose(0, 2))
    assert not moments.kernel_takes(x.double())
    assert not moments.kernel_takes(x.half())
    assert not moments.kernel_takes(x[:0])
    monkeypatch.setenv(KERNELS_ENV, "torch")
    assert not moments.kernel_takes(x)


def test_reduce_moments_over_channels_matches_scipy_on_flattened_tensor():
    x = activations((4, 9, 33), -1, seed=6, offset=1e5, dtype=torch.float64)
    x[0, 0, 5] = math.nan
    acc = ChannelMoments(33)
    acc.update(x)
    total = reduce_moments(acc.state_dict(), 0)
    assert all(v.shape == () for v in total.values())
    got = {**total, **moments_summary(total)}
    assert int(total["nan_count"]) == 1
    assert_stats_close({k: v[None] for k, v in got.items()}, reference(x.numpy().ravel()))


def test_reduce_moments_over_several_axes():
    x = torch.randn(6, 5, 4, dtype=torch.float64) * 2 + 7
    # One "channel" per (j, k), with the 6 values x[:, j, k].
    stats = {k: v.reshape(5, 4) for k, v in batch_moments(x.reshape(6, 20), -1).items()}
    data = x.numpy()
    cases = [
        ((0, 1), [data.ravel()]),
        (1, [data[:, j, :].ravel() for j in range(5)]),
        (0, [data[:, :, k].ravel() for k in range(4)]),
    ]
    for dims, columns in cases:
        reduced = reduce_moments(stats, dims)
        got = {k: v.reshape(-1) for k, v in {**reduced, **moments_summary(reduced)}.items()}
        for c, column in enumerate(columns):
            assert_stats_close(got, reference(column), c)


def test_combine_moments_identity_is_empty_state():
    x = torch.randn(20, 3, dtype=torch.float64)
    stats = batch_moments(x, -1)
    empty = ChannelMoments(3).state_dict()
    for merged in (combine_moments(stats, empty), combine_moments(empty, stats)):
        for k in MOMENT_KEYS:
            assert torch.equal(merged[k], stats[k]), k


def test_weight_channel_stats_match_numpy():
    w = torch.randn(8, 4, 3, 3) * torch.linspace(0.1, 2, 8)[:, None, None, None]
    got = weight_channel_stats(w)
    rows = w.reshape(8, -1).double().numpy()
    for o in range(8):
        ref = reference(rows[o])
        assert float(got["absmax"][o]) == np.abs(rows[o]).max()
        assert_stats_close({**got, "count": torch.full((8,), 36)}, ref, o)
