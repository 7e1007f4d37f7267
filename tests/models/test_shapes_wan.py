"""The shipped trained model ``shapes-wan``: its files, its pipeline, its recorded scores."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from qvd_bench.commands import main as cli
from qvd_bench.datasets import shapes
from qvd_bench.errors import UserError
from qvd_bench.evaluate.groundtruth import score_clips
from qvd_bench.models import sampling, shapes_wan
from qvd_bench.models.pipelines import run_pipeline
from qvd_bench.models.zoo import list_models, load_model

# Recorded with the shipped weights (benchmarks/results/reference_training.md): every
# 6th of the 144 held-out seen captions, 20 steps, guidance 3, sampling seed 0.
SAMPLE_CAPTIONS = shapes.heldout_captions("seen")[::6]
RECORDED = {
    "gt_color_acc": 24 / 24,
    "gt_shape_acc": 22 / 24,
    "gt_motion_acc": 21 / 24,
    "gt_persistence": 24 / 24,
}
# 24 clips: a flipped decision moves an accuracy by 1/24. Float rounding on another
# machine or torch version may flip a borderline clip or two, not more.
MARGIN = 2.5 / 24


def test_shipped_files_have_the_recorded_sha256():
    for name, expected in shapes_wan.SHA256.items():
        data = (shapes_wan.WEIGHTS_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == expected, name
    total = sum((shapes_wan.WEIGHTS_DIR / name).stat().st_size for name in shapes_wan.SHA256)
    assert total <= 10 * 2**20


def test_loads_as_a_wan_pipeline_without_vae():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from safetensors.torch import load_file

    loaded = load_model("shapes-wan")
    assert isinstance(loaded.pipeline, WanPipeline) and loaded.pipeline.vae is None
    assert isinstance(loaded.pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(loaded.denoiser, WanTransformer3DModel)
    assert loaded.pipeline.transformer is loaded.denoiser
    assert loaded.trained and not loaded.random_weights and loaded.knobs == {}
    # The weights are the file's, not a fresh random init.
    stored = load_file(str(shapes_wan.WEIGHTS_DIR / shapes_wan.TRANSFORMER_FILE))
    state = loaded.denoiser.state_dict()
    assert stored.keys() == state.keys()
    assert all(torch.equal(stored[k], state[k]) for k in stored)


def test_text_states_are_the_pipelines_own():
    loaded = load_model("shapes-wan")
    cond, uncond = sampling.text_states_for_prompts(loaded, ["a red disc moving left"])
    expected, _ = loaded.pipeline.encode_prompt(
        ["a red disc moving left"],
        do_classifier_free_guidance=False,
        max_sequence_length=shapes_wan.TEXT_LENGTH,
    )
    empty, _ = loaded.pipeline.encode_prompt(
        [""], do_classifier_free_guidance=False, max_sequence_length=shapes_wan.TEXT_LENGTH
    )
    assert torch.equal(cond, expected) and torch.equal(uncond, empty)


def test_held_out_captions_score_as_recorded():
    loaded = load_model("shapes-wan")
    latents = run_pipeline(
        loaded,
        SAMPLE_CAPTIONS,
        steps=20,
        guidance_scale=3.0,
        seed=0,
        sample_ids=range(len(SAMPLE_CAPTIONS)),
        frames=shapes.FRAMES,
        height=shapes.HEIGHT,
        width=shapes.WIDTH,
    )
    scores = score_clips((latents + 1.0) / 2.0, SAMPLE_CAPTIONS)
    for metric, recorded in RECORDED.items():
        assert abs(scores[metric] - recorded) <= MARGIN, (metric, scores[metric], recorded)


@pytest.fixture
def corrupt_copy(tmp_path, monkeypatch):
    """The shipped files copied, one byte of the transformer's flipped, loaded from there."""
    folder = tmp_path / "shapes-wan"
    shutil.copytree(shapes_wan.WEIGHTS_DIR, folder)
    path = folder / shapes_wan.TRANSFORMER_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    monkeypatch.setattr(shapes_wan, "WEIGHTS_DIR", folder)
    return path


def test_corrupt_weights_are_refused_naming_file_and_hash(corrupt_copy):
    with pytest.raises(UserError) as error:
        load_model("shapes-wan")
    message = str(error.value)
    assert "\n" not in message
    assert str(corrupt_copy) in message
    assert shapes_wan.SHA256[shapes_wan.TRANSFORMER_FILE] in message


def test_corrupt_weights_on_the_command_line(corrupt_copy, capsys):
    assert cli.main(["models", "--roles", "shapes-wan"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert shapes_wan.SHA256[shapes_wan.TRANSFORMER_FILE] in err


@pytest.mark.parametrize("knob", ["disparity", "asymmetry"])
def test_outlier_knobs_are_refused(knob, tmp_path, capsys):
    with pytest.raises(UserError, match=f"trained weights: {knob}"):
        load_model("shapes-wan", **{knob: 0.5})
    args = ["collect", "--model", "shapes-wan", f"--{knob}", "0.5", "--out", tmp_path / "run"]
    assert cli.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"trained weights: {knob}" in err
    assert not (tmp_path / "run").exists()


def test_listed_as_trained(capsys):
    rows = {row.name: row for row in list_models()}
    assert rows["shapes-wan"].trained and not rows["tiny-wan"].trained
    assert rows["shapes-wan"].parameters == load_model("shapes-wan").param_count
    assert cli.main(["models"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert " trained " in lines["shapes-wan"] and " random " in lines["tiny-wan"]


def test_collect_runs_its_pipeline_and_the_manifest_says_trained(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    args = ["collect", "--model", "shapes-wan", "--steps", "2", "--num-prompts", "1"]
    assert cli.main([*args, "--out", str(out), "--no-progress"]) == 0
    assert "shapes-wan (trained weights)" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["trained"] is True and manifest["model"]["random_weights"] is False
    assert manifest["model"]["knobs"] == {}
    assert manifest["sampling"]["sampler"] == "pipeline"
    assert manifest["sampling"]["scheduler"]["config"]["shift"] == 3.0


@pytest.mark.parametrize("size", [["--frames", "2"], ["--height", "15"]], ids=["frames", "height"])
def test_a_latent_that_is_not_whole_patches_is_one_line_exit_2(size, tmp_path, capsys):
    out = tmp_path / "stats"
    args = ["collect", "--model", "shapes-wan", "--steps", "1", "--num-prompts", "1", *size]
    assert cli.main([*args, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "multiples of the patch 4x2x2" in err, err
    assert not out.exists()
    # The library refuses it before sampling too.
    loaded = load_model("shapes-wan")
    with pytest.raises(UserError, match="multiples of the patch"):
        run_pipeline(
            loaded, ["a red disc moving left"], steps=1, guidance_scale=3.0, seed=0,
            sample_ids=[0], frames=8, height=16, width=15,
        )  # fmt: skip
