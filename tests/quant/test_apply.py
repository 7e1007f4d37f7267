"""quantize_ and the errors bad input gets; options reach the method."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qvd_bench.errors import UserError
from qvd_bench.models.zoo import load_model, load_run_model
from qvd_bench.quant.apply import make_plan_for, quantize_, unquantize_
from qvd_bench.quant.config import PercentileOptions, QuantConfig
from tests.quant.helpers import tiny_stats


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


def test_percentile_options_reach_the_method():
    run = tiny_stats()
    loaded = load_run_model(run)

    def scales(options):
        record = quantize_(loaded, QuantConfig("percentile", 8, 8, options=options), stats=run)
        unquantize_(loaded, record)
        return record.config.options, [r.tensors["act_scale"] for r in record.layers]

    default_options, default = scales(None)
    explicit_options, explicit = scales(PercentileOptions(0.999))
    narrow_options, narrow = scales(PercentileOptions(0.9))
    assert default_options == explicit_options == PercentileOptions(0.999)
    assert narrow_options == PercentileOptions(0.9)
    assert all(torch.equal(a, b) for a, b in zip(default, explicit, strict=True))
    assert all(float(n) <= float(d) for n, d in zip(narrow, default, strict=True))
    assert any(float(n) < float(d) for n, d in zip(narrow, default, strict=True))
