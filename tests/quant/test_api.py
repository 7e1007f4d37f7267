"""quantize_command (the library parts: test_config, test_record, test_apply)."""

from __future__ import annotations

from qvd_bench.quant.api import quantize_command
from tests.quant.test_methods import tiny_stats


def test_quantize_command(tmp_path):
    run = tiny_stats()
    summary = quantize_command(None, run.path, "qvd-htdq", "W8A8", tmp_path / "q")
    assert (tmp_path / "q" / "record.safetensors").exists()
    assert summary["quantized"] == summary["layers"] == len(run.roles)
    assert 0 < summary["coverage"]["mean"] <= 1
    temporal = {row["layer"]: row for row in summary["temporal"]}
    assert set(temporal) == set(run.temporal["layer"].astype(str))
    assert all(0 < row["tdscore"] <= 1 for row in temporal.values())
