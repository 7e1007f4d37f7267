import pytest
import torch

from qvd_bench.errors import UserError
from qvd_bench.numerics import grid as G
from qvd_bench.quant import primitives as P


def _data(seed=0, shape=(3, 40, 24)):
    g = torch.Generator().manual_seed(seed)
    # Heavy-ish tails and an offset, so ranges are asymmetric and rounding varied.
    return torch.randn(shape, generator=g) ** 3 + 0.3


# --------------------------------------------------------------------------- bits


@pytest.mark.parametrize("bits", [1, 17, 0, 2.5, True, "8"])
def test_bits_out_of_range(bits):
    with pytest.raises(UserError):
        G.check_bits(bits)


def test_quant_range():
    assert G.quant_range(8) == (0, 255)
    assert G.quant_range(8, symmetric=True) == (-128, 127)
    assert G.quant_range(2, symmetric=True) == (-2, 1)


def test_analysis_and_quant_share_the_grid():
    from qvd_bench.analysis import channels
    from qvd_bench.quant import modules

    assert channels.quant_levels is G.quant_levels
    assert channels.check_bits is G.check_bits is modules.check_bits


# --------------------------------------------------------------------------- level sets


def _brute_force_nearest(x, levels):
    index = (x.reshape(-1, 1) - levels.reshape(1, -1)).abs().argmin(1)
    return levels[index].reshape(x.shape)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("base", G.LOG_BASES)
def test_signed_log_levels_layout(bits, base):
    levels = G.signed_log_levels(1.5, bits, base)
    half = 2 ** (bits - 1)
    assert levels.numel() == 2**bits
    assert torch.all(levels[1:] > levels[:-1])
    assert (levels == 0).sum() == 1
    assert (levels > 0).sum() == half and (levels < 0).sum() == half - 1
    assert levels.max() == 1.5 and levels.min() == -1.5
    positive = levels[levels > 0]
    assert torch.allclose(positive[1:] / positive[:-1], torch.tensor(base, dtype=torch.float64))


def test_signed_log_levels_negative_scale_and_degenerate():
    levels = G.signed_log_levels(4.0, 3, 2.0, negative_scale=0.25)
    assert levels.tolist() == [-0.25, -0.125, -0.0625, 0.0, 0.5, 1.0, 2.0, 4.0]
    assert G.signed_log_levels(0.0, 4).tolist() == [0.0]
    # Base 2 at 16 bits: 2^15 magnitudes underflow float64, fewer levels come back.
    deep = G.signed_log_levels(1.0, 16, 2.0)
    assert 1 < deep.numel() < 2**16
    assert torch.all(deep[1:] > deep[:-1])
    with pytest.raises(UserError):
        G.signed_log_levels(1.0, 4, base=1.0)
    with pytest.raises(UserError):
        G.signed_log_levels(-1.0, 4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_levels_match_affine(bits):
    levels = G.uniform_levels(-0.4, 3.0, bits)
    assert levels.numel() == 2**bits and (levels == 0).sum() == 1
    assert torch.all(levels[1:] > levels[:-1])
    x = _data(bits, shape=(500,)).double()
    scale, zero_point = G.affine_qparams(-0.4, 3.0, bits)
    via_levels = G.fake_quant_levels(x, levels)
    via_affine = P.fake_quant_affine(x, scale, zero_point, bits)
    assert torch.allclose(via_levels, via_affine, atol=float(scale) * 1e-6)


@pytest.mark.parametrize("bits,k", [(2, 1), (3, 4), (4, 9), (8, 100), (8, 255)])
def test_mixed_levels_layout(bits, k):
    lo, hi, edge = -0.278, 6.0, 0.75
    levels = G.mixed_levels(lo, hi, bits, edge, k)
    assert levels.numel() == 2**bits
    assert torch.all(levels[1:] > levels[:-1])
    assert (levels == 0).sum() == 1
    assert (levels <= edge).sum() == k and (levels > edge).sum() == 2**bits - k
    assert levels.max() == hi
    negative = (k - 1) // 2
    assert (levels < 0).sum() == negative
    if negative:
        assert levels.min() == pytest.approx(lo)
    if k - 1 - negative:
        assert edge in levels.tolist()
    above = levels[levels > edge]
    steps = torch.diff(torch.cat([torch.tensor([edge], dtype=torch.float64), above]))
    assert torch.allclose(steps, steps[0].expand_as(steps))


def test_mixed_levels_all_positive_and_bad_parameters():
    levels = G.mixed_levels(0.5, 4.0, 3, 1.0, 4)  # lo > 0: no negative levels
    assert levels.tolist() == [0.0, 0.25, 0.5, 1.0, 1.75, 2.5, 3.25, 4.0]
    levels = G.mixed_levels(-1.0, 4.0, 3, 1.0, 4, negative=3)
    assert levels.tolist() == [-1.0, -0.5, -0.25, 0.0, 1.75, 2.5, 3.25, 4.0]
    for kwargs in (
        {"edge": 5.0, "k": 2},
        {"edge": 0.0, "k": 2},
        {"edge": 1.0, "k": 0},
        {"edge": 1.0, "k": 8},
        {"edge": 1.0, "k": 3, "negative": 3},
    ):
        with pytest.raises(UserError):
            G.mixed_levels(-1.0, 4.0, 3, **kwargs)


@pytest.mark.parametrize(
    "levels",
    [
        G.signed_log_levels(2.0, 4, 2**0.5),
        G.mixed_levels(-0.278, 5.0, 5, 0.5, 12),
        G.uniform_levels(-1.0, 2.0, 3),
        torch.tensor([0.0]),
    ],
)
def test_fake_quant_levels_is_nearest(levels):
    x = _data(5, shape=(3000,)) * 2
    out = G.fake_quant_levels(x, levels)
    ref = _brute_force_nearest(x, levels.float())
    assert torch.equal(out, ref)
    assert out.unique().numel() <= levels.numel()
    assert set(out.unique().tolist()) <= set(levels.float().tolist())
    out64 = G.fake_quant_levels(x.double(), levels)
    assert torch.equal(out64, _brute_force_nearest(x.double(), levels.double()))


def test_fake_quant_levels_ties_go_up():
    levels = torch.tensor([-1.0, 0.0, 1.0, 3.0])
    x = torch.tensor([-0.5, 0.5, 2.0, -7.0, 9.0])
    assert G.fake_quant_levels(x, levels).tolist() == [0.0, 1.0, 3.0, -1.0, 3.0]
    with pytest.raises(ValueError):
        G.fake_quant_levels(x, torch.tensor([1.0, 0.0]))
