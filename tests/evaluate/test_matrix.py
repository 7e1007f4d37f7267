"""The evaluation matrix end to end: results rows, fidelity values, resume, a real-video
reference, mixed bit-widths, and a two-process run against one process."""

import hashlib
import json
import math
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from qvd_bench.commands._args import with_flags
from qvd_bench.commands.evaluate import write_report
from qvd_bench.commands.main import main
from qvd_bench.errors import UserError
from qvd_bench.evaluate import fidelity
from qvd_bench.evaluate import generate as gen
from qvd_bench.evaluate.config import EvalConfig
from qvd_bench.evaluate.frechet import SampleSizeWarning
from qvd_bench.evaluate.generate import GenerationCache, GenerationSettings
from qvd_bench.evaluate.latents import latent_range, to_uint8_videos
from qvd_bench.evaluate.matrix import evaluate
from qvd_bench.evaluate.results import RESULT_COLUMNS, RESULTS_FILE, SETTINGS_FILE
from qvd_bench.models import zoo

SETTINGS = GenerationSettings(steps=2, frames=2, height=16, width=16)
PROMPTS = ("a cat", "a dog")


def _config(**overrides):
    values = dict(prompts=PROMPTS, methods=("fp", "minmax"), bits=("W8A8",), settings=SETTINGS)
    values.update(overrides)
    return EvalConfig(**values)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """An evaluation, and its report written as the evaluate command writes it."""
    out = tmp_path_factory.mktemp("eval")
    config = _config(metrics=("fvd",))
    result = evaluate(config, out, progress=False)
    write_report(result, config, out, "tiny-unet3d")
    return out, result


def _cached(results_dir, method, bits, mode):
    """The cached generations of one configuration, in prompt order."""
    root = GenerationCache(results_dir).root / "tiny-unet3d-w0" / method / bits
    return [GenerationCache.load_path(p) for p in sorted(root.glob(f"p*-{mode}-*.safetensors"))]


def test_results_table_rows_and_outputs(evaluated):
    out, result = evaluated
    frame = pd.read_parquet(result.results_dir / RESULTS_FILE)
    assert tuple(frame.columns) == RESULT_COLUMNS
    assert set(frame["method"]) == {"fp", "minmax"}
    assert set(frame["metric"]) == {"sqnr", "cosine", "psnr", "ssim"}
    assert (frame["n"] == 2).all() and (frame["reference"] == "fp").all()
    # Per step (0, 1) and over all steps (-1), for each branch.
    tf = frame[(frame["mode"] == "teacher-forced") & (frame["method"] == "minmax")]
    assert set(tf["step"]) == {-1, 0, 1}
    assert set(tf["branch"]) == {"cfg", "uncond", "cond"}
    assert (out / "reports" / "tiny-unet3d" / "index.html").is_file()
    assert (out / "stats" / "tiny-unet3d-w0" / "analysis.parquet").is_file()
    # Time and peak memory per stage (statistics, FP reference, each configuration).
    timings = result.timings
    assert list(timings["method"]) == ["statistics", "reference", "fp", "minmax"]
    assert (timings["peak_host_bytes"] > 0).all() and timings["peak_device_bytes"].isna().all()
    assert "Cost and quality" in (out / "reports" / "tiny-unet3d" / "report.md").read_text()
    # FVD weights are absent: skipped with a notice naming the parameter, which the
    # command line prints as its flag.
    (notice,) = [n for n in result.notices if "fvd skipped" in n]
    assert "weights['fvd']" in notice and "--" not in notice
    assert "--fvd-weights" in with_flags(notice)


def test_fp_method_is_inf_against_itself(evaluated):
    _, result = evaluated
    fp = result.results[result.results["method"] == "fp"]
    for metric in ("sqnr", "psnr"):
        assert (fp[fp["metric"] == metric]["value"] == math.inf).all()
    for metric in ("cosine", "ssim"):
        values = fp[fp["metric"] == metric]["value"]
        assert values.to_numpy() == pytest.approx([1.0] * len(values), abs=1e-12)


