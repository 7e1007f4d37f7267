"""Forward hooks and streaming, mergeable statistics.

The package is also the top-level function ``qvd_bench.collect(model, prompts, steps=,
out=)`` (``collect.api.collect``): the package name and the function name are one, so the
package object itself is callable. Importing it imports nothing heavy.
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    """This package, callable as ``collect.api.collect``."""

    def __call__(self, *args, **kwargs):
        from qvd_bench.collect.api import collect

        return collect(*args, **kwargs)


# The documented way to customise a Python module object (not a torch module): without it
# ``qvd_bench.collect`` would stop being the function once the package is imported.
sys.modules[__name__].__class__ = _CallablePackage
