"""The plan follows the measurements: synthetic statistics flipped one property at a time."""

import json

import numpy as np
import pytest
import torch

from qvd_bench import store
from qvd_bench.analysis import (
    PlanThresholds,
    QuantPlan,
    headline,
    layer_summary,
    make_plan,
    require_temporal,
)
from qvd_bench.collect.histogram import Histogram
from qvd_bench.collect.moments import ChannelMoments
from qvd_bench.collect.temporal import TemporalFeatures
from qvd_bench.errors import UserError
from qvd_bench.numerics.edges import SignedLogEdges
from qvd_bench.numerics.moments import weight_channel_stats
from qvd_bench.store import StatsRun

TEMB, FFN, CONST = "time_embedding.linear_2", "blk.ffn", "blk.const"
LAYERS = [(TEMB, "time_emb", 64), (FFN, "ffn", 16), (CONST, "io", 8)]
GRID = np.arange(0.0, 1000.0, 50.0)  # the temporal-feature grid: 20 timesteps
SAMPLED = (501.0, 1.0)  # sampling timesteps
BRANCHES = ("uncond", "cond")
TOKENS = 256


def silu(x):
    return x / (1.0 + np.exp(-x))


def temporal_vectors(kind, rng):
    """(T, D) features: SiLU of a wide Gaussian (skewed) or the Gaussian itself (symmetric)."""
    x = rng.normal(0.0, 3.0, size=(len(GRID), 64))
    return silu(x) if kind == "skewed" else x


def ffn_rows(rng, *, ranges, tails, scale):
    """(TOKENS, 16) rows of the FFN input at one call.

    ranges: "equal" (every channel the same symmetric distribution) or "scattered"
    (log-normal gains and off-centre offsets per channel). tails: "light" (uniform) or
    "heavy" (Gaussian with 1 % of the values scaled 8x: excess kurtosis ~40).
    """
    if tails == "light":
        base = rng.uniform(-1.0, 1.0, size=(TOKENS, 16))
    else:
        base = rng.normal(size=(TOKENS, 16))
        base = np.where(rng.random(base.shape) < 0.01, 8.0 * base, base)
    if ranges == "scattered":
        gains = np.exp(np.random.default_rng(7).normal(0.0, 1.5, size=16))
        offsets = gains * np.random.default_rng(8).uniform(-2.0, 2.0, size=16)
        base = offsets + gains * base
    return scale * base


def write_synthetic(
    path, *, temporal="skewed", ranges="equal", tails="light", drift=False, seed=0
) -> StatsRun:
    """A stored run of three layers: a time_emb layer, an FFN and a constant-input layer.

    Args:
        temporal: "skewed", "symmetric" or None (no temporal features stored).
        ranges, tails: the FFN's channel ranges and tails (see ``ffn_rows``).
        drift: the FFN's range grows 4x from the first sampled timestep to the second.
    """
    rng = np.random.default_rng(seed)
    features = temporal_vectors(temporal or "skewed", rng)
    edges = SignedLogEdges(relative_error=0.01)
    moments, histograms = {}, {}
    for step, t in enumerate(SAMPLED):
        scale = 4.0**step if drift else 1.0
        for branch in BRANCHES:
            near = int(np.abs(GRID - t).argmin())
            inputs = {
                TEMB: features[near][None, :],  # one vector per call
                FFN: ffn_rows(rng, ranges=ranges, tails=tails, scale=scale),
                CONST: np.tile(np.linspace(-1.0, 1.0, 8), (4, 1)),
            }
            for layer, x in inputs.items():
                x = torch.from_numpy(x)
                acc = ChannelMoments(x.shape[-1])
                acc.update(x, -1)
                moments[("input", layer, t, branch)] = acc
                hist = Histogram(edges)
                hist.update(x)
                histograms[("input", layer, t, branch)] = hist
    temporal_accs = {}
    if temporal is not None:
        acc = TemporalFeatures()
        acc.update(torch.from_numpy(features), torch.from_numpy(GRID))
        temporal_accs[TEMB] = acc
    generator = torch.Generator().manual_seed(seed)
    weights = {
        name: weight_channel_stats(torch.randn(32, width, generator=generator, dtype=torch.float64))
        for name, _, width in LAYERS
    }
    manifest = {
        "model": {"name": "synthetic", "random_weights": True},
        "histogram": {"edges": edges.to_dict()},
        "layers": [
            {
                "name": name,
                "role": role,
                "decided_by": "test",
                "kind": "linear",
                "in_channels": width,
                "out_channels": 32,
            }
            for name, role, width in LAYERS
        ],
    }
    store.write_run(
        path,
        manifest,
        moments=moments,
        histograms=histograms,
        temporal=temporal_accs,
        reservoirs={},
        weights=weights,
    )
    return StatsRun(path)


def plan_of(run, **kwargs) -> QuantPlan:
    kwargs = {"w_bits": 8, "a_bits": 8, **kwargs}
    return make_plan(run, layer_summary(run), **kwargs)


