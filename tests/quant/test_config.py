"""QuantConfig, the options of single methods, and bit-width specs."""

from __future__ import annotations

import dataclasses
import json

import pytest

from qvd_bench.config import SCHEMA_VERSION
from qvd_bench.errors import UserError
from qvd_bench.quant.config import (
    METHOD_OPTIONS,
    PRESETS,
    HtdqOptions,
    PercentileOptions,
    QuantConfig,
    parse_bits,
)
from qvd_bench.quant.methods import METHODS


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
    with pytest.raises(UserError, match=r"^Lp exponent p must"):
        QuantConfig("mse", p=0.0)
    config = QuantConfig("mse", keep_fp_layers=["conv_in"])
    assert QuantConfig.from_dict(config.to_dict()) == config


def test_options_belong_to_registered_methods():
    assert set(METHOD_OPTIONS) <= set(METHODS)


def test_method_options_default_and_given():
    assert QuantConfig("percentile").options == PercentileOptions(percentile=0.999)
    assert QuantConfig("qvd").options == HtdqOptions(tolerance=0.1)
    assert QuantConfig("mse").options is None
    given = QuantConfig("htdq", 4, 8, options=HtdqOptions(tolerance=0.25))
    assert given.options.tolerance == 0.25
    # A config keeps its options through replace (mixed precision, resolving defaults).
    assert dataclasses.replace(given, a_bits=6).options == given.options


def test_wrong_options_name_the_parameter():
    with pytest.raises(UserError, match=r"^options: method 'minmax' takes no options"):
        QuantConfig("minmax", options=HtdqOptions())
    with pytest.raises(UserError, match=r"^options: method 'qvd' takes HtdqOptions, got Perc"):
        QuantConfig("qvd", options=PercentileOptions())
    with pytest.raises(UserError, match=r"^percentile must be in \[0.5, 1\], got 2"):
        PercentileOptions(percentile=2)
    with pytest.raises(UserError, match=r"^tolerance must be >= 0, got -1"):
        HtdqOptions(tolerance=-1)
    with pytest.raises(TypeError, match="percentile"):
        QuantConfig("percentile", percentile=0.99)  # the option is not a config field


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig("percentile", 8, 6, options=PercentileOptions(0.9999)),
        QuantConfig("qvd-htdq", 4, 8, options=HtdqOptions(0.3), role_bits=(("ffn", 8, 8),)),
        QuantConfig("smoothquant", attention_bits=(8,), split_skip=True, p=2.0),
    ],
)
def test_json_round_trip(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert data["schema_version"] == SCHEMA_VERSION
    assert QuantConfig.from_dict(data) == config


def test_from_dict_errors():
    data = QuantConfig("htdq").to_dict()
    with pytest.raises(UserError, match="unknown options of method 'htdq': tolerence"):
        QuantConfig.from_dict({**data, "options": {"tolerence": 0.2}})
    with pytest.raises(UserError, match="options: method 'mse' takes no options"):
        QuantConfig.from_dict({**data, "method": "mse"})
    with pytest.raises(UserError, match="schema version 99"):
        QuantConfig.from_dict({**data, "schema_version": 99})
    with pytest.raises(UserError, match="unknown quantization config fields: bogus"):
        QuantConfig.from_dict({**data, "bogus": 1})


def test_unversioned_dicts_of_older_records():
    """Configs saved before method options carried every method's option at the top."""
    old = {
        "method": "percentile",
        "w_bits": 8,
        "a_bits": 4,
        "weight_clipping": "minmax",
        "granularity": "tensor",
        "timestep_groups": 4,
        "keep_fp_roles": [],
        "keep_fp_layers": [],
        "role_bits": [],
        "layer_bits": [],
        "attention_bits": [],
        "split_skip": False,
        "p": 2.4,
        "percentile": 0.99,
        "htdq_tolerance": 0.1,
    }
    config = QuantConfig.from_dict(old)
    assert config.options == PercentileOptions(0.99)
    assert (config.a_bits, config.weight_clipping) == (4, "minmax")
    assert QuantConfig.from_dict({**old, "method": "qvd"}).options == HtdqOptions(0.1)
    assert QuantConfig.from_dict({**old, "method": "mse"}).options is None
