"""Accumulators against independent references (scipy, numpy, brute force).

Moment references are scipy.stats on the concatenated raw data, evaluated in long double
so that the reference itself is not the limiting precision for data far from zero.
"""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from qvd_bench.collect import accumulators, fused
from qvd_bench.collect.accumulators import (
    MOMENT_KEYS,
    ChannelMoments,
    Histogram,
    LinearEdges,
    Reservoir,
    SignedLogEdges,
    TemporalFeatures,
    batch_moments,
    combine_moments,
    edges_from_dict,
    moments_summary,
    reduce_moments,
    row_key,
    weight_channel_stats,
)
from qvd_bench.models import kernels

RTOL = 1e-8
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- references


def reference(values: np.ndarray) -> dict[str, float]:
    """scipy/numpy statistics of the finite values of a 1-D array."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return {"count": 0}
    ld = v.astype(np.longdouble)
    constant = v.min() == v.max()
    return {
        "count": v.size,
        "min": v.min(),
        "max": v.max(),
        "mean": float(np.mean(ld)),
        "variance": float(np.var(ld)),
        "skewness": math.nan if constant else float(scipy.stats.skew(ld, bias=True)),
        "kurtosis": math.nan if constant else float(scipy.stats.kurtosis(ld, bias=True)),
    }


def channel_columns(x: torch.Tensor, channel_dim: int) -> np.ndarray:
    """(N, C) float64 array with one column per channel."""
    a = x.double().movedim(channel_dim, -1).numpy()
    return a.reshape(-1, a.shape[-1])


def assert_stats_close(got: dict[str, torch.Tensor], ref: dict[str, float], c: int = 0) -> None:
    """Counts and extrema exactly; moments to rtol 1e-8 (g1, g2 also atol 1e-8: they are
    scale-free, and rtol alone means nothing near zero)."""
    assert int(got["count"][c]) == ref["count"]
    if ref["count"] == 0:
        return
    assert float(got["min"][c]) == ref["min"]
    assert float(got["max"][c]) == ref["max"]
    spread = math.sqrt(ref["variance"])
    np.testing.assert_allclose(float(got["mean"][c]), ref["mean"], rtol=RTOL, atol=RTOL * spread)
    np.testing.assert_allclose(float(got["variance"][c]), ref["variance"], rtol=RTOL)
    for k in ("skewness", "kurtosis"):
        np.testing.assert_allclose(float(got[k][c]), ref[k], rtol=RTOL, atol=RTOL)


def assert_channels_match(acc: ChannelMoments, columns: np.ndarray) -> None:
    got = acc.compute()
    for c in range(columns.shape[1]):
        col = columns[:, c]
        assert int(got["nan_count"][c]) == int(np.isnan(col).sum())
        assert int(got["inf_count"][c]) == int(np.isinf(col).sum())
        assert_stats_close(got, reference(col), c)


def activations(shape, channel_dim, seed=0, offset=0.0, dtype=torch.float32):
    """Channels with different shapes: normal, skewed, heavy-tailed, offset, small ints."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x.movedim(channel_dim, -1).clone()
    c = x.shape[-1]
    x[..., 0 % c] = torch.empty_like(x[..., 0]).exponential_(generator=g) * 3
    x[..., 1 % c] = x[..., 1 % c] ** 3
    x[..., 2 % c] = x[..., 2 % c] * 0.05 + 1e4
    x[..., 3 % c] = torch.randint(-2, 3, x[..., 3 % c].shape, generator=g).double()
    return (x + offset).movedim(-1, channel_dim).contiguous().to(dtype)


def assert_matches_float64_path(x: torch.Tensor, channel_dim: int) -> None:
    """A float32 tensor's moments agree with those of its float64 copy far below 1e-8."""
    fast = batch_moments(x, channel_dim)
    exact = batch_moments(x.double(), channel_dim)
    for k in ("count", "nan_count", "inf_count", "min", "max"):
        assert torch.equal(fast[k], exact[k]), k
    scale = exact["m2"] / exact["count"]
    torch.testing.assert_close(fast["mean"], exact["mean"], rtol=1e-13, atol=0)
    for p, k in ((2, "m2"), (3, "m3"), (4, "m4")):
        # relative to n·σ^p, the natural size of M_p
        err = (fast[k] - exact[k]).abs() / (exact["count"] * scale ** (p / 2))
        assert float(err.max()) < 1e-12, k


