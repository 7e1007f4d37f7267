"""The mutation suite: the committed baseline of the trained reference model catches every
deliberate fault and passes every rounding change.

The baseline configuration is measured once as stated (statistics collected once); each
fault reruns only the stages from the one it changes (``faults.FAULTS``), each rounding
change (``regress.ROUNDING_CHANGES``) only the stages it touches: the collection and
analysis when it changes the statistics, the FP reference when it changes the
generations, and the quantized runs always.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from qvd_bench.evaluate import regress
from qvd_bench.quant.methods import base
from tests.mutation.faults import FAULTS

COMMITTED = Path(__file__).resolve().parents[2] / "stats" / "baselines" / "shapes-wan.json"
STATISTICS = ("skew", "kurtosis", "coverage_a8", "coverage_a4", "cfg_skew_gap")


@pytest.fixture(scope="module")
def baseline():
    return regress.load_baseline(COMMITTED)


@pytest.fixture(scope="module")
def stated(tmp_path_factory):
    config = regress.load_baseline_configuration(COMMITTED)
    return regress.measure(config, tmp_path_factory.mktemp("stated"))


def failing(table) -> list[str]:
    return list(table.loc[table["status"].isin(["REGRESSION", "MISSING"]), "figure"])


def test_the_stated_run_passes(stated, baseline):
    table, ok = regress.compare(stated[0], baseline["figures"])
    assert ok, failing(table)
    assert not (table["status"] == "new").any()


def rerun(
    measurement: regress.Measurement,
    stated_figures: dict[str, float],
    work: Path,
    *,
    statistics: bool,
    reference: bool,
) -> dict[str, float]:
    """The figures with the statistics (collection and analysis) and the FP reference run
    again where asked, the quantized runs always."""
    m = copy.copy(measurement)
    if statistics:
        m.work_dir = work
        with regress._threads(m.rounding.threads):
            regress.collect_stage(m)
            regress.analysis_stage(m)
        figures = regress.statistics_figures(m.run_dir)
    else:
        figures = {k: v for k, v in stated_figures.items() if k.split("/")[0] in STATISTICS}
    if reference:
        regress.reference_stage(m)
    figures.update(regress.method_figures(m))
    figures.update(regress.paired_figures(figures, m.config))
    return figures


@pytest.mark.parametrize("name", list(FAULTS))
def test_every_fault_is_caught(name, stated, baseline, monkeypatch, tmp_path):
    fault = FAULTS[name]
    # Searches are memoised by their inputs' content; a fault inside one must not be
    # hidden by the unfaulty run's values.
    monkeypatch.setattr(base, "_SEARCHES", {})
    fault.inject(monkeypatch)
    m = copy.copy(stated[1])
    if fault.stage == "analysis":  # the statistics stay, the analysis is redone
        regress.analysis_stage(m, into=tmp_path / "analyzed")
        figures = regress.statistics_figures(m.run_dir)
        figures.update(regress.method_figures(m))
        figures.update(regress.paired_figures(figures, m.config))
    else:
        figures = rerun(
            m, stated[0], tmp_path, statistics=fault.stage == "collect", reference=False
        )
    table, ok = regress.compare(figures, baseline["figures"])
    assert not ok
    caught = failing(table)
    print(f"\nFAULT {name}: caught by {len(caught)}: {', '.join(caught)}")


@pytest.mark.parametrize("change", list(regress.ROUNDING_CHANGES))
def test_rounding_changes_pass(change, stated, baseline, tmp_path):
    m = copy.copy(stated[1])
    m.rounding = regress.ROUNDING_CHANGES[change]
    figures = rerun(
        m,
        stated[0],
        tmp_path,
        statistics=m.rounding.changes_statistics,
        reference=m.rounding.changes_generations,
    )
    table, ok = regress.compare(figures, baseline["figures"])
    assert ok, failing(table)
