"""The evaluation report's tables from results rows."""

import pandas as pd
import pytest

from qvd_bench.report.results import headline_table


def test_headline_table_reports_mean_and_spread_over_seeds():
    rows = []
    for seed, value in ((0, 10.0), (1, 12.0)):
        for metric, mode in (("sqnr", "teacher-forced"), ("psnr", "free-running")):
            rows.append(
                dict(method="minmax", bits="W8A8", weight_seed=seed, metric=metric, mode=mode,
                     branch="cfg", step=-1, value=value)
            )  # fmt: skip
    table = headline_table(pd.DataFrame(rows))
    assert table["SQNR tf (dB)"].iloc[0] == 11.0
    assert table["SQNR tf (dB) sd"].iloc[0] == pytest.approx(2**0.5)
    assert table["seeds"].iloc[0] == 2
