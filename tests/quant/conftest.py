"""Fixtures shared by the quantization tests."""

import pytest

from qvd_bench.store import StatsRun
from tests.quant.helpers import tiny_run


@pytest.fixture(scope="session")
def unet_run() -> StatsRun:
    """``collect_tiny`` statistics of tiny-unet3d (weight seed 0), collected once per process."""
    return tiny_run("tiny-unet3d")
