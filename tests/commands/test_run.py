"""``qvd-bench run``: defaults printed first and recorded, the outputs where it says."""

import html
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from qvd_bench.commands.run import (
    RUN_DEFAULTS,
    default_prompts,
    format_settings,
    job_config,
    run_job,
    run_settings,
)
from qvd_bench.datasets.shapes import COLORS, MOTION_PHRASES, SHAPES, heldout_captions
from qvd_bench.errors import UserError
from qvd_bench.prompts import DEFAULT_PROMPTS

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_design_section_7():
    assert RUN_DEFAULTS["model"] == "shapes-wan"
    # The trained model's clip: 8 frames of 16x16 RGB, sampled as it was scored.
    assert (RUN_DEFAULTS["frames"], RUN_DEFAULTS["height"], RUN_DEFAULTS["width"]) == (8, 16, 16)
    assert (RUN_DEFAULTS["steps"], RUN_DEFAULTS["scheduler"]) == (10, "flow-euler")
    assert RUN_DEFAULTS["guidance_scale"] == 3.0  # CFG, as the model was trained for
    assert RUN_DEFAULTS["metrics"] == ("fidelity", "groundtruth")
    assert RUN_DEFAULTS["methods"] == (
        "fp", "minmax", "mse", "smoothquant", "os+", "qvd", "qvd-htdq", "qvd-scri"
    )  # fmt: skip
    assert RUN_DEFAULTS["bits"] == ("W8A8", "W4A8", "W4A4")
    assert RUN_DEFAULTS["seeds"] == 1


def test_default_prompts_are_a_fixed_spread_of_heldout_seen_captions():
    seen = heldout_captions("seen")
    prompts = default_prompts("shapes-wan", RUN_DEFAULTS["num_prompts"])
    assert prompts == default_prompts("shapes-wan", RUN_DEFAULTS["num_prompts"])
    assert len(prompts) == RUN_DEFAULTS["num_prompts"] and set(prompts) <= set(seen)
    assert len(set(prompts)) == len(prompts)
    # Every k-th caption, k = 144 // count + 1, wrapping past the end.
    assert prompts == tuple(seen[i * 25] for i in range(6))
    assert default_prompts("shapes-wan", 200)[145] == seen[145 % 144]
    # They spread over colours, shapes and motions (the captions list motions fastest).
    for attribute in (COLORS, SHAPES, tuple(MOTION_PHRASES.values())):
        assert len({a for a in attribute for p in prompts if f" {a}" in f" {p}"}) >= 3
    with pytest.raises(UserError, match="at least 1"):
        default_prompts("shapes-wan", 0)


def test_another_model_falls_back_to_built_in_prompts_without_groundtruth():
    settings = run_settings(model="tiny-unet3d")
    assert settings["model"] == "tiny-unet3d"
    assert settings["metrics"] == ("fidelity",)  # groundtruth scores shapes-wan alone
    assert (settings["num_prompts"], settings["steps"], settings["scheduler"]) == (2, 10, "ddim")
    assert settings["guidance_scale"] == 7.5
    assert settings["methods"] == RUN_DEFAULTS["methods"]
    assert settings["bits"] == RUN_DEFAULTS["bits"]
    assert default_prompts("tiny-unet3d", 2) == tuple(DEFAULT_PROMPTS[:2])
    # A flag still wins over the model's defaults, and only flags are marked as changed.
    assert run_settings(model="tiny-unet3d", steps=3)["steps"] == 3
    shown = format_settings(run_settings(model="tiny-unet3d", steps=3)).splitlines()
    assert " * steps           3" in shown and "   scheduler       ddim" in shown
    assert "   model           shapes-wan" in format_settings(run_settings()).splitlines()


