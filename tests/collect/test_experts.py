"""Collecting a two-expert pipeline (Wan 2.2): every timestep under the expert that ran it."""

import pytest
from diffusers import DiffusionPipeline

from qvd_bench import store
from qvd_bench.collect.collector import collect
from qvd_bench.config import CollectConfig
from tests.experts import EXPERTS, STEPS, expert_of_timestep


@pytest.fixture(scope="module")
def two_expert_run(two_expert_wan_dir, tmp_path_factory):
    config = CollectConfig(
        model=str(two_expert_wan_dir),
        prompts=("a cat jumps onto a table",),
        steps=STEPS,
        guidance_scale=5.0,
        frames=2,
        height=8,
        width=8,
        temporal_stride=250,
        reservoir_capacity=4,
    )
    run_dir = tmp_path_factory.mktemp("wan22-run") / "run"
    collect(config, run_dir, progress=False)
    return store.StatsRun(run_dir)


def test_every_timestep_is_stored_under_the_expert_that_ran_it(two_expert_wan_dir, two_expert_run):
    pipe = DiffusionPipeline.from_pretrained(two_expert_wan_dir, local_files_only=True)
    expected = expert_of_timestep(pipe)
    assert sorted(set(expected.values())) == list(EXPERTS), "the fixture must use both experts"
    run = two_expert_run
    assert run.manifest["schedule"] == pytest.approx(sorted(expected, reverse=True))
    ran = [(t, expert) for t, expert in run.manifest["timestep_experts"]]
    assert [e for _, e in ran] == [expected[t] for t in sorted(expected, reverse=True)]
    assert [t for t, _ in ran] == pytest.approx(sorted(expected, reverse=True))

    channels = run.channels
    for (layer, timestep), _ in channels.groupby(["layer", "timestep"]):
        expert = layer.split(".", 1)[0]
        assert expert in EXPERTS, layer
        assert expected[min(expected, key=lambda t: abs(t - timestep))] == expert, (layer, timestep)
    # Both branches at every timestep.
    assert set(channels["branch"]) == {"uncond", "cond"}


def test_layers_of_both_experts_are_collected(two_expert_run):
    run = two_expert_run
    names = list(run.layers["name"])
    for expert in EXPERTS:
        own = [n for n in names if n.split(".", 1)[0] == expert]
        assert own, f"no layer of {expert}"
        assert f"{expert}.blocks.0.attn1.to_q" in own
    half = len(names) // 2
    assert [n.split(".", 1)[1] for n in names[:half]] == [n.split(".", 1)[1] for n in names[half:]]
    assert set(run.channels["layer"]) == set(names)
    assert set(run.weights["layer"]) == set(names)
    time_emb = {n for n, role in run.roles.items() if role == "time_emb"}
    assert {n.split(".", 1)[0] for n in time_emb} == set(EXPERTS)
    assert set(run.temporal["layer"]) == time_emb
    assert set(run.reservoir) == set(names)
    experts = run.manifest["model"]["experts"]
    assert list(experts) == list(EXPERTS)
    assert all(e["class"] == "WanTransformer3DModel" for e in experts.values())
