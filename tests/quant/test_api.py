"""quantize_ / records, and the errors bad input gets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qvd_bench.errors import UserError
from qvd_bench.models.zoo import load_model, load_run_model
from qvd_bench.quant.api import (
    PRESETS,
    QuantConfig,
    apply_record,
    load_record,
    make_plan_for,
    parse_bits,
    quantize_,
)
from tests.quant.test_methods import out_of_scope, sample, tiny_stats


def test_parse_bits():
    assert parse_bits("W4A8") == (4, 8)
    assert parse_bits("w16a2") == (16, 2)
    for name, bits in PRESETS.items():
        assert parse_bits(name) == bits
    for bad in ("W1A8", "W8A17", "8/8", "W8"):
        with pytest.raises(UserError):
            parse_bits(bad)


def test_config_validation():
    with pytest.raises(UserError):
        QuantConfig("mse", 1, 8)
    with pytest.raises(UserError):
        QuantConfig("mse", granularity="channel")
    config = QuantConfig("mse", keep_fp_layers=["conv_in"])
    assert QuantConfig.from_dict(config.to_dict()) == config


def test_unknown_method_suggests():
    with pytest.raises(UserError, match="did you mean 'mse'"):
        quantize_(torch.nn.Linear(2, 2), QuantConfig("msee"), stats=tiny_stats())


def test_stats_from_another_model():
    other = load_model("tiny-latte")
    with pytest.raises(UserError, match="another model"):
        quantize_(other, QuantConfig("minmax"), stats=tiny_stats())


def test_plan_naming_missing_layers():
    run = tiny_stats()
    plan = make_plan_for(run, QuantConfig("qvd"))
    renamed = dataclasses.replace(plan.layers[0], layer="no.such.layer")
    bad = dataclasses.replace(plan, layers=(renamed, *plan.layers[1:]))
    with pytest.raises(UserError, match="no.such.layer"):
        quantize_(load_run_model(run), QuantConfig("qvd"), stats=run, plan=bad)


def test_already_quantized():
    run = tiny_stats()
    loaded = load_run_model(run)
    quantize_(loaded, QuantConfig("minmax"), stats=run)
    with pytest.raises(UserError, match="already quantized"):
        quantize_(loaded, QuantConfig("minmax"), stats=run)


@pytest.mark.parametrize("method", ["qvd", "timestep_aware", "fsc"])
def test_export_reload_identical(method, tmp_path):
    run = tiny_stats()
    loaded = load_run_model(run)
    config = QuantConfig(method, 4, 6, keep_fp_layers=out_of_scope(run))
    record = quantize_(loaded, config, stats=run)
    expected = sample(loaded, record.tracker)
    record.save(tmp_path)
    fresh = load_run_model(run)
    reloaded = apply_record(fresh, load_record(tmp_path))
    assert torch.equal(sample(fresh, reloaded.tracker), expected)
    assert [r.meta() for r in reloaded.layers] == [r.meta() for r in record.layers]


def test_load_record_errors(tmp_path):
    with pytest.raises(UserError, match="no quantization record"):
        load_record(tmp_path)
    (tmp_path / "record.json").write_text("{}")
    with pytest.raises(UserError, match="not a qvd-bench quantization record"):
        load_record(tmp_path)
