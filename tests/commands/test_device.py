"""Device and dtype on every command: half precision on the CPU for every preset through
collect -> quantize -> fidelity, and a device or kernel this machine lacks refused in one
line with exit code 2 before any work."""

import json
import math

import pandas as pd
import pytest
import torch

from qvd_bench import store
from qvd_bench.commands import main as cli
from qvd_bench.errors import UserError
from qvd_bench.models import device as D
from qvd_bench.models.zoo import MODELS

# evaluate generates with the minimal sampler, which drives a single denoiser: the
PRESETS = [name for name in MODELS if name.startswith("tiny-")]
HALF = ["bfloat16", "float16"]
# The smallest sampling: one prompt, one step with CFG, two 8x8 latent frames.
TINY = ["--num-prompts", "1", "--steps", "1", "--frames", "2", "--height", "8", "--width", "8"]


def run_cli(*args):
    return cli.main([str(a) for a in args])


def error_line(capsys):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_in_half_precision_on_the_cpu(preset, dtype, tmp_path, capsys):
    """collect -> quantize -> fidelity in bf16 and fp16; the FP model's fidelity against
    float32 is reported (printed and in settings.json), not asserted equal."""
    matrix = ["--methods", "fp,minmax", "--bits", "W8A8", *TINY, "--no-progress"]
    if MODELS.get(preset).experts:
        # One step runs only the high-noise expert; two reach the second expert too.
        matrix += ["--steps", "2"]
    code = run_cli("evaluate", "--model", preset, "--dtype", dtype, *matrix, "--out", tmp_path)
    printed = capsys.readouterr().out
    assert code == 0
    stats = store.StatsRun(tmp_path / "stats" / f"{preset}-w0")
    assert stats.manifest["config"]["dtype"] == dtype
    assert stats.channels["mean"].dtype == "float64"
    results = pd.read_parquet(tmp_path / "results" / preset / "results.parquet")
    minmax = results[(results["method"] == "minmax") & (results["metric"] == "sqnr")]
    assert len(minmax) and minmax["value"].map(math.isfinite).all()
    settings = json.loads((tmp_path / "results" / preset / "settings.json").read_text())
    assert settings["config"]["dtype"] == dtype
    against = settings["fp_against_float32"]["0"]
    assert {"sqnr", "cosine", "psnr"} <= set(against)
    assert "FP against float32 FP (weight seed 0, final latents): sqnr" in printed


def test_quantize_and_sensitivity_take_device_and_dtype(tmp_path, capsys):
    stats = tmp_path / "stats"
    collect = ["collect", "--model", "tiny-latte", *TINY, "--temporal-stride", "250"]
    assert run_cli(*collect, "--out", stats, "--no-progress") == 0
    record = tmp_path / "record"
    args = ["--stats", stats, "--method", "minmax", "--bits", "W4A8", "--out", record]
    assert run_cli("quantize", *args, "--device", "cpu", "--dtype", "bfloat16") == 0
    assert (record / "record.json").is_file()
    report = tmp_path / "sensitivity"
    args = ["--stats", stats, "--method", "minmax", "--by", "role", "--out", report]
    assert run_cli("sensitivity", *args, "--dtype", "float16", "--no-progress") == 0
    assert (report / "index.html").is_file()
    capsys.readouterr()


def _commands(tmp_path):
    stats, out = tmp_path / "stats", tmp_path / "out"
    return {
        "collect": ["collect", "--model", "tiny-wan", "--out", out, "--no-progress"],
        "quantize": ["quantize", "--stats", stats, "--out", out],
        "sensitivity": ["sensitivity", "--stats", stats, "--out", out, "--no-progress"],
        "evaluate": ["evaluate", "--out", out, "--no-progress"],
        "run": ["run", "--out", out, "--no-progress"],
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["collect", "quantize", "sensitivity", "evaluate", "run"])
def test_cuda_without_cuda_is_one_line_before_any_work(command, tmp_path, capsys):
    assert run_cli(*_commands(tmp_path)[command], "--device", "cuda") == 2
    assert error_line(capsys) == (
        "qvd-bench: error: device cuda asked for, but CUDA is not available on this machine"
    )
    assert not (tmp_path / "out").exists()


@pytest.fixture
def no_half_kernels(monkeypatch):
    """A PyTorch build whose CPU conv3d has no float16 kernel."""

    def conv3d(device, dtype):
        if dtype == torch.float16:
            raise RuntimeError("\"slow_conv3d_cpu\" not implemented for 'Half'")

    monkeypatch.setattr(D, "_PROBES", (("conv3d", conv3d),))
    D._missing_kernel.cache_clear()
    yield
    D._missing_kernel.cache_clear()


@pytest.mark.parametrize("command", ["collect", "quantize", "sensitivity", "evaluate", "run"])
def test_dtype_without_kernels_is_one_line_before_any_work(
    command, tmp_path, capsys, no_half_kernels
):
    assert run_cli(*_commands(tmp_path)[command], "--dtype", "float16") == 2
    assert error_line(capsys) == (
        "qvd-bench: error: dtype float16 cannot run on device cpu: this PyTorch build has "
        "no float16 kernel for conv3d there; use another dtype or device"
    )
    assert not (tmp_path / "out").exists()


def test_loaders_check_device_and_dtype(no_half_kernels):
    from qvd_bench.models.zoo import load_model

    with pytest.raises(UserError, match="no float16 kernel for conv3d"):
        load_model("tiny-unet3d", dtype=torch.float16)
    loaded = load_model("tiny-latte", dtype="bfloat16")
    assert next(loaded.denoiser.parameters()).dtype == torch.bfloat16
    with pytest.raises(UserError, match="not a torch device"):
        load_model("tiny-latte", device="gpu0")


def test_check_device_passes_every_dtype_on_the_cpu():
    for name in HALF + ["float32"]:
        assert D.check_device("cpu", name) == (torch.device("cpu"), getattr(torch, name))
    with pytest.raises(UserError, match="dtype must be one of"):
        D.check_device("cpu", "float8")


def test_library_callers_may_pass_any_floating_torch_dtype():
    assert D.torch_dtype(torch.float64) is torch.float64  # exact references load in float64
    with pytest.raises(UserError, match="dtype must be one of"):
        D.torch_dtype(torch.int8)
