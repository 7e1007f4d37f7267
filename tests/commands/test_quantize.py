"""``qvd-bench quantize``: a record from statistics, and its summary."""

from qvd_bench.commands.quantize import quantize_from_stats
from tests.quant.helpers import tiny_stats


def test_quantize_from_stats(tmp_path):
    run = tiny_stats()
    summary = quantize_from_stats(None, run.path, "qvd-htdq", "W8A8", tmp_path / "q")
    assert (tmp_path / "q" / "record.safetensors").exists()
    assert summary["quantized"] == summary["layers"] == len(run.roles)
    assert 0 < summary["coverage"]["mean"] <= 1
    temporal = {row["layer"]: row for row in summary["temporal"]}
    assert set(temporal) == set(run.temporal["layer"].astype(str))
    assert all(0 < row["tdscore"] <= 1 for row in temporal.values())
