"""Reports built from small collected runs: content, self-containment, errors, a browser."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from qvd_bench import store
from qvd_bench.analysis.summary import analyze
from qvd_bench.collect.collector import collect
from qvd_bench.config import CollectConfig
from qvd_bench.errors import UserError
from qvd_bench.report import build_report
from qvd_bench.report.figures import TEMPORAL_GROUP

FIGURES = {
    "skew_by_role",
    "temporal_distributions",
    "tdscore_vs_bits",
    "worst_channel_ranges",
    "coverage_ecdf",
    "range_heatmap",
    "weight_ranges",
}
TEMPORAL_FIGURES = {"temporal_distributions", "tdscore_vs_bits"}
COMPARE_FIGURES = {"compare_skew_by_role", "compare_coverage_ecdf", "compare_weight_ranges"}
IMG = re.compile(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="([^"]*)">')
FIGCAPTION = re.compile(r"<figcaption>([^<]*)</figcaption>")
MD_FIGURE = re.compile(r"!\[[^\]]*\]\(figures/([^)]+\.png)\)")


def _collect(path: Path, weight_seed: int) -> Path:
    config = CollectConfig(
        model="tiny-unet3d",
        weight_seed=weight_seed,
        prompts=("a cat",),
        steps=2,
        frames=2,
        height=16,
        width=16,
        temporal_stride=50,
        reservoir_capacity=16,
    )
    collect(config, path, progress=False)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of tiny-unet3d that differ only in the weight seed."""
    root = tmp_path_factory.mktemp("stats")
    return _collect(root / "seed0", 0), _collect(root / "seed1", 1)


@pytest.fixture(scope="module")
def single(runs, tmp_path_factory):
    return build_report([runs[0]], tmp_path_factory.mktemp("reports") / "single")


@pytest.fixture(scope="module")
def comparison(runs, tmp_path_factory):
    return build_report(list(runs), tmp_path_factory.mktemp("reports") / "compare")


def _md_tables(markdown: str) -> list[str]:
    return re.findall(r"^#### (.+)$", markdown, flags=re.M)


def _html_tables(page: str) -> list[str]:
    return re.findall(r"<(?:h4|summary)>([^<(]+?)(?: \(\d+ rows\))?</(?:h4|summary)>", page)


def _html_table_rows(page: str, title: str) -> list[str]:
    """The body rows of the HTML table titled ``title``."""
    start = page.index(f"<h4>{title}</h4>")
    body = page[start : page.index("</tbody>", start)]
    return re.findall(r"<tr><td>.*?</tr>", body)


def _md_table_rows(markdown: str, title: str) -> list[str]:
    lines = markdown[markdown.index(f"#### {title}\n") :].splitlines()[4:]
    return [line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("|"))]]


def test_single_report_has_every_figure_with_its_caption(single):
    page = single.read_text()
    markdown = (single.parent / "report.md").read_text()
    alts, captions = IMG.findall(page), FIGCAPTION.findall(page)
    assert len(alts) == len(captions) == len(FIGURES)
    assert all(c.endswith(".") and len(c) > 20 for c in captions)
    assert alts == captions
    files = MD_FIGURE.findall(markdown)
    assert {Path(f).stem for f in files} == FIGURES
    assert sorted(p.name for p in (single.parent / "figures").iterdir()) == sorted(files)
    for caption in captions:
        assert f"*{html.unescape(caption)}*" in markdown


def test_single_report_tables_and_header(single, runs):
    page = single.read_text()
    markdown = (single.parent / "report.md").read_text()
    titles = [
        "Run",
        "Measurements by role",
        "Collection cost",
        "Accumulator state",
        "Plan by role",
        "Plan per layer",
    ]
    assert _md_tables(markdown) == titles
    assert _html_tables(page) == titles
    assert page.count("<table>") == len(titles)
    layers = len(json.loads((runs[0] / "manifest.json").read_text())["layers"])
    assert len(_md_table_rows(markdown, "Plan per layer")) == layers
    for text in ("tiny-unet3d", "random weights (seed 0; disparity 1, asymmetry 0.5)",
                 "torch 2.", "test the machinery, not trained models", "no plan.json"):  # fmt: skip
        assert text in page
        assert text in markdown


def test_html_is_self_contained(single, comparison):
    for path in (single, comparison):
        page = path.read_text()
        assert "http://" not in page and "https://" not in page
        assert "<script" not in page and "<link" not in page
        sources = re.findall(r'src="([^"]*)"', page)
        assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def test_comparison_has_one_row_per_run(comparison):
    page = comparison.read_text()
    markdown = (comparison.parent / "report.md").read_text()
    rows = _html_table_rows(page, "Comparison")
    assert len(rows) == 2
    assert "seed 0" in rows[0] and "seed 1" in rows[1]
    md_rows = _md_table_rows(markdown, "Comparison")
    assert len(md_rows) == 2 and "seed 1" in md_rows[1]
    # The runs share figures (one colour each) instead of repeating each run in full.
    files = {p.stem for p in (comparison.parent / "figures").iterdir()}
    assert files == COMPARE_FIGURES
    assert len(IMG.findall(page)) == len(MD_FIGURE.findall(markdown)) == len(COMPARE_FIGURES)
    assert _md_tables(markdown).count("Plan by role (W8A8)") == 2  # each run's plan


