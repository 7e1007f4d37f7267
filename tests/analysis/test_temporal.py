"""TDScore on hand cases and its limits; the reference quantizers."""

import math

import numpy as np
import pytest
import torch

from qvd_bench.analysis.temporal import log2_quantize, tdscore, uniform_quantize
from qvd_bench.errors import UserError


def features(t=12, d=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    steps = torch.linspace(0, 1, t, dtype=torch.float64)[:, None]
    freqs = torch.rand(1, d, generator=generator, dtype=torch.float64) * 6 + 1
    return torch.nn.functional.silu(torch.sin(steps * freqs) * 3)


def test_identity_keeps_everything():
    e = features()
    w = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = tdscore(e, w, lambda x: x)
    assert out == {"tdscore": 1.0, "relative_mse": 0.0, "collisions": 0, "pairs": 66}


def test_collapse_to_one_vector():
    e = features()
    w = torch.eye(6)
    out = tdscore(e, w, lambda x: x.mean(0, keepdim=True).expand_as(x))
    assert out["tdscore"] == 0.0 and out["collisions"] == out["pairs"] == 66


def test_hand_case():
    # y = e: d01 = 1, d02 = 3, d12 = 2; Q merges steps 1 and 2: d̂ = 1, 1, 0.
    e = torch.tensor([[0.0], [1.0], [3.0]])
    out = tdscore(e, torch.tensor([[1.0]]), lambda x: torch.tensor([[0.0], [1.0], [1.0]]))
    assert out["tdscore"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert out["relative_mse"] == pytest.approx(4 / 10)
    assert (out["collisions"], out["pairs"]) == (1, 3)


def test_pairs_equal_before_quantization_are_left_out():
    e = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 1.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    out = tdscore(e, w, lambda x: x * 2)  # every distance doubles
    assert out["pairs"] == 2 and out["tdscore"] == pytest.approx(0.5)
    assert out["relative_mse"] == pytest.approx(1.0)


def test_merging_some_timesteps_is_strictly_between():
    e = features(t=40)
    w = torch.randn(8, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = tdscore(e, w, lambda x: uniform_quantize(x, 2))
    assert 0 < out["collisions"] < out["pairs"] == 40 * 39 // 2
    assert 0 < out["tdscore"] < 1 and out["relative_mse"] > 0
    fine = tdscore(e, w, lambda x: uniform_quantize(x, 8))
    assert out["tdscore"] < fine["tdscore"] < 1 and fine["collisions"] == 0


def test_large_grid_and_weight_on_output_space():
    e = features(t=1000, d=4)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = tdscore(e.float(), w.float(), lambda x: x)
    assert out["pairs"] == 1000 * 999 // 2 and out["tdscore"] == 1.0
    # A quantizer that only moves e along the null space of W keeps every distance.
    null = torch.linalg.svd(w).Vh[-1]
    shifted = tdscore(e, w, lambda x: x + 0.3 * null)
    assert shifted["tdscore"] == pytest.approx(1.0) and shifted["relative_mse"] < 1e-20


def test_uniform_quantize():
    x = torch.linspace(-1.3, 2.1, 101, dtype=torch.float64)
    q = uniform_quantize(x, 4)
    step = 3.4 / 15
    assert torch.unique(q).numel() <= 16
    assert (q - x).abs().max() <= step / 2 + 1e-12
    assert q.min() == -1.3 and q.max() == pytest.approx(2.1)
    clipped = uniform_quantize(x, 4, lo=0.0, hi=1.0)
    assert clipped.min() == 0.0 and clipped.max() == 1.0


def test_log2_quantize():
    x = torch.tensor([0.0, 8.0, -8.0, 3.0, -1.1, 0.3, 6.0])
    q = log2_quantize(x, 3)  # levels 0, ±8, ±4, ±2
    assert q.tolist() == [0.0, 8.0, -8.0, 4.0, -0.0, 0.0, 8.0]
    levels = torch.unique(log2_quantize(torch.linspace(-5, 5, 1001), 4))
    nonzero = levels[levels != 0].abs()
    assert levels.numel() <= 2**4 - 1
    assert torch.allclose(torch.log2(nonzero / 5), torch.log2(nonzero / 5).round())
    assert not math.isnan(float(log2_quantize(torch.zeros(3), 4).sum()))


@pytest.mark.parametrize("quantize", [uniform_quantize, log2_quantize])
def test_quantizers_check_bits(quantize):
    with pytest.raises(UserError, match="bit-width must be between 2 and 16, got 33"):
        quantize(torch.zeros(2), 33)


def test_shape_errors():
    with pytest.raises(ValueError, match="weight"):
        tdscore(torch.zeros(3, 2), torch.zeros(4, 3), lambda x: x)
    with pytest.raises(ValueError, match="quantize returned"):
        tdscore(torch.zeros(3, 2), torch.zeros(4, 2), lambda x: x[:2])
    assert np.isnan(tdscore(torch.ones(3, 2), torch.ones(4, 2), lambda x: x)["tdscore"])
