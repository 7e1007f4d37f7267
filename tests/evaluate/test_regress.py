"""Regression check against a baseline, and the committed tiny-unet3d baseline."""

import json
from pathlib import Path

import pandas as pd
import pytest

from qvd_bench.commands.run import run_job
from qvd_bench.errors import UserError
from qvd_bench.evaluate import regress
from qvd_bench.evaluate.results import RESULTS_FILE
from qvd_bench.numerics.kernels import KERNELS_ENV

COMMITTED = Path(__file__).resolve().parents[2] / "stats" / "baselines" / "tiny-unet3d.json"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The committed baseline's reduced run configuration, run once."""
    root = tmp_path_factory.mktemp("baseline-run")
    run_job(root, progress=False, **regress.BASELINE_RUN)
    return root


def statuses(table: pd.DataFrame) -> dict[str, str]:
    return dict(zip(table["figure"], table["status"]))


def test_the_baseline_run_matches_the_committed_baseline(out):
    recorded = json.loads(COMMITTED.read_text())["configuration"]["run"]
    for key, value in regress.BASELINE_RUN.items():
        assert recorded[key] == (list(value) if isinstance(value, tuple) else value)
    table, ok = regress.compare_with_baseline(out, COMMITTED)
    assert ok and "REGRESSION" not in statuses(table).values()


def test_the_baseline_holds_under_other_float_rounding(tmp_path, monkeypatch):
    """PyTorch's operations instead of qvd-bench's compiled statistics kernels: the same
    computation rounded differently, which moves the quantized figures (TOLERANCES comment) within tolerance."""
    monkeypatch.setenv(KERNELS_ENV, "torch")
    run_job(tmp_path, progress=False, **regress.BASELINE_RUN)
    table, ok = regress.compare_with_baseline(tmp_path, COMMITTED)
    assert ok and "REGRESSION" not in statuses(table).values()


def test_identical_results_pass_and_perturbed_ones_fail(out, tmp_path):
    baseline = tmp_path / "baseline.json"
    regress.write_baseline(baseline, out)
    assert regress.compare_with_baseline(out, baseline)[1]

    results_dir = regress.find_results(out)
    frame = pd.read_parquet(results_dir / RESULTS_FILE)
    frame.to_parquet(tmp_path / "saved.parquet")
    hit = (
        (frame["method"] == "minmax")
        & (frame["bits"] == "W8A8")
        & (frame["metric"] == "sqnr")
        & (frame["mode"] == "teacher-forced")
        & (frame["step"] == -1)
        & (frame["branch"] == "cfg")
    )
    assert hit.sum() == 1
    try:
        frame.loc[hit, "value"] += 3.0  # beyond 1.5 dB + 2 %
        frame.to_parquet(results_dir / RESULTS_FILE)
        table, ok = regress.compare_with_baseline(out, baseline)
        assert not ok
        assert [f for f, s in statuses(table).items() if s != "ok"] == ["sqnr_tf/minmax/W8A8"]
        assert statuses(table)["sqnr_tf/minmax/W8A8"] == "REGRESSION"
        frame.loc[hit, "value"] -= 2.5  # 0.5 dB: within tolerance
        frame.to_parquet(results_dir / RESULTS_FILE)
        assert regress.compare_with_baseline(out, baseline)[1]
    finally:
        pd.read_parquet(tmp_path / "saved.parquet").to_parquet(results_dir / RESULTS_FILE)


def test_compare_rules():
    baseline = {
        "a": {"value": 10.0, "abs": 0.5, "rel": 0.0},
        "b": {"value": "inf", "abs": 0.5, "rel": 0.0},
        "c": {"value": 1.0, "abs": 0.0, "rel": 0.1},
        "gone": {"value": 1.0, "abs": 0.0, "rel": 0.0},
    }
    table, ok = regress.compare({"a": 10.4, "b": float("inf"), "c": 1.09, "new": 3.0}, baseline)
    status = dict(zip(table["figure"], table["status"]))
    assert status == {"a": "ok", "b": "ok", "c": "ok", "gone": "MISSING", "new": "new"}
    assert not ok
    table, ok = regress.compare({"a": 10.6, "b": 50.0, "c": 1.0, "gone": 1.0}, baseline)
    status = dict(zip(table["figure"], table["status"]))
    assert status["a"] == "REGRESSION" and status["b"] == "REGRESSION" and not ok


def test_bad_input_is_a_one_line_user_error(out, tmp_path):
    with pytest.raises(UserError, match="no baseline"):
        regress.compare_with_baseline(out, tmp_path / "none.json")
    foreign = tmp_path / "foreign.json"
    foreign.write_text("{}")
    with pytest.raises(UserError, match="not a qvd-bench baseline"):
        regress.compare_with_baseline(out, foreign)
    with pytest.raises(UserError, match="no results.parquet"):
        regress.compare_with_baseline(tmp_path, COMMITTED)
    other = json.loads(COMMITTED.read_text())
    other["protocols"] = {"fvd": "fvd/stylegan-v/sha256:0"}
    mismatched = tmp_path / "mismatched.json"
    mismatched.write_text(json.dumps(other))
    results_dir = regress.find_results(out)
    frame = pd.read_parquet(results_dir / RESULTS_FILE)
    extra = frame.iloc[:1].assign(
        metric="fvd", protocol="fvd/stylegan-v/sha256:1", mode="distribution"
    )
    try:
        pd.concat([frame, extra]).to_parquet(results_dir / RESULTS_FILE)
        with pytest.raises(UserError, match="different protocols") as info:
            regress.compare_with_baseline(out, mismatched)
        assert "\n" not in str(info.value)
    finally:
        frame.to_parquet(results_dir / RESULTS_FILE)
