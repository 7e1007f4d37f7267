"""Ranges, asymmetry, disparity, coverage, drift and weight summaries on hand cases and
brute-force references."""

import numpy as np
import pandas as pd
import pytest
import torch

from qvd_bench import store
from qvd_bench.analysis import channels as ch
from qvd_bench.collect.moments import ChannelMoments
from qvd_bench.errors import UserError
from qvd_bench.numerics.moments import weight_channel_stats

ROLES = {"blk.ffn": "ffn", "blk.conv": "spatial_conv"}


def channel_frame(ranges):
    """channels.parquet rows from {(layer, timestep, branch): [(min_c, max_c), ...]}.

    Each channel holds its min, its max and their midpoint.
    """
    moments = {}
    for (layer, t, branch), spans in ranges.items():
        lo, hi = np.array(spans, dtype=np.float64).T
        x = torch.from_numpy(np.stack([lo, (lo + hi) / 2, hi]))
        acc = ChannelMoments(len(spans))
        acc.update(x, -1)
        moments[("input", layer, t, branch)] = acc
    return store.channels_frame(moments, ROLES)


def test_gini_known_vectors():
    assert ch.gini([1, 1, 1, 1]) == 0.0
    assert ch.gini([0, 0, 0, 1]) == pytest.approx(0.75)
    assert ch.gini([3, 1, 2]) == pytest.approx(
        np.abs(np.subtract.outer([3, 1, 2], [3, 1, 2])).sum() / (2 * 9 * 2)
    )
    assert np.isnan(ch.gini([0, 0])) and np.isnan(ch.gini([]))


def test_channel_ranges_merge_timesteps_and_branches():
    frame = channel_frame(
        {
            ("blk.ffn", 999.0, "uncond"): [(-1, 3), (0, 1)],
            ("blk.ffn", 999.0, "cond"): [(-2, 1), (0, 1)],
            ("blk.ffn", 500.0, "cond"): [(0, 5), (0, 0.5)],
        }
    )
    out = ch.channel_ranges(frame)
    assert out[["min", "max"]].values.tolist() == [[-2, 5], [0, 1]]
    assert out["asymmetry"].tolist() == pytest.approx([3 / 7, 1.0])
    only = ch.channel_ranges(frame, timesteps=[999.0], branches=["uncond"])
    assert only["asymmetry"].iloc[0] == pytest.approx(0.5)  # (3 − 1)/(3 + 1)
    steps = ch.channel_ranges(frame, per_timestep=True)
    assert steps[["timestep", "range"]].values.tolist() == [
        [500.0, 5],
        [500.0, 0.5],
        [999.0, 5],
        [999.0, 1],
    ]
    with pytest.raises(UserError, match="timestep 7.0 is not in the statistics"):
        ch.channel_ranges(frame, timesteps=[7.0])


def test_disparity_hand_case():
    frame = channel_frame({("blk.ffn", 1.0, "cond"): [(0, 1), (0, 2), (-1, 2), (0, 10), (4, 4)]})
    out = ch.disparity(ch.channel_ranges(frame)).iloc[0]
    ranges = np.array([1, 2, 3, 10, 0.0])
    assert out["channels"] == 5 and out["zero_range"] == 1
    assert out["max_median_ratio"] == pytest.approx(10 / 2)
    assert out["gini_range"] == pytest.approx(ch.gini(ranges))
    assert out["std_log_range"] == pytest.approx(np.std(np.log(ranges[:4])))


def levels_brute_force(cmin, cmax, lo, hi, bits):
    """Distinct levels a continuum [cmin, cmax] reaches, from a dense grid of values."""
    a, b = max(lo, cmin), min(hi, cmax)
    if a > b:
        return 0
    values = np.linspace(a, b, 200_001)
    step = (hi - lo) / (2**bits - 1)
    return np.unique(np.clip(np.round((values - lo) / step), 0, 2**bits - 1)).size


@pytest.mark.parametrize("bits", [8, 4])
def test_coverage_hand_cases(bits):
    spans = [(-1, 1), (0, 0.3), (-0.2, -0.1), (0.5, 0.5)]
    frame = channel_frame({("blk.ffn", 1.0, "cond"): spans})
    out = ch.coverage(ch.channel_ranges(frame), bits)
    assert (out["lo"] == -1).all() and (out["hi"] == 1).all()
    expected = {8: (1.0, 39 / 256), 4: (1.0, 3 / 16)}[bits]
    assert out["coverage"].iloc[:2].tolist() == pytest.approx(expected)
    for span, value in zip(spans, out["coverage"]):
        assert value == levels_brute_force(*span, -1, 1, bits) / 2**bits
    assert (out["coverage"] > 0).all() and (out["coverage"] <= 1).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_coverage_against_brute_force(bits):
    rng = np.random.default_rng(3)
    lo_hi = np.sort(rng.uniform(-3, 3, size=(12, 2)), axis=1)
    frame = channel_frame({("blk.conv", 1.0, "cond"): [tuple(s) for s in lo_hi]})
    # A calibrated range narrower than the data: some channels fall outside it.
    out = ch.coverage(ch.channel_ranges(frame), bits, quant_range={"blk.conv": (-1.0, 1.5)})
    for (cmin, cmax), value in zip(lo_hi, out["coverage"]):
        assert value == levels_brute_force(cmin, cmax, -1.0, 1.5, bits) / 2**bits
        assert value >= 0