def test_fidelity_numbers_equal_a_direct_computation(evaluated):
    out, result = evaluated
    loaded = zoo.load_model("tiny-unet3d")
    scheduler = gen.scheduler_for(loaded, SETTINGS)
    results_dir = result.results_dir
    reference = _cached(results_dir, "reference", "fp", "free")
    forced = _cached(results_dir, "minmax", "W8A8", "teacher")
    free = _cached(results_dir, "minmax", "W8A8", "free")
    assert len(reference) == len(forced) == len(free) == 2
    frame = result.results[result.results["method"] == "minmax"]

    def value(metric, mode, step, branch="cfg"):
        row = frame[
            (frame["metric"] == metric)
            & (frame["mode"] == mode)
            & (frame["step"] == step)
            & (frame["branch"] == branch)
        ]
        assert len(row) == 1
        return float(row["value"].iloc[0])

    ref_x0 = torch.cat([g.x0(scheduler) for g in reference], dim=1)
    test_x0 = torch.cat(
        [f.x0(scheduler, "cfg", g.model_inputs) for f, g in zip(forced, reference)], 1
    )
    assert value("sqnr", "teacher-forced", 1) == float(fidelity.sqnr(ref_x0[1], test_x0[1]))
    assert value("cosine", "teacher-forced", 0) == float(
        fidelity.cosine_similarity(ref_x0[0], test_x0[0])
    )
    assert value("sqnr", "teacher-forced", -1) == float(
        fidelity.sqnr(ref_x0.flatten(0, 1), test_x0.flatten(0, 1))
    )
    ref = torch.cat([g.latents for g in reference])
    test = torch.cat([g.latents for g in free])
    assert value("sqnr", "free-running", -1) == float(fidelity.sqnr(ref, test))
    lo, hi = float(ref.min()), float(ref.max())

    def frames(x):  # (B, C, F, H, W) -> (B, F, C, H, W) in [0, 1] by the reference range
        return ((x.double() - lo) / (hi - lo)).transpose(1, 2)

    assert value("psnr", "free-running", -1) == float(fidelity.psnr(frames(ref), frames(test)))
    assert value("ssim", "free-running", -1) == float(fidelity.ssim(frames(ref), frames(test)))