def test_comparison_figures_overlay_every_run(runs):
    """The shared coverage figure draws each run's ECDF, equal to numpy's, in one panel."""
    from qvd_bench.report import figures as F
    from qvd_bench.store import StatsRun

    data = pd.concat(
        [F.coverage_data(StatsRun(r).channels, (8,)).assign(run=r.name) for r in runs],
        ignore_index=True,
    )
    fig = F.coverage_ecdf_compare(data)
    lines = {line.get_label(): line for line in fig.figure.axes[0].get_lines()}
    for run in runs:
        values = np.sort(data.loc[data["run"] == run.name, "coverage"].to_numpy())
        x, y = lines[run.name].get_data()
        np.testing.assert_allclose(x, values)
        np.testing.assert_allclose(y, np.arange(1, len(values) + 1) / len(values))


def test_run_without_temporal_features_renders_with_a_notice(single, runs, tmp_path):
    run = tmp_path / "no-temporal"
    shutil.copytree(runs[0], run)
    store.write_parquet(run / "temporal.parquet", store.temporal_frame({}))
    analyze(run)  # a stored plan.json is used as it is
    # Written over a copy of an earlier report, which it must replace whole.
    out = tmp_path / "report"
    shutil.copytree(single.parent, out)
    (out / "figures" / "stale.png").write_bytes(b"")
    index = build_report([run], out, title="no temporal features")
    page = index.read_text()
    markdown = (out / "report.md").read_text()
    assert "<title>no temporal features</title>" in page
    assert "plan.json (written by qvd-bench analyze)" in page
    assert len(IMG.findall(page)) == len(FIGURES - TEMPORAL_FIGURES)
    assert len(list((out / "figures").iterdir())) == len(FIGURES - TEMPORAL_FIGURES)
    assert "stores no temporal features" in page and "stores no temporal features" in markdown
    assert TEMPORAL_GROUP.split("\n")[0] not in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-temporal", "report"]


def test_bad_input_is_a_one_line_user_error(runs, tmp_path):
    cases = [
        ([tmp_path / "missing"], "no statistics run at"),
        ([runs[0], tmp_path / "other"], f"comparison run {tmp_path / 'other'}"),
        ([runs[0], runs[0]], "listed twice"),
        ([], "no statistics run given"),
    ]
    for run_dirs, message in cases:
        with pytest.raises(UserError, match=re.escape(message)) as error:
            build_report(run_dirs, tmp_path / "out")
        assert "\n" not in str(error.value)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds no report"):
        build_report([runs[0]], busy)
    assert (busy / "notes.txt").exists()
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- browser

CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
)
# Set once the page has loaded: how many images decoded (naturalWidth > 0) out of all.
PROBE = """<script>
window.addEventListener("load", function () {
  var all = Array.prototype.slice.call(document.images);
  var ok = all.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute("data-images", ok.length + "/" + all.length);
});
</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(single, tmp_path):
    # The probe goes into a copy: the report itself stays free of scripts.
    probed = tmp_path / "probed.html"
    probed.write_text(single.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium(tmp_path, "--virtual-time-budget=2000", "--dump-dom", probed.as_uri()).stdout
    assert f'data-images="{len(FIGURES)}/{len(FIGURES)}"' in dom

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", single.as_uri())
    rgb = (matplotlib.image.imread(shot)[::4, ::4, :3] * 255).astype(np.uint32)
    # Non-blank: many distinct colours, and a good share of non-white pixels (the figures).
    colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert len(colours) > 100
    assert (rgb.min(axis=-1) < 230).mean() > 0.05


def test_plan_table_lists_every_layer_in_module_order(single, runs):
    """The per-layer plan table lists the manifest's layers in module order."""
    markdown = (single.parent / "report.md").read_text()
    names = [row.split("|")[1].strip() for row in _md_table_rows(markdown, "Plan per layer")]
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert names == [layer["name"] for layer in manifest["layers"]]
    assert pd.Series(names).is_unique


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_report_directory_and_files_follow_the_umask(tmp_path, umask):
    import os
    import stat

    from qvd_bench.report.render import write_report

    previous = os.umask(umask)
    try:
        write_report([], "empty", tmp_path / "report")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "report").stat().st_mode)
    assert mode == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "report" / "index.html").stat().st_mode) == 0o666 & ~umask
