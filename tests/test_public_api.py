"""The package's public API: exported names, imported on first use."""

import subprocess
import sys

import qvd_bench
from qvd_bench.quant.apply import apply_record, quantize_, unquantize_
from qvd_bench.quant.config import HtdqOptions, PercentileOptions, QuantConfig
from qvd_bench.quant.record import QuantRecord, load_record
from qvd_bench.store import StatsRun


def test_exports_are_the_library_objects():
    expected = {
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
    assert set(qvd_bench.__all__) == {"__version__", *expected}
    for name, value in expected.items():
        assert getattr(qvd_bench, name) is value


def test_importing_the_package_imports_no_torch():
    code = "import sys, qvd_bench; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