def test_interrupted_evaluation_resumes_without_regenerating(tmp_path, monkeypatch, evaluated):
    stats = str(evaluated[1].stats_dirs[0])
    config = _config(stats=stats, methods=("minmax",))
    save = GenerationCache.save
    saved = []

    def save_then_interrupt(self, key, generation):
        save(self, key, generation)
        saved.append(key)
        if len(saved) == 3:  # the two reference videos, then prompt 0's free-running one
            raise KeyboardInterrupt

    monkeypatch.setattr(GenerationCache, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        evaluate(config, tmp_path, progress=False)
    assert [(k.method, k.prompt_index, k.mode) for k in saved] == [
        ("reference", 0, "free"),
        ("reference", 1, "free"),
        ("minmax", 0, "free"),
    ]
    first_free = load_file(
        str(GenerationCache(tmp_path / "results" / "tiny-unet3d").path(saved[2]))
    )
    monkeypatch.setattr(GenerationCache, "save", save)

    singles, pairs = [], []
    generate, generate_pair = gen.generate, gen.generate_free_and_forced

    def counting(*args, **kwargs):
        singles.append(args[1:3])
        return generate(*args, **kwargs)

    def counting_pairs(*args, **kwargs):
        made = generate_pair(*args, **kwargs)
        pairs.append((args[1:3], made))
        return made

    monkeypatch.setattr(gen, "generate", counting)
    monkeypatch.setattr(gen, "generate_free_and_forced", counting_pairs)
    result = evaluate(config, tmp_path, progress=False)
    # 2 reference videos + 2 prompts x (teacher, free) = 6, three finished before. A
    # prompt's two videos are made together: prompt 0's free-running video is made again
    # for its teacher-forced one, the same bit for bit, and the cached file is kept.
    assert singles == [] and [p[0] for p in pairs] == [("a cat", 0), ("a dog", 1)]
    assert result.generated == 3 and result.cached == 3
    remade = pairs[0][1][0].tensors()
    assert remade.keys() == first_free.keys()
    assert all(torch.equal(remade[name], first_free[name]) for name in remade)
    pairs.clear()
    again = evaluate(config, tmp_path, progress=False)
    assert singles == [] and pairs == [] and again.generated == 0 and again.cached == 6
    pd.testing.assert_frame_equal(again.results, result.results)


# ----------------------------------------------------------------------------- real reference


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory):
    """A directory of 3 synthetic real videos (16 frames) and a TorchScript FVD detector."""
    from tests.evaluate.helpers import ScriptedDetector, random_videos

    root = tmp_path_factory.mktemp("real")
    directory = root / "clips"
    directory.mkdir()
    videos = random_videos(3, 16, 12, seed=5).contiguous()
    save_file({"videos": videos}, str(directory / "videos.safetensors"))
    torch.manual_seed(2)
    detector = root / "i3d_torchscript.pt"
    torch.jit.script(ScriptedDetector()).save(str(detector))
    return directory, detector


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning")
def test_real_video_reference_end_to_end(real_clips, evaluated, tmp_path):
    from qvd_bench.evaluate.fvd import fvd, load_detector

    directory, detector_file = real_clips
    # 16 frames: the StyleGAN-V protocol takes exactly 16. The statistics of the module's
    # run calibrate the quantizers (their frame count does not matter to the check).
    settings = GenerationSettings(steps=2, frames=16, height=8, width=8)
    config = _config(
        settings=settings,
        metrics=("fvd",),
        reference=str(directory),
        weights={"fvd": str(detector_file)},
        stats=str(evaluated[1].stats_dirs[0]),
    )
    with pytest.warns(SampleSizeWarning):  # 2 and 3 videos of 400-d features
        result = evaluate(config, tmp_path, progress=False)

    digest = hashlib.sha256((directory / "videos.safetensors").read_bytes()).hexdigest()
    reference_id = f"real:clips/sha256:{digest[:16]}"
    detector = load_detector("stylegan-v", detector_file)
    frechet = result.results[result.results["metric"] == "fvd"]
    assert sorted(frechet["method"]) == ["fp", "minmax"]
    assert (frechet["protocol"] == detector.protocol_id).all()
    assert (frechet["reference"] == reference_id).all()
    assert (frechet["mode"] == "distribution").all() and (frechet["n"] == 2).all()
    fidelity_rows = result.results[result.results["metric"] != "fvd"]
    assert (fidelity_rows["reference"] == "fp").all()

    # Each value: FVD of the real set against the method's free-running videos.
    loaded = zoo.load_model("tiny-unet3d")
    layout = loaded.family.layout
    reference = _cached(result.results_dir, "reference", "fp", "free")
    value_range = latent_range(reference)
    real = load_file(str(directory / "videos.safetensors"))["videos"]
    real_features = detector.features(real)
    generated = {"fp": reference, "minmax": _cached(result.results_dir, "minmax", "W8A8", "free")}
    for method, videos in generated.items():
        latents = torch.cat([g.latents for g in videos])
        test = to_uint8_videos(latents, layout, value_range)
        with pytest.warns(SampleSizeWarning):
            expected = fvd(real_features, detector.features(test))
        value = frechet.loc[frechet["method"] == method, "value"].item()
        assert value == pytest.approx(expected, rel=1e-9) and value > 0

    recorded = json.loads((result.results_dir / SETTINGS_FILE).read_text())["reference"]
    assert recorded["id"] == reference_id and recorded["sha256"] == digest
    assert recorded["directory"] == str(directory.resolve())
    assert recorded["videos"] == 3 and recorded["shape"] == [3, 16, 12, 12, 3]


