"""Frechet distance, FeatureStats and the bootstrap interval against independent references."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qvd_bench.collect.accumulator import ACCUMULATORS
from qvd_bench.evaluate.frechet import (
    FeatureStats,
    SampleSizeWarning,
    bootstrap_interval,
    frechet_distance,
    frechet_distance_of_features,
    trace_sqrt_product_eigh,
)


def sqrtm_fd(mu1, cov1, mu2, cov2) -> float:
    """pytorch-fid's computation: real part of sqrtm(Σ1·Σ2)."""
    root = scipy.linalg.sqrtm(cov1 @ cov2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(root))


def gaussian_stats(rng, n: int, d: int, shift: float = 0.0):
    scales = rng.uniform(0.1, 2.0, d)
    mix = np.eye(d) + 0.2 * rng.standard_normal((d, d))
    x = (rng.standard_normal((n, d)) * scales) @ mix + shift
    mu = x.mean(0)
    return mu, np.cov(x, rowvar=False, bias=True), x


@pytest.mark.parametrize(
    "d, n",
    [(8, 64), (64, 200), (400, 900), (64, 32), (200, 120)],
    ids=["d8", "d64", "d400", "d64-singular", "d200-singular"],
)
def test_frechet_matches_sqrtm(d, n):
    rng = np.random.default_rng(d + n)
    mu1, cov1, _ = gaussian_stats(rng, n, d)
    mu2, cov2, _ = gaussian_stats(rng, n, d, shift=0.3)
    tolerance = 1e-6 * (np.trace(cov1) + np.trace(cov2))
    expected = sqrtm_fd(mu1, cov1, mu2, cov2)
    assert abs(frechet_distance(mu1, cov1, mu2, cov2) - expected) < tolerance
    # The eigh form, and the argument order, give the same value.
    assert abs(frechet_distance(mu2, cov2, mu1, cov1) - expected) < tolerance
    c1, c2 = torch.from_numpy(cov1), torch.from_numpy(cov2)
    alt = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2))
    alt -= 2.0 * trace_sqrt_product_eigh(c1, c2)
    assert abs(alt - expected) < tolerance


def test_frechet_of_identical_gaussians_is_zero_and_takes_tensors():
    rng = np.random.default_rng(0)
    mu, cov, _ = gaussian_stats(rng, 50, 10)
    value = frechet_distance(torch.from_numpy(mu), torch.from_numpy(cov), mu, cov)
    assert abs(value) < 1e-9 * np.trace(cov)
    with pytest.raises(ValueError, match="expected means"):
        frechet_distance(mu, cov, mu[:5], cov)


@pytest.mark.filterwarnings("ignore::qvd_bench.evaluate.frechet.SampleSizeWarning")
@pytest.mark.parametrize("d, n", [(16, 8), (400, 100), (64, 200)])
def test_frechet_of_a_feature_set_to_itself_is_zero_never_negative(d, n):
    x = torch.from_numpy(np.random.default_rng(d).standard_normal((n, d)) * 3)
    assert frechet_distance_of_features(x, x) == 0.0
    # The same set in another order: equal statistics up to rounding, which once took
    # the distance below zero (by 5e-5 at d = 400, N = 100).
    shuffled = x[torch.from_numpy(np.random.default_rng(1).permutation(n))]
    value = frechet_distance_of_features(x, shuffled)
    assert 0.0 <= value < 1e-6 * 2 * float(x.var(0).sum())  # the documented agreement


