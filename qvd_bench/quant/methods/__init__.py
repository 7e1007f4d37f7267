"""Quantization methods, one module each, registered by name in ``METHODS``.

Importing this package imports every module in it, so a new method file registers
itself without being listed anywhere (``base.register_method``); ``get_method`` is
therefore defined here, where every method is known.
"""

import importlib
import pkgutil

from qvd_bench.quant.methods.base import (
    METHODS,
    Method,
    QuantContext,
    register_method,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def get_method(name: str) -> Method:
    """An instance of the registered method ``name`` (UserError with suggestions if unknown)."""
    return METHODS.get(name)()


__all__ = [
    "METHODS",
    "Method",
    "QuantContext",
    "get_method",
    "register_method",
]
