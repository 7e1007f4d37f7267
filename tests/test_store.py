"""The store: round trips, atomic assembly, checkpoints, and clear errors on bad runs."""

import json
import os
import stat

import numpy as np
import pytest
import torch

from qvd_bench import store
from qvd_bench.collect.histogram import Histogram
from qvd_bench.collect.moments import ChannelMoments
from qvd_bench.collect.reservoir import Reservoir
from qvd_bench.collect.temporal import TemporalFeatures
from qvd_bench.errors import UserError
from qvd_bench.numerics.edges import SignedLogEdges
from qvd_bench.numerics.moments import weight_channel_stats

LAYERS = [
    {
        "name": "a.proj",
        "role": "ffn",
        "decided_by": "table:.*proj",
        "kind": "linear",
        "in_channels": 3,
        "out_channels": 2,
    },
    {
        "name": "time.linear_1",
        "role": "time_emb",
        "decided_by": "table:time.*",
        "kind": "linear",
        "in_channels": 4,
        "out_channels": 4,
    },
]


def make_accumulators():
    generator = torch.Generator().manual_seed(0)
    moments, histograms = {}, {}
    edges = SignedLogEdges()
    for t in (999.0, 500.0):
        for branch in ("uncond", "cond"):
            x = torch.randn(5, 7, 3, generator=generator)
            m = ChannelMoments(3)
            m.update(x, -1)
            moments[("input", "a.proj", t, branch)] = m
            h = Histogram(edges)
            h.update(x)
            histograms[("input", "a.proj", t, branch)] = h
    temporal = {"time.linear_1": TemporalFeatures()}
    temporal["time.linear_1"].update(
        torch.randn(3, 4, generator=generator), torch.tensor([0.0, 1.0, 2.0])
    )
    reservoir = Reservoir(8, 3, seed=0)
    reservoir.update(torch.randn(2, 10, 3, generator=generator), torch.tensor([0, 1]), 999.0, 1)
    weights = {
        "a.proj": weight_channel_stats(torch.randn(2, 3, generator=generator)),
        "time.linear_1": weight_channel_stats(torch.randn(4, 4, generator=generator)),
    }
    return dict(
        moments=moments,
        histograms=histograms,
        temporal=temporal,
        reservoirs={"a.proj": reservoir},
        weights=weights,
    )


def write(tmp_path, **kwargs):
    manifest = {"layers": LAYERS, "model": {"name": "test"}}
    return store.write_run(tmp_path / "run", manifest, **make_accumulators(), **kwargs)


def test_round_trip(tmp_path):
    accs = make_accumulators()
    run_dir = store.write_run(tmp_path / "run", {"layers": LAYERS}, **accs)
    run = store.StatsRun(run_dir)
    assert not store.partial_dir(run_dir).exists()
    channels = run.channels
    assert len(channels) == 4 * 3
    assert channels["layer"].dtype == "category"
    row = channels[(channels.timestep == 500.0) & (channels.branch == "cond")].sort_values(
        "channel"
    )
    state = accs["moments"][("input", "a.proj", 500.0, "cond")].state_dict()
    for field in store.MOMENT_FIELDS:
        np.testing.assert_array_equal(row[field].to_numpy(), state[field].numpy())
    hist = run.histograms
    counts = accs["histograms"][("input", "a.proj", 999.0, "uncond")].state_dict()["counts"]
    sub = hist[(hist.timestep == 999.0) & (hist.branch == "uncond")]
    assert sub["count"].sum() == counts.sum().item()
    np.testing.assert_array_equal(np.flatnonzero(counts.numpy()), np.sort(sub["bin"].to_numpy()))
    timesteps, vectors = run.temporal_matrix("time.linear_1")
    expected_t, expected_v = accs["temporal"]["time.linear_1"].as_matrix()
    np.testing.assert_array_equal(timesteps, expected_t.numpy())
    np.testing.assert_allclose(vectors, expected_v.numpy())
    for field, value in accs["reservoirs"]["a.proj"].state_dict().items():
        torch.testing.assert_close(run.reservoir["a.proj"][field], value.cpu(), rtol=0, atol=0)
    assert set(run.weights["layer"]) == {"a.proj", "time.linear_1"}
    assert run.manifest["schema_version"] == store.SCHEMA_VERSION


def test_existing_run_needs_overwrite(tmp_path):
    write(tmp_path)
    with pytest.raises(UserError, match="overwrite=True"):
        write(tmp_path)
    write(tmp_path, overwrite=True)
    assert store.StatsRun(tmp_path / "run").channels.shape[0] == 12


def test_unwritable_parent_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="not a writable directory"):
        store.check_writable(blocker / "run", overwrite=False)


