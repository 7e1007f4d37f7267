"""merge_across_processes: two gloo processes against the single-process merge."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qvd_bench.collect.distributed import merge_across_processes
from qvd_bench.collect.histogram import Histogram
from qvd_bench.collect.moments import ChannelMoments
from qvd_bench.collect.reservoir import Reservoir
from qvd_bench.collect.temporal import TemporalFeatures
from qvd_bench.numerics.edges import SignedLogEdges

WORLD = 2
CALLS = [(999.0, "uncond"), (999.0, "cond"), (500.0, "cond")]


def layer_input(sample_id: int, timestep: float, branch: str) -> torch.Tensor:
    """Deterministic (1, 4, 8) Linear input of one sample and call, far from zero."""
    g = torch.Generator().manual_seed(sample_id * 7919 + int(timestep) * 2 + len(branch))
    return torch.randn(1, 8, 4, generator=g) * 0.1 + 3e4


def shard_accumulators(samples: list[int], rank: int) -> dict:
    """What one process collects for its samples (one layer, keys as the hooks make them)."""
    accs: dict = {}
    for sample_id in samples:
        for t, branch in CALLS:
            x = layer_input(sample_id, t, branch)
            key = ("input", "block.proj", t, branch)
            accs.setdefault(key, ChannelMoments(4)).update(x)
            accs.setdefault(("hist",) + key[1:], Histogram(SignedLogEdges())).update(x)
            res = accs.setdefault(("reservoir", "block.proj"), Reservoir(10, 4, seed=3))
            res.update(x, torch.tensor([sample_id]), t, ["uncond", "cond"].index(branch))
    # A key only one rank has, and temporal features both ranks share in part.
    accs[("only", rank)] = ChannelMoments(2)
    accs[("only", rank)].update(torch.full((3, 2), float(rank)))
    ts = torch.tensor([10.0 * rank, 5.0])
    temporal = TemporalFeatures()
    temporal.update(torch.stack([ts.sin(), ts.cos()], 1), ts)
    accs[("temporal", "time_emb")] = temporal
    return accs


SHARDS = [[0, 2, 4], [1, 3]]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        merged = merge_across_processes(shard_accumulators(SHARDS[rank], rank))
        states = {key: acc.state_dict() for key, acc in merged.items()}
        torch.save(states, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def single_process_merge() -> dict:
    merged: dict = {}
    for rank, samples in enumerate(SHARDS):
        for key, acc in shard_accumulators(samples, rank).items():
            merged[key] = merged[key].merge(acc) if key in merged else acc
    return merged


def test_two_gloo_processes_equal_single_process_merge(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    expected = single_process_merge()
    one_pass = shard_accumulators(sorted(SHARDS[0] + SHARDS[1]), 0)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert list(got) == list(expected)
        for key, acc in expected.items():
            want = acc.state_dict()
            for field, value in got[key].items():
                if isinstance(acc, ChannelMoments) and field in ("mean", "m2", "m3", "m4"):
                    torch.testing.assert_close(value, want[field], rtol=1e-8, atol=0)
                else:
                    assert torch.equal(value, want[field]), (key, field)
        # The sample set does not depend on the sharding.
        reservoir_key = ("reservoir", "block.proj")
        for field, value in one_pass[reservoir_key].state_dict().items():
            assert torch.equal(got[reservoir_key][field], value), field
        moments = ChannelMoments.from_state_dict(got[("input", "block.proj", 999.0, "cond")])
        reference = one_pass[("input", "block.proj", 999.0, "cond")]
        for field, value in reference.compute().items():
            torch.testing.assert_close(moments.compute()[field], value, rtol=1e-8, atol=1e-8)
        assert got[("temporal", "time_emb")]["timesteps"].tolist() == [0.0, 5.0, 10.0]


def test_noop_without_process_group():
    assert not dist.is_initialized()
    accs = shard_accumulators([0], 0)
    assert merge_across_processes(accs) is accs
