"""The package's public API: exported names, imported on first use."""

import subprocess
import sys

import qvd_bench
from qvd_bench.evaluate.api import fidelity
from qvd_bench.quant.apply import apply_record, quantize_, unquantize_
from qvd_bench.quant.config import HtdqOptions, PercentileOptions, QuantConfig
from qvd_bench.quant.record import QuantRecord, load_record
from qvd_bench.store import StatsRun


def test_exports_are_the_library_objects():
    expected = {
        "fidelity": fidelity,
        "HtdqOptions": HtdqOptions,
        "PercentileOptions": PercentileOptions,
        "QuantConfig": QuantConfig,
        "QuantRecord": QuantRecord,
        "StatsRun": StatsRun,
        "apply_record": apply_record,
        "load_record": load_record,
        "quantize_": quantize_,
        "unquantize_": unquantize_,
    }
    assert set(qvd_bench.__all__) == {"__version__", "collect", *expected}
    for name, value in expected.items():
        assert getattr(qvd_bench, name) is value


def test_collect_is_the_statistics_package_and_calls_the_collect_function(monkeypatch):
    """``qvd_bench.collect`` is both the package (``qvd_bench.collect.collector``) and the
    function: the name stays callable after the package's modules are imported."""
    import qvd_bench.collect.api as api
    import qvd_bench.collect.collector  # noqa: F401  (binds the package as an attribute)

    seen = []
    monkeypatch.setattr(api, "collect", lambda *args, **kwargs: seen.append((args, kwargs)))
    qvd_bench.collect("tiny-unet3d", ["a cat"], steps=2, out="x")
    assert seen == [(("tiny-unet3d", ["a cat"]), {"steps": 2, "out": "x"})]
    assert qvd_bench.collect.collector.collect.__module__ == "qvd_bench.collect.collector"


def test_importing_the_package_imports_no_torch():
    code = "import sys, qvd_bench; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
