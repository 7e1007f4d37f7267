"""Cost tables: wall time and peak memory per stage, beside what a run produced.

Stages are ``resources.StageCost.to_dict()`` records, as ``collect`` writes them to the
manifest (``cost.stages``), ``quantize`` to ``record.json`` (``cost``), ``sensitivity`` to
``cost.json`` and ``evaluate`` to ``timings.parquet`` (one row per configuration).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from qvd_bench.resources import format_bytes


class CostTable(NamedTuple):
    """A table for a report: ``render.Table(*cost_table)`` (render imports this module)."""

    title: str
    frame: pd.DataFrame
    caption: str = ""
    collapsed: bool = False


PEAK_NOTE = (
    "Peak host: the process's resident-set peak during the stage (its peak so far where "
    "the system cannot reset it); peak device: the most memory torch allocated on the CUDA "
    "device (– elsewhere)."
)
STAGE_CAPTION = "Wall time and peak memory of each stage. " + PEAK_NOTE


def _bytes(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return format_bytes(float(value))


def stage_table(stages: Sequence[Mapping]) -> pd.DataFrame:
    """One row per stage: stage, seconds, peak host and device memory (formatted)."""
    return pd.DataFrame(
        {
            "stage": [s["stage"] for s in stages],
            "wall (s)": [round(float(s["wall_s"]), 2) for s in stages],
            "peak host": [_bytes(s.get("peak_host_bytes")) for s in stages],
            "peak device": [_bytes(s.get("peak_device_bytes")) for s in stages],
        }
    )


def stage_tables(stages: Sequence[Mapping], title: str = "Cost per stage") -> list[CostTable]:
    """The ``stage_table``; none when no stage was recorded."""
    if not stages:
        return []
    return [CostTable(title, stage_table(stages), STAGE_CAPTION)]


def collection_tables(manifest: Mapping) -> list[CostTable]:
    """The collection's stages and its estimated against measured accumulator state, for
    the report of a statistics run (none for runs that recorded no cost)."""
    cost = manifest.get("cost") or {}
    blocks = stage_tables(cost.get("stages", []), "Collection cost")
    estimate, measured = cost.get("estimate"), cost.get("measured")
    if estimate and measured:
        parts = estimate["accumulator_parts"]
        rows = [
            {
                "accumulator": name,
                "estimated": format_bytes(parts[name]),
                "measured": format_bytes(measured["accumulator_parts"].get(name, 0)),
            }
            for name in parts
        ]
        rows.append(
            {
                "accumulator": "in all",
                "estimated": format_bytes(estimate["accumulator_bytes"]),
                "measured": format_bytes(measured["accumulator_bytes"]),
            }
        )
        blocks.append(
            CostTable(
                "Accumulator state",
                pd.DataFrame(rows),
                "Estimated before the collection from layer shapes (collect.cost), and "
                "measured at its end.",
                collapsed=True,
            )
        )
    return blocks


def evaluation_cost_table(timings: pd.DataFrame, headline: pd.DataFrame) -> pd.DataFrame:
    """Cost beside quality: one row per (method, bits) of ``headline`` with its
    teacher-forced SQNR, seconds quantizing (calibration from the statistics) and
    generating, and the configuration's peak memory (the largest over weight seeds);
    first a row for the statistics (collection and analysis) and one for the FP reference.

    Args:
        timings: ``timings.parquet`` (method, bits, quantize_s, generate_s and, from
            this version on, peak_host_bytes and peak_device_bytes).
        headline: ``results.headline_table``.
    """
    timings = timings.copy()
    for column in ("peak_host_bytes", "peak_device_bytes"):
        if column not in timings:
            timings[column] = np.nan
        timings[column] = pd.to_numeric(timings[column], errors="coerce")
    grouped = timings.groupby(["method", "bits"], sort=False).agg(
        quantize_s=("quantize_s", "sum"),
        generate_s=("generate_s", "sum"),
        peak_host=("peak_host_bytes", "max"),
        peak_device=("peak_device_bytes", "max"),
    )
    quality = {}
    if not headline.empty and "SQNR tf (dB)" in headline:
        quality = {
            (row["method"], row["bits"]): row["SQNR tf (dB)"] for _, row in headline.iterrows()
        }
    rows = []
    for (method, bits), row in grouped.iterrows():
        rows.append(
            {
                "method": method,
                "bits": bits,
                "SQNR tf (dB)": quality.get((method, bits), np.nan),
                "quantize (s)": round(float(row["quantize_s"]), 2),
                "generate (s)": round(float(row["generate_s"]), 2),
                "peak host": _bytes(row["peak_host"]),
                "peak device": _bytes(row["peak_device"]),
            }
        )
    return pd.DataFrame(rows)


def evaluation_tables(timings: pd.DataFrame, headline: pd.DataFrame) -> list[CostTable]:
    """The ``evaluation_cost_table`` of an evaluation report; none without timings."""
    if timings.empty:
        return []
    return [
        CostTable(
            "Cost and quality",
            evaluation_cost_table(timings, headline),
            "Seconds spent quantizing (calibration from the statistics; for the statistics "
            "row, collecting and analysing them) and generating (0 when cached), summed over "
            "weight seeds, beside the teacher-forced SQNR; the peaks are the largest of "
            "each row's stages. " + PEAK_NOTE,
        )
    ]
