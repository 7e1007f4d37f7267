"""Collecting a two-expert pipeline (Wan 2.2): every timestep under the expert that ran it."""

import pytest
from diffusers import DiffusionPipeline

from tests.experts import EXPERTS, expert_of_timestep


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


def test_attention_of_both_experts_is_collected(two_expert_run):
    modules = two_expert_run.manifest["attention"]["modules"]
    for expert in EXPERTS:
        assert f"{expert}.blocks.0.attn1" in modules
    assert set(two_expert_run.attention["module"]) == set(modules)


def test_the_minimal_sampler_refuses_two_experts(two_expert_wan_dir, tmp_path):
    from qvd_bench.collect.collector import collect
    from qvd_bench.config import CollectConfig
    from qvd_bench.errors import UserError

    config = CollectConfig(
        model=str(two_expert_wan_dir), prompts=("a cat",), steps=2, sampler="denoiser"
    )
    with pytest.raises(UserError, match="transformer, transformer_2.*minimal sampler"):
        collect(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