# ----------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path, capsys):
    """``torchrun --nproc_per_node=2 -m qvd_bench evaluate`` writes what one process does.

    Equality is exact: every video is computed alone from its own seeds by the same
    operations whichever process runs it, and the collection's two prompts (one per
    process) merge in the order one process folds them in, so nothing is summed in another
    order.
    """
    args = [
        "evaluate", "--model", "tiny-unet3d", "--num-prompts", "2", "--frames", "2",
        "--height", "8", "--width", "8", "--steps", "2", "--methods", "fp,mse",
        "--bits", "W8A8", "--no-progress",
    ]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    capsys.readouterr()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "qvd_bench", *args,
            "--out", str(tmp_path / "double"),
        ],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("results written to") == 1  # rank 0 alone reports

    single = tmp_path / "single" / "results" / "tiny-unet3d"
    double = tmp_path / "double" / "results" / "tiny-unet3d"
    a = pd.read_parquet(single / RESULTS_FILE)
    b = pd.read_parquet(double / RESULTS_FILE)
    assert len(a) > 0 and set(a["method"]) == {"fp", "mse"}
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    settings = json.loads((double / SETTINGS_FILE).read_text())
    assert settings["processes"] == 2
    manifest = json.loads(
        (tmp_path / "double" / "stats" / "tiny-unet3d-w0" / "manifest.json").read_text()
    )
    assert manifest["world_size"] == 2
    # Each process wrote its own prompts' videos; together the single process's set.
    files = {p.relative_to(single) for p in single.rglob("*.safetensors")}
    assert files == {p.relative_to(double) for p in double.rglob("*.safetensors")}
    assert {p.name[:5] for p in files} == {"p0000", "p0001"}


def test_mixed_bits_specs_run_in_the_matrix(tmp_path):
    config = _config(
        model="tiny-wan", methods=("mse",), bits=("w8a6-MIXED", "W8A6"), prompts=PROMPTS[:1]
    )
    assert config.bits == ("W8A6-mixed", "W8A6")
    result = evaluate(config, tmp_path, progress=False)
    frame = result.results
    sqnr = frame[(frame["metric"] == "sqnr") & (frame["step"] == -1) & (frame["branch"] == "cfg")]
    assert set(sqnr["bits"]) == {"W8A6-mixed", "W8A6"}
    assert sqnr["value"].map(math.isfinite).all()
    mixed = sqnr[sqnr["bits"] == "W8A6-mixed"]["value"].tolist()
    uniform = sqnr[sqnr["bits"] == "W8A6"]["value"].tolist()
    assert mixed != uniform  # the mixed cell is quantized with its own bits per layer
    with pytest.raises(UserError):
        _config(bits=("W8A6-mixd",))


def test_an_interruption_while_collecting_keeps_the_collection_message(tmp_path):
    from types import SimpleNamespace

    from qvd_bench.errors import Interrupted
    from qvd_bench.evaluate.matrix import _interrupted

    collecting = Interrupted("the statistics of 1 of 2 prompts are saved in X")
    nothing = SimpleNamespace(generated=0, cached=0, cache=GenerationCache(tmp_path))
    assert str(_interrupted(collecting, nothing, "the statistics of weight seed 1")) == (
        "the statistics of 1 of 2 prompts are saved in X"
    )
    some = SimpleNamespace(generated=3, cached=2, cache=GenerationCache(tmp_path))
    assert str(_interrupted(collecting, some, "the statistics of weight seed 1")) == (
        f"the statistics of 1 of 2 prompts are saved in X; 5 finished videos are in "
        f"{tmp_path / gen.GENERATIONS_DIR}"
    )
    assert str(_interrupted(KeyboardInterrupt(), nothing, "weight seed 0, mse W8A8")) == (
        "no video had finished; rerunning the same command resumes at weight seed 0, mse W8A8"
    )
