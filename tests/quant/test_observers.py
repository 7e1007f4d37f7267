from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qvd_bench.collect.collector import collect
from qvd_bench.collect.histogram import Histogram
from qvd_bench.config import CollectConfig
from qvd_bench.errors import UserError
from qvd_bench.numerics import grid as G
from qvd_bench.numerics.edges import SignedLogEdges, edges_from_dict
from qvd_bench.quant import observers as O
from qvd_bench.quant import primitives as P
from qvd_bench.store import StatsRun, histograms_frame


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = CollectConfig(
        model="tiny-unet3d",
        prompts=("a cat",),
        steps=2,
        frames=2,
        height=8,
        width=8,
        temporal_stride=100,
        reservoir_capacity=64,
    )
    path = tmp_path_factory.mktemp("stats") / "run"
    collect(config, path, progress=False)
    return StatsRun(path)


LAYER = "down_blocks.0.attentions.0.proj_in"


def _inputs(run, layer):
    rows = run.channels
    return rows[(rows["layer"] == layer) & (rows["tensor"] == "input") & (rows["count"] > 0)]


def _heavy_tailed(seed, shape):
    g = np.random.default_rng(seed)
    return torch.from_numpy(g.standard_t(2.0, size=shape).astype(np.float32))


# --------------------------------------------------------------------------- min-max


