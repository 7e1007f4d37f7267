"""The command line end to end: collect, info, models, errors, resume, two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qvd_bench import store
from qvd_bench.collect import collector
from qvd_bench.commands import main as cli

SMALL = [
    "--steps",
    "2",
    "--frames",
    "2",
    "--height",
    "8",
    "--width",
    "8",
    "--temporal-stride",
    "250",
    "--reservoir",
    "16",
    "--no-progress",
]
PRESETS = [
    "tiny-unet3d",
    "tiny-animatediff",
    "tiny-svd",
    "tiny-i2vgenxl",
    "tiny-latte",
    "tiny-cogvideox",
    "tiny-wan",
]


def run_cli(*args):
    return cli.main([str(a) for a in args])


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("preset", PRESETS)
def test_collect_every_preset(preset, tmp_path, capsys):
    out = tmp_path / preset
    assert run_cli("collect", "--model", preset, "--out", out, "--sampler", "denoiser", *SMALL) == 0
    printed = capsys.readouterr().out
    assert f"statistics written to {out}" in printed and "random weights" in printed
    run = store.StatsRun(out)
    assert set(run.channels["branch"]) == {"uncond", "cond"}
    assert run.channels["timestep"].nunique() == 2
    assert (run.channels["count"] > 0).all()
    assert set(run.layers["role"]) >= {"time_emb"}
    assert set(run.temporal["timestep"]) == {0.0, 250.0, 500.0, 750.0}
    assert run.manifest["model"]["random_weights"] is True
    assert len(run.reservoir) == len(run.layers)


def test_rerun_with_same_seeds_gives_identical_parquet(tmp_path):
    for name in ("a", "b"):
        assert run_cli("collect", "--out", tmp_path / name, "--num-prompts", "2", *SMALL) == 0
    for table in ("channels", "histograms", "temporal", "weights"):
        a = (tmp_path / "a" / f"{table}.parquet").read_bytes()
        b = (tmp_path / "b" / f"{table}.parquet").read_bytes()
        assert a == b, table
    assert (tmp_path / "a" / "reservoir.safetensors").read_bytes() == (
        tmp_path / "b" / "reservoir.safetensors"
    ).read_bytes()


def test_interrupted_collect_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["collect", "--out", out, "--num-prompts", "3", "--checkpoint-every", "0", *SMALL]
    original = collector.run_sample
    calls = []

    def interrupt_second(*a, **k):
        calls.append(a[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(collector, "run_sample", interrupt_second)
    assert run_cli(*args) == 130
    assert "1 of 3 prompts are saved" in capsys.readouterr().err
    assert not out.exists() and store.partial_dir(out).exists()
    with pytest.raises(Exception, match="interrupted collection"):
        store.StatsRun(out)

    monkeypatch.setattr(collector, "run_sample", original)
    resumed = []
    monkeypatch.setattr(
        collector, "run_sample", lambda *a, **k: resumed.append(a[2]) or original(*a, **k)
    )
    assert run_cli(*args) == 0
    assert "1 resumed from a checkpoint" in capsys.readouterr().out
    assert resumed == [1, 2]

    monkeypatch.setattr(collector, "run_sample", original)
    assert run_cli(*[a if a != out else tmp_path / "fresh" for a in args]) == 0
    pd.testing.assert_frame_equal(
        store.StatsRun(out).channels, store.StatsRun(tmp_path / "fresh").channels
    )


def _interrupt_after_step(sample, step):
    """A run_sample that raises KeyboardInterrupt after ``step`` steps of ``sample``."""
    original = collector.run_sample

    def run_sample(loaded, prompt, sample_id, config, tracker, on_step):
        steps = []

        def counted_step():
            on_step()
            steps.append(1)
            if sample_id == sample and len(steps) == step:
                raise KeyboardInterrupt

        return original(loaded, prompt, sample_id, config, tracker, counted_step)

    return run_sample


def test_interrupt_with_default_checkpoint_interval_saves_finished_prompts(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    args = ["collect", "--out", out, "--num-prompts", "3", *SMALL]
    # Mid-sample: the accumulators then hold half of prompt 1, which must not be saved.
    monkeypatch.setattr(collector, "run_sample", _interrupt_after_step(1, 1))
    assert run_cli(*args) == 130
    message = error_line(capsys)
    assert message == (
        f"qvd-bench: interrupted; the statistics of 1 of 3 prompts are saved in "
        f"{store.partial_dir(out)}; rerunning the same command resumes with the other 2"
    )

    monkeypatch.undo()
    resumed = []
    original = collector.run_sample
    monkeypatch.setattr(
        collector, "run_sample", lambda *a, **k: resumed.append(a[2]) or original(*a, **k)
    )
    assert run_cli(*args) == 0
    assert "1 resumed from a checkpoint" in capsys.readouterr().out
    assert resumed == [1, 2]

    monkeypatch.undo()
    assert run_cli(*[a if a != out else tmp_path / "fresh" for a in args]) == 0
    resumed_run, fresh = store.StatsRun(out), store.StatsRun(tmp_path / "fresh")
    for table in ("channels", "histograms", "temporal", "weights"):
        pd.testing.assert_frame_equal(getattr(resumed_run, table), getattr(fresh, table))
    assert (out / "reservoir.safetensors").read_bytes() == (
        tmp_path / "fresh" / "reservoir.safetensors"
    ).read_bytes()


def test_interrupt_before_any_prompt_finished_says_nothing_was_saved(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(collector, "run_sample", _interrupt_after_step(0, 1))
    assert run_cli("collect", "--out", out, "--num-prompts", "2", *SMALL) == 130
    assert error_line(capsys) == (
        "qvd-bench: interrupted; no prompt had finished, so nothing was saved; "
        "rerunning the same command starts from the beginning"
    )
    assert not out.exists() and not store.partial_dir(out).exists()


def test_info_and_models(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("collect", "--out", out, "--roles", "time_emb,ffn", *SMALL) == 0
    capsys.readouterr()
    assert run_cli("info", out) == 0
    printed = capsys.readouterr().out
    assert "roles: ffn" in printed and "time_emb" in printed and "channels.parquet" in printed
    assert run_cli("models") == 0
    listing = capsys.readouterr().out
    for preset in [*PRESETS, "modelscope-t2v-arch"]:
        assert preset in listing
    assert run_cli("models", "--roles", "tiny-latte") == 0
    assert "time_emb" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["collect", "--model", "tiny-unet"], "did you mean 'tiny-unet3d'"),
        (["collect", "--steps", "0"], "steps must be at least 1"),
        (["collect", "--roles", "ffm"], "unknown role 'ffm'"),
        (["collect", "--include", "no-such-layer"], "no layer matches"),
        (["collect", "--steps", "two"], "invalid int value"),
        (["info", "/nonexistent/run"], "no statistics run"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path):
    assert run_cli(*args, *(["--out", tmp_path / "x"] if args[0] == "collect" else [])) == 2
    assert message in error_line(capsys)


def test_empty_prompt_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# only a comment\n\n")
    assert run_cli("collect", "--prompts", prompts, "--out", tmp_path / "x") == 2
    assert "has no prompts" in error_line(capsys)


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run_cli("collect", "--out", blocker / "run", *SMALL) == 2
    assert "not a writable directory" in error_line(capsys)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("small") / "run"
    assert run_cli("collect", "--out", run, *SMALL) == 0
    return run


@pytest.mark.parametrize("command", ["collect", "evaluate", "run", "quantize", "report"])
@pytest.mark.parametrize("where", ["below-a-file", "/proc/nope"])
def test_unwritable_output_fails_before_any_work(
    command, where, small_run, tmp_path, monkeypatch, capsys
):
    if where.startswith("/proc") and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    out = tmp_path / "file" / "out" if where == "below-a-file" else where
    (tmp_path / "file").write_text("")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output directory was checked")

    from qvd_bench.models import zoo

    monkeypatch.setattr(zoo, "load_model", no_work)
    monkeypatch.setattr(zoo, "load_run_model", no_work)
    monkeypatch.setattr("qvd_bench.report.build_report", no_work)
    args = {
        "collect": ["collect", *SMALL],
        "evaluate": ["evaluate", "--no-progress"],
        "run": ["run", "--no-progress"],
        "quantize": ["quantize", "--stats", small_run],
        "report": ["report", small_run],
    }[command]
    assert run_cli(*args, "--out", out) == 2
    assert "not a writable directory" in error_line(capsys)


@pytest.mark.parametrize(
    "flag, metric",
    [
        ("--fvd-weights", "fvd"),
        ("--fvd-cd-weights", "fvd-cd"),
        ("--fid-weights", "fid"),
        ("--clip-model", "clipsim"),
    ],
)
def test_missing_weights_path_fails_before_any_work(flag, metric, tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the weights path was checked")

    monkeypatch.setattr("qvd_bench.evaluate.matrix.evaluate", no_work)
    missing = tmp_path / "nonexistent.pt"
    args = ["evaluate", "--metrics", metric, flag, missing, "--out", tmp_path / "out"]
    assert run_cli(*args) == 2
    assert error_line(capsys) == f"qvd-bench: error: {flag}: {missing} does not exist"
    assert not (tmp_path / "out").exists()


def test_corrupt_stats_on_info(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text('{"format": "qvd-bench-stats", "schema_version": 0}')
    assert run_cli("info", tmp_path) == 2
    assert "schema version 0" in error_line(capsys)


def test_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"qvd-bench {metadata.version('qvd-bench')}\n"


def test_console_script_exit_code(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qvd_bench",
            "collect",
            "--model",
            "nope",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown model 'nope'" in result.stderr


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    common = ["collect", "--num-prompts", "3", *SMALL]
    assert run_cli(*common, "--out", tmp_path / "single") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "qvd_bench",
            *common,
            "--out",
            str(tmp_path / "double"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single, double = store.StatsRun(tmp_path / "single"), store.StatsRun(tmp_path / "double")
    assert double.manifest["world_size"] == 2
    a, b = single.channels, double.channels
    pd.testing.assert_frame_equal(
        a.drop(columns=["mean", "m2", "m3", "m4"]), b.drop(columns=["mean", "m2", "m3", "m4"])
    )
    for field in ("mean", "m2", "m3", "m4"):
        np.testing.assert_allclose(b[field], a[field], rtol=1e-8, atol=1e-12)
    pd.testing.assert_frame_equal(single.histograms, double.histograms)
    for layer, state in single.reservoir.items():
        for field, value in state.items():
            assert torch.equal(double.reservoir[layer][field], value), (layer, field)


@pytest.mark.parametrize("preset", ["tiny-unet3d", "tiny-wan"])
def test_collect_from_saved_pipeline_directory(preset, tmp_path, capsys):
    from qvd_bench.models.pipelines import save_tiny_pipeline

    directory = save_tiny_pipeline(preset, tmp_path / "pipeline")
    out = tmp_path / "run"
    assert run_cli("collect", "--model", directory, "--out", out, *SMALL) == 0
    run = store.StatsRun(out)
    assert run.manifest["config"]["sampler"] == "auto"
    # "auto" resolved to the pipeline; each sample's generator seed and its scheduler.
    sampling = run.manifest["sampling"]
    assert sampling["sampler"] == "pipeline" and len(sampling["samples"]) == 2
    assert sampling["scheduler"]["class"].endswith("Scheduler")
    assert all(isinstance(s["generator_seed"], int) for s in sampling["samples"])
    assert run.manifest["model"]["name"] == str(directory)
    # The pipeline ran the sampling: both CFG branches at each of its 2 steps.
    assert set(run.channels["branch"]) == {"uncond", "cond"}
    assert run.channels["timestep"].nunique() == 2


def test_collect_in_bfloat16(tmp_path):
    out = tmp_path / "run"
    assert (
        run_cli("collect", "--model", "tiny-latte", "--dtype", "bfloat16", "--out", out, *SMALL)
        == 0
    )
    run = store.StatsRun(out)
    assert run.manifest["config"]["dtype"] == "bfloat16"
    assert np.isfinite(run.channels["mean"]).all()


def test_analyze_writes_table_and_plan(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("collect", "--out", out, *SMALL) == 0
    capsys.readouterr()
    assert run_cli("analyze", out, "--a-bits", "4") == 0
    printed = capsys.readouterr().out
    assert "plan W8A4" in printed and "time_emb (temporal features)" in printed
    from qvd_bench.analysis import QuantPlan

    plan = QuantPlan.load(out / "plan.json")
    assert plan.a_bits == 4 and len(plan.layers) == len(store.StatsRun(out).layers)
    assert pd.read_parquet(out / "analysis.parquet")["layer"].nunique() == len(plan.layers)


@pytest.mark.parametrize("bits", ["0", "33"])
def test_analyze_rejects_bit_widths(bits, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("collect", "--out", out, "--roles", "ffn,time_emb", *SMALL) == 0
    capsys.readouterr()
    assert run_cli("analyze", out, "--a-bits", bits) == 2
    assert f"got {bits}" in error_line(capsys)


def test_analyze_needs_temporal_features(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        run_cli(
            "collect", "--out", out, "--roles", "ffn,time_emb", *SMALL, "--temporal-stride", "0"
        )
        == 0
    )
    capsys.readouterr()
    assert run_cli("analyze", out) == 2
    assert "no temporal features" in error_line(capsys)
    assert run_cli("analyze", out, "--no-temporal") == 0
    assert "no temporal features" in capsys.readouterr().out


def test_analyze_missing_run(tmp_path, capsys):
    assert run_cli("analyze", tmp_path / "missing") == 2
    assert "no statistics run" in error_line(capsys)


def test_report_command(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("collect", "--out", run, *SMALL) == 0
    assert run_cli("analyze", run) == 0
    capsys.readouterr()
    assert run_cli("report", run, "--out", tmp_path / "report") == 0
    assert "report written to" in capsys.readouterr().out
    html = (tmp_path / "report" / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 5
    assert (tmp_path / "report" / "report.md").exists()
    assert run_cli("report", run, "--compare", tmp_path / "nope", "--out", tmp_path / "r2") == 2
    assert "nope" in error_line(capsys)


def test_quantize_command(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("collect", "--out", run, *SMALL, "--temporal-stride", "50") == 0
    capsys.readouterr()
    assert (
        run_cli(
            "quantize",
            "--stats",
            run,
            "--method",
            "htdq",
            "--bits",
            "W4A8",
            "--out",
            tmp_path / "rec",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "htdq W4A8" in printed and "TDScore" in printed
    assert (tmp_path / "rec" / "record.safetensors").exists() and (
        tmp_path / "rec" / "record.json"
    ).exists()
    for args, message in (
        (["--method", "qvdd"], "did you mean 'qvd'"),
        (["--bits", "W1A8"], "between 2 and 16"),
        (["--model", "tiny-latte"], "from another model"),
    ):
        assert run_cli("quantize", "--stats", run, "--out", tmp_path / "x", *args) == 2
        assert message in error_line(capsys)


TINY_RUN = [
    "--num-prompts",
    "1",
    "--steps",
    "2",
    "--frames",
    "2",
    "--height",
    "8",
    "--width",
    "8",
    "--bits",
    "W8A8",
    "--no-progress",
]


def test_run_and_evaluate_commands(tmp_path, monkeypatch, capsys):
    # regress on run's results: tests/commands/test_regress.py (--config-of).
    # run defaults to shapes-wan; this checks the output layout on the tiny preset.
    assert (
        run_cli(
            "run", "--out", tmp_path, "--model", "tiny-unet3d", "--methods", "fp,minmax", *TINY_RUN
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "tiny-unet3d" in printed and "index.html" in printed

    # evaluate's --out is the output root, as run's is, and by default the current
    # directory: its folders are where the other commands put theirs by default.
    out = tmp_path / "evaluate"
    out.mkdir()
    monkeypatch.chdir(out)
    assert run_cli("evaluate", "--methods", "fp,mse", *TINY_RUN) == 0
    assert [p.relative_to(out) for p in out.rglob("results.parquet")] == [
        Path("results/tiny-unet3d/results.parquet")
    ]
    assert (out / "reports" / "tiny-unet3d" / "index.html").is_file()
    assert (out / "stats" / "tiny-unet3d-w0" / "manifest.json").is_file()
    assert f"results written to {Path('results/tiny-unet3d/results.parquet')}" in (
        capsys.readouterr().out
    )
    # --out results names the root's results folder: the same layout, no results/results.
    assert run_cli("evaluate", "--methods", "fp,mse", "--out", "results", *TINY_RUN) == 0
    assert [p.relative_to(out) for p in out.rglob("results.parquet")] == [
        Path("results/tiny-unet3d/results.parquet")
    ]
    assert "--out results names a results/ folder" in capsys.readouterr().err
    assert run_cli("evaluate", "--metrics", "fvdd", "--out", out, *TINY_RUN) == 2
    assert "did you mean 'fvd'" in error_line(capsys)


def test_interrupted_evaluate_keeps_finished_videos_and_resumes_to_the_same_results(
    tmp_path, monkeypatch, capsys
):
    from qvd_bench.evaluate import generate as gen

    out = tmp_path / "interrupted"
    args = ["evaluate", "--methods", "fp,mse,minmax", *TINY_RUN, "--num-prompts", "2"]
    original = gen.generate_free_and_forced
    calls = []

    def interrupt_second(*a, **k):  # mse's second prompt: after its first pair is saved
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(gen, "generate_free_and_forced", interrupt_second)
    assert run_cli(*args, "--out", out) == 130
    generations = out / "results" / "tiny-unet3d" / gen.GENERATIONS_DIR
    # The FP videos of both prompts and mse's free-running and teacher-forced pair of one.
    assert error_line(capsys) == (
        f"qvd-bench: interrupted; 4 finished videos are in {generations}; rerunning the "
        "same command takes them from the cache and resumes at weight seed 0, mse W8A8"
    )
    assert len(list(generations.rglob("*.safetensors"))) == 4
    assert not (out / "results" / "tiny-unet3d" / "results.parquet").exists()

    monkeypatch.undo()
    assert run_cli(*args, "--out", out) == 0
    assert "videos: 6 generated, 4 from the cache" in capsys.readouterr().out
    assert run_cli(*args, "--out", tmp_path / "fresh") == 0
    resumed, fresh = (
        pd.read_parquet(root / "results" / "tiny-unet3d" / "results.parquet")
        for root in (out, tmp_path / "fresh")
    )
    pd.testing.assert_frame_equal(resumed, fresh)

    # What reproducing a video outside qvd-bench needs: sampler, scheduler, per-sample seeds;
    # the statistics were sampled the same way.
    from qvd_bench.models.sampling import sample_seed

    recorded = json.loads((out / "results" / "tiny-unet3d" / "settings.json").read_text())
    assert recorded["sampling"]["sampler"] == "denoiser"
    assert recorded["sampling"]["scheduler"]["class"] == "DDIMScheduler"
    assert [s["noise_seed"] for s in recorded["sampling"]["samples"]] == [
        sample_seed(0, i, 0) for i in (0, 1)
    ]
    manifest = store.StatsRun(out / "stats" / "tiny-unet3d-w0").manifest
    assert manifest["sampling"] == recorded["sampling"]


# Counts the page faults of repeated tiny-unet3d forwards after the CLI's allocator set-up.
FAULTS_SCRIPT = """
import resource, torch
from qvd_bench.commands import main as cli
from qvd_bench.models import sampling, zoo
applied = cli.tune_allocator()
torch.set_num_threads(1)
loaded = zoo.load_model("tiny-unet3d")
cond, uncond = sampling.text_states_for_prompts(loaded, ["a cat"])
x, text = torch.randn(2, 4, 8, 16, 16), torch.cat([uncond, cond])
with torch.inference_mode():
    loaded.denoiser(x, 500, encoder_hidden_states=text)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        loaded.denoiser(x, 500, encoder_hidden_states=text)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(applied, (after - before) / 3)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_memory_across_forwards():
    """With glibc's defaults a forward's activations come back as fresh pages (page
    faults); after ``tune_allocator`` the freed heap is reused."""
    counts = {}
    for setting in ("default", "tuned"):
        env = {**os.environ, "OMP_NUM_THREADS": "1", cli.MALLOC_ENV: setting}
        result = subprocess.run(
            [sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        applied, faults = result.stdout.split()
        assert applied == str(setting == "tuned")
        counts[setting] = float(faults)
    assert counts["default"] > 1000
    # Far fewer: about 20 against 13,000 alone, a few hundred under a loaded test run.
    assert counts["tuned"] < counts["default"] / 5


HELP_IMPORTS_SCRIPT = """
import contextlib, io, sys
from qvd_bench.commands import main as cli
with contextlib.redirect_stdout(io.StringIO()):
    try:
        cli.main(["--help"])
    except SystemExit:
        pass
import os
print(sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
print(os.environ.get("DIFFUSERS_VERBOSITY"), os.environ.get("TRANSFORMERS_VERBOSITY"))
"""


@pytest.mark.parametrize("preset", [None, "info"])
def test_help_imports_no_model_library_and_quiets_them_by_environment(preset):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    if preset:
        env["DIFFUSERS_VERBOSITY"] = preset  # the user's own setting is kept
    result = subprocess.run(
        [sys.executable, "-c", HELP_IMPORTS_SCRIPT], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    imported, verbosity = result.stdout.splitlines()
    assert imported == "[]"
    assert verbosity == f"{preset or 'error'} error"


def test_libraries_imported_already_are_quieted_directly(monkeypatch):
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for variable in cli.QUIET_LIBRARIES.values():
        monkeypatch.delenv(variable, raising=False)
    diffusers_logging.set_verbosity_warning()
    transformers_logging.set_verbosity_warning()
    try:
        cli._quiet_libraries()
        assert diffusers_logging.get_verbosity() == diffusers_logging.ERROR
        assert transformers_logging.get_verbosity() == transformers_logging.ERROR
    finally:
        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
