"""``qvd-bench run``: defaults printed first and recorded, the outputs where it says."""

import json

import pandas as pd
import pytest

from qvd_bench.commands.run import RUN_DEFAULTS, run_job, run_settings
from qvd_bench.errors import UserError


def test_defaults_are_design_section_7():
    assert RUN_DEFAULTS["model"] == "tiny-unet3d"
    assert (RUN_DEFAULTS["num_prompts"], RUN_DEFAULTS["frames"], RUN_DEFAULTS["steps"]) == (
        2,
        8,
        10,
    )
    assert (RUN_DEFAULTS["height"], RUN_DEFAULTS["width"], RUN_DEFAULTS["scheduler"]) == (
        16,
        16,
        "ddim",
    )
    assert RUN_DEFAULTS["guidance_scale"] > 1  # CFG
    assert RUN_DEFAULTS["methods"] == (
        "fp", "minmax", "mse", "smoothquant", "os+", "qvd", "qvd-htdq", "qvd-scri"
    )  # fmt: skip
    assert RUN_DEFAULTS["bits"] == ("W8A8", "W4A8", "W4A4")
    assert RUN_DEFAULTS["seeds"] == 1


def test_run_prints_defaults_first_records_them_and_says_where(tmp_path, capsys):
    code = run_job(
        tmp_path, progress=False, num_prompts=1, frames=2, steps=2, methods=["fp", "minmax"],
        bits=["W8A8"],
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].startswith("qvd-bench run settings")
    assert any(line.startswith(" * steps") and line.endswith("2") for line in lines[:16])
    assert any(line.startswith("   height") for line in lines[:16])
    index = tmp_path / "reports" / "tiny-unet3d" / "index.html"
    assert index.is_file() and str(index) in printed
    assert (tmp_path / "stats" / "tiny-unet3d-w0" / "plan.json").is_file()
    record = json.loads((tmp_path / "results" / "tiny-unet3d" / "run.json").read_text())
    assert record["settings"]["steps"] == 2 and record["defaults"]["steps"] == 10
    assert record["wall_seconds"] > 0 and "minmax" in record["seconds_per_method"]
    results = pd.read_parquet(tmp_path / "results" / "tiny-unet3d" / "results.parquet")
    assert set(results["method"]) == {"fp", "minmax"}
    html = index.read_text()
    assert "Headline figures" in html and "Statistics (weight seed 0" in html


def test_bad_settings_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown run settings: colour"):
        run_settings(colour="red")
    with pytest.raises(UserError, match="--seeds"):
        run_job(tmp_path, seeds=0)
    with pytest.raises(UserError, match="did you mean 'minmax'"):
        run_job(tmp_path, methods=["minmx"], progress=False)
