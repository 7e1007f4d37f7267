"""The cost printed before a collection against what the collection measured."""

from __future__ import annotations

import json

import pytest

from qvd_bench.collect.collector import collect
from qvd_bench.collect.cost import LARGE_STATE_BYTES, advice, estimate_cost
from qvd_bench.collect.hooks import LayerInfo
from qvd_bench.config import CollectConfig


@pytest.mark.parametrize("model", ["tiny-unet3d", "tiny-ltx"])
def test_estimate_is_within_ten_percent_of_the_measured_collection(tmp_path, model):
    estimates = []
    config = CollectConfig(model=model, steps=3, prompts=("a red fox", "a boat at sea"))
    collect(config, tmp_path / "run", progress=False, on_estimate=estimates.append)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    estimate, measured = manifest["cost"]["estimate"], manifest["cost"]["measured"]
    assert estimates[0].to_dict() == estimate
    # Moments, histograms and temporal features are exact; the reservoir bound is close.
    for part in ("moments", "histograms", "temporal"):
        assert estimate["accumulator_parts"][part] == measured["accumulator_parts"][part]
    assert estimate["accumulator_bytes"] == pytest.approx(measured["accumulator_bytes"], rel=0.1)
    stages = manifest["cost"]["stages"]
    assert [s["stage"] for s in stages] == ["load", "sample", "finish"]
    assert all(s["wall_s"] > 0 and s["peak_host_bytes"] > 0 for s in stages)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "run").iterdir())
    assert estimate["store_bytes"] == pytest.approx(on_disk, rel=0.1)


def test_keys_channels_and_large_state_advice():
    layers = [LayerInfo("a", "ffn", "table", "linear", 5120, 13824)]
    cost = estimate_cost(layers, {"a": 50}, branches=2, samples=1)
    assert (cost.keys, cost.channels, cost.channel_rows) == (100, 5120, 512_000)
    assert cost.accumulator_bytes == 512_000 * 72
    assert advice(cost) == ""
    big = estimate_cost(layers * 3000, {"a": 50}, branches=2, samples=1)
    assert big.accumulator_bytes > LARGE_STATE_BYTES
    assert "hook fewer layers" in advice(big)
