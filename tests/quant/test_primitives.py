import math

import numpy as np
import pytest
import torch

from qvd_bench.errors import UserError
from qvd_bench.numerics import grid as G
from qvd_bench.quant import primitives as P

BITS = range(2, 17)


def _data(seed=0, shape=(3, 40, 24)):
    g = torch.Generator().manual_seed(seed)
    # Heavy-ish tails and an offset, so ranges are asymmetric and rounding varied.
    return torch.randn(shape, generator=g) ** 3 + 0.3


def _np_fake_quant(x, scale, zero_point, q_min, q_max):
    """Plain numpy float32 reference: (clamp(round(x·(1/s)) + z) − z)·s."""
    x = np.asarray(x, dtype=np.float32)
    s = np.asarray(scale, dtype=np.float32)
    z = np.asarray(zero_point, dtype=np.float32)
    q = np.clip(np.round(x * (np.float32(1.0) / s)) + z, q_min, q_max)
    return ((q - z) * s).astype(np.float32)


def _np_qparams(lo, hi, bits):
    """numpy float64 reference of the asymmetric qparams."""
    q_max = 2**bits - 1
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = np.maximum((hi - lo) / q_max, np.finfo(np.float32).eps)
    zero_point = np.clip(-np.round(lo / scale), 0, q_max)
    return scale.astype(np.float32), zero_point.astype(np.int32)


# --------------------------------------------------------------------------- bits


@pytest.mark.parametrize("bits", [1, 17, 0, 2.5, True, "8"])
def test_bits_out_of_range(bits):
    with pytest.raises(UserError):
        P.fake_quant_dynamic_per_token(torch.zeros(2, 3), bits)


# --------------------------------------------------------------------------- affine vs torch


@pytest.mark.parametrize("bits", BITS)
def test_per_tensor_equals_torch(bits):
    x = _data(bits)
    for symmetric in (False, True):
        lo, hi = x.min() * 0.8, x.max() * 0.6  # clipped: the clamp is exercised
        scale, zero_point = G.affine_qparams(lo, hi, bits, symmetric)
        q_min, q_max = G.quant_range(bits, symmetric)
        ours = P.fake_quant_affine(x, scale, zero_point, bits, symmetric=symmetric)
        ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), q_min, q_max)
        assert torch.equal(ours, ref)
        # The Python-number path used by the modules gives the same numbers.
        fast = P.fake_quant(x, float(scale), int(zero_point), q_min, q_max)
        assert torch.equal(fast, ref)
        assert ours.unique().numel() <= 2**bits


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_per_channel_equals_torch(bits, axis):
    x = _data(100 + bits)
    dims = [d for d in range(3) if d != axis % 3]
    lo, hi = x.amin(dims) * 0.9, x.amax(dims) * 0.7
    for symmetric in (False, True):
        scale, zero_point = G.affine_qparams(lo, hi, bits, symmetric)
        q_min, q_max = G.quant_range(bits, symmetric)
        ours = P.fake_quant_affine(x, scale, zero_point, bits, axis=axis, symmetric=symmetric)
        ref = torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis % 3, q_min, q_max)
        assert torch.equal(ours, ref)
        for c in range(x.shape[axis]):
            assert ours.select(axis, c).unique().numel() <= 2**bits
        if symmetric:  # a Python int zero point (one scalar clamp): the same numbers
            shape = [1, 1, 1]
            shape[axis % 3] = -1
            one_clamp = P.fake_quant(x, scale.reshape(shape), 0, q_min, q_max)
            assert torch.equal(one_clamp, ref)


@pytest.mark.parametrize("bits", BITS)
def test_affine_equals_numpy_reference(bits):
    x = _data(200 + bits)
    lo, hi = x.amin((0, 1)).double(), x.amax((0, 1)).double()  # ranges from statistics
    scale, zero_point = G.affine_qparams(lo, hi, bits)
    ref_scale, ref_zp = _np_qparams(lo.numpy(), hi.numpy(), bits)
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    np.testing.assert_array_equal(zero_point.numpy(), ref_zp)
    ours = P.fake_quant_affine(x, scale, zero_point, bits, axis=-1)
    ref = _np_fake_quant(x.numpy(), ref_scale, ref_zp, 0, 2**bits - 1)
    np.testing.assert_array_equal(ours.numpy(), ref)


