"""``measure_stage``: wall time and peak host memory of a stage, nested stages."""

from __future__ import annotations

import mmap
import time

import numpy as np
import pytest
import torch

from qvd_bench import resources
from qvd_bench.resources import measure_stage

MIB = 1 << 20
# The kernel updates the resident-set counters lazily (per-thread caches): two readings of
# the same peak may differ by this much.
SLACK = 8 * MIB


class _touch:
    """``nbytes`` of resident pages, returned to the system by ``del``.

    An anonymous mapping of its own, not the allocator's heap: after earlier tests have
    raised glibc's mmap threshold, a freed numpy array can stay resident and count in the
    next stage's peak.
    """

    def __init__(self, nbytes: int):
        self.block = mmap.mmap(-1, nbytes)
        np.frombuffer(self.block, dtype=np.uint8).fill(1)

    def __del__(self):
        self.block.close()


def test_stage_peak_counts_its_own_allocation_and_not_an_earlier_one():
    if not resources._reset_host_peak():
        pytest.skip("the resident-set high-water mark cannot be reset here")
    earlier = _touch(400 * MIB)
    del earlier  # the process peak now holds 400 MiB more than what is resident
    with measure_stage("small") as small:
        kept = _touch(50 * MIB)
    del kept
    with measure_stage("large") as large:
        kept = _touch(200 * MIB)
        resident = resources._host_peak()
    del kept
    assert small.host_scope == large.host_scope == "stage"
    # The small stage does not see the earlier 400 MiB; the large one sees its 200 MiB.
    assert small.peak_host_bytes < large.peak_host_bytes - 100 * MIB
    assert large.peak_host_bytes >= resident - SLACK
    assert small.peak_device_bytes is None and large.peak_device_bytes is None


def test_an_inner_stage_does_not_hide_the_outer_peak():
    if not resources._reset_host_peak():
        pytest.skip("the resident-set high-water mark cannot be reset here")
    with measure_stage("outer") as outer:
        kept = _touch(300 * MIB)
        high = resources._host_peak()
        del kept
        with measure_stage("inner") as inner:  # resets the mark after the 300 MiB
            pass
    assert outer.peak_host_bytes >= high - SLACK
    assert inner.peak_host_bytes < high - 200 * MIB


def test_wall_time_and_record():
    with measure_stage("sleep", device="cpu") as cost:
        started = time.perf_counter()
        time.sleep(0.05)
        elapsed = time.perf_counter() - started
    assert cost.wall_s >= elapsed
    record = cost.to_dict()
    assert set(record) == {"stage", "wall_s", "peak_host_bytes", "peak_device_bytes", "host_scope"}
    assert record["stage"] == "sleep" and record["peak_device_bytes"] is None


def test_process_scope_where_the_mark_cannot_be_reset(monkeypatch):
    monkeypatch.setattr(resources, "_CLEAR_REFS", "/nonexistent/clear_refs")
    with measure_stage("stage") as cost:
        pass
    assert cost.host_scope == "process"
    assert cost.peak_host_bytes >= resources._host_peak() - SLACK


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_peak_on_cuda():
    with measure_stage("cuda", device="cuda") as cost:
        block = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda")
        del block
    assert cost.peak_device_bytes >= 64 * MIB
