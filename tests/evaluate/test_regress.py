"""Regression check against a baseline, and the committed tiny-unet3d baseline."""

import json
from pathlib import Path

import pandas as pd
import pytest

from qvd_bench.errors import UserError
from qvd_bench.evaluate import regress
from qvd_bench.evaluate.harness import RESULTS_FILE
from qvd_bench.numerics.kernels import KERNELS_ENV
from qvd_bench.run import run_command

COMMITTED = Path(__file__).resolve().parents[2] / "stats" / "baselines" / "tiny-unet3d.json"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The committed baseline's reduced run configuration, run once."""
    root = tmp_path_factory.mktemp("baseline-run")
    run_command(root, progress=False, **regress.BASELINE_RUN)
    return root


def test_the_baseline_run_matches_the_committed_baseline(out, capsys):
    recorded = json.loads(COMMITTED.read_text())["configuration"]["run"]
    for key, value in regress.BASELINE_RUN.items():
        assert recorded[key] == (list(value) if isinstance(value, tuple) else value)
    capsys.readouterr()
    assert regress.regress_command(out, COMMITTED) == 0
    assert "REGRESSION" not in capsys.readouterr().out


def test_the_baseline_holds_under_other_float_rounding(tmp_path, capsys, monkeypatch):
    """PyTorch's operations instead of qvd-bench's compiled kernels: the same computation
    rounded differently, which moves the quantized figures (TOLERANCES comment) within
    tolerance."""
    monkeypatch.setenv(KERNELS_ENV, "torch")
    run_command(tmp_path, progress=False, **regress.BASELINE_RUN)
    capsys.readouterr()
    assert regress.regress_command(tmp_path, COMMITTED) == 0
    assert "REGRESSION" not in capsys.readouterr().out


def test_identical_results_pass_and_perturbed_ones_fail(out, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    assert regress.regress_command(out, baseline, update=True) == 0
    assert regress.regress_command(out, baseline) == 0

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
        capsys.readouterr()
        assert regress.regress_command(out, baseline) == 1
        printed = capsys.readouterr().out
        assert "sqnr_tf/minmax/W8A8" in printed and "REGRESSION" in printed
        frame.loc[hit, "value"] -= 2.5  # 0.5 dB: within tolerance
        frame.to_parquet(results_dir / RESULTS_FILE)
        assert regress.regress_command(out, baseline) == 0
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
        regress.regress_command(out, tmp_path / "none.json")
    foreign = tmp_path / "foreign.json"
    foreign.write_text("{}")
    with pytest.raises(UserError, match="not a qvd-bench baseline"):
        regress.regress_command(out, foreign)
    with pytest.raises(UserError, match="no results.parquet"):
        regress.regress_command(tmp_path, COMMITTED)
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
            regress.regress_command(out, mismatched)
        assert "\n" not in str(info.value)
    finally:
        frame.to_parquet(results_dir / RESULTS_FILE)