def test_float64_is_computed_in_float64():
    x = _data(3).double()
    scale, zero_point = G.affine_qparams(x.min(), x.max(), 12)
    out = P.fake_quant_affine(x, scale, zero_point, 12)
    s, z = float(scale), int(zero_point)
    ref = (torch.clamp(torch.round(x * (1.0 / s)) + z, 0, 4095) - z) * s
    assert out.dtype == torch.float64
    assert torch.equal(out, ref)


def test_half_precision_round_trips():
    x = _data(4).to(torch.bfloat16)
    scale, zero_point = G.affine_qparams(x.min().float(), x.max().float(), 4)
    out = P.fake_quant_affine(x, scale, zero_point, 4)
    assert out.dtype == torch.bfloat16
    assert out.unique().numel() <= 16


def test_per_channel_shape_checked():
    with pytest.raises(ValueError):
        P.fake_quant_affine(torch.zeros(2, 3), torch.ones(2), torch.zeros(2), 8, axis=1)
    with pytest.raises(ValueError):
        P.fake_quant_affine(torch.zeros(2, 3), torch.ones(3), torch.zeros(3), 8)


# --------------------------------------------------------------------------- qparams edge cases


def test_qparams_constant_range():
    for value in (0.0, 2.5, -1.0):
        for symmetric in (False, True):
            scale, zero_point = G.affine_qparams(value, value, 8, symmetric)
            assert float(scale) > 0
            x = torch.full((5,), value)
            out = P.fake_quant_affine(x, scale, zero_point, 8, symmetric=symmetric)
            assert torch.allclose(out, x, atol=float(scale) / 2 + 1e-12)
    scale, zero_point = G.affine_qparams(0.0, 0.0, 8)
    assert float(scale) == G.EPS and int(zero_point) == 0


def test_qparams_all_positive_keeps_zero_exact():
    x = torch.tensor([0.0, 1.0, 2.0, 3.7, 5.0])
    scale, zero_point = G.affine_qparams(1.0, 5.0, 4)  # range widened to [0, 5]
    assert int(zero_point) == 0
    out = P.fake_quant_affine(x, scale, zero_point, 4)
    assert out[0] == 0.0 and out[-1] == pytest.approx(5.0)
    scale, zero_point = G.affine_qparams(-5.0, -1.0, 4)  # widened to [-5, 0]
    assert int(zero_point) == 15
    assert P.fake_quant_affine(torch.zeros(1), scale, zero_point, 4).item() == 0.0


def test_qparams_zero_is_always_a_level():
    g = torch.Generator().manual_seed(1)
    lo = -torch.rand(50, generator=g) * 3
    hi = torch.rand(50, generator=g) * 7
    for bits in (2, 3, 8):
        scale, zero_point = G.affine_qparams(lo, hi, bits)
        out = P.fake_quant_affine(torch.zeros(3, 50), scale, zero_point, bits, axis=1)
        assert torch.equal(out, torch.zeros(3, 50))


def test_symmetric_qparams_cover_absmax():
    scale, zero_point = G.affine_qparams(-3.0, 2.0, 4, symmetric=True)
    assert int(zero_point) == 0
    assert float(scale) == pytest.approx(3.0 / 7)
    out = P.fake_quant_affine(torch.tensor([-3.0, 3.0]), scale, zero_point, 4, symmetric=True)
    assert torch.allclose(out, torch.tensor([-3.0, 3.0]))


def test_qparams_reject_bad_ranges():
    with pytest.raises(UserError):
        G.affine_qparams(1.0, 0.0, 8)
    with pytest.raises(UserError):
        G.affine_qparams(float("nan"), 1.0, 8)
    with pytest.raises(UserError):
        G.affine_qparams(-1.0, 1.0, 20)


@pytest.mark.parametrize("symmetric", [False, True])
def test_error_falls_with_bits(symmetric):
    x = _data(7, shape=(4000,))
    errors = []
    for bits in BITS:
        scale, zero_point = G.affine_qparams(x.min(), x.max(), bits, symmetric)
        xq = P.fake_quant_affine(x, scale, zero_point, bits, symmetric=symmetric)
        errors.append(float(P.lp_error(x, xq)))
    assert all(a > b for a, b in zip(errors, errors[1:]))
    sqnr = [
        float(P.sqnr_db(x, P.fake_quant_affine(x, *G.affine_qparams(x.min(), x.max(), b), b)))
        for b in BITS
    ]
    assert all(a < b for a, b in zip(sqnr, sqnr[1:]))