LINEAR_SHAPE, CONV_SHAPE = (3, 17, 6), (2, 5, 3, 4, 7)

needs_numba = pytest.mark.skipif(not fused.available(), reason="numba is not installed")


@pytest.fixture
def no_fused(monkeypatch):
    """float32 inputs take the low-precision path, as they do without numba."""
    monkeypatch.setattr(fused, "covers", lambda x3: False)


# --------------------------------------------------------------------------- ChannelMoments


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


@pytest.mark.parametrize(("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1)])
@pytest.mark.parametrize("chunk", [7, 40, 200])
def test_moments_in_pieces_match_scipy(shape, channel_dim, chunk, monkeypatch):
    monkeypatch.setattr(accumulators, "CHUNK_ELEMENTS", chunk)
    x = activations(shape, channel_dim, seed=8, offset=1e5)
    x.view(-1)[::97] = math.nan
    acc = ChannelMoments(x.shape[channel_dim])
    acc.update(x, channel_dim)
    assert_channels_match(acc, channel_columns(x, channel_dim))


def _as_acl(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """The (A, C, L) view batch_moments works on."""
    d = channel_dim % x.ndim
    return x.reshape(math.prod(x.shape[:d]), x.shape[d], -1)


@pytest.mark.parametrize(("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1)])
@pytest.mark.parametrize("piece", [1, 7, 40, 200, 10_000])
@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_low_precision_pieces_match_scipy(shape, channel_dim, piece, offset, monkeypatch, no_fused):
    """float32 inputs: one centre for all pieces, any piece size, rtol 1e-8 vs scipy."""
    monkeypatch.setattr(accumulators, "PIECE_ELEMENTS", piece)
    x = activations(shape, channel_dim, seed=9, offset=offset)
    assert accumulators._low_precision_moments(_as_acl(x, channel_dim)) is not None
    acc = ChannelMoments(x.shape[channel_dim])
    acc.update(x, channel_dim)
    assert_channels_match(acc, channel_columns(x, channel_dim))


@pytest.mark.parametrize(("shape", "channel_dim"), [((64, 4, 40), -1), ((2, 24, 8, 4), 1)])
@pytest.mark.parametrize("margin", [-1, 0, 1])
def test_low_precision_piece_boundaries(shape, channel_dim, margin, monkeypatch, no_fused):
    """Inputs just below, at and just above the piece size, and a row split in two."""
    x = activations(shape, channel_dim, seed=10, offset=3.0)
    x3 = _as_acl(x, channel_dim)
    for limit in (x.numel() + margin, x3[0].numel() + margin):
        monkeypatch.setattr(accumulators, "PIECE_ELEMENTS", limit)
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
def test_low_precision_path_agrees_with_float64_path(shape, channel_dim, monkeypatch, no_fused):
    """Same data as float32 and as float64: the two paths agree far below rtol 1e-8."""
    monkeypatch.setattr(accumulators, "PIECE_ELEMENTS", 4096)
    x = activations(shape, channel_dim, seed=12, offset=1e3)
    assert_matches_float64_path(x, channel_dim)


def test_low_precision_path_hands_over_far_centres_and_nonfinite_input(monkeypatch, no_fused):
    """The centre (the first piece's mean) far from the mean, or NaN/Inf: general path."""
    monkeypatch.setattr(accumulators, "PIECE_ELEMENTS", 64)
    x = torch.randn(4096, 3, generator=torch.Generator().manual_seed(13)) + 50.0
    x[:16, 1] += 1e4  # the first piece (21 rows) of channel 1: its mean lies ~12 σ off
    assert accumulators._low_precision_moments(_as_acl(x, -1)) is None
    acc = ChannelMoments(3)
    acc.update(x)
    assert_channels_match(acc, x.double().numpy())
    y = x.clone()
    y[:16, 1] -= 1e4
    assert accumulators._low_precision_moments(_as_acl(y, -1)) is not None
    y[7, 2] = math.inf
    assert accumulators._low_precision_moments(_as_acl(y, -1)) is None
    acc = ChannelMoments(3)
    acc.update(y)
    assert int(acc.inf_count[2]) == 1
    assert_channels_match(acc, y.double().numpy())
    y[9, 0] = math.nan
    assert accumulators._low_precision_moments(_as_acl(y, -1)) is None


@pytest.mark.parametrize("path", ["low_precision", pytest.param("fused", marks=needs_numba)])
def test_float32_constant_channels_are_exact(path, monkeypatch):
    if path == "low_precision":
        monkeypatch.setattr(fused, "covers", lambda x3: False)
        monkeypatch.setattr(accumulators, "PIECE_ELEMENTS", 10)
    x = torch.randn(40, 4)
    x[:, 1] = 0.1
    x[:, 3] = -3.7e5
    got = batch_moments(x, -1)
    for c, value in ((1, 0.1), (3, -3.7e5)):
        v = float(torch.tensor(value, dtype=torch.float32))
        assert float(got["mean"][c]) == v and float(got["min"][c]) == v
        assert all(float(got[k][c]) == 0.0 for k in ("m2", "m3", "m4"))


@needs_numba
@pytest.mark.parametrize(
    ("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1), ((96, 4, 320), -1)]
)
@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_fused_power_sums_match_numpy(shape, channel_dim, offset):
    """Centre = the mean; S_p about it, min and max against numpy in long double."""
    x = activations(shape, channel_dim, seed=14, offset=offset)
    x3 = _as_acl(x, channel_dim)
    assert fused.covers(x3)
    center, s1, s2, s3, s4 = fused.power_sums(x3)
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


@needs_numba
@pytest.mark.parametrize(
    ("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1), ((2, 64, 4, 8, 8), 1)]
)
@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_fused_path_matches_scipy_and_the_float64_path(shape, channel_dim, offset):
    x = activations(shape, channel_dim, seed=15, offset=offset)
    x3 = _as_acl(x, channel_dim)
    assert fused.channel_moments(x3, accumulators.CENTER_SPREAD) is not None
    acc = ChannelMoments(x.shape[channel_dim])
    acc.update(x, channel_dim)
    assert_channels_match(acc, channel_columns(x, channel_dim))
    assert_matches_float64_path(x, channel_dim)


@needs_numba
@pytest.mark.parametrize(("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1)])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_fused_path_hands_nonfinite_input_to_the_general_path(shape, channel_dim, bad):
    x = activations(shape, channel_dim, seed=16)
    x.view(-1)[5] = bad
    x3 = _as_acl(x, channel_dim)
    sums = fused.power_sums(x3)
    assert not np.isfinite(sums[4]).all()
    assert fused.channel_moments(x3, accumulators.CENTER_SPREAD) is None
    acc = ChannelMoments(x.shape[channel_dim])
    acc.update(x, channel_dim)
    assert_channels_match(acc, channel_columns(x, channel_dim))


@needs_numba
@pytest.mark.parametrize(("shape", "channel_dim"), [(LINEAR_SHAPE, -1), (CONV_SHAPE, 1)])
def test_fused_path_takes_strided_inputs(shape, channel_dim):
    """A transposed view (channels not in their contiguous place) gives the same result."""
    x = activations(shape, channel_dim, seed=17, offset=10.0)
    x3 = _as_acl(x, channel_dim)
    strided = x3.transpose(0, 1).contiguous().transpose(0, 1)  # (A, C, L), C outermost
    assert not strided.is_contiguous() and torch.equal(strided, x3)
    got = fused.channel_moments(strided, accumulators.CENTER_SPREAD)
    want = fused.channel_moments(x3.contiguous(), accumulators.CENTER_SPREAD)
    for k in MOMENT_KEYS:
        torch.testing.assert_close(got[k], want[k], rtol=1e-13, atol=0)
    acc = ChannelMoments(x.shape[channel_dim])
    acc.fold(batch_moments(strided, 1))
    assert_channels_match(acc, channel_columns(x, channel_dim))


def test_fused_path_takes_float32_cpu_tensors_only():
    x = torch.randn(3, 4, 5)
    assert fused.covers(x) == fused.available()
    assert fused.covers(x.transpose(0, 2)) == fused.available()
    assert not fused.covers(x.double())
    assert not fused.covers(x.half())
    assert not fused.covers(x[:0])


def test_update_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="channels"):
        ChannelMoments(4).update(torch.zeros(2, 5))


def test_merge_rejects_other_shapes_and_types():
    with pytest.raises(ValueError):
        ChannelMoments(4).merge(ChannelMoments(5))
    with pytest.raises(ValueError):
        ChannelMoments(4).merge(Histogram(LinearEdges(0, 1, 4)))


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


# --------------------------------------------------------------------------- properties


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


def copy(acc):
    return type(acc).from_state_dict(acc.state_dict())


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


# --------------------------------------------------------------------------- Histogram


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


@needs_numba
@pytest.mark.parametrize(
    "edges",
    [SignedLogEdges(), SignedLogEdges(0.05, 1e-3, 1e3), SignedLogEdges(0.001), SignedLogEdges(0.3)],
    ids=lambda e: f"{e.relative_error}-{e.min_abs}-{e.max_abs}",
)
def test_fused_signed_log_counts_equal_searchsorted_and_the_torch_path(edges, monkeypatch):
    x = _float32_grid_values(edges)
    assert fused.covers_histogram(x) and fused.bit_tables(edges) is not None
    h = Histogram(edges)
    h.update(x)
    finite = x[torch.isfinite(x)].double().numpy()
    ref = np.searchsorted(edges.edges().numpy(), finite, "right") - 1
    assert h.counts.tolist() == np.bincount(ref, minlength=edges.num_bins).tolist()
    assert (int(h.nan_count), int(h.inf_count)) == (2, 2)
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    assert not fused.covers_histogram(x)
    slow = Histogram(edges)
    slow.update(x)
    for key in ("counts", "nan_count", "inf_count"):
        assert torch.equal(h.state_dict()[key], slow.state_dict()[key])


@needs_numba
@pytest.mark.parametrize("stride", [1, 3])
def test_fused_histogram_counts_strided_rows_and_accumulates(stride, monkeypatch):
    edges = SignedLogEdges()
    x = _float32_grid_values(edges, seed=1)[: 41 * 137].reshape(41, 137)
    h = Histogram(edges)
    h.update(x[:20], stride=stride)
    h.update(x[20:], stride=stride)
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    slow = Histogram(edges)
    slow.update(x[:20], stride=stride)
    slow.update(x[20:], stride=stride)
    assert torch.equal(h.counts, slow.counts) and h.total == slow.total
    assert int(h.nan_count) == int(slow.nan_count) and int(h.inf_count) == int(slow.inf_count)


@needs_numba
def test_fused_histogram_leaves_other_inputs_to_the_torch_path():
    edges = SignedLogEdges()
    x = torch.randn(6, 5)
    assert not fused.covers_histogram(x.t())  # not contiguous
    assert not fused.covers_histogram(x.double())
    for other in (x.t(), x.double(), x.bfloat16()):
        h = Histogram(edges)
        h.update(other)
        ref = np.searchsorted(edges.edges().numpy(), other.double().numpy().ravel(), "right") - 1
        assert h.counts.tolist() == np.bincount(ref, minlength=edges.num_bins).tolist()
    # A grid too fine for a table of bit ranges is counted by the torch path.
    fine = SignedLogEdges(1e-6)
    assert fused.bit_tables(fine) is None
    h = Histogram(fine)
    h.update(x)
    assert h.total == 30


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


def test_signed_log_edges_have_bounded_relative_width():
    edges = SignedLogEdges(0.01, 1e-6, 1e6)
    table = edges.edges().numpy()
    pos = table[table > 0][:-1]
    ratio = pos[1:] / pos[:-1]
    np.testing.assert_allclose(ratio, edges.gamma, rtol=1e-12)
    assert pos[0] <= 1e-6 < pos[1] and pos[-2] < 1e6 <= pos[-1]
    half = len(table) // 2
    np.testing.assert_array_equal(table[:half], -table[half:][::-1])


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


# --------------------------------------------------------------------------- TemporalFeatures


def embedding(t: torch.Tensor, dim: int = 6) -> torch.Tensor:
    freqs = torch.arange(1, dim + 1, dtype=torch.float64)
    return torch.sin(t.double()[:, None] * freqs / 100)


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


# --------------------------------------------------------------------------- Reservoir


def _mix_reference(z: int) -> int:
    m = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def row_key_reference(seed, sample_id, timestep, branch, row) -> int:
    """The documented hash in unsigned 64-bit Python integers."""
    m = (1 << 64) - 1
    bits = int(np.float64(timestep + 0.0).view(np.uint64))
    h = seed & m
    for f in (sample_id, bits, branch, row):
        h = _mix_reference(((h ^ (f & m)) + 0x9E3779B97F4A7C15) & m)
    return h & ((1 << 63) - 1)


def test_row_key_matches_unsigned_reference_and_is_deterministic():
    ids, rows = torch.tensor([0, 1, 7, 123456789]), torch.arange(5)
    for seed, t, branch in ((0, 0.0, 0), (42, 999.0, 1), (-5, 0.125, 1), (2**40, -0.0, 0)):
        keys = row_key(seed, ids[:, None], t, branch, rows[None, :])
        assert keys.dtype == torch.int64 and bool((keys >= 0).all())
        assert torch.equal(keys, row_key(seed, ids[:, None], t, branch, rows[None, :]))
        for i, s in enumerate(ids.tolist()):
            for r in rows.tolist():
                assert int(keys[i, r]) == row_key_reference(seed, s, t, branch, r)
    assert len(set(row_key(3, torch.arange(1000), 1.0, 0, 0).tolist())) == 1000


def test_row_key_of_int_fields_matches_tensor_fields():
    # Int sample ids and branches are folded on the host; tensors take the general path.
    rows = torch.tensor([0, 1, 2047, -1, 2**62])
    for seed, sample, t, branch in (
        (0, 0, 901.0, 0),
        (-5, -3, -0.0, 1),
        (2**63 - 1, -(2**63), 1e300, 2**40),
        (12345, 2**63 - 1, 0.1, -1),
    ):
        keys = row_key(seed, sample, t, branch, rows)
        assert torch.equal(keys, row_key(seed, torch.tensor(sample), t, torch.tensor(branch), rows))
        assert keys.tolist() == [
            row_key_reference(seed, sample, t, branch, r) for r in rows.tolist()
        ]


RES_C, RES_CAP = 3, 20


def sample_rows(sample_id: int, timestep: float, branch: int, rows: int = 9) -> torch.Tensor:
    """Deterministic (rows, C) data for one sample and call."""
    g = torch.Generator().manual_seed(sample_id * 1000 + int(timestep) * 2 + branch)
    return torch.randn(rows, RES_C, generator=g)


CALLS = [(t, b) for t in (999.0, 500.0, 1.0) for b in (0, 1)]


def fill(res: Reservoir, samples, calls=CALLS, batch: int = 2) -> Reservoir:
    for t, b in calls:
        for i in range(0, len(samples), batch):
            ids = samples[i : i + batch]
            rows = torch.stack([sample_rows(s, t, b) for s in ids])
            res.update(rows, torch.tensor(ids), t, b)
    return res


def assert_reservoirs_identical(a: Reservoir, b: Reservoir) -> None:
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_reservoir_is_bottom_k_of_all_keys():
    samples = list(range(8))
    res = fill(Reservoir(RES_CAP, RES_C, seed=11), samples)
    everything = [
        (row_key_reference(11, s, t, b, r), s, t, b, r)
        for t, b in CALLS
        for s in samples
        for r in range(9)
    ]
    best = sorted(everything)[:RES_CAP]
    state = res.state_dict()
    assert state["keys"].tolist() == [k for k, *_ in best]
    assert state["sample_ids"].tolist() == [s for _, s, *_ in best]
    assert state["timesteps"].tolist() == [t for _, _, t, _, _ in best]
    assert state["branches"].tolist() == [b for *_, b, _ in best]
    assert state["row_indices"].tolist() == [r for *_, r in best]
    for row, (_, s, t, b, r) in zip(state["rows"], best):
        assert torch.equal(row, sample_rows(s, t, b)[r])


def test_reservoirs_of_one_call_share_keys_only_where_they_agree():
    # Layers of one denoiser call reuse the call's keys; another seed, row count, sample,
    # timestep or branch gets its own (each reservoir is its own bottom-k of row_key).
    calls = [(11, [0, 1], 500.0, 0, 9), (11, [0, 1], 500.0, 0, 9), (12, [0, 1], 500.0, 0, 9),
             (11, [0, 1], 500.0, 0, 5), (11, [1, 2], 500.0, 0, 9), (11, [0, 1], 250.0, 0, 9),
             (11, [0, 1], 500.0, 1, 9)]  # fmt: skip
    for seed, ids, t, b, rows in calls:
        res = Reservoir(4, RES_C, seed=seed)
        res.update(torch.stack([sample_rows(s, t, b)[:rows] for s in ids]), ids, t, b)
        everything = sorted(row_key_reference(seed, s, t, b, r) for s in ids for r in range(rows))
        assert res.state_dict()["keys"].tolist() == everything[:4]


def test_reservoir_sharded_updates_equal_single_pass():
    single = fill(Reservoir(RES_CAP, RES_C, seed=5), list(range(10)), batch=3)
    shards = [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    parts = [fill(Reservoir(RES_CAP, RES_C, seed=5), s, batch=1) for s in shards]
    assert_reservoirs_identical(parts[2].merge(parts[0]).merge(parts[1]), single)


def test_reservoir_takes_sample_ids_as_ints_or_tensor():
    rows = torch.stack([sample_rows(s, 7.0, 1, rows=40) for s in (3, 8)])
    a, b = Reservoir(25, RES_C, seed=2), Reservoir(25, RES_C, seed=2)
    for t in (999.0, 7.0, 3.0):
        a.update(rows, torch.tensor([3, 8]), t, 1)
        b.update(rows, (3, 8), t, 1)
    assert_reservoirs_identical(a, b)
    with pytest.raises(ValueError):
        b.update(rows, (3,), 1.0, 0)


def test_reservoir_below_capacity_and_idempotent_merge():
    res = fill(Reservoir(1000, RES_C, seed=0), [0, 1])
    assert len(res) == 2 * 9 * len(CALLS)
    again = copy(res).merge(copy(res))
    assert_reservoirs_identical(again, res)


@PROPERTY
@given(
    st.permutations(list(range(9))),
    st.lists(st.integers(0, 2), min_size=9, max_size=9),
    st.integers(1, 40),
    st.integers(0, 2**62),
)
def test_reservoir_independent_of_sharding_and_order(order, shard_of, capacity, seed):
    single = fill(Reservoir(capacity, RES_C, seed=seed), list(range(9)), batch=9)
    shards = [[s for s in order if shard_of[s] == k] for k in range(3)]
    parts = [
        fill(Reservoir(capacity, RES_C, seed=seed), s, calls=CALLS[::-1], batch=2) for s in shards
    ]
    random.Random(seed).shuffle(parts)
    assert_reservoirs_identical(parts[0].merge(parts[1].merge(parts[2])), single)


def test_bottom_k_breaks_key_ties_by_row_identity_and_drops_duplicates():
    rng = random.Random(1)
    rows = [
        (
            rng.randrange(4),
            rng.randrange(3),
            float(rng.randrange(2)),
            rng.randrange(2),
            rng.randrange(3),
        )
        for _ in range(200)
    ]
    ids = {
        name: torch.tensor(
            [r[i] for r in rows], dtype=torch.float64 if name == "timesteps" else torch.int64
        )
        for i, name in enumerate(accumulators.ROW_ID_FIELDS)
    }
    for k in (1, 5, 17, 500):
        got = [rows[i] for i in accumulators._bottom_k(ids, k).tolist()]
        assert got == sorted(set(rows))[:k]


def test_reservoir_rejects_other_config_and_bad_rows():
    with pytest.raises(ValueError):
        Reservoir(4, 3, seed=0).merge(Reservoir(4, 3, seed=1))
    with pytest.raises(ValueError):
        Reservoir(4, 3, seed=0).merge(Reservoir(5, 3, seed=0))
    with pytest.raises(ValueError):
        Reservoir(4, 3, seed=0).update(torch.zeros(2, 5, 4), torch.tensor([0, 1]), 1.0, 0)
    with pytest.raises(ValueError):
        Reservoir(4, 3, seed=0).update(torch.zeros(2, 5, 3), torch.tensor([0]), 1.0, 0)


# --------------------------------------------------------------------------- state dicts


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
    accumulators.fold_many(list(zip(accs, batches)))
    for got, want in zip(accs, one_by_one):
        for k in MOMENT_KEYS:
            assert torch.equal(getattr(got, k), getattr(want, k)), k
    with pytest.raises(ValueError, match="at most once"):
        accumulators.fold_many([(accs[0], batches[0]), (accs[0], batches[0])])


def test_fold_rejects_statistics_of_another_width():
    with pytest.raises(ValueError, match="channels"):
        ChannelMoments(4).fold(batch_moments(torch.zeros(2, 5), -1))