@pytest.mark.parametrize("temporal, expected", [("skewed", True), ("symmetric", False)])
def test_htdq_follows_temporal_skew(tmp_path, temporal, expected):
    plan = plan_of(write_synthetic(tmp_path / "run", temporal=temporal))
    entry = plan.layer(TEMB)
    assert entry.role == "time_emb"  # the same role either way: only the statistics differ
    assert entry.htdq.apply is expected
    assert entry.family == ("htdq" if expected else "uniform")
    skew = entry.htdq.figures["temporal_skew"]
    assert (abs(skew) > plan.thresholds.temporal_skew) is expected
    assert f"{abs(skew):.2f}" in entry.htdq.reason
    assert entry.htdq.figures["temporal_timesteps"] == len(GRID)
    # Layers without temporal features never get HTDQ.
    assert not plan.layer(FFN).htdq.apply and plan.layer(FFN).family == "uniform"


def test_without_temporal_features(tmp_path):
    run = write_synthetic(tmp_path / "run", temporal=None)
    table = layer_summary(run)
    assert not table["has_temporal"].any() and table["temporal_skew"].isna().all()
    plan = make_plan(run, table, w_bits=8, a_bits=8)
    entry = plan.layer(TEMB)
    assert not entry.htdq.apply and entry.family == "uniform"
    assert "no temporal features in this run" in entry.htdq.reason
    assert "note: no temporal features" in headline(table, plan)
    with pytest.raises(
        UserError, match=r"run has no temporal features; recollect with temporal_stride=1$"
    ):
        require_temporal(run)
    assert require_temporal(write_synthetic(tmp_path / "with")) == [TEMB]


@pytest.mark.parametrize("ranges, expected", [("equal", False), ("scattered", True)])
def test_scri_follows_channel_ranges(tmp_path, ranges, expected):
    plan = plan_of(write_synthetic(tmp_path / "run", ranges=ranges))
    scri = plan.layer(FFN).scri
    assert scri.apply is expected
    figures, t = scri.figures, plan.thresholds
    assert (figures["coverage_mean"] < t.coverage) is expected
    if expected:
        assert figures["disparity"] > t.disparity and figures["asymmetry_abs_mean"] > t.asymmetry
        assert "scattered" in scri.reason and "off-centre" in scri.reason
    else:
        assert figures["disparity"] < 1.5 and figures["asymmetry_abs_mean"] < 0.1
    assert figures["bits"] == 8.0


@pytest.mark.parametrize("tails, expected", [("light", "minmax"), ("heavy", "mse")])
def test_clipping_follows_tails(tmp_path, tails, expected):
    plan = plan_of(write_synthetic(tmp_path / "run", tails=tails))
    entry = plan.layer(FFN)
    assert entry.clipping == expected
    assert entry.clipping_reason.apply is (expected == "mse")
    kurtosis = entry.clipping_reason.figures["kurtosis_median"]
    assert (kurtosis > plan.thresholds.kurtosis) is (expected == "mse")


@pytest.mark.parametrize("drift, expected", [(False, "tensor"), (True, "timestep_group")])
def test_granularity_follows_drift(tmp_path, drift, expected):
    plan = plan_of(write_synthetic(tmp_path / "run", drift=drift))
    entry = plan.layer(FFN)
    assert entry.granularity == expected
    assert entry.clipping_reason.figures["drift"] == pytest.approx(4.0 if drift else 1.0, rel=0.1)


def test_constant_channels_are_not_integrated(tmp_path):
    plan = plan_of(write_synthetic(tmp_path / "run"))
    scri = plan.layer(CONST).scri
    assert not scri.apply and "constant" in scri.reason
    assert scri.figures["disparity"] is None and scri.figures["asymmetry_abs_mean"] is None


def test_thresholds_and_bits_change_the_plan(tmp_path):
    run = write_synthetic(tmp_path / "run", ranges="scattered")
    strict = PlanThresholds(temporal_skew=100.0, coverage=0.0)
    plan = plan_of(run, thresholds=strict)
    assert not plan.layer(TEMB).htdq.apply and not plan.layer(FFN).scri.apply
    assert plan.thresholds == strict
    # A bit-width the table does not report coverage at is measured for the plan.
    plan6 = plan_of(run, a_bits=6)
    assert plan6.a_bits == 6 and {p.bits for p in plan6.layers} == {6}
    assert plan6.layer(FFN).scri.figures["bits"] == 6.0
    for bad in (0, 33):
        with pytest.raises(UserError, match="bit-width must be"):
            plan_of(run, a_bits=bad)
        with pytest.raises(UserError, match="bit-width must be"):
            plan_of(run, w_bits=bad)


def test_plan_json_round_trip(tmp_path):
    run = write_synthetic(tmp_path / "run", temporal=None, ranges="scattered")
    plan = plan_of(run)
    assert [p.layer for p in plan.layers] == [name for name, _, _ in LAYERS]
    assert plan.model == "synthetic" and plan.run == str(run.path)
    path = tmp_path / "plan.json"
    plan.save(path)

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    json.loads(path.read_text(), parse_constant=reject)  # NaN / inf were written as null
    assert QuantPlan.load(path) == plan
