"""Regression figures, tolerances from spread, and refusal of other configurations."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qvd_bench.errors import UserError
from qvd_bench.evaluate import regress
from qvd_bench.quant.record import LayerRecord, QuantRecord

COMMITTED = Path(__file__).resolve().parents[2] / "stats" / "baselines" / "tiny-unet3d.json"


def statuses(table: pd.DataFrame) -> dict[str, str]:
    return dict(zip(table["figure"], table["status"]))


def test_compare_rules():
    baseline = {
        "a": {"value": 10.0, "spread": 0.1, "tolerance": 0.5},
        "b": {"value": "inf", "spread": 0.0, "tolerance": 0.5},
        "c": {"value": 1.0, "spread": 0.0, "tolerance": 0.1},
        "gone": {"value": 1.0, "spread": 0.0, "tolerance": 0.0},
    }
    table, ok = regress.compare({"a": 10.4, "b": float("inf"), "c": 1.09, "new": 3.0}, baseline)
    assert statuses(table) == {"a": "ok", "b": "ok", "c": "ok", "gone": "MISSING", "new": "new"}
    assert not ok
    assert table.set_index("figure").loc["a", "detects"] == pytest.approx(0.6)
    table, ok = regress.compare({"a": 10.6, "b": 50.0, "c": 1.0, "gone": 1.0}, baseline)
    status = statuses(table)
    assert status["a"] == "REGRESSION" and status["b"] == "REGRESSION" and not ok


def test_spread_is_the_largest_deviation_over_the_changes():
    base = {"x": 1.0, "y": 2.0, "z": 3.0}
    changed = {"one": {"x": 1.25, "y": 2.0, "z": 3.0}, "two": {"x": 0.5, "y": 2.0}}
    assert regress.spreads(base, changed) == {"x": 0.5, "y": 0.0, "z": math.inf}


def test_tolerances_are_a_multiple_of_the_spread_with_a_floor_and_a_gap_cap():
    values = {
        "sqnr_tf/a/W8A8": 10.0,
        "sqnr_tf/b/W8A8": 11.0,  # 1.0 apart: distinct when the spread is below 1/3
        "sqnr_tf/c/W4A4": 10.1,  # other bits: never compared with a or b
        "layers_quantized/a/W8A8": 175.0,
    }
    spread = {
        "sqnr_tf/a/W8A8": 0.2,
        "sqnr_tf/b/W8A8": 0.1,
        "sqnr_tf/c/W4A4": 0.2,
        "layers_quantized/a/W8A8": 0.0,
    }
    tol = regress.tolerances(values, spread)
    # 3 x 0.2 = 0.6 > half the gap 0.5: capped; b: 3 x 0.1 = 0.3 stays.
    assert tol["sqnr_tf/a/W8A8"] == {"tolerance": 0.5, "rule": "gap to b"}
    assert tol["sqnr_tf/b/W8A8"]["tolerance"] == pytest.approx(0.3)
    assert tol["sqnr_tf/c/W4A4"]["tolerance"] == pytest.approx(0.6)
    assert tol["layers_quantized/a/W8A8"]["rule"] == "floor"
    assert tol["layers_quantized/a/W8A8"]["tolerance"] < 1e-3  # one layer more fails
    spread["sqnr_tf/b/W8A8"] = 0.4  # no longer distinct: no cap
    assert regress.tolerances(values, spread)["sqnr_tf/a/W8A8"]["rule"] == "spread"


def test_record_figures_against_a_direct_computation():
    weight = torch.randn(6, 5, dtype=torch.float64)
    scale = weight.abs().amax(1) / 7  # symmetric 4-bit min-max
    layers = [
        LayerRecord("a", "ffn", "linear", 4, "minmax", "static", 6,
                    tensors={"weight_scale": scale.float()}, info={"htdq": {"tdscore": 0.5}}),
        LayerRecord("b", "ffn", "linear", 8, "mse", "static", 8,
                    tensors={"weight_scale": scale.float() / 16, "weight": weight.float()},
                    info={"transform": {"coverage": 0.75}, "htdq": {"tdscore": 0.7}}),
        LayerRecord("c", "ffn", "linear", None, "none", "none", None),
    ]  # fmt: skip
    record = QuantRecord(config=None, model={}, layers=layers)
    figures = regress.record_figures(record, {"a": weight, "b": weight, "c": weight})
    assert figures["layers_quantized"] == 2
    assert figures["w_bits"] == 6 and figures["a_bits"] == 7
    assert figures["tdscore"] == pytest.approx(0.6) and figures["scri_coverage"] == 0.75
    expected = []
    for s, q_max, w in (
        (scale.float().double(), 7, weight),
        (scale.float().double() / 16, 127, weight.float().double()),
    ):
        fake = torch.fake_quantize_per_channel_affine(
            w.float(), s.float(), torch.zeros(6, dtype=torch.int32), 0, -q_max, q_max
        ).double()
        expected.append(10 * np.log10((w**2).sum().item() / ((w - fake) ** 2).sum().item()))
    assert figures["weight_sqnr"] == pytest.approx(np.mean(expected), abs=1e-4)


def write_figures(tmp_path, **overrides):
    config = regress.configuration(**overrides)
    return regress.write_figures(tmp_path, config, {"skew/io": 1.0})


def test_other_configurations_are_refused_in_one_line(tmp_path):
    path = write_figures(tmp_path, steps=10, frames=8)
    with pytest.raises(regress.OtherConfiguration) as info:
        regress.compare_with_baseline(tmp_path, COMMITTED)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, UserError)
    assert "frames (baseline 2, results 8)" in message and "steps (baseline 4" in message
    assert info.value.differences == [
        "frames (baseline 2, results 8)",
        "steps (baseline 4, results 10)",
    ]
    assert path.is_file()


def test_results_of_qvd_bench_run_are_refused_naming_the_settings(tmp_path):
    results = tmp_path / "results" / "tiny-unet3d"
    results.mkdir(parents=True)
    pd.DataFrame({"value": [1.0]}).to_parquet(results / "results.parquet")
    settings = {"steps": 10, "guidance_scale": 7.5, "seed": 0, "frames": 8, "height": 16,
                "width": 16, "scheduler": "ddim"}  # fmt: skip
    config = {"model": "tiny-unet3d", "weight_seeds": [0], "prompts": ["a", "b"],
              "methods": ["fp", "mse"], "bits": ["W8A8"], "settings": settings}  # fmt: skip
    (results / "settings.json").write_text(json.dumps({"config": config}))
    with pytest.raises(UserError, match=r"methods \(baseline none, results fp,mse\)"):
        regress.compare_with_baseline(tmp_path, COMMITTED)


def test_bad_baselines_are_one_line_errors(tmp_path):
    write_figures(tmp_path)
    with pytest.raises(UserError, match="no baseline"):
        regress.compare_with_baseline(tmp_path, tmp_path / "none.json")
    foreign = tmp_path / "foreign.json"
    foreign.write_text("{}")
    with pytest.raises(UserError, match="not a qvd-bench baseline"):
        regress.compare_with_baseline(tmp_path, foreign)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": regress.BASELINE_FORMAT, "figures": {}}))
    with pytest.raises(UserError, match="older format; regenerate it"):
        regress.compare_with_baseline(tmp_path, old)
    with pytest.raises(UserError, match="no figures.json"):
        regress.compare_with_baseline(tmp_path / "empty", COMMITTED)


def test_the_committed_baseline_records_spreads_and_environment():
    data = regress.load_baseline(COMMITTED)
    assert set(data["rounding_changes"]) == set(regress.ROUNDING_CHANGES)
    assert {"torch", "diffusers", "numpy", "machine"} <= set(data["environment"])
    assert data["spread_multiple"] == regress.SPREAD_MULTIPLE
    for name, entry in data["figures"].items():
        spread, tol = float(entry["spread"]), float(entry["tolerance"])
        assert tol >= min(regress.SPREAD_MULTIPLE, 1.5) * spread, name
        assert tol >= regress.floor_for(float(entry["value"])) * (1 - 1e-12), name


def test_the_random_preset_baseline_holds_statistics_figures_only():
    data = regress.load_baseline(COMMITTED)
    assert data["configuration"] == regress._jsonable(regress.configuration(model="tiny-unet3d"))
    assert data["configuration"]["methods"] == [] and data["configuration"]["bits"] == []
    kinds = {name.split("/")[0] for name in data["figures"]}
    assert kinds == {"skew", "kurtosis", "coverage_a8", "coverage_a4", "cfg_skew_gap"}
    assert data["distinct_pairs"] == []


def test_a_fresh_measurement_passes_against_the_committed_statistics_baseline(tmp_path):
    config = regress.load_baseline_configuration(COMMITTED)
    path, _ = regress.run_configuration(config, tmp_path)
    table, ok = regress.compare_with_baseline(path, COMMITTED)
    assert ok, table[table["status"] != "ok"].to_string()
    assert (table["status"] == "ok").all()


def test_the_statistics_of_two_gloo_processes_are_the_single_process_ones(tmp_path):
    """The ``gloo-2`` rounding change: the collection sharded over two processes, merged as
    under ``torchrun``, holds the single-process statistics (moments to float64 rounding)."""
    from qvd_bench.store import StatsRun

    config = regress.configuration(num_prompts=3, steps=2, frames=1, height=8, width=8)
    runs = []
    for name, rounding in (("one", regress.AS_STATED), ("two", regress.ROUNDING_CHANGES["gloo-2"])):
        m = regress.Measurement(config, tmp_path / name, rounding)
        runs.append(StatsRun(regress.collect_stage(m)))
    one, two = runs
    assert (one.manifest["world_size"], two.manifest["world_size"]) == (1, 2)
    moments = ["mean", "m2", "m3", "m4"]
    pd.testing.assert_frame_equal(
        one.channels.drop(columns=moments), two.channels.drop(columns=moments)
    )
    for field in moments:
        np.testing.assert_allclose(two.channels[field], one.channels[field], rtol=1e-8, atol=1e-12)
    pd.testing.assert_frame_equal(one.histograms, two.histograms)


def test_separate_cfg_forwards_give_the_batched_values_up_to_rounding():
    """The ``cfg-separate`` rounding change computes the same thing: the branches as two
    forwards instead of one batch, compared with the batched run."""
    from qvd_bench.evaluate.generate import GenerationSettings, generate
    from qvd_bench.models import zoo
    from qvd_bench.models.sampling import CallTracker

    loaded = zoo.load_model("tiny-unet3d")
    settings = GenerationSettings(steps=2, frames=2, height=16, width=16)
    calls = []
    tracker = CallTracker(loaded.denoiser).attach()
    hook = loaded.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0] if args else kwargs["sample"]).shape[0]),
        with_kwargs=True,
    )
    try:
        batched = generate(loaded, "a cat", 0, settings, tracker=tracker)
        separate = generate(loaded, "a cat", 0, settings, tracker=tracker, batch_cfg=False)
    finally:
        hook.remove()
        tracker.detach()
    assert calls == [2, 2, 1, 1, 1, 1]  # one batch of both branches per step, then two
    # CFG (scale 7.5) amplifies last-bit differences of the branches: compare energies.
    for name in ("prediction", "latents"):
        a, b = getattr(separate, name), getattr(batched, name)
        assert float((a - b).norm() / b.norm()) < 1e-4


def test_paired_figures_are_differences_to_the_first_method():
    config = regress.configuration(methods=("mse", "qvd"), bits=("W8A8",))
    figures = {
        "sqnr_tf/mse/W8A8": 20.0,
        "sqnr_tf/qvd/W8A8": 21.5,
        "cosine_tf/mse/W8A8": 0.9,
        "cosine_tf/qvd/W8A8": 0.95,
    }
    paired = regress.paired_figures(figures, config)
    assert paired == pytest.approx({"sqnr_tf_gain/qvd/W8A8": 1.5, "cosine_tf_gain/qvd/W8A8": 0.05})
    # A figure a method lacks gives no pair.
    del figures["cosine_tf/qvd/W8A8"]
    assert set(regress.paired_figures(figures, config)) == {"sqnr_tf_gain/qvd/W8A8"}