def test_output_directory_is_created_and_probed(tmp_path):
    out = store.check_output_directory(tmp_path / "a" / "b")
    assert out == tmp_path / "a" / "b" and out.is_dir() and not list(out.iterdir())


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_are_written_with_the_users_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        store.write_json(tmp_path / "record.json", {"a": 1})
        store.atomic_write(tmp_path / "t.bin", lambda p: p.write_bytes(b"x"))
    finally:
        os.umask(previous)
    for name in ("record.json", "t.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_missing_run(tmp_path):
    with pytest.raises(UserError, match="no statistics run"):
        store.StatsRun(tmp_path / "nothing")


def test_directory_without_manifest(tmp_path):
    with pytest.raises(UserError, match="manifest.json is missing"):
        store.StatsRun(tmp_path)


def test_foreign_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match="not a qvd-bench statistics manifest"):
        store.StatsRun(tmp_path)


def test_garbled_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        store.StatsRun(tmp_path)


def test_schema_mismatch(tmp_path):
    run_dir = write(tmp_path)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="schema version 999"):
        store.StatsRun(run_dir)


@pytest.mark.parametrize("table", ["channels", "histograms", "temporal", "weights"])
def test_corrupt_parquet(tmp_path, table):
    run_dir = write(tmp_path)
    (run_dir / f"{table}.parquet").write_bytes(b"PAR1 this is not parquet")
    run = store.StatsRun(run_dir)
    with pytest.raises(UserError, match=f"{table}.parquet is corrupt"):
        getattr(run, table)


def test_corrupt_reservoir(tmp_path):
    run_dir = write(tmp_path)
    (run_dir / "reservoir.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="reservoir.safetensors is corrupt"):
        _ = store.StatsRun(run_dir).reservoir


def test_checkpoint_round_trip_and_fingerprint(tmp_path):
    accs = make_accumulators()
    run_dir = tmp_path / "run"
    groups = {
        "moments": accs["moments"],
        "histograms": accs["histograms"],
        "reservoirs": accs["reservoirs"],
    }
    factories = {
        "moments": ChannelMoments.from_state_dict,
        "histograms": Histogram.from_state_dict,
        "reservoirs": Reservoir.from_state_dict,
    }
    store.save_checkpoint(run_dir, {"steps": 3}, {0, 2}, store.checkpoint_state(groups))
    done, loaded = store.load_checkpoint(run_dir, {"steps": 3}, factories)
    assert done == {0, 2}
    for key, acc in accs["moments"].items():
        for field, value in acc.state_dict().items():
            torch.testing.assert_close(
                loaded["moments"][key].state_dict()[field], value, rtol=0, atol=0
            )
    assert set(loaded["reservoirs"]) == {"a.proj"}
    assert store.load_checkpoint(run_dir, {"steps": 4}, factories) is None


def test_torn_checkpoint_is_ignored(tmp_path):
    accs = make_accumulators()
    run_dir = tmp_path / "run"
    store.save_checkpoint(
        run_dir, {"a": 1}, {0}, store.checkpoint_state({"moments": accs["moments"]})
    )
    (store.partial_dir(run_dir) / store.CHECKPOINT_TENSORS).write_bytes(b"garbage")
    assert (
        store.load_checkpoint(run_dir, {"a": 1}, {"moments": ChannelMoments.from_state_dict})
        is None
    )


def test_run_conveniences_and_run_model(tmp_path):
    from qvd_bench.collect.collector import collect
    from qvd_bench.config import CollectConfig
    from qvd_bench.models import zoo

    config = CollectConfig(
        model="tiny-latte",
        weight_seed=3,
        disparity=0.7,
        prompts=("a cat",),
        steps=1,
        frames=2,
        height=8,
        width=8,
        temporal_stride=500,
        reservoir_capacity=4,
    )
    collect(config, tmp_path / "run", progress=False)
    run = store.StatsRun(tmp_path / "run")
    assert run.roles == dict(zip(run.layers["name"], run.layers["role"]))
    assert run.histogram_edges.num_bins > 0
    # The reservoir's branch codes: CFG's two branches first, then the guidance passes.
    assert run.manifest["reservoir"]["branches"][:2] == ["uncond", "cond"]
    assert run.manifest["keying"]["stored_branches"] == ["uncond", "cond"]
    assert set(next(iter(run.reservoir.values()))) >= {
        "rows",
        "keys",
        "sample_ids",
        "timesteps",
        "branches",
        "row_indices",
    }
    rebuilt = zoo.load_run_model(run)
    direct = zoo.load_model("tiny-latte", weight_seed=3, disparity=0.7)
    assert rebuilt.knobs == direct.knobs == {"disparity": 0.7, "asymmetry": zoo.DEFAULT_ASYMMETRY}
    for (name, a), (_, b) in zip(
        rebuilt.denoiser.state_dict().items(), direct.denoiser.state_dict().items()
    ):
        assert torch.equal(a, b), name
