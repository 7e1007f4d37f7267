"""``qvd-bench regress``: the diff table, the verdict line and the exit code."""

import pandas as pd

from qvd_bench.commands import main as cli
from qvd_bench.evaluate import regress


def test_a_regression_is_printed_and_exits_1(tmp_path, monkeypatch, capsys):
    baseline = tmp_path / "baseline.json"
    baseline.write_text("{}")
    table = pd.DataFrame(
        [("sqnr_tf/minmax/W8A8", 30.0, 25.0, -5.0, 2.1, "REGRESSION"),
         ("skew/ffn", 1.0, 1.0, 0.0, 0.1, "ok")],
        columns=["figure", "baseline", "current", "delta", "tolerance", "status"],
    )  # fmt: skip
    monkeypatch.setattr(regress, "compare_with_baseline", lambda results, base: (table, False))
    assert cli.main(["regress", "--results", str(tmp_path), "--baseline", str(baseline)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["figure", "baseline", "current", "delta", "tolerance", "status"]
    assert printed[-1] == "1 figure(s) out of tolerance: sqnr_tf/minmax/W8A8"


def test_a_missing_baseline_says_how_to_write_one(tmp_path, capsys):
    missing = tmp_path / "none.json"
    assert cli.main(["regress", "--results", str(tmp_path), "--baseline", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"qvd-bench: error: no baseline at {missing}; write one with --update"
    )