def test_run_on_the_default_model_reports_groundtruth_per_method_and_bits(tmp_path, capsys):
    code = run_job(
        tmp_path, progress=False, num_prompts=2, steps=2, methods=["fp", "minmax"],
        bits=["W8A8"],
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].startswith("qvd-bench run settings")
    assert any(line.startswith(" * steps") and line.endswith("2") for line in lines[:18])
    assert "   metrics         fidelity,groundtruth" in lines[:18]
    index = tmp_path / "reports" / "shapes-wan" / "index.html"
    assert index.is_file() and str(index) in printed
    assert (tmp_path / "stats" / "shapes-wan-w0" / "plan.json").is_file()
    record = json.loads((tmp_path / "results" / "shapes-wan" / "run.json").read_text())
    assert record["settings"]["steps"] == 2 and record["defaults"]["steps"] == 10
    assert record["wall_seconds"] > 0 and "minmax" in record["seconds_per_method"]
    results = pd.read_parquet(tmp_path / "results" / "shapes-wan" / "results.parquet")
    assert set(results["method"]) == {"fp", "minmax"}
    stored = json.loads((tmp_path / "results" / "shapes-wan" / "settings.json").read_text())
    assert stored["config"]["prompts"] == list(default_prompts("shapes-wan", 2))

    # The ground-truth metrics of every (method, bits) in results.parquet, and in the report's
    # table with the same values (mean over the one weight seed).
    gt = results[results["metric"].str.startswith("gt_")]
    assert set(gt["metric"]) == {
        "gt_color_acc", "gt_shape_acc", "gt_motion_acc", "gt_persistence", "gt_all_acc", "gt_fd"
    }  # fmt: skip
    assert set(zip(gt["method"], gt["bits"], strict=True)) == {("fp", "W8A8"), ("minmax", "W8A8")}
    page = html.unescape(index.read_text())
    start = page.index("Ground truth against the captions")
    table = page[start : page.index("</table>", start)]
    rows = {
        tuple(cells[:2]): cells
        for cells in (
            re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>.*?</tr>", table, re.S)
        )
        if cells
    }
    assert set(rows) == {("fp", "W8A8"), ("minmax", "W8A8")}
    for (method, bits), cells in rows.items():
        at = gt[(gt["method"] == method) & (gt["bits"] == bits)].set_index("metric")["value"]
        shown = [float(c) for c in cells[3:9]]
        expected = [at[m] for m in ("gt_color_acc", "gt_shape_acc", "gt_motion_acc",
                                    "gt_persistence", "gt_all_acc", "gt_fd")]  # fmt: skip
        assert shown == pytest.approx(expected, rel=5e-3, abs=5e-4)  # as the table rounds
    # A trained model: no random-weights notice; the verdict is there.
    assert "random-weight presets" not in page
    assert "<h2>Verdict</h2>" in page and "Headline figures" in page


def test_bad_settings_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown run settings: colour"):
        run_settings(colour="red")
    with pytest.raises(UserError, match="--seeds"):
        run_job(tmp_path, seeds=0)
    with pytest.raises(UserError, match="did you mean 'minmax'"):
        run_job(tmp_path, methods=["minmx"], progress=False)


def _markdown_table(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table after ``heading``, as cells."""
    section = text.split(heading, 1)[1].lstrip("\n")
    lines = section.split("\n\n", 1)[0].splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _flattened(config: dict, prefix: str = "") -> dict[str, str]:
    """A config as the report's settings table shows it: nested dicts as dotted keys,
    lists, empty dicts and None as JSON."""
    shown = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            shown |= _flattened(value, f"{prefix}{key}.")
        elif isinstance(value, (list, tuple, dict)) or value is None:
            shown[f"{prefix}{key}"] = json.dumps(value)
        else:
            shown[f"{prefix}{key}"] = str(value)
    return shown


def test_the_committed_example_report_is_the_default_jobs_and_the_readme_gives_its_command():
    example = ROOT / "reports" / "example"
    report = (example / "report.md").read_text()
    # Made with today's defaults: its settings are the default job's configuration.
    config = job_config(run_settings()).to_dict()
    settings = dict(_markdown_table(report, "#### Settings"))
    assert settings == _flattened(config)
    # Every default method and bit-width has its results; the verdict covers each width.
    headline = {(row[0], row[1]) for row in _markdown_table(report, "#### Headline figures")}
    assert headline == {(m, b) for b in config["bits"] for m in config["methods"]}
    verdict = [row[0] for row in _markdown_table(report, "#### Best method per bit-width")]
    assert verdict == list(config["bits"])
    # The README says how it was made: the main job into a fresh root, the report here.
    command = re.search(r"^qvd-bench run --out (\S+) --report-dir reports/example$",
                        (ROOT / "README.md").read_text(), re.M)  # fmt: skip
    assert command is not None
    assert f"## Statistics (weight seed 0, {command.group(1)}/stats/shapes-wan-w0)" in report