def test_minmax_range_equals_channel_table(run):
    layers = run.channels["layer"].astype(str).unique().tolist()
    for layer in layers[:: max(1, len(layers) // 12)]:
        rows = _inputs(run, layer)
        lo, hi = O.minmax_range(run, layer)
        assert lo.dtype == torch.float64 and lo.ndim == 0
        assert float(lo) == rows["min"].to_numpy().min()
        assert float(hi) == rows["max"].to_numpy().max()


def test_minmax_range_of_a_subset(run):
    rows = _inputs(run, LAYER)
    timesteps = sorted(rows["timestep"].unique().tolist())
    for t in timesteps:
        for branch in ("cond", "uncond"):
            sub = rows[(rows["timestep"] == t) & (rows["branch"] == branch)]
            lo, hi = O.minmax_range(run, LAYER, timesteps=[t], branches=[branch])
            assert float(lo) == sub["min"].min() and float(hi) == sub["max"].max()
    lo, hi = O.minmax_channel_range(run, LAYER, timesteps=timesteps[:1])
    sub = rows[rows["timestep"] == timesteps[0]].groupby("channel", observed=True)
    np.testing.assert_array_equal(lo.numpy(), sub["min"].min().to_numpy())
    np.testing.assert_array_equal(hi.numpy(), sub["max"].max().to_numpy())
    full_lo, full_hi = O.minmax_channel_range(run, LAYER)
    assert float(full_lo.min()) == float(O.minmax_range(run, LAYER)[0])
    assert torch.all(full_lo <= lo) and torch.all(full_hi >= hi)


def test_missing_layer_or_timestep_names_it(run):
    with pytest.raises(UserError, match="no_such_layer"):
        O.minmax_range(run, "no_such_layer")
    with pytest.raises(UserError, match="123.5"):
        O.minmax_range(run, LAYER, timesteps=[123.5])
    with pytest.raises(UserError, match="sideways"):
        O.minmax_channel_range(run, LAYER, branches=["sideways"])
    with pytest.raises(UserError, match="no_such_layer"):
        O.percentile_range(run, "no_such_layer")
    with pytest.raises(UserError, match="123.5"):
        O.percentile_range(run, LAYER, timesteps=[123.5])
    with pytest.raises(UserError, match="no_such_layer"):
        O.reservoir_rows(run, "no_such_layer")
    with pytest.raises(UserError, match="123.5"):
        O.reservoir_rows(run, LAYER, timesteps=[123.5])


# --------------------------------------------------------------------------- percentile


def test_percentile_on_known_data_within_grid_error():
    edges = SignedLogEdges(relative_error=0.01)
    g = torch.Generator().manual_seed(0)
    parts = {}
    data = []
    for t in (1.0, 501.0):
        for branch in ("cond", "uncond"):
            x = torch.randn(4000, generator=g) * 2.0 + 0.5
            acc = Histogram(edges)
            acc.update(x)
            parts[("input", "layer", t, branch)] = acc
            data.append(x)
    frame = histograms_frame(parts, {"layer": "ffn"})
    stub = SimpleNamespace(
        path=Path("known"), manifest={"histogram": {"edges": edges.to_dict()}}, histograms=frame
    )
    values = torch.cat(data).double().numpy()
    for q in (0.9, 0.99, 0.999, 1.0):
        lo, hi = O.percentile_range(stub, "layer", q)
        ref_lo, ref_hi = np.quantile(values, [1 - q, q])
        tolerance = edges.gamma - 1
        assert abs(float(lo) - ref_lo) <= tolerance * abs(ref_lo)
        assert abs(float(hi) - ref_hi) <= tolerance * abs(ref_hi)
    # A subset merges only its histograms.
    lo, hi = O.percentile_range(stub, "layer", 0.99, timesteps=[1.0], branches=["cond"])
    ref_lo, ref_hi = np.quantile(data[0].double().numpy(), [0.01, 0.99])
    assert abs(float(hi) - ref_hi) <= (edges.gamma - 1) * abs(ref_hi)


def test_percentile_range_on_a_run(run):
    lo, hi = O.percentile_range(run, LAYER, 0.99)
    full_lo, full_hi = O.minmax_range(run, LAYER)
    assert full_lo <= lo < hi <= full_hi
    top_lo, top_hi = O.percentile_range(run, LAYER, 1.0)
    tolerance = edges_from_dict(run.manifest["histogram"]["edges"]).gamma - 1
    assert abs(float(top_hi) - float(full_hi)) <= tolerance * abs(float(full_hi))
    assert abs(float(top_lo) - float(full_lo)) <= tolerance * abs(float(full_lo))
    with pytest.raises(UserError):
        O.percentile_range(run, LAYER, 0.3)


# --------------------------------------------------------------------------- MSE search


def _brute_force_alpha(x, lo, hi, bits, p, grid, symmetric=False):
    best, best_err = None, None
    for alpha in O.shrink_factors(grid).tolist():
        scale, zp = G.affine_qparams(
            torch.tensor(alpha * lo, dtype=torch.float64),
            torch.tensor(alpha * hi, dtype=torch.float64),
            bits,
            symmetric,
        )
        err = float(P.lp_error(x, P.fake_quant_affine(x, scale, zp, bits, symmetric=symmetric), p))
        if best_err is None or err < best_err:
            best, best_err = alpha, err
    return best


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mse_range_equals_brute_force_and_beats_minmax(bits):
    rows = _heavy_tailed(bits, (256, 16))
    lo, hi = O.mse_range(rows, bits)
    mn, mx = float(rows.min()), float(rows.max())
    alpha = _brute_force_alpha(rows, mn, mx, bits, 2.4, 100)
    assert float(lo) == alpha * mn and float(hi) == alpha * mx
    assert alpha < 1.0  # heavy tails: clipping pays off

    def err(lo, hi):
        scale, zp = G.affine_qparams(lo, hi, bits)
        return float(P.lp_error(rows, P.fake_quant_affine(rows, scale, zp, bits)))

    assert err(lo, hi) < err(torch.tensor(mn).double(), torch.tensor(mx).double())


@pytest.mark.parametrize(
    "case",
    ["heavy tails", "ties on a lattice", "near ties", "float32 overflow", "float32 underflow"],
)
def test_shrink_search_screening_equals_exhaustive_float64(case):
    # Large enough to be screened in float32 first; the answer must be the float64 one.
    x = _heavy_tailed(7, (4, 2048)).double()
    p, bits, grid = 2.4, 4, 100
    if case == "near ties":  # errors closer than float32 resolves: it must not decide
        x, grid = _heavy_tailed(8, (16, 8192)).double(), [0.05, 0.05 + 1e-9, 0.05 + 2e-9]
    elif case == "ties on a lattice":  # many factors give exactly equal errors
        x = torch.arange(4 * 2048, dtype=torch.float64).reshape(4, 2048) % 16 - 8
    elif case == "float32 overflow":  # |x − x̂|^p overflows float32 for some factors
        x, p = x * 1e3, 16.0
    elif case == "float32 underflow":  # |x − x̂|^p underflows float32
        x = x * 1e-20
    assert x.numel() * len(O.shrink_factors(grid)) > O.SCREEN_ELEMENTS
    lo, hi = x.amin(1), x.amax(1)
    alpha = O.shrink_search(x, lo, hi, bits, p, grid)
    for r in range(x.shape[0]):
        expected = _brute_force_alpha(x[r], float(lo[r]), float(hi[r]), bits, p, grid)
        assert float(alpha[r]) == expected, r


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.7])
def test_shrink_search_screening_equals_exhaustive_float64_for_any_p(p):
    x = _heavy_tailed(9, (4, 512)).double()
    assert x.numel() * 100 > O.SCREEN_ELEMENTS
    lo, hi = x.amin(1), x.amax(1)
    alpha = O.shrink_search(x, lo, hi, 4, p)
    for r in range(x.shape[0]):
        expected = _brute_force_alpha(x[r], float(lo[r]), float(hi[r]), 4, p, 100)
        assert float(alpha[r]) == expected, r


