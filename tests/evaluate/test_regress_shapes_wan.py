"""The baseline of the trained reference model ``shapes-wan``: its configuration, and a
fresh measurement of it against the committed baseline."""

from pathlib import Path

import pytest

from qvd_bench.datasets import shapes
from qvd_bench.errors import UserError
from qvd_bench.evaluate import regress

BASELINES = Path(__file__).resolve().parents[2] / "stats" / "baselines"
SHAPES_WAN = BASELINES / "shapes-wan.json"


def test_the_shapes_wan_configuration_is_where_the_model_was_trained():
    config = regress.configuration(model="shapes-wan")
    assert (config["frames"], config["height"], config["width"]) == (8, 16, 16)
    assert config["guidance_scale"] == 3.0 and config["scheduler"] == "flow-euler"
    prompts = regress.configuration_prompts(config)
    assert len(prompts) == config["num_prompts"]
    seen = set(shapes.heldout_captions("seen"))
    assert all(p in seen for p in prompts)
    # Every colour, shape and motion occurs among them.
    for vocabulary in (shapes.COLORS, shapes.SHAPES):
        assert all(any(f" {word} " in p for p in prompts) for word in vocabulary)
    assert len(set(prompts)) == len(prompts)
    # Explicit settings still win over the model's.
    assert regress.configuration(model="shapes-wan", steps=3)["steps"] == 3
    # A model of another source keeps the defaults and the built-in prompts; a preset with
    # random weights keeps its statistics figures only.
    assert regress.configuration(model="some/pipeline") == {
        **regress.REGRESS_CONFIG,
        "model": "some/pipeline",
    }
    assert regress.configuration(model="tiny-unet3d") == {
        **regress.REGRESS_CONFIG,
        **regress.RANDOM_WEIGHTS_CONFIG,
    }


def test_an_unknown_prompt_set_is_a_one_line_error():
    with pytest.raises(UserError, match="unknown prompt set 'nope'; known: shapes-seen"):
        regress.configuration(prompts="nope")


def test_the_shapes_wan_baseline_records_spreads_and_separates_the_methods():
    data = regress.load_baseline(SHAPES_WAN)
    assert data["configuration"] == regress._jsonable(regress.configuration(model="shapes-wan"))
    assert set(data["rounding_changes"]) == set(regress.ROUNDING_CHANGES)
    for name, entry in data["figures"].items():
        assert float(entry["tolerance"]) >= min(regress.SPREAD_MULTIPLE, 1.5) * float(
            entry["spread"]
        ), name
    pairs = regress.method_pairs(data)
    distinct = pairs[pairs["distinct"]]
    assert (distinct["tolerance"] <= distinct["difference"] / 2 + 1e-12).all()
    separated = {
        tuple(sorted(p))
        for p, kind in zip(zip(distinct["method_a"], distinct["method_b"]), distinct["kind"])
        if kind == "sqnr_tf"
    }
    assert {("mse", "qvd"), ("qvd", "qvd-htdq")} <= separated
    # The baseline file states the pairs it tells apart.
    recorded = {(p["kind"], p["bits"], *p["methods"]) for p in data["distinct_pairs"]}
    assert recorded == set(
        zip(distinct["kind"], distinct["bits"], distinct["method_a"], distinct["method_b"])
    )


def test_a_fresh_measurement_passes_against_the_committed_shapes_wan_baseline(tmp_path):
    config = regress.load_baseline_configuration(SHAPES_WAN)
    path, _ = regress.run_configuration(config, tmp_path)
    table, ok = regress.compare_with_baseline(path, SHAPES_WAN)
    assert ok, table[table["status"] != "ok"].to_string()
    assert (table["status"] == "ok").sum() == len(regress.load_baseline(SHAPES_WAN)["figures"])