def test_feature_stats_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 6)) * 3 + 1
    stats = FeatureStats.of(torch.from_numpy(x).float())
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(stats.mean().numpy(), x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        stats.cov().numpy(), np.cov(x32, rowvar=False, bias=True), atol=1e-11
    )
    np.testing.assert_allclose(stats.cov(ddof=1).numpy(), np.cov(x32, rowvar=False), atol=1e-11)
    assert stats.n == 300 and stats.num_features == 6


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.lists(st.integers(-50, 50), min_size=3, max_size=3), min_size=1, max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=4),
    order=st.randoms(use_true_random=False),
)
def test_feature_stats_merge_is_exact_in_any_order(data, cuts, order):
    x = torch.tensor(data, dtype=torch.float32)
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    parts = [FeatureStats.of(x[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    order.shuffle(parts)
    merged = FeatureStats(3)
    for part in parts:
        merged.merge(part)
    whole = FeatureStats.of(x)
    for name, value in whole.state_dict().items():
        assert torch.equal(merged.state_dict()[name], value), name


def test_feature_stats_state_round_trip_and_registry():
    stats = FeatureStats.of(torch.randn(10, 4))
    assert ACCUMULATORS["FeatureStats"] is FeatureStats
    copy = ACCUMULATORS["FeatureStats"].from_state_dict(stats.state_dict())
    assert torch.equal(copy.outer, stats.outer) and copy.n == 10
    with pytest.raises(ValueError, match="cannot merge"):
        copy.merge(FeatureStats(5))
    with pytest.raises(ValueError, match=r"expected features \(N, 4\)"):
        copy.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="state needs"):
        FeatureStats.from_state_dict({**stats.state_dict(), "outer": torch.zeros(3, 3)})


def test_sample_size_warning():
    x = torch.randn(15, 8)
    with pytest.warns(SampleSizeWarning, match="N < 2 x dim"):
        frechet_distance_of_features(x, x + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frechet_distance_of_features(torch.randn(16, 8), torch.randn(16, 8))


def _merge_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from qvd_bench.collect.distributed import merge_across_processes

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = torch.arange(60, dtype=torch.float32).reshape(20, 3) % 7
        local = {"fvd/real": FeatureStats.of(x[rank::world])}
        merged = merge_across_processes(local)
        torch.save(merged["fvd/real"].state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_merge_across_processes_gloo(tmp_path):
    import torch.multiprocessing as mp

    # A file rendezvous (no port to race for) and results through files, as in
    # tests/collect/test_distributed.py.
    mp.spawn(_merge_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    whole = FeatureStats.of(torch.arange(60, dtype=torch.float32).reshape(20, 3) % 7)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in whole.state_dict().items():
            assert torch.equal(state[name], value), name


def paired_features(prompts: int = 40, per_prompt: int = 2, d: int = 5):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(prompts * per_prompt, d, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(a.shape, generator=g, dtype=torch.float64) + 0.2
    ids = [f"prompt {i}" for i in range(prompts) for _ in range(per_prompt)]
    return a, b, ids


def test_bootstrap_interval_contains_point_and_is_reproducible():
    a, b, ids = paired_features()
    first = bootstrap_interval(a, b, ids, n_boot=100, seed=7)
    assert first.low <= first.point <= first.high
    assert first.low < first.high
    assert first.point == pytest.approx(frechet_distance_of_features(a, b), rel=1e-9)
    assert bootstrap_interval(a, b, ids, n_boot=100, seed=7) == first
    assert bootstrap_interval(a, b, ids, n_boot=100, seed=8) != first


def test_bootstrap_resamples_prompts_jointly():
    # Rows of one prompt always travel together: with a single prompt every resample is
    # the whole data set, so the interval has zero width.
    a, b, _ = paired_features(prompts=1, per_prompt=30, d=3)
    result = bootstrap_interval(a, b, np.zeros(30, dtype=int), n_boot=20, seed=0)
    assert result.low == pytest.approx(result.point) and result.high == pytest.approx(result.point)
    assert result.shift == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="prompt_ids"):
        bootstrap_interval(a, b, np.zeros(29), n_boot=2)


def test_bootstrap_warns_on_small_samples():
    a, b, ids = paired_features(prompts=4, per_prompt=1, d=5)
    with pytest.warns(SampleSizeWarning):
        bootstrap_interval(a, b, ids, n_boot=5)
