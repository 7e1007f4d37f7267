"""The mutation suite: the committed baseline catches every deliberate fault and passes
every rounding change.

The baseline configuration is measured once as stated (statistics collected once); each
fault reruns only the stages from the one it changes (``faults.FAULTS``), each rounding
change (``regress.ROUNDING_CHANGES``) reruns everything.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from qvd_bench.evaluate import regress
from qvd_bench.quant.methods import base
from tests.mutation.faults import FAULTS

COMMITTED = Path(__file__).resolve().parents[2] / "stats" / "baselines" / "tiny-unet3d.json"


@pytest.fixture(scope="module")
def baseline():
    return regress.load_baseline(COMMITTED)


@pytest.fixture(scope="module")
def stated(baseline, tmp_path_factory):
    config = regress.load_baseline_configuration(COMMITTED)
    return regress.measure(config, tmp_path_factory.mktemp("stated"))


def failing(table) -> list[str]:
    return list(table.loc[table["status"].isin(["REGRESSION", "MISSING"]), "figure"])


def test_the_stated_run_passes(stated, baseline):
    table, ok = regress.compare(stated[0], baseline["figures"])
    assert ok, failing(table)


def rerun(measurement: regress.Measurement, stage: str, stated_figures, work: Path):
    """The figures with the stages from ``stage`` on run again."""
    m = copy.copy(measurement)
    if stage == "collect":
        m.work_dir = work
        regress.collect_stage(m)
    if stage in ("collect", "analysis"):
        regress.analysis_stage(m, into=work / "analyzed")
        figures = regress.statistics_figures(m.run_dir)
    else:
        figures = {k: v for k, v in stated_figures.items() if k.split("/")[0] in STATISTICS}
    figures.update(regress.method_figures(m))
    return figures


STATISTICS = ("skew", "kurtosis", "coverage_a8", "coverage_a4", "cfg_skew_gap")


@pytest.mark.parametrize("name", list(FAULTS))
def test_every_fault_is_caught(name, stated, baseline, monkeypatch, tmp_path):
    fault = FAULTS[name]
    # Searches are memoised by their inputs' content; a fault inside one must not be
    # hidden by the unfaulty run's values.
    monkeypatch.setattr(base, "_SEARCHES", {})
    fault.inject(monkeypatch)
    figures = rerun(stated[1], fault.stage, stated[0], tmp_path)
    table, ok = regress.compare(figures, baseline["figures"])
    assert not ok
    caught = failing(table)
    print(f"\nFAULT {name}: caught by {len(caught)}: {', '.join(caught)}")


@pytest.mark.parametrize("change", list(regress.ROUNDING_CHANGES))
def test_rounding_changes_pass(change, stated, baseline, tmp_path):
    rounding = regress.ROUNDING_CHANGES[change]
    if rounding.changes_statistics:
        config = regress.load_baseline_configuration(COMMITTED)
        figures, _ = regress.measure(config, tmp_path, rounding)
    else:  # the same statistics: only the FP reference and the quantized runs again
        m = copy.copy(stated[1])
        m.rounding = rounding
        regress.reference_stage(m)
        figures = {k: v for k, v in stated[0].items() if k.split("/")[0] in STATISTICS}
        figures.update(regress.method_figures(m))
    table, ok = regress.compare(figures, baseline["figures"])
    assert ok, failing(table)
