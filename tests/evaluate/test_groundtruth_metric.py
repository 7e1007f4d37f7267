"""The ``groundtruth`` metric family of the evaluation matrix."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from qvd_bench.commands import main as cli
from qvd_bench.datasets import shapes
from qvd_bench.errors import UserError
from qvd_bench.evaluate import groundtruth
from qvd_bench.evaluate.config import EvalConfig
from qvd_bench.evaluate.frechet import SampleSizeWarning, frechet_distance_of_features
from qvd_bench.evaluate.metrics import METRICS, groundtruth_rows


@pytest.fixture(scope="module")
def dataset():
    clips, truths = shapes.make_clips(seed=5, count=96)
    return clips, [truth.caption for truth in truths]


def test_rows_of_dataset_clips_as_latents(dataset):
    clips, captions = dataset
    latents = torch.from_numpy(clips) * 2.0 - 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleSizeWarning)
        rows = {row["metric"]: row for row in groundtruth_rows(latents, "BCFHW", captions)}
    assert set(rows) == set(groundtruth.RESULT_METRICS)
    assert any("color" in name for name in rows)
    for name in groundtruth.METRICS:
        assert rows[name]["value"] == 1.0 and rows[name]["n"] == len(captions)
        assert rows[name]["protocol"] == groundtruth.ACCURACY_PROTOCOL_ID
    # The distance is the Frechet distance of the features to the dataset reference.
    reference, _ = shapes.make_clips(
        groundtruth.REFERENCE_SEED, groundtruth.REFERENCE_CLIPS, split="all"
    )
    # Of the clips the latents stand for ((x + 1) / 2, float32 rounding included).
    back = ((latents + 1.0) / 2.0).numpy()
    expected = frechet_distance_of_features(
        groundtruth.clip_features(back), groundtruth.clip_features(reference)
    )
    assert rows["gt_fd"]["value"] == pytest.approx(expected, rel=1e-9)
    assert rows["gt_fd"]["protocol"] == groundtruth.FD_PROTOCOL_ID


def test_frame_first_layout_and_wrong_colours(dataset):
    clips, captions = dataset
    latents = torch.from_numpy(clips).transpose(1, 2) * 2.0 - 1.0  # (N, F, C, H, W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleSizeWarning)
        same = {r["metric"]: r["value"] for r in groundtruth_rows(latents, "BFCHW", captions)}
        # Red and blue channels swapped: only green and magenta keep their colour.
        swapped = latents[:, :, [2, 1, 0]]
        wrong = {r["metric"]: r["value"] for r in groundtruth_rows(swapped, "BFCHW", captions)}
    assert same["gt_color_acc"] == 1.0
    expected = np.mean([shapes.parse_caption(c)[0].color in ("green", "magenta") for c in captions])
    assert wrong["gt_color_acc"] == pytest.approx(expected)


def test_latents_of_another_size_are_refused():
    with pytest.raises(UserError, match="clips must be"):
        groundtruth_rows(torch.zeros(1, 4, 8, 16, 16), "BCFHW", ["a red disc growing"])


def test_config_refuses_prompts_that_are_not_captions_and_other_sizes():
    from qvd_bench.evaluate.generate import GenerationSettings

    assert METRICS.get("groundtruth").kind == "groundtruth"
    with pytest.raises(UserError, match="unknown word 'guitar'"):
        EvalConfig(model="shapes-wan", metrics=("groundtruth",), prompts=("a red guitar",))
    with pytest.raises(UserError, match="frames, height and width must be 8, 16 and 16"):
        EvalConfig(
            model="shapes-wan",
            metrics=("groundtruth",),
            prompts=("a red disc growing",),
            settings=GenerationSettings(frames=4),
        )


def test_evaluate_command_on_shapes_wan(tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red disc moving left\na blue square growing\n")
    args = ["evaluate", "--model", "shapes-wan", "--methods", "fp,minmax", "--bits", "W8A8"]
    args += ["--metrics", "groundtruth", "--prompts", captions, "--steps", "2"]
    args += ["--guidance-scale", "3", "--out", tmp_path / "out", "--no-progress"]
    assert cli.main([str(a) for a in args]) == 0
    results = pd.read_parquet(tmp_path / "out" / "results" / "shapes-wan" / "results.parquet")
    measured = results[results["metric"].isin(groundtruth.RESULT_METRICS)]
    assert set(measured["method"]) == {"fp", "minmax"}
    assert set(measured["metric"]) == set(groundtruth.RESULT_METRICS)
    assert (measured["n"] == 2).all()
    accuracies = measured[measured["metric"] != groundtruth.FD_METRIC]["value"]
    assert accuracies.between(0.0, 1.0).all()


def test_evaluate_command_refuses_an_unknown_caption_word(tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red disc moving sideways\n")
    args = ["evaluate", "--model", "shapes-wan", "--metrics", "groundtruth"]
    args += ["--prompts", captions, "--out", tmp_path / "out"]
    assert cli.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown word 'sideways'" in err
    assert not (tmp_path / "out" / "results").exists()
