"""``qvd-bench quantize``: a record from statistics, and its summary."""

from qvd_bench.commands.quantize import quantize_from_stats
from qvd_bench.quant.record import load_record
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
    # What it cost, per stage, in the summary and in the record (CPU: no device peak).
    stages = load_record(tmp_path / "q").cost
    assert stages == summary["cost"]
    assert [s["stage"] for s in stages] == ["load", "quantize"]
    assert all(s["wall_s"] > 0 and s["peak_host_bytes"] > 0 for s in stages)
    assert all(s["peak_device_bytes"] is None for s in stages)