def _exhaustive_lp_clip(rows, channel_lo, channel_hi, tokens, bits, p, grid=100):
    """lp_clip_search's choice with every candidate's float64 error (no screen)."""
    lo, hi = channel_lo.min().double(), channel_hi.max().double()
    share = min(1.0, 2.0 / tokens)

    def err(x, scale, zp):
        x = x.reshape(-1).float()
        return float(P.lp_error(x, P.fake_quant_affine(x, scale, zp, bits), p))

    best, best_err = None, None
    for alpha in O.shrink_factors(grid).tolist():
        scale, zp = G.affine_qparams(alpha * lo, alpha * hi, bits)
        extreme = err(torch.stack([channel_lo, channel_hi]), scale, zp)
        e = (1.0 - share) * err(rows, scale, zp) + share * extreme
        if best_err is None or e < best_err:
            best, best_err = alpha, e
    return best * lo, best * hi


@pytest.mark.parametrize(("bits", "p", "tokens"), [(4, 2.4, 10**5), (8, 2.4, 70), (3, 7.0, 500)])
def test_lp_clip_search_screening_equals_exhaustive_float64(bits, p, tokens):
    from qvd_bench.quant.methods.base import lp_clip_search

    rows = _heavy_tailed(bits, (64, 32)).double()
    channel_lo, channel_hi = rows.amin(0) * 1.5, rows.amax(0) * 1.5  # beyond the sample
    assert rows.numel() * 100 > O.SCREEN_ELEMENTS
    lo, hi = lp_clip_search(rows, channel_lo, channel_hi, tokens, bits, p)
    expected = _exhaustive_lp_clip(rows, channel_lo, channel_hi, tokens, bits, p)
    assert (float(lo), float(hi)) == (float(expected[0]), float(expected[1]))


def test_batched_searches_equal_separate_ones():
    x = _heavy_tailed(4, (3, 2048)).double()
    lo, hi = O.mse_ranges(x, 4)
    for r in range(3):
        assert (lo[r], hi[r]) == O.mse_range(x[r], 4)
    weights = [_heavy_tailed(5 + i, (8, 3, 3, 3)) for i in range(3)]
    scale, _ = O.weight_qparams(torch.cat(weights), 4, "mse")
    assert torch.equal(scale, torch.cat([O.weight_qparams(w, 4, "mse")[0] for w in weights]))


