"""``qvd-bench regress`` and ``run --config-of``: the table, the verdict, the exit codes."""

from pathlib import Path

import pandas as pd

from qvd_bench.commands import main as cli
from qvd_bench.evaluate import regress

COMMITTED = Path(__file__).resolve().parents[2] / "stats" / "baselines" / "tiny-unet3d.json"
COLUMNS = ["figure", "baseline", "current", "delta", "tolerance", "detects", "status"]


def test_a_regression_is_printed_and_exits_1(tmp_path, monkeypatch, capsys):
    table = pd.DataFrame(
        [("sqnr_tf/mse/W8A8", 30.0, 25.0, -5.0, 2.1, 2.8, "REGRESSION"),
         ("skew/ffn", 1.0, 1.0, 0.0, 0.1, 0.13, "ok")],
        columns=COLUMNS,
    )  # fmt: skip
    monkeypatch.setattr(regress, "compare_with_baseline", lambda results, base: (table, False))
    args = ["regress", "--results", str(tmp_path), "--baseline", str(COMMITTED)]
    assert cli.main(args) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == COLUMNS
    assert printed[-1] == "1 figure(s) out of tolerance: sqnr_tf/mse/W8A8"


def test_a_missing_baseline_says_how_to_write_one(tmp_path, capsys):
    missing = tmp_path / "none.json"
    assert cli.main(["regress", "--results", str(tmp_path), "--baseline", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"qvd-bench: error: no baseline at {missing}; write one with --new MODEL --baseline "
        f"{missing}"
    )


def test_results_of_another_configuration_exit_2_in_one_line(tmp_path, capsys):
    regress.write_figures(tmp_path, regress.configuration(steps=10), {"skew/io": 1.0})
    code = cli.main(["regress", "--results", str(tmp_path), "--baseline", str(COMMITTED)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "steps (baseline 4, results 10)" in err
    assert f"qvd-bench run --config-of {COMMITTED} --out DIR" in err


def test_run_config_of_then_regress_passes(tmp_path, monkeypatch, capsys):
    """The command path end to end, on canned figures (the measurement itself is the
    mutation suite's)."""
    baseline = regress.load_baseline(COMMITTED)
    values = {k: regress._from_json(v["value"]) for k, v in baseline["figures"].items()}
    seen = {}

    def fake_measure(config, work_dir, rounding=regress.AS_STATED, progress=False):
        seen["config"] = config
        return dict(values), None

    monkeypatch.setattr(regress, "measure", fake_measure)
    out = tmp_path / "out"
    assert cli.main(["run", "--config-of", str(COMMITTED), "--out", str(out)]) == 0
    assert seen["config"] == regress.configuration(**baseline["configuration"])
    assert cli.main(["regress", "--results", str(out), "--baseline", str(COMMITTED)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("no regression:")
    name, entry = next(iter(baseline["figures"].items()))
    values[name] += 2 * regress._from_json(entry["tolerance"]) + 1e-6
    assert cli.main(["regress", "--baseline", str(COMMITTED)]) == 1


def test_new_writes_a_baseline_with_spreads(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_measure(config, work_dir, rounding=regress.AS_STATED, progress=False):
        calls.append((config["model"], rounding))
        return {"sqnr_tf/mse/W8A8": 10.0 + 0.1 * len(calls), "skew/io": 1.0}, None

    monkeypatch.setattr(regress, "measure", fake_measure)
    path = tmp_path / "b.json"
    assert cli.main(["regress", "--new", "tiny-wan", "--baseline", str(path)]) == 0
    assert [c[1] for c in calls] == [regress.AS_STATED, *regress.ROUNDING_CHANGES.values()]
    assert {c[0] for c in calls} == {"tiny-wan"}
    data = regress.load_baseline(path)
    # Stated 10.1, the changes 10.2 ... : the spread is the last change's deviation.
    spread = 0.1 * len(regress.ROUNDING_CHANGES)
    assert data["figures"]["sqnr_tf/mse/W8A8"]["spread"] == pytest_approx(spread)
    assert data["regenerate"] == f"qvd-bench regress --regenerate {path}"
    assert "regenerate it with" in capsys.readouterr().out
    calls.clear()
    assert cli.main(["regress", "--regenerate", str(path)]) == 0
    assert {c[0] for c in calls} == {"tiny-wan"}


def pytest_approx(value):
    import pytest

    return pytest.approx(value)


def test_run_config_of_refuses_flags_that_change_the_configuration(tmp_path, capsys):
    args = ["run", "--config-of", str(COMMITTED), "--steps", "3", "--out", str(tmp_path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop --steps" in err
