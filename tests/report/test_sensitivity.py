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


def test_axis_labels_fit_inside_the_figure():
    """No x label is cut at the figure's edge, even beside long layer names in a figure
    of layers alone (the narrowest)."""
    table = _table()
    table = table[table["kind"] == "layer"].assign(
        unit=lambda t: "up_blocks.1.temp_attentions.0.transformer_blocks.0." + t["unit"]
    )
    figure = sensitivity_figure(table, top=3)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    width = figure.bbox.width
    for ax in figure.axes:
        box = ax.xaxis.label.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= width


def test_random_weights_get_a_notice(tmp_path):
    plain = write_sensitivity_report(_table(), tmp_path / "plain", "S", random_weights=False)
    noted = write_sensitivity_report(_table(), tmp_path / "noted", "S", random_weights=True)
    assert "random weights" not in plain.read_text()
    assert 'class="notice">This model has random weights' in noted.read_text()
