"""Quantization records: export to safetensors + JSON and reload."""

from __future__ import annotations

import json

import pytest
import torch

from qvd_bench.errors import UserError
from qvd_bench.models.zoo import load_run_model
from qvd_bench.quant.apply import apply_record, quantize_
from qvd_bench.quant.config import HtdqOptions, QuantConfig
from qvd_bench.quant.record import RECORD_JSON, load_record
from tests.quant.helpers import out_of_scope, sample, tiny_stats


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
    assert reloaded.config == record.config


def test_load_record_errors(tmp_path):
    with pytest.raises(UserError, match="no quantization record"):
        load_record(tmp_path)
    (tmp_path / "record.json").write_text("{}")
    with pytest.raises(UserError, match="not a qvd-bench quantization record"):
        load_record(tmp_path)


def test_record_written_before_method_options_loads(tmp_path):
    """A record.json whose config has the old flat option fields still loads."""
    run = tiny_stats()
    record = quantize_(load_run_model(run), QuantConfig("htdq", 8, 8), stats=run)
    record.save(tmp_path)
    data = json.loads((tmp_path / RECORD_JSON).read_text())
    config = data["config"]
    del config["schema_version"], config["options"]
    config.update(percentile=0.999, htdq_tolerance=0.1)
    (tmp_path / RECORD_JSON).write_text(json.dumps(data))
    loaded = load_record(tmp_path)
    assert loaded.config == record.config
    assert loaded.config.options == HtdqOptions(0.1)
