"""The job's progress bar: its ETA before the first unit, weighted stages."""

import io
import re

import pytest

from qvd_bench.commands.run import job_config, run_settings
from qvd_bench.evaluate.matrix import planned_steps, planned_work
from qvd_bench.evaluate.progress import (
    COLLECT_STEP_COST,
    PROBE_FORWARDS_PER_UNIT,
    QUANTIZE_COST,
    REPORT_COST,
    JobBar,
    Weighted,
    seconds_per_unit,
)


def _shown(buffer: io.StringIO) -> str:
    return buffer.getvalue().split("\r")[-1]


def test_eta_before_the_first_unit_is_the_prior_estimate():
    buffer = io.StringIO()
    bar = JobBar(total=120, file=buffer, seconds_per_unit=0.5, mininterval=0)
    # 120 units at 0.5 s each: 60 s, shown before anything is done.
    assert re.search(r"0/120 \[00:00<01:00, ", _shown(buffer))
    bar.update(60)
    bar.close()
    # Once units are done, the rate is measured, not the prior's (half done would be 00:30).
    assert "60/120" in _shown(buffer) and "<00:30" not in _shown(buffer)

    buffer = io.StringIO()
    JobBar(total=120, file=buffer).close()
    assert "0/120 [00:00<?" in _shown(buffer)  # no prior: tqdm's unknown


def test_prior_is_the_machine_probe_times_the_default_job_in_probe_forwards(tmp_path):
    # The default job's units, counted from its configuration, cost the 520 probe
    # forwards the README states for it.
    config = job_config(run_settings())
    steps = planned_steps(config, tmp_path)
    work = planned_work(config, tmp_path)
    quantizing = len(config.methods) - 1  # fp quantizes nothing
    assert work == {
        "statistics": steps["statistics"] * COLLECT_STEP_COST,
        "fp reference": steps["fp reference"],
        "quantize": quantizing * len(config.bits) * QUANTIZE_COST,
        "quantized": steps["quantized"],
    }
    units = sum(work.values()) + REPORT_COST
    assert units * PROBE_FORWARDS_PER_UNIT == pytest.approx(520)
    assert seconds_per_unit(0.2) * units == pytest.approx(0.2 * 520)


def test_weighted_stage_advances_the_bar_by_its_weight():
    bar = JobBar(total=100, file=io.StringIO())
    stage = Weighted(bar, 8)
    stage.unpause()
    stage.update(2)
    stage.update()
    assert bar.n == 24
