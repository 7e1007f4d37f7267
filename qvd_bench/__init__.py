"""qvd-bench: post-training quantization analysis and benchmarks for video diffusion models.

The public Python API, imported on first use (``import qvd_bench`` stays light, so the
command line starts fast)::

    import qvd_bench

    run = qvd_bench.collect(pipe, prompts, steps=20, out="stats/my-model")
    record = qvd_bench.quantize_(pipe, qvd_bench.QuantConfig("qvd", 4, 8), stats=run)
    table = qvd_bench.fidelity(pipe, record, prompts, steps=20)

``pipe`` is a diffusers pipeline object (a model name or a pipeline directory works for
``collect`` too); ``qvd_bench.StatsRun("stats/my-model")`` reopens a stored run.
``qvd_bench.collect`` is also the statistics package: the package object is callable.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Public name -> the module that defines it ("collect" is the callable package itself).
_EXPORTS = {
    "collect": "qvd_bench.collect",
    "fidelity": "qvd_bench.evaluate.api",
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
    "collect",
    "fidelity",
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

    from qvd_bench import collect
    from qvd_bench.evaluate.api import fidelity
    from qvd_bench.quant.apply import apply_record, quantize_, unquantize_
    from qvd_bench.quant.config import HtdqOptions, PercentileOptions, QuantConfig
    from qvd_bench.quant.record import QuantRecord, load_record
    from qvd_bench.store import StatsRun


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qvd_bench' has no attribute {name!r}")
    import importlib

    value = importlib.import_module(module)
    if module != f"{__name__}.{name}":  # the callable package is the export itself
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