def test_memoised_batch_computes_only_missing_values_in_batches():
    from qvd_bench.quant.methods import base

    calls = []

    def compute(indices):
        calls.append(list(indices))
        return [f"value {i}" for i in indices]

    keys = [("test-batch", i) for i in range(5)]
    for key in keys:
        base._SEARCHES.pop(key, None)
    assert base.memoised(keys[1], lambda: "cached") == "cached"
    assert base.memoised_batch(keys, compute, batch=2) == [
        "value 0",
        "cached",
        "value 2",
        "value 3",
        "value 4",
    ]
    assert calls == [[0, 2], [3, 4]]
    assert base.memoised_batch(keys, compute, batch=2)[4] == "value 4" and len(calls) == 2


def test_mse_range_grid_and_checks():
    rows = _heavy_tailed(0, (128, 8))
    grid = [1.0, 0.5, 0.25]
    lo, hi = O.mse_range(rows, 4, grid=grid)
    alpha = _brute_force_alpha(rows, float(rows.min()), float(rows.max()), 4, 2.4, grid)
    assert float(hi) == alpha * float(rows.max())
    assert torch.allclose(O.shrink_factors(4), torch.tensor([1.0, 0.75, 0.5, 0.25]).double())
    nan_rows = rows.clone()
    nan_rows[0, 0] = float("nan")
    assert O.mse_range(nan_rows, 4, grid=grid)[1] <= hi  # non-finite values are ignored
    with pytest.raises(UserError):
        O.mse_range(torch.full((3, 3), float("nan")), 4)
    with pytest.raises(UserError):
        O.mse_range(rows, 4, grid=[1.5])
    with pytest.raises(UserError):
        O.mse_range(rows, 4, p=0)
    with pytest.raises(UserError):
        O.mse_range(rows, 1)


def test_mse_range_on_reservoir_rows(run):
    rows = O.reservoir_rows(run, LAYER)
    assert rows.ndim == 2 and rows.shape[0] > 0
    lo, hi = O.mse_range(rows, 4)
    assert float(rows.min()) <= float(lo) <= 0.0 <= float(hi) <= float(rows.max())
    timesteps = run.reservoir[LAYER]["timesteps"]
    t = float(timesteps[0])
    some = O.reservoir_rows(run, LAYER, timesteps=[t], branches=["cond"])
    assert 0 < some.shape[0] < rows.shape[0]


# --------------------------------------------------------------------------- weights


def test_weight_qparams_minmax():
    w = _heavy_tailed(1, (6, 4, 3, 3))
    scale, zero_point = O.weight_qparams(w, 8)
    absmax = w.reshape(6, -1).abs().amax(1)
    assert torch.allclose(scale, absmax / 127)
    assert scale.dtype == torch.float32 and torch.all(zero_point == 0)
    wq = P.fake_quant_affine(w, scale, zero_point, 8, axis=0, symmetric=True)
    assert torch.allclose(wq.reshape(6, -1).abs().amax(1), absmax)


@pytest.mark.parametrize("bits", [3, 4])
def test_weight_qparams_mse_per_channel_brute_force(bits):
    w = _heavy_tailed(2, (5, 64))
    scale, zp = O.weight_qparams(w, bits, "mse")
    minmax_scale, _ = O.weight_qparams(w, bits, "minmax")
    q_max = 2 ** (bits - 1) - 1
    for c in range(5):
        absmax = float(w[c].abs().max())
        alpha = _brute_force_alpha(w[c], -absmax, absmax, bits, 2.4, 100, symmetric=True)
        expected, _ = G.affine_qparams(-alpha * absmax, alpha * absmax, bits, symmetric=True)
        assert float(scale[c]) == float(expected)
        assert float(scale[c]) <= float(minmax_scale[c]) * (1 + 1e-6)
        assert float(scale[c]) == pytest.approx(alpha * absmax / q_max, rel=1e-6)

    def err(s):
        wq = P.fake_quant_affine(w, s, zp, bits, axis=0, symmetric=True)
        return P.lp_error(w, wq, dim=1)

    assert torch.all(err(scale) <= err(minmax_scale))


def test_weight_qparams_checks():
    with pytest.raises(UserError):
        O.weight_qparams(torch.ones(2, 2), 8, "median")
    with pytest.raises(UserError):
        O.weight_qparams(torch.tensor([[float("inf"), 1.0]]), 8)
