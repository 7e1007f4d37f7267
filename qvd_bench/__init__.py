"""qvd-bench: post-training quantization analysis and benchmarks for video diffusion models.

The public Python API, imported on first use (``import qvd_bench`` stays light, so the
command line starts fast)::

    import qvd_bench

    run = qvd_bench.StatsRun("stats/tiny-unet3d")
    record = qvd_bench.quantize_(model, qvd_bench.QuantConfig("qvd", 4, 8), stats=run)
"""

from __future__ import annotations

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "HtdqOptions": "qvd_bench.quant.config",
    "PercentileOptions": "qvd_bench.quant.config",
    "QuantConfig": "qvd_bench.quant.config",
    "QuantRecord": "qvd_bench.quant.record",
    "StatsRun": "qvd_bench.store",
    "apply_record": "qvd_bench.quant.apply",
    "load_record": "qvd_bench.quant.record",
    "quantize_": "qvd_bench.quant.apply",
    "unquantize_": "qvd_bench.quant.apply",
}

__all__ = [
    "__version__",
    "HtdqOptions",
    "PercentileOptions",
    "QuantConfig",
    "QuantRecord",
    "StatsRun",
    "apply_record",
    "load_record",
    "quantize_",
    "unquantize_",
]

# typing.TYPE_CHECKING without importing typing (it would add to every start-up).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from qvd_bench.quant.apply import apply_record, quantize_, unquantize_
    from qvd_bench.quant.config import HtdqOptions, PercentileOptions, QuantConfig
    from qvd_bench.quant.record import QuantRecord, load_record
    from qvd_bench.store import StatsRun


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qvd_bench' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
