"""HTDQ: the level-set family, its search, and what it buys end to end."""

from __future__ import annotations

import functools

import pytest
import torch

from qvd_bench.collect.collector import timestep_grid
from qvd_bench.collect.hooks import capture_temporal_features
from qvd_bench.config import CollectConfig
from qvd_bench.models.roles import classify
from qvd_bench.models.zoo import load_model, load_run_model
from qvd_bench.numerics.grid import fake_quant_levels
from qvd_bench.quant.apply import quantize_
from qvd_bench.quant.config import QuantConfig
from qvd_bench.quant.methods.htdq import (
    DEFAULT_TOLERANCE,
    htdq_candidates,
    htdq_search,
    score_candidate,
)
from qvd_bench.quant.primitives import sqnr_db
from tests.quant.helpers import reference, sample, tiny_stats

F64 = torch.float64


def skewed_features(t: int = 12, d: int = 6, seed: int = 0) -> torch.Tensor:
    """(t, d) SiLU of smooth functions of the timestep: skewed like temporal features."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.linspace(0, 1, t, dtype=F64)[:, None]
    freq = torch.rand(1, d, generator=g, dtype=F64) * 6
    x = 3 * torch.sin(freq * steps + torch.rand(1, d, generator=g, dtype=F64))
    return torch.nn.functional.silu(x)


def test_family_has_the_stated_members():
    e = skewed_features()
    candidates = htdq_candidates(e, 3)
    families = [c.family for c in candidates]
    assert families[:2] == ["uniform-mse", "uniform-minmax"]
    assert families.count("log") == 3
    # 4 edges x 3 log shares x 3 bases.
    assert families.count("mixed") == 36
    for c in candidates:
        assert c.levels.numel() <= 2**3
        assert bool((c.levels == 0).any())
        assert bool((c.levels.diff() > 0).all())


def test_scores_match_direct_pairwise_distances():
    """The Gram-form scorer against distances taken from every pair's difference."""
    e = skewed_features(t=300, d=6)
    e[10] = e[11]  # an equal pair (left out) and a near-equal one (cancels in Gram form)
    e[20] = e[21] + 1e-9
    w = torch.randn(9, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    for candidate in htdq_candidates(e, 3)[:6]:
        q = fake_quant_levels(e, candidate.levels)
        got = score_candidate(e, w, candidate.levels)
        y, y_hat = e @ w.T, q @ w.T
        i, j = torch.triu_indices(len(e), len(e), offset=1)
        d, d_hat = (y[i] - y[j]).norm(dim=1), (y_hat[i] - y_hat[j]).norm(dim=1)
        keep = d > 0
        d, d_hat = d[keep], d_hat[keep]
        ratio = torch.where(d_hat == 0, 0.0, torch.minimum(d_hat / d, d / d_hat))
        assert got["pairs"] == int(keep.sum()) == len(i) - 1
        assert got["collisions"] == int((d_hat == 0).sum())
        assert got["tdscore"] == pytest.approx(float(ratio.mean()), abs=1e-12)
        relative_mse = float((y_hat - y).square().sum() / y.square().sum())
        assert got["relative_mse"] == pytest.approx(relative_mse, rel=1e-10)


def test_search_is_the_brute_force_argmax():
    e, w = skewed_features(), torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    choice = htdq_search(e, w, 3)
    candidates = htdq_candidates(e, 3)
    scores = [score_candidate(e, w.to(F64), c.levels) for c in candidates]
    bound = scores[0]["relative_mse"] * (1 + DEFAULT_TOLERANCE)
    feasible = [i for i, s in enumerate(scores) if s["relative_mse"] <= bound]
    best = max(feasible, key=lambda i: (scores[i]["tdscore"], -scores[i]["relative_mse"]))
    assert choice.candidate.label == candidates[best].label
    assert choice.scores["tdscore"] == scores[best]["tdscore"]
    assert choice.scores["relative_mse"] <= bound
    assert choice.scores["tdscore"] >= scores[0]["tdscore"]


# Presets of each denoiser family with temporal features: UNet (time_emb_proj), Latte
# (adaLN-single), CogVideoX (adaLN per block; fast-varying sinusoidal inputs) and Wan.
HELD_OUT_PRESETS = ("tiny-unet3d", "tiny-latte", "tiny-cogvideox", "tiny-wan")
HELD_OUT_TOLERANCE = 0.01


@functools.cache
def calibration_and_held_out(preset: str, seed: int):
    """Temporal features on the collector's default grid and on the midpoints between.

    Returns:
        (layers, weights, calibration, held_out): the temporal-feature layers in module
        order, their weights, and layer -> (T, D) features on each grid (float64).
    """
    loaded = load_model(preset, weight_seed=seed)
    decisions = classify(loaded)
    layers = [name for name, decision in decisions.items() if decision.role == "time_emb"]
    grid = timestep_grid(CollectConfig.temporal_stride)
    # Timesteps no grid point holds: samplers with continuous schedules use them.
    midpoints = [(a + b) / 2 for a, b in zip(grid, grid[1:])]
    grids = [capture_temporal_features(loaded, layers, g) for g in (grid, midpoints)]
    weights = {n: loaded.denoiser.get_submodule(n).weight.detach().to(F64) for n in layers}
    calibration, held_out = ({n: f[n].vectors.to(F64) for n in layers} for f in grids)
    return layers, weights, calibration, held_out


@pytest.mark.parametrize("preset", HELD_OUT_PRESETS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tdscore_holds_on_held_out_timesteps(preset, seed):
    """Calibrated on the default grid (every training timestep), scored between its points.

    The first temporal layer reads the sinusoidal embedding itself (its fastest component
    turns in about 6 timesteps), the last a SiLU'd feature deep in the embedding MLP.
    """
    layers, weights, calibration, held_out = calibration_and_held_out(preset, seed)
    drifts = {}
    for layer in (layers[0], layers[-1]):
        for bits in (4, 8):
            choice = htdq_search(calibration[layer], weights[layer], bits)
            scored = score_candidate(held_out[layer], weights[layer], choice.candidate.levels)
            drifts[(layer, bits)] = scored["tdscore"] - choice.scores["tdscore"]
    print(f"{preset} seed {seed}: held-out - calibrated TDScore", drifts)
    assert all(abs(d) <= HELD_OUT_TOLERANCE for d in drifts.values()), drifts


def test_temporal_features_only_end_to_end():
    """Only the temporal-feature layers quantized (A4, W16), everything else FP."""
    run = tiny_stats()
    temporal = set(run.temporal["layer"].astype(str))
    others = tuple(n for n in run.roles if n not in temporal)
    figures = {}
    for method in ("minmax", "fsc", "htdq", "fp-temporal"):
        loaded = load_run_model(run)
        config = QuantConfig(method, 16, 4, keep_fp_layers=others)
        record = quantize_(loaded, config, stats=run)
        figures[method] = float(sqnr_db(reference(), sample(loaded, record.tracker)))
    print("temporal-only A4 SQNR (dB):", figures)
    assert figures["htdq"] > figures["minmax"]
    assert figures["fp-temporal"] >= figures["htdq"]
