"""The sensitivity report, from a sensitivity table alone."""

from __future__ import annotations

import pandas as pd

from qvd_bench.report.sensitivity import sensitivity_figure, write_sensitivity_report


def _table() -> pd.DataFrame:
    rows = [("all", "model", "", 6, 21.0, 1)]
    rows += [(f"down_blocks.0.layer{i}", "layer", "ffn", 1, 30.0 + i, i + 1) for i in range(4)]
    rows += [("ffn", "role", "ffn", 4, 25.0, 1), ("temporal", "role", "temporal", 2, 28.0, 2)]
    frame = pd.DataFrame(rows, columns=["unit", "kind", "role", "layers", "sqnr_db", "rank"])
    frame["method"], frame["w_bits"], frame["a_bits"] = "mse", 8, 4
    frame["noise"] = 10 ** (-frame["sqnr_db"] / 10)
    return frame


def test_figure_shows_layers_and_roles():
    figure = sensitivity_figure(_table(), top=3)
    assert [ax.get_title() for ax in figure.axes] == [
        "most sensitive layers",
        "most sensitive roles",
    ]
    assert len(figure.axes[0].patches) == 3
    assert "mse W8A4" in figure.get_suptitle()


def test_report_writes_table_and_index(tmp_path):
    table = _table()
    index = write_sensitivity_report(table, tmp_path / "out", "Sensitivity of a run", top=2)
    assert index.exists()
    html = index.read_text()
    assert "Sensitivity of a run" in html and "By role" in html
    stored = pd.read_parquet(tmp_path / "out" / "sensitivity.parquet")
    pd.testing.assert_frame_equal(stored, table)
