"""Independent references for the statistics tests (scipy and numpy in long double), and
the test data they are applied to.

Moment references are scipy.stats on the concatenated raw data, evaluated in long double
so that the reference itself is not the limiting precision for data far from zero.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats
import torch
from hypothesis import HealthCheck, settings

from qvd_bench.collect.moments import ChannelMoments
from qvd_bench.numerics.moments import (
    batch_moments,
)

RTOL = 1e-8


PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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
