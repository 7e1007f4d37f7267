"""The verdict of a results report: best method per bit-width, margin, spread, and why.

Synthetic results tables check the rules (ties, spread, ablations); a small ``qvd-bench
run`` checks the page itself against its ``results.parquet`` (recomputed here with plain
Python), in headless Chromium at desktop and laptop widths, and that editing the table
changes the verdict and its why.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import statistics
import subprocess

import pandas as pd
import pytest

from qvd_bench.commands.main import main
from qvd_bench.commands.run import run_job
from qvd_bench.report.verdict import NO_SPREAD, verdict_table, why_sentences


def _rows(values: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    """Results rows: (method, bits) -> teacher-forced SQNR per weight seed, and fp."""
    rows = []
    for (method, bits), per_seed in values.items():
        for seed, value in enumerate(per_seed):
            for metric, mode in (("sqnr", "teacher-forced"), ("psnr", "free-running")):
                rows.append(
                    dict(model="m", weight_seed=seed, method=method, bits=bits, metric=metric,
                         mode=mode, branch="cfg", step=-1, value=value)
                )  # fmt: skip
    return pd.DataFrame(rows)


def expected_verdict(results: pd.DataFrame) -> dict[str, tuple[set[str], str, float]]:
    """bits -> (the best methods (identical ones tie), runner-up, margin), recomputed from
    the rows with plain Python."""
    out = {}
    for bits in dict.fromkeys(results["bits"]):
        per_method: dict[str, list[float]] = {}
        for row in results.itertuples():
            if (row.bits, row.metric, row.mode, row.branch, row.step) == (
                bits, "sqnr", "teacher-forced", "cfg", -1
            ) and row.method != "fp":  # fmt: skip
                per_method.setdefault(row.method, []).append(float(row.value))
        means = {m: sum(v) / len(v) for m, v in per_method.items()}
        top = max(means, key=means.get)
        best = {m for m, v in per_method.items() if v == per_method[top]}
        runner = max((m for m in means if m not in best), key=means.get)
        out[bits] = (best, runner, means[top] - means[runner])
    return out


def test_best_margin_and_ties_per_bits():
    results = _rows(
        {
            ("fp", "W8A8"): [float("inf")],
            ("minmax", "W8A8"): [10.0],
            ("mse", "W8A8"): [12.0],
            ("qvd-htdq", "W8A8"): [12.0],  # identical to mse: a tie, not a runner-up
            ("qvd-scri", "W8A8"): [11.5],
            ("minmax", "W4A4"): [1.0],
            ("mse", "W4A4"): [2.0],
            ("qvd-htdq", "W4A4"): [2.0],
            ("qvd-scri", "W4A4"): [4.5],
        }
    )
    table = verdict_table(results).set_index("bits")
    assert table.loc["W8A8", "best method"] == "mse (= qvd-htdq)"
    assert table.loc["W8A8", "runner-up"] == "qvd-scri"
    assert table.loc["W8A8", "margin (dB)"] == "+0.50"
    assert table.loc["W4A4", "best method"] == "qvd-scri"
    assert table.loc["W4A4", "margin (dB)"] == "+2.50"
    assert (table["spread"] == NO_SPREAD).all()
    for bits, (best, runner, margin) in expected_verdict(results).items():
        assert table.loc[bits, "best method"].split(" ")[0] in best
        assert table.loc[bits, "runner-up"] == runner
        assert table.loc[bits, "margin (dB)"] == f"+{margin:.2f}"
    why = why_sentences(results)
    assert "qvd-htdq equals mse at every bit-width: HTDQ changed nothing here." in why
    assert any(s.startswith("SCRI (qvd-scri against mse): -0.50 dB at W8A8, +2.50 dB") for s in why)


def test_spread_over_seeds_and_wins():
    results = _rows({("mse", "W8A8"): [10.0, 12.0, 11.0], ("minmax", "W8A8"): [9.0, 12.5, 8.0]})
    row = verdict_table(results).iloc[0]
    assert row["best method"] == "mse"
    sd = statistics.stdev([10.0, 12.0, 11.0])
    assert row["spread"] == f"sd {sd:.2f} dB over 3 seeds; wins 2/3"


def test_why_cites_before_and_after_figures_of_the_winner():
    results = _rows({("qvd-scri", "W4A8"): [9.0], ("mse", "W4A8"): [7.0]})
    changes = pd.DataFrame(
        [
            dict(weight_seed=0, method="qvd-scri", bits="W4A8", layer=f"l{i}", role="ffn",
                 change="scri", figure=figure, before=before, after=after, detail="")
            for i in range(2)
            for figure, before, after in (("coverage", 0.2, 0.6), ("sqnr_db", 20.0, 25.0))
        ]
    )  # fmt: skip
    why = why_sentences(results, changes)
    assert why[0] == (
        "W4A8: qvd-scri wins by 2.00 dB over mse. SCRI transformed 2 layers: mean level "
        "coverage 20.0 % → 60.0 %, layer-output SQNR 20.0 → 25.0 dB (mse's calibration → "
        "SCRI's); end-to-end SQNR with mse's calibration → qvd-scri: 7.00 → 9.00 dB."
    )


# ----------------------------------------------------------------------------- a real run

METHODS = ["fp", "minmax", "mse", "qvd-htdq", "qvd-scri"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    run_job(out, progress=False, model="tiny-unet3d", num_prompts=1, frames=2, steps=2,
            methods=METHODS, bits=["W8A8", "W4A4"])  # fmt: skip
    return out


def _verdict_rows(page: str) -> dict[str, list[str]]:
    start = page.index("<h4>Best method per bit-width</h4>")
    body = page[start : page.index("</tbody>", start)]
    rows = [
        [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)]
        for row in re.findall(r"<tr><td>.*?</tr>", body)
    ]
    return {row[0]: row for row in rows}


def _check_verdict(page: str, results: pd.DataFrame) -> None:
    rows = _verdict_rows(page)
    expected = expected_verdict(results)
    assert set(rows) == set(expected)
    for bits, (best, runner, margin) in expected.items():
        assert rows[bits][1].split(" ")[0] in best
        assert rows[bits][3] == runner
        assert rows[bits][4] == f"+{margin:.2f}"
        assert rows[bits][5] == NO_SPREAD


def test_run_report_verdict_matches_results_parquet(job):
    results = pd.read_parquet(job / "results" / "tiny-unet3d" / "results.parquet")
    page = (job / "reports" / "tiny-unet3d" / "index.html").read_text()
    # The verdict comes first: before the random-weights notice and every other table.
    assert page.index("<h2>Verdict</h2>") < page.index('class="notice"')
    assert page.index("Best method per bit-width") < page.index("Headline figures")
    _check_verdict(page, results)
    transforms = pd.read_parquet(job / "results" / "tiny-unet3d" / "transforms.parquet")
    assert {"qvd-htdq", "qvd-scri"} <= set(transforms["method"])
    scri = transforms[(transforms["change"] == "scri") & (transforms["figure"] == "coverage")]
    # Each before -> after figure the why cites for SCRI is in the page, as the mean of
    # the table's rows.
    for bits in ("W8A8", "W4A4"):
        at = scri[(scri["method"] == "qvd-scri") & (scri["bits"] == bits)]
        before, after = 100 * at["before"].mean(), 100 * at["after"].mean()
        assert f"mean level coverage {before:.1f} % → {after:.1f} %" in html.unescape(page)


def test_editing_results_changes_the_verdict_and_its_why(job, tmp_path, capsys):
    results_dir = tmp_path / "results" / "tiny-unet3d"
    shutil.copytree(job / "results" / "tiny-unet3d", results_dir)
    shutil.copytree(job / "stats", tmp_path / "stats")
    path = results_dir / "results.parquet"
    results = pd.read_parquet(path)
    best, _, _ = expected_verdict(results)["W8A8"]
    assert "minmax" not in best
    target = (
        (results["method"] == "minmax") & (results["bits"] == "W8A8") & (results["metric"] == "sqnr")
        & (results["mode"] == "teacher-forced") & (results["branch"] == "cfg") & (results["step"] == -1)
    )  # fmt: skip
    top = results[~results["method"].isin(["fp"]) & (results["bits"] == "W8A8")]
    results.loc[target, "value"] = float(top.loc[top["metric"] == "sqnr", "value"].max()) + 5.0
    results.to_parquet(path, index=False)

    assert main(["report", str(results_dir), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    _check_verdict(page, results)
    assert _verdict_rows(page)["W8A8"][1] == "minmax"
    text = html.unescape(page)
    assert "W8A8: minmax wins by " in text
    assert "minmax applies no transform or level set of its own here." in text


# ----------------------------------------------------------------------------- browser

CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
)
# Desktop and laptop viewports.
WIDTHS = {"desktop": (1920, 1080), "laptop": (1366, 768)}
# Written into body attributes once the page has loaded: horizontal overflow, where the
# verdict table ends, its cells, and how many images decoded.
PROBE = """<script>
window.addEventListener("load", function () {
  var b = document.body, h4 = Array.prototype.slice.call(document.querySelectorAll("h4"))
    .filter(function (e) { return e.textContent === "Best method per bit-width"; })[0];
  var table = h4.nextElementSibling.querySelector("table");
  var rows = Array.prototype.slice.call(table.querySelectorAll("tbody tr")).map(function (r) {
    return Array.prototype.slice.call(r.cells).map(function (c) { return c.textContent; });
  });
  var imgs = Array.prototype.slice.call(document.images);
  b.setAttribute("data-overflow", String(document.documentElement.scrollWidth > window.innerWidth));
  b.setAttribute("data-verdict-bottom", String(table.getBoundingClientRect().bottom));
  b.setAttribute("data-verdict-right", String(table.getBoundingClientRect().right));
  b.setAttribute("data-viewport", window.innerWidth + "x" + window.innerHeight);
  b.setAttribute("data-verdict", JSON.stringify(rows));
  b.setAttribute("data-images", imgs.filter(function (i) {
    return i.complete && i.naturalWidth > 0; }).length + "/" + imgs.length);
});
</script>"""


def _attribute(dom: str, name: str) -> str:
    return html.unescape(re.search(rf'{name}="([^"]*)"', dom).group(1))


def test_run_report_in_headless_chromium_at_desktop_and_laptop_widths(job, tmp_path):
    if CHROMIUM is None:
        message = "chromium not installed (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must check the report in a browser")
        pytest.skip(message)
    index = job / "reports" / "tiny-unet3d" / "index.html"
    results = pd.read_parquet(job / "results" / "tiny-unet3d" / "results.parquet")
    expected = expected_verdict(results)
    probed = tmp_path / "probed.html"  # the report itself stays free of scripts
    probed.write_text(index.read_text().replace("</body>", PROBE + "</body>"))
    for name, (width, height) in WIDTHS.items():
        command = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / name}", f"--window-size={width},{height}",
            "--virtual-time-budget=3000", "--dump-dom", probed.as_uri(),
        ]  # fmt: skip
        dom = subprocess.run(command, capture_output=True, text=True, timeout=90, check=True).stdout
        # The window's frame takes some height: the page gets the rest.
        inner_width, inner_height = map(int, _attribute(dom, "data-viewport").split("x"))
        assert inner_width == width and 0.8 * height <= inner_height <= height, name
        assert _attribute(dom, "data-overflow") == "false", name
        # The verdict is on the first screen, whole.
        assert float(_attribute(dom, "data-verdict-bottom")) <= inner_height, name
        assert float(_attribute(dom, "data-verdict-right")) <= width, name
        images = _attribute(dom, "data-images").split("/")
        assert images[0] == images[1] and int(images[1]) > 0, name
        shown = {row[0]: row for row in json.loads(_attribute(dom, "data-verdict"))}
        for bits, (best, runner, margin) in expected.items():
            assert shown[bits][1].split(" ")[0] in best, name
            assert (shown[bits][3], shown[bits][4]) == (runner, f"+{margin:.2f}"), name


def test_a_transform_without_figures_is_said_so_and_cites_the_end_to_end_change():
    results = _rows({("smoothquant", "W8A8"): [15.0], ("mse", "W8A8"): [12.5]})
    changes = pd.DataFrame(
        [
            dict(weight_seed=0, method="smoothquant", bits="W8A8", layer=f"l{i}", role="ffn",
                 change="smoothquant", figure="transformed", before=float("nan"),
                 after=float("nan"), detail="")
            for i in range(3)
        ]
    )  # fmt: skip
    assert why_sentences(results, changes)[0] == (
        "W8A8: smoothquant wins by 2.50 dB over mse. SmoothQuant transformed 3 layers (its "
        "record keeps no per-layer before → after figure); end-to-end SQNR with mse's "
        "calibration → smoothquant: 12.50 → 15.00 dB."
    )


def test_a_plan_figure_stored_as_none_is_left_out_of_the_median():
    """An infinite SCRI disparity (a channel zero throughout) is stored as None; the
    median is over the finite figures of the layers the plan transforms."""
    from types import SimpleNamespace

    from qvd_bench.report.verdict import _plan_figure

    def layer(apply, value):
        return SimpleNamespace(scri=SimpleNamespace(apply=apply, figures={"disparity": value}))

    plan = SimpleNamespace(
        layers=[layer(True, None), layer(True, -3.0), layer(True, 5.0), layer(False, 100.0)]
    )
    assert _plan_figure(plan, "scri", "disparity") == (4.0, 2)
    assert _plan_figure(SimpleNamespace(layers=[layer(True, None)]), "scri", "disparity")[1] == 0