# --------------------------------------------------------------------------- dynamic per token


def _np_per_token(x, bits, axis):
    """numpy float32 reference of dynamic per-token quantization."""
    x = np.asarray(x, dtype=np.float32)
    q_max = 2**bits - 1
    lo = np.minimum(x.min(axis=axis, keepdims=True), np.float32(0))
    hi = np.maximum(x.max(axis=axis, keepdims=True), np.float32(0))
    scale = np.maximum((hi - lo) / np.float32(q_max), np.float32(G.EPS))
    zero_point = np.clip(np.float32(0) - np.round(lo / scale), 0, q_max)
    return _np_fake_quant(x, scale, zero_point, 0, q_max)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_dynamic_per_token_vs_numpy(bits, channel_dim):
    x = _data(bits + channel_dim, shape=(2, 16, 5, 12))
    out = P.fake_quant_dynamic_per_token(x, bits, channel_dim)
    ref = _np_per_token(x.numpy(), bits, channel_dim)
    np.testing.assert_array_equal(out.numpy(), ref)
    tokens = out.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
    assert max(row.unique().numel() for row in tokens) <= 2**bits


def test_dynamic_per_token_equals_per_channel_with_token_ranges():
    x = _data(11, shape=(37, 20))
    scale, zero_point = G.affine_qparams(x.amin(1), x.amax(1), 6)
    ref = P.fake_quant_affine(x, scale, zero_point, 6, axis=0)
    assert torch.equal(P.fake_quant_dynamic_per_token(x, 6), ref)


def test_dynamic_per_token_constant_token():
    x = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [-1.0, 0.5, 3.0]])
    out = P.fake_quant_dynamic_per_token(x, 4)
    assert torch.equal(out[0], x[0])
    assert torch.allclose(out[1], x[1])


# --------------------------------------------------------------------------- timestep groups


def test_timestep_groups_contiguous_descending():
    groups = P.timestep_groups([1, 21, 41, 61, 81, 101, 121, 141, 161, 181], 3)
    assert groups == [[181.0, 161.0, 141.0, 121.0], [101.0, 81.0, 61.0], [41.0, 21.0, 1.0]]
    assert P.timestep_groups([5, 5, 3], 1) == [[5.0, 3.0]]
    assert P.timestep_groups([1, 2, 3, 4], 4) == [[4.0], [3.0], [2.0], [1.0]]


@pytest.mark.parametrize("groups", [0, 5, -1, 1.5])
def test_timestep_groups_bad_count(groups):
    with pytest.raises(UserError):
        P.timestep_groups([1, 2, 3, 4], groups)


def test_timestep_lookup_nearest():
    groups = P.timestep_groups([999, 800, 600, 400, 200, 1], 3)  # [999, 800] [600, 400] [200, 1]
    lookup = P.TimestepLookup(groups)
    assert [lookup(t) for t in (999, 800, 600, 400, 200, 1)] == [0, 0, 1, 1, 2, 2]
    assert lookup(1500) == 0 and lookup(-3) == 2
    assert lookup(690) == 1 and lookup(710) == 0  # nearest 600 / 800
    assert lookup(700) == 0  # halfway: the larger timestep
    assert lookup.nearest(301) == 400.0
    assert P.group_of(250.0, groups) == 2
    with pytest.raises(UserError):
        P.TimestepLookup([[1.0], [1.0]])


# --------------------------------------------------------------------------- errors


def test_lp_error_and_sqnr():
    x = torch.tensor([1.0, -2.0, 3.0, 0.0])
    xq = torch.tensor([1.5, -2.0, 2.0, 0.0])
    assert float(P.lp_error(x, xq, p=2.4)) == pytest.approx((0.5**2.4 + 1.0) / 4)
    assert float(P.lp_error(x, xq, p=2)) == pytest.approx((0.25 + 1.0) / 4)
    per_row = P.lp_error(x.reshape(2, 2), xq.reshape(2, 2), p=1, dim=1)
    assert per_row.tolist() == [0.25, 0.5]
    expected = 10 * math.log10(14.0 / 1.25)
    assert float(P.sqnr_db(x, xq)) == pytest.approx(expected)
    assert float(P.sqnr_db(x, x)) == math.inf
