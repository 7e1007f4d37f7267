"""The switch between the compiled CPU kernels (numba) and PyTorch's operations.

Each compiled kernel computes what a PyTorch path beside it computes, for the inputs it
takes (float32 on the CPU, mostly); ``QVD_BENCH_KERNELS=torch`` in the environment sends
everything to the PyTorch paths instead.
"""

from __future__ import annotations

import os

KERNELS_ENV = "QVD_BENCH_KERNELS"


def fast_kernels_enabled() -> bool:
    """False when ``QVD_BENCH_KERNELS=torch`` asks for PyTorch's operations only."""
    return os.environ.get(KERNELS_ENV, "").strip().lower() != "torch"
