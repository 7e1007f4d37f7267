"""Skewness and kurtosis at each level against scipy on the raw values, Bowley skew against
numpy quantiles, and the per-role summary."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from qvd_bench import store
from qvd_bench.analysis import distribution as dist
from qvd_bench.collect.histogram import Histogram
from qvd_bench.collect.moments import ChannelMoments
from qvd_bench.collect.temporal import TemporalFeatures
from qvd_bench.numerics.edges import SignedLogEdges

ROLES = {"blk.ffn": "ffn", "blk.conv": "spatial_conv", "time.linear_1": "time_emb"}
TIMESTEPS = (999.0, 500.0)
BRANCHES = ("uncond", "cond")


def raw_inputs():
    """(layer, timestep, branch) -> (tokens, C) raw inputs: skewed, channel by channel."""
    rng = np.random.default_rng(0)
    data = {}
    for layer, channels in (("blk.ffn", 3), ("blk.conv", 5)):
        for t in TIMESTEPS:
            for branch in BRANCHES:
                shape = rng.uniform(0.3, 1.5, channels)
                x = rng.lognormal(0.0, shape, size=(40, channels)) - rng.uniform(0, 2, channels)
                data[(layer, t, branch)] = x
    return data


@pytest.fixture(scope="module")
def raw():
    return raw_inputs()


@pytest.fixture(scope="module")
def channels(raw):
    moments = {}
    for (layer, t, branch), x in raw.items():
        acc = ChannelMoments(x.shape[1])
        # Three batches, so the stored moments are merges as in a real collection.
        for part in np.array_split(x, 3):
            acc.update(torch.from_numpy(part), -1)
        moments[("input", layer, t, branch)] = acc
    return store.channels_frame(moments, ROLES)


def test_channel_level_matches_scipy(raw, channels):
    out = dist.channel_skew(channels)
    assert set(out["level"]) == {"channel"}
    assert len(out) == len(channels)
    for row in out.itertuples():
        x = raw[(row.layer, row.timestep, row.branch)][:, row.channel]
        assert row.skewness == pytest.approx(stats.skew(x, bias=True), rel=1e-9)
        assert row.kurtosis == pytest.approx(stats.kurtosis(x, bias=True), rel=1e-9)
        assert row.count == x.size and row.min == x.min() and row.max == x.max()


def test_tensor_level_merges_channels_exactly(raw, channels):
    out = dist.tensor_skew(channels)
    assert set(out["level"]) == {"tensor"}
    assert len(out) == 2 * len(TIMESTEPS) * len(BRANCHES)
    for row in out.itertuples():
        x = raw[(row.layer, row.timestep, row.branch)].ravel()
        assert row.role == ROLES[row.layer]
        assert row.count == x.size
        assert row.mean == pytest.approx(x.mean(), rel=1e-12)
        assert row.skewness == pytest.approx(stats.skew(x, bias=True), rel=1e-9)
        assert row.kurtosis == pytest.approx(stats.kurtosis(x, bias=True), rel=1e-9)


def test_tensor_level_across_branches(raw, channels):
    out = dist.tensor_skew(channels, merge_branches=True)
    assert list(out.columns[:6]) == ["level", "tensor", "layer", "role", "timestep", "branch"]
    assert set(out["branch"]) == {"all"} and len(out) == 2 * len(TIMESTEPS)
    for row in out.itertuples():
        x = np.concatenate([raw[(row.layer, row.timestep, b)].ravel() for b in BRANCHES])
        assert row.skewness == pytest.approx(stats.skew(x, bias=True), rel=1e-9)
        assert row.kurtosis == pytest.approx(stats.kurtosis(x, bias=True), rel=1e-9)


def test_merge_moments_uneven_groups(raw, channels):
    # Drop one channel of one tensor: groups of one layer then differ in size.
    dropped = (channels["layer"] == "blk.conv") & (channels["timestep"] == 500.0)
    dropped &= (channels["branch"] == "cond") & (channels["channel"] == 4)
    merged = dist.merge_moments(channels[~dropped], ["layer", "timestep", "branch"])
    row = merged[
        (merged["layer"] == "blk.conv")
        & (merged["timestep"] == 500.0)
        & (merged["branch"] == "cond")
    ].iloc[0]
    x = raw[("blk.conv", 500.0, "cond")][:, :4].ravel()
    assert row["count"] == x.size and row["min"] == x.min() and row["max"] == x.max()
    assert row["m2"] == pytest.approx(((x - x.mean()) ** 2).sum(), rel=1e-12)
    assert row["m3"] == pytest.approx(((x - x.mean()) ** 3).sum(), rel=1e-9)


def test_constant_channel_is_nan_and_left_out_of_summary():
    acc = ChannelMoments(2)
    acc.update(torch.tensor([[1.0, 2.0], [1.0, 3.0], [1.0, 7.0]]), -1)
    frame = store.channels_frame({("input", "blk.ffn", 1.0, "cond"): acc}, ROLES)
    out = dist.channel_skew(frame)
    assert np.isnan(out["skewness"].iloc[0]) and np.isfinite(out["skewness"].iloc[1])
    summary = dist.skew_by_role(out)
    assert summary[["n", "n_nan"]].values.tolist() == [[1, 1]]
    assert summary["median_abs"].iloc[0] == pytest.approx(abs(out["skewness"].iloc[1]))


@pytest.fixture(scope="module")
def temporal_raw():
    rng = np.random.default_rng(1)
    t = np.arange(0.0, 1000.0, 50.0)  # T = 20
    freqs = rng.uniform(1e-3, 2e-2, 6)
    x = np.sin(t[:, None] * freqs)
    silu = x / (1 + np.exp(-4 * x))
    silu[:, 5] = -0.25  # a dimension that does not depend on the timestep
    return t, silu


@pytest.fixture(scope="module")
def temporal(temporal_raw):
    t, x = temporal_raw
    acc = TemporalFeatures()
    acc.update(torch.from_numpy(x[::-1].copy()), torch.from_numpy(t[::-1].copy()))
    return store.temporal_frame({"time.linear_1": acc})


def test_temporal_channel_level(temporal_raw, temporal):
    _, x = temporal_raw
    x = x.astype(np.float32).astype(np.float64)  # the store keeps float32 vectors
    out = dist.temporal_channel_skew(temporal)
    assert set(out["level"]) == {"temporal_channel"}
    assert set(out["role"]) == {"time_emb"} and set(out["tensor"]) == {"input"}
    np.testing.assert_allclose(out["skewness"][:5], stats.skew(x[:, :5], bias=True), rtol=1e-9)
    np.testing.assert_allclose(out["kurtosis"][:5], stats.kurtosis(x[:, :5], bias=True), rtol=1e-9)
    assert np.isnan(out["skewness"].iloc[5])


def test_temporal_layer_level(temporal_raw, temporal):
    _, x = temporal_raw
    x = x.astype(np.float32).astype(np.float64).ravel()
    out = dist.temporal_layer_skew(temporal, roles={"time.linear_1": "time_emb"})
    assert out["level"].tolist() == ["temporal_layer"] and out["count"].iloc[0] == x.size
    assert out["skewness"].iloc[0] == pytest.approx(stats.skew(x, bias=True), rel=1e-9)
    assert out["kurtosis"].iloc[0] == pytest.approx(stats.kurtosis(x, bias=True), rel=1e-9)


def test_skew_by_role_keeps_levels_apart(channels, temporal):
    frames = [dist.channel_skew(channels), dist.temporal_channel_skew(temporal)]
    out = dist.skew_by_role(frames)
    assert out[["level", "role"]].values.tolist() == [
        ["channel", "ffn"],
        ["channel", "spatial_conv"],
        ["temporal_channel", "time_emb"],
    ]
    spatial = frames[0][frames[0]["role"] == "spatial_conv"]["skewness"]
    row = out[out["role"] == "spatial_conv"].iloc[0]
    assert row["median_abs"] == pytest.approx(spatial.abs().median())
    assert row["n"] == len(spatial) and row["statistic"] == "skewness"


def histogram_case(relative_error):
    rng = np.random.default_rng(2)
    edges = SignedLogEdges(relative_error=relative_error)
    raw, hists = {}, {}
    for t in TIMESTEPS:
        for branch in BRANCHES:
            x = rng.lognormal(0.0, 0.8, size=4001) + 0.5
            h = Histogram(edges)
            h.update(torch.from_numpy(x))
            raw[(t, branch)], hists[("input", "blk.ffn", t, branch)] = x, h
    return edges, raw, hists


def test_grouped_quantiles_equal_histogram_quantile():
    edges, _, hists = histogram_case(0.01)
    frame = store.histograms_frame(hists, ROLES)
    probs = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
    out = dist.grouped_quantiles(frame, edges.to_dict(), probs, ["timestep", "branch"])
    for row in out.itertuples(index=False):
        expected = hists[("input", "blk.ffn", row.timestep, row.branch)].quantile(
            torch.tensor(probs, dtype=torch.float64)
        )
        np.testing.assert_allclose(row[3:], expected.numpy(), rtol=1e-12)


def test_bowley_skew_against_numpy():
    edges, raw, hists = histogram_case(0.001)
    out = dist.quartile_skew(store.histograms_frame(hists, ROLES), edges.to_dict())
    assert set(out["level"]) == {"tensor"} and len(out) == 4
    tolerance = edges.gamma - 1
    for row in out.itertuples():
        x = raw[(row.timestep, row.branch)]
        q1, q2, q3 = np.quantile(x, [0.25, 0.5, 0.75])
        np.testing.assert_allclose([row.q1, row.q2, row.q3], [q1, q2, q3], rtol=tolerance)
        # Each quartile within relative error ε moves the ratio by at most
        # ε·(|Q3| + |Q1| + 2|Q2|)·(1 + |B|)/(Q3 − Q1) to first order.
        bowley = (q3 + q1 - 2 * q2) / (q3 - q1)
        bound = tolerance * (abs(q3) + abs(q1) + 2 * abs(q2)) * (1 + abs(bowley)) / (q3 - q1)
        assert abs(row.bowley_skew - bowley) <= 1.5 * bound
        assert row.bowley_skew > 0  # lognormal: right-skewed


def test_bowley_merged_branches_and_degenerate():
    edges, raw, hists = histogram_case(0.01)
    frame = store.histograms_frame(hists, ROLES)
    merged = dist.quartile_skew(frame, edges, merge_branches=True)
    assert set(merged["branch"]) == {"all"}
    assert merged["count"].tolist() == [2 * 4001] * 2
    one_bin = pd.DataFrame(
        {
            "layer": ["a"],
            "role": ["ffn"],
            "timestep": [1.0],
            "branch": ["cond"],
            "bin": [0],
            "count": [5],
        }
    )
    assert np.isnan(dist.quartile_skew(one_bin, edges)["bowley_skew"].iloc[0])


def test_tables_loaded_from_a_run(tmp_path, raw, temporal_raw):
    """The functions take the tables as ``StatsRun`` loads them from parquet."""
    moments, hists = {}, {}
    edges = SignedLogEdges()
    for (layer, t, branch), x in raw.items():
        moments[("input", layer, t, branch)] = acc = ChannelMoments(x.shape[1])
        acc.update(torch.from_numpy(x), -1)
        hists[("input", layer, t, branch)] = h = Histogram(edges)
        h.update(torch.from_numpy(x))
    steps, vectors = temporal_raw
    temporal = TemporalFeatures()
    temporal.update(torch.from_numpy(vectors), torch.from_numpy(steps))
    layers = [{"name": name, "role": role} for name, role in ROLES.items()]
    run_dir = store.write_run(
        tmp_path / "run",
        {"layers": layers},
        moments=moments,
        histograms=hists,
        temporal={"time.linear_1": temporal},
        reservoirs={},
        weights={},
    )
    run = store.StatsRun(run_dir)
    tensor = dist.tensor_skew(run.channels)
    # The collector records the grid as manifest["histogram"]["edges"], this dict.
    bowley = dist.quartile_skew(run.histograms, edges.to_dict())
    temporal_out = dist.temporal_channel_skew(run.temporal)
    summary = dist.skew_by_role([dist.channel_skew(run.channels), temporal_out])
    assert len(tensor) == len(bowley) == len(raw)
    x = raw[("blk.conv", 500.0, "cond")].ravel()
    row = tensor[
        (tensor["layer"] == "blk.conv")
        & (tensor["timestep"] == 500.0)
        & (tensor["branch"] == "cond")
    ].iloc[0]
    assert row["skewness"] == pytest.approx(stats.skew(x, bias=True), rel=1e-9)
    assert set(summary["level"]) == {"channel", "temporal_channel"}
    assert temporal_out["count"].tolist() == [len(steps)] * vectors.shape[1]
