"""Quantization methods, one module each, registered by name in ``METHODS``.

Importing this package imports every module in it, so a new method file registers
itself without being listed anywhere (``base.register_method``).
"""

import importlib
import pkgutil

from qvd_bench.quant.methods.base import (
    METHODS,
    LayerRecord,
    Method,
    QuantContext,
    get_method,
    register_builder,
    register_method,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "METHODS",
    "LayerRecord",
    "Method",
    "QuantContext",
    "get_method",
    "register_builder",
    "register_method",
]
