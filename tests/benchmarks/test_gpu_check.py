"""The GPU check: its pass criterion on right and deliberately wrong runs, and a smoke run
on the CPU at tiny size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qvd_bench.collect.moments import ChannelMoments
from qvd_bench.store import channels_frame

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["gpu_check"]


def _frame(mean, std) -> pd.DataFrame:
    index = pd.MultiIndex.from_tuples(
        [("a", 999.0, "cond", c) for c in range(len(mean))],
        names=["layer", "timestep", "branch", "channel"],
    )
    return pd.DataFrame({"mean": mean, "std": std}, index=index)


def test_channel_mean_std_are_the_data_mean_and_population_std(gpu_check):
    data = torch.randn(5, 40, 3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + 3.0
    moments = ChannelMoments(3)
    moments.update(data, channel_dim=-1)
    channels = channels_frame({("input", "layer", 999.0, "cond"): moments}, {"layer": "ffn"})
    frame = gpu_check.channel_mean_std(channels)
    flat = data.reshape(-1, 3).numpy()
    np.testing.assert_allclose(frame["mean"].to_numpy(), flat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(frame["std"].to_numpy(), flat.std(axis=0), rtol=1e-12)


def test_agreement_errors_are_medians_of_the_relative_errors(gpu_check):
    reference = _frame([1.0, -2.0, 0.0], [1.0, 1.0, 4.0])
    test = _frame([1.005, -2.0, 0.2], [1.0, 1.5, 4.0])
    result = gpu_check.agreement(reference, test, x0_sqnr_db=40.0)
    # Mean errors over max(|mean|, std): 0.005, 0, 0.05; std errors: 0, 0.5, 0.
    assert result.mean_error == pytest.approx(0.005)
    assert result.std_error == 0.0
    assert result.passed and result.failures == ()


def test_identical_runs_pass(gpu_check):
    reference = _frame(np.linspace(-1, 1, 50), np.linspace(0.5, 2, 50))
    result = gpu_check.agreement(reference, reference.copy(), x0_sqnr_db=float("inf"))
    assert result.passed and result.mean_error == result.std_error == 0.0


@pytest.mark.parametrize(
    "wrong, failure",
    [
        ({"mean_shift": 0.05}, "per-channel mean"),
        ({"std_scale": 0.9}, "per-channel std"),
        ({"sqnr": 25.0}, "FP x0 SQNR 25.0 dB < 30.0 dB"),
        ({"drop": 3}, "different statistics keys"),
    ],
)
def test_deliberately_wrong_runs_fail(gpu_check, wrong, failure):
    rng = np.random.default_rng(0)
    reference = _frame(rng.normal(size=200), rng.uniform(0.5, 2.0, size=200))
    test = reference.copy()
    test["mean"] += (
        wrong.get("mean_shift", 0.0)
        * np.maximum(test["mean"].abs(), test["std"])
        * rng.choice([-1, 1], size=200)
    )
    test["std"] *= wrong.get("std_scale", 1.0)
    test = test.iloc[wrong.get("drop", 0) :]
    result = gpu_check.agreement(reference, test, x0_sqnr_db=wrong.get("sqnr", 45.0))
    assert not result.passed
    assert any(failure in line for line in result.failures), result.failures


@pytest.mark.parametrize(
    "x0_sqnr_db, floor_db, bar_db, passed",
    [
        (22.0, 24.5, 21.5, True),  # bfloat16-like: within 3 dB of the dtype's CPU rounding
        (20.0, 24.5, 21.5, False),  # rounds worse than the dtype does on the CPU
        (31.0, 45.0, 30.0, True),  # a dtype that reaches 30 dB keeps the fixed bar
        (29.0, 45.0, 30.0, False),
        (29.0, None, 30.0, False),  # no floor known: the fixed bar
    ],
)
def test_the_sqnr_bar_is_lowered_only_to_the_dtypes_own_rounding(
    gpu_check, x0_sqnr_db, floor_db, bar_db, passed
):
    reference = _frame(np.linspace(-1, 1, 50), np.linspace(0.5, 2, 50))
    result = gpu_check.agreement(
        reference, reference.copy(), x0_sqnr_db=x0_sqnr_db, dtype_floor_db=floor_db
    )
    assert result.min_sqnr_db == pytest.approx(bar_db)
    assert result.passed is passed
    if not passed:
        assert result.failures == (
            f"FP x0 SQNR {x0_sqnr_db:.1f} dB < {bar_db:.1f} dB"
            + (" (the dtype's CPU rounding less 3 dB)" if bar_db < 30 else ""),
        )


def test_a_collected_run_with_perturbed_statistics_fails(gpu_check, tmp_path):
    """Two float32 CPU collections agree exactly; one with its stds 2 % larger, or its
    means moved by a fifth of a std, fails."""
    from qvd_bench.collect.collector import collect
    from qvd_bench.store import StatsRun

    frames = {}
    for name in ("reference", "again"):
        config = gpu_check.collect_config(
            "tiny-wan", (2, 8, 8), steps=2, prompts=1, device="cpu", dtype="float32",
            temporal_stride=0, reservoir_capacity=0,
        )  # fmt: skip
        collect(config, tmp_path / name, progress=False)
        frames[name] = gpu_check.channel_mean_std(StatsRun(tmp_path / name).channels)
    assert gpu_check.agreement(frames["reference"], frames["again"], 60.0).passed
    wider = frames["again"].assign(std=frames["again"]["std"] * 1.02)
    result = gpu_check.agreement(frames["reference"], wider, 60.0)
    assert not result.passed and result.std_error == pytest.approx(0.02, rel=1e-6)
    assert result.mean_error == 0.0
    moved = frames["again"].assign(mean=frames["again"]["mean"] + 0.2 * frames["again"]["std"])
    result = gpu_check.agreement(frames["reference"], moved, 60.0)
    assert not result.passed and result.mean_error > 1e-2 and result.std_error == 0.0


def test_smoke_run_on_the_cpu_at_tiny_size(gpu_check, tmp_path, capsys):
    # float16 on the CPU agrees with float32 within the criterion (bfloat16 does not on
    # tiny-unet3d: see the README).
    argv = ["--device", "cpu", "--dtype", "float16", "--size", "tiny", "--steps", "2"]
    assert gpu_check.main([*argv, "--prompts", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    agreements = [line for line in out.splitlines() if "x0 SQNR" in line and "by step" in line]
    assert len(agreements) == 2 and all(line.endswith(": pass") for line in agreements)
    assert out.splitlines()[-1] == "gpu check: pass"
    for phase in ("collect", "analyze", "quantize qvd W8A8", "fidelity qvd W4A8"):
        assert out.count(phase) == 2  # once per model
    assert "enable_model_cpu_offload(): skipped" in out