def test_coverage_non_overlap_and_summary():
    frame = channel_frame({("blk.ffn", 1.0, "cond"): [(-1, 1), (0.9, 1.0), (0.0, 0.01), (2, 3)]})
    out = ch.coverage(ch.channel_ranges(frame), 8, quant_range={"blk.ffn": (-1.0, 1.0)})
    assert out["coverage"].iloc[3] == 0 and out["level_min"].iloc[3] == -1
    summary = ch.coverage_summary(out).iloc[0]
    values = out["coverage"].to_numpy()
    assert summary["mean_coverage"] == pytest.approx(values.mean())
    assert summary["median_coverage"] == pytest.approx(np.median(values))
    assert summary["share_below_threshold"] == pytest.approx(0.75)
    assert summary["threshold"] == 0.1 and summary["bits"] == 8


def test_coverage_summary_keeps_bit_widths_apart():
    frame = channel_frame({("blk.ffn", 1.0, "cond"): [(-1, 1), (0.0, 0.1), (0.5, 0.6)]})
    ranges = ch.channel_ranges(frame)
    both = pd.concat([ch.coverage(ranges, bits) for bits in (8, 4)], ignore_index=True)
    summary = ch.coverage_summary(both).set_index("bits")
    assert sorted(summary.index) == [4, 8]
    for bits in (8, 4):
        alone = ch.coverage_summary(ch.coverage(ranges, bits)).iloc[0]
        assert summary.loc[bits, "mean_coverage"] == pytest.approx(alone["mean_coverage"])
    assert summary.loc[4, "mean_coverage"] != summary.loc[8, "mean_coverage"]


@pytest.mark.parametrize("bits", [1, 33, 2.5, True])
def test_bad_bit_width(bits):
    frame = channel_frame({("blk.ffn", 1.0, "cond"): [(-1, 1)]})
    with pytest.raises(UserError, match="bit-width must be"):
        ch.coverage(ch.channel_ranges(frame), bits)
    with pytest.raises(UserError, match="bit-width must be"):
        ch.empirical_coverage(np.zeros((2, 1)), bits, -1.0, 1.0)


def test_bad_bit_width_message():
    with pytest.raises(UserError, match=r"^bit-width must be between 2 and 16, got 33$"):
        ch.empirical_coverage(np.zeros((2, 1)), 33, -1.0, 1.0)


def test_empirical_coverage():
    rng = np.random.default_rng(4)
    rows = np.stack(
        [
            rng.uniform(-1, 1, 500),
            np.tile([0.0, 0.5, 1.0], 167)[:500],  # exactly three levels at any bit-width
            rng.normal(0.2, 0.01, 500),
        ],
        axis=1,
    )
    rows[0, 2] = np.nan
    out = ch.empirical_coverage(torch.from_numpy(rows), 4, -1.0, 1.0)
    assert out["occupied_levels"].iloc[1] == 3 and out["rows"].tolist() == [500, 500, 499]
    for c in range(3):
        x = rows[:, c][np.isfinite(rows[:, c])]
        levels = np.unique(np.clip(np.round((x + 1) / (2 / 15)), 0, 15))
        assert out["empirical_coverage"].iloc[c] == levels.size / 16
    # Never more than the levels the channel's range can reach.
    frame = channel_frame(
        {("blk.ffn", 1.0, "cond"): [(np.nanmin(r), np.nanmax(r)) for r in rows.T]}
    )
    theory = ch.coverage(ch.channel_ranges(frame), 4, quant_range={"blk.ffn": (-1.0, 1.0)})
    assert (out["empirical_coverage"] <= theory["coverage"]).all()


def test_temporal_drift():
    frame = channel_frame(
        {
            ("blk.ffn", 999.0, "cond"): [(-1, 0), (0, 3)],  # step range 4
            ("blk.ffn", 500.0, "cond"): [(0, 1), (0, 0.5)],  # 1
            ("blk.ffn", 500.0, "uncond"): [(0, 2), (0, 0.5)],  # 2 with both branches
        }
    )
    out = ch.temporal_drift(frame).iloc[0]
    assert out["drift"] == pytest.approx(2.0)
    assert (out["timestep_of_min"], out["timestep_of_max"]) == (500.0, 999.0)
    cond = ch.temporal_drift(frame, branches=["cond"]).iloc[0]
    assert (cond["min_step_range"], cond["max_step_range"], cond["drift"]) == (1, 4, 4)


def test_weight_summary():
    generator = torch.Generator().manual_seed(5)
    weights = {"blk.ffn": torch.randn(6, 4, generator=generator) * torch.arange(1.0, 7.0)[:, None]}
    frame = store.weights_frame({k: weight_channel_stats(w) for k, w in weights.items()}, ROLES)
    out = ch.weight_summary(frame).iloc[0]
    w = weights["blk.ffn"].double().numpy()
    absmax = np.abs(w).max(1)
    assert out["out_channels"] == 6 and out["min"] == w.min() and out["max"] == w.max()
    assert out["absmax_max_median_ratio"] == pytest.approx(absmax.max() / np.median(absmax))
    assert out["absmax_gini"] == pytest.approx(ch.gini(absmax))


def test_quant_levels_degenerate_range():
    assert ch.quant_levels(torch.tensor([2.0, 3.0]), 2.0, 2.0, 8).tolist() == [0, 0]
    frame = channel_frame({("blk.ffn", 1.0, "cond"): [(2, 2)]})
    assert ch.coverage(ch.channel_ranges(frame), 8)["coverage"].tolist() == [1 / 256]
