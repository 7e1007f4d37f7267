"""Reports of a two-expert Wan 2.2 model show its experts side by side: the statistics
report's measurements and plan by role, and the sensitivity ranking of the layers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qvd_bench.analysis.summary import stored_layer_summary
from qvd_bench.evaluate.sensitivity import probe_for_run, sensitivity
from qvd_bench.models import zoo
from qvd_bench.quant.config import QuantConfig
from qvd_bench.report import build_report
from qvd_bench.report.render import expert_parts, experts_side_by_side, role_table
from qvd_bench.report.sensitivity import (
    experts_layer_table,
    experts_role_table,
    write_sensitivity_report,
)
from tests.experts import EXPERTS


def test_statistics_report_shows_the_experts_side_by_side(two_expert_run, tmp_path):
    assert two_expert_run.experts == list(EXPERTS)
    index = build_report([two_expert_run.path], tmp_path / "report")
    markdown = (index.parent / "report.md").read_text()
    for title in (
        "Measurements by role, experts side by side",
        "Plan by role, experts side by side",
    ):
        assert title in markdown
    # Markdown escapes the bars of "|skew|"; each expert's column next to the other's.
    assert "\\|skew\\| · transformer | \\|skew\\| · transformer_2 |" in markdown
    # Each expert's column: the median over that expert's own layers (pandas, by prefix).
    layers = stored_layer_summary(two_expert_run)
    parts = expert_parts(layers, "layer", EXPERTS)
    table = experts_side_by_side({e: role_table(p) for e, p in parts.items()}, ["role", "level"])
    for expert in EXPERTS:
        own = layers[layers["layer"].str.startswith(f"{expert}.")]
        assert len(own) and len(own) == len(parts[expert])
        for role, group in own.groupby("role"):
            row = table[(table["role"] == role) & (table["level"] == "tensor")]
            assert row[f"|skew| · {expert}"].item() == pytest.approx(
                float(group["skew_median"].abs().median()), nan_ok=True
            )
            assert row[f"layers · {expert}"].item() == len(group)


@pytest.fixture(scope="module")
def two_expert_sensitivity(two_expert_wan_dir, two_expert_run):
    loaded = zoo.load_model(str(two_expert_wan_dir))
    probe = probe_for_run(loaded, two_expert_run, steps=4)
    # The same layer in both experts, a role spanning them and that role in each.
    only = [f"{expert}.blocks.0.attn1.to_q" for expert in EXPERTS] + ["ffn"]
    only += [f"{expert}.ffn" for expert in EXPERTS]
    config = QuantConfig(method="minmax", w_bits=4, a_bits=4)
    return sensitivity(loaded, two_expert_run, config, probe, only=only)


def test_sensitivity_report_shows_the_experts_side_by_side(two_expert_sensitivity, tmp_path):
    table = two_expert_sensitivity
    layer_rows = table[table["kind"] == "layer"]
    assert list(layer_rows.sort_values("unit")["expert"]) == list(EXPERTS)
    assert set(table.loc[table["kind"] == "model", "expert"]) == {""}
    roles = table[table["kind"] == "role"].set_index("unit")
    assert roles.loc["ffn", "expert"] == "" and roles.loc["ffn", "rank"] == 1
    for expert in EXPERTS:
        # Each expert's ffn layers alone, ranked among that expert's roles.
        own = roles.loc[f"{expert}.ffn"]
        assert own["expert"] == expert and own["role"] == "ffn" and own["rank"] == 1
        assert own["layers"] * 2 == roles.loc["ffn", "layers"]
    assert roles.loc[[f"{e}.ffn" for e in EXPERTS], "sqnr_db"].nunique() == 2
    side_roles = experts_role_table(table)
    assert list(side_roles["role"]) == ["ffn"]
    for expert in EXPERTS:
        assert side_roles[f"sqnr_db · {expert}"].item() == roles.loc[f"{expert}.ffn", "sqnr_db"]
    side = experts_layer_table(table)
    assert list(side.columns) == [
        "layer", "role", "sqnr_db · transformer", "sqnr_db · transformer_2",
        "rank · transformer", "rank · transformer_2",
    ]  # fmt: skip
    assert len(side) == 1
    row = side.iloc[0]
    assert row["layer"] == "blocks.0.attn1.to_q" and row["role"] == "self_attn"
    for expert in EXPERTS:
        unit = layer_rows[layer_rows["unit"] == f"{expert}.blocks.0.attn1.to_q"]
        assert row[f"sqnr_db · {expert}"] == unit["sqnr_db"].item()
        assert row[f"rank · {expert}"] == unit["rank"].item()
    # The two experts have different weights: their figures differ.
    first, second = (row[f"sqnr_db · {expert}"] for expert in EXPERTS)
    assert np.isfinite([first, second]).all() and first != second
    index = write_sensitivity_report(table, tmp_path / "sensitivity", "two experts")
    markdown = (index.parent / "report.md").read_text()
    assert "By layer, experts side by side" in markdown
    assert "By role, experts side by side" in markdown
    assert "sqnr_db · transformer | sqnr_db · transformer_2" in markdown
    stored = pd.read_parquet(tmp_path / "sensitivity" / "sensitivity.parquet")
    assert list(stored["expert"]) == list(table["expert"])


def test_one_denoiser_has_no_expert_tables(tmp_path):
    table = pd.DataFrame(
        {"unit": ["a.b"], "kind": ["layer"], "role": ["ffn"], "sqnr_db": [10.0], "rank": [1]}
    )
    index = write_sensitivity_report(table, tmp_path / "one", "one denoiser")
    assert "experts side by side" not in (index.parent / "report.md").read_text()
