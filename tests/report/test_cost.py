"""Cost tables: stages as recorded, and cost beside quality in an evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from qvd_bench.report.cost import collection_tables, evaluation_cost_table, stage_table

GIB = 1 << 30


def test_stage_table_formats_each_stage():
    stages = [
        {"stage": "load", "wall_s": 1.234, "peak_host_bytes": 3 * GIB, "peak_device_bytes": None},
        {"stage": "quantize", "wall_s": 0.5, "peak_host_bytes": 1536, "peak_device_bytes": GIB},
    ]
    table = stage_table(stages)
    assert table.to_dict("records") == [
        {"stage": "load", "wall (s)": 1.23, "peak host": "3.0 GiB", "peak device": "–"},
        {"stage": "quantize", "wall (s)": 0.5, "peak host": "1.5 KiB", "peak device": "1.0 GiB"},
    ]


def test_evaluation_cost_sums_seconds_keeps_the_largest_peak_and_joins_quality():
    timings = pd.DataFrame(
        [
            # method, bits, quantize_s, generate_s, peak host, peak device; two seeds
            ("statistics", "", 4.0, 0.0, 2 * GIB, None),
            ("statistics", "", 6.0, 0.0, 3 * GIB, None),
            ("minmax", "W8A8", 1.0, 2.0, GIB, None),
            ("minmax", "W8A8", 1.5, 2.5, 2 * GIB, None),
        ],
        columns=[
            "method",
            "bits",
            "quantize_s",
            "generate_s",
            "peak_host_bytes",
            "peak_device_bytes",
        ],
    )
    timings["weight_seed"] = [0, 1, 0, 1]
    headline = pd.DataFrame([{"method": "minmax", "bits": "W8A8", "SQNR tf (dB)": 31.5}])
    table = evaluation_cost_table(timings, headline).set_index("method")
    assert table.loc["statistics", "quantize (s)"] == 10.0
    assert np.isnan(table.loc["statistics", "SQNR tf (dB)"])
    assert table.loc["statistics", "peak host"] == "3.0 GiB"
    row = table.loc["minmax"]
    assert (row["quantize (s)"], row["generate (s)"]) == (2.5, 4.5)
    assert (row["SQNR tf (dB)"], row["peak host"], row["peak device"]) == (31.5, "2.0 GiB", "–")


def test_timings_written_before_peaks_were_recorded():
    timings = pd.DataFrame(
        [("minmax", "W8A8", 1.0, 2.0)], columns=["method", "bits", "quantize_s", "generate_s"]
    )
    table = evaluation_cost_table(timings, pd.DataFrame())
    assert table.loc[0, "peak host"] == table.loc[0, "peak device"] == "–"


def test_collection_tables_of_a_manifest_with_and_without_cost():
    assert collection_tables({}) == []
    manifest = {
        "cost": {
            "stages": [{"stage": "sample", "wall_s": 2.0, "peak_host_bytes": GIB}],
            "estimate": {"accumulator_bytes": 300, "accumulator_parts": {"moments": 300}},
            "measured": {"accumulator_bytes": 290, "accumulator_parts": {"moments": 290}},
        }
    }
    stages, state = collection_tables(manifest)
    assert stages.title == "Collection cost" and stages.frame.loc[0, "peak host"] == "1.0 GiB"
    assert state.frame.to_dict("records")[-1] == {
        "accumulator": "in all",
        "estimated": "300 B",
        "measured": "290 B",
    }
