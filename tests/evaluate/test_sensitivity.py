"""Sensitivity per layer and role, and the mixed-precision assignment driven by it."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from qvd_bench.collect.collector import collect
from qvd_bench.commands.main import main
from qvd_bench.config import CollectConfig
from qvd_bench.errors import UserError
from qvd_bench.evaluate.generate import GenerationSettings, generate
from qvd_bench.evaluate.results import ALL_STEPS, teacher_forced_rows
from qvd_bench.evaluate.sensitivity import (
    Budget,
    FidelityProbe,
    assign_bits,
    check_candidates,
    mean_bits,
    mixed_config,
    quantized,
    sensitivity,
)
from qvd_bench.models.roles import leaf_layers
from qvd_bench.models.zoo import load_model
from qvd_bench.quant.apply import quantize_
from qvd_bench.quant.config import QuantConfig
from qvd_bench.quant.record import load_record
from qvd_bench.store import StatsRun

MODEL = "tiny-unet3d"
PROBE = GenerationSettings(steps=2, frames=2, height=8, width=8, seed=1)


def _collect(path, model):
    config = CollectConfig(
        model=model,
        prompts=("a cat", "a dog"),
        steps=2,
        frames=2,
        height=8,
        width=8,
        temporal_stride=100,
        reservoir_capacity=96,
    )
    collect(config, path, progress=False)
    return StatsRun(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _collect(tmp_path_factory.mktemp("stats") / "run", MODEL)


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory):
    # 27 layers: the command-line test of --mixed stays quick.
    return _collect(tmp_path_factory.mktemp("stats") / "wan", "tiny-wan")


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def probe(loaded):
    return FidelityProbe(loaded, ["a red car"], PROBE)


def _independent_sqnr(run, config: QuantConfig) -> float:
    """Quantize a fresh model with ``config`` and take the matrix's teacher-forced SQNR."""
    fresh = load_model(MODEL)
    prompt = "a red car"
    reference = generate(fresh, prompt, 0, PROBE)
    record = quantize_(fresh, config, stats=run)
    forced = generate(fresh, prompt, 0, PROBE, tracker=record.tracker, teacher=reference)
    from qvd_bench.evaluate.generate import scheduler_for

    rows = teacher_forced_rows([reference], [forced], scheduler_for(fresh, PROBE))
    (value,) = [
        r["value"]
        for r in rows
        if r["metric"] == "sqnr" and r["branch"] == "cfg" and r["step"] == ALL_STEPS
    ]
    return value


def test_layer_sensitivity_equals_quantizing_that_layer_alone(run, loaded, probe):
    names = list(leaf_layers(loaded.denoiser))
    chosen = [names[0], names[len(names) // 2], names[-1]]
    table = sensitivity(loaded, run, QuantConfig("mse", 8, 4), probe, by=("layer",), only=chosen)
    layers = table[table["kind"] == "layer"].set_index("unit")
    assert sorted(layers.index) == sorted(chosen)
    for name in chosen:
        others = tuple(n for n in names if n != name)
        alone = _independent_sqnr(run, QuantConfig("mse", 8, 4, keep_fp_layers=others))
        assert np.isfinite(alone)
        assert layers.loc[name, "sqnr_db"] == pytest.approx(alone, rel=1e-9, abs=1e-9)
        assert layers.loc[name, "noise"] == pytest.approx(10 ** (-alone / 10), rel=1e-9)


def test_role_sensitivity_equals_quantizing_that_role_alone(run, loaded, probe):
    table = sensitivity(
        loaded, run, QuantConfig("mse", 8, 4), probe, by=("role",), only=["temporal"]
    )
    (value,) = table.loc[table["unit"] == "temporal", "sqnr_db"]
    roles = {run.roles.get(n, "") for n in leaf_layers(loaded.denoiser)} - {"temporal"}
    alone = _independent_sqnr(run, QuantConfig("mse", 8, 4, keep_fp_roles=tuple(sorted(roles))))
    assert value == pytest.approx(alone, rel=1e-9)


def test_model_row_is_the_fully_quantized_model(run, loaded, probe):
    table = sensitivity(loaded, run, QuantConfig("mse", 8, 4), probe, by=("role",))
    (value,) = table.loc[table["kind"] == "model", "sqnr_db"]
    assert value == pytest.approx(_independent_sqnr(run, QuantConfig("mse", 8, 4)), rel=1e-9)
    roles = table[table["kind"] == "role"]
    assert list(roles["rank"]) == list(range(1, len(roles) + 1))
    assert roles["noise"].is_monotonic_decreasing


def test_sensitivity_leaves_the_model_unchanged(run, probe):
    model = load_model(MODEL)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    modules = dict(leaf_layers(model.denoiser))
    sensitivity(model, run, QuantConfig("smoothquant", 8, 4), probe, by=("role",), only=["ffn"])
    after = model.denoiser.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(a is b for a, b in zip(modules.values(), leaf_layers(model.denoiser).values()))


def test_ranking_is_stable_across_sampling_seeds(run, loaded):
    tables = []
    for seed in (1, 2):
        seed_probe = FidelityProbe(
            loaded, ["a red car"], GenerationSettings(**{**PROBE.to_dict(), "seed": seed})
        )
        table = sensitivity(loaded, run, QuantConfig("mse", 8, 4), seed_probe, by=("layer",))
        tables.append(table[table["kind"] == "layer"].set_index("unit")["noise"])
    first, second = tables
    rho = spearmanr(first, second.loc[first.index]).statistic
    print(f"Spearman rank correlation of layer sensitivity, sampling seeds 1 vs 2: {rho:.3f}")
    assert rho >= 0.8


def test_mixed_a6_beats_uniform_a6_within_budget(run, loaded, probe):
    uniform = QuantConfig("mse", 8, 6)
    mixed, decisions = mixed_config(loaded, run, uniform, Budget.parse("A6"), probe)
    pairs = [(n, run.roles.get(n, "")) for n in leaf_layers(loaded.denoiser)]
    assert mean_bits(mixed, pairs, "a") <= 6.0
    assert set(decisions["bits"]) <= {4, 6, 8}
    assert len(decisions) == len(pairs)
    with quantized(loaded, uniform, run) as record:
        uniform_db = probe.sqnr_db(record.tracker)
    with quantized(loaded, mixed, run) as record:
        mixed_db = probe.sqnr_db(record.tracker)
        assert {r.layer: r.a_bits for r in record.layers} == dict(
            zip(decisions["layer"], decisions["bits"])
        )
    print(f"A6 uniform {uniform_db:.2f} dB, mixed {mixed_db:.2f} dB")
    assert mixed_db > uniform_db


# --------------------------------------------------------------------------- assign_bits


def _brute_force(table: np.ndarray, candidates: list[int], budget: float) -> float:
    best = np.inf
    for choice in itertools.product(range(len(candidates)), repeat=table.shape[0]):
        if np.mean([candidates[c] for c in choice]) <= budget + 1e-9:
            best = min(best, sum(table[i, c] for i, c in enumerate(choice)))
    return best


@settings(max_examples=60, deadline=None)
@given(
    base=st.lists(st.floats(1e-4, 10.0), min_size=1, max_size=5),
    decay=st.lists(st.floats(1.5, 32.0), min_size=5, max_size=5),
    budget=st.sampled_from([4.0, 4.5, 5.0, 6.0, 6.5, 7.0, 8.0]),
)
def test_assign_bits_meets_budget_and_matches_brute_force_on_convex_tables(base, decay, budget):
    # Noise falling by a constant factor per step: convex, the case greedy solves exactly.
    candidates = [4, 6, 8]
    table = np.array([[b, b / d, b / d**2] for b, d in zip(base, decay)])
    frame = pd.DataFrame(table, index=[f"l{i}" for i in range(len(base))], columns=candidates)
    chosen = assign_bits(frame, budget)
    assert np.mean(list(chosen.values())) <= budget + 1e-9
    total = sum(frame.loc[name, bits] for name, bits in chosen.items())
    assert total == pytest.approx(_brute_force(table, candidates, budget), rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    table=st.lists(st.lists(st.floats(0.0, 5.0), min_size=3, max_size=3), min_size=1, max_size=6),
    budget=st.sampled_from([4.0, 5.0, 6.0, 7.5, 8.0]),
)
def test_assign_bits_never_exceeds_budget_nor_loses_to_uniform(table, budget):
    candidates = [4, 6, 8]
    frame = pd.DataFrame(table, index=[f"l{i}" for i in range(len(table))], columns=candidates)
    chosen = assign_bits(frame, budget)
    assert np.mean(list(chosen.values())) <= budget + 1e-9
    total = sum(frame.loc[name, bits] for name, bits in chosen.items())
    if budget in candidates:
        assert total <= frame[int(budget)].sum() + 1e-12


def test_budget_parsing_and_bad_budgets():
    assert Budget.parse("A6") == Budget("a", 6.0)
    assert Budget.parse("w5.5") == Budget("w", 5.5)
    for bad in ("6", "A", "X6", "A6b"):
        with pytest.raises(UserError, match="budget"):
            Budget.parse(bad)
    with pytest.raises(UserError, match="below the fewest candidate bits"):
        check_candidates((4, 6, 8), Budget.parse("A3"))
    with pytest.raises(UserError):
        check_candidates((1, 8), Budget.parse("A6"))


def test_unknown_roles_and_layers_are_user_errors(run, loaded, probe):
    with pytest.raises(UserError, match="unknown role 'temporl'.*did you mean 'temporal'"):
        quantize_(load_model(MODEL), QuantConfig("mse", role_bits=(("temporl", 8, 6),)), stats=run)
    with pytest.raises(UserError, match="no layer 'conv_inn'.*did you mean 'conv_in'"):
        quantize_(
            load_model(MODEL), QuantConfig("mse", layer_bits=(("conv_inn", 8, 6),)), stats=run
        )
    with pytest.raises(UserError, match="no quantized layer 'nope'"):
        sensitivity(loaded, run, QuantConfig("mse", 8, 4), probe, by=("layer",), only=["nope"])
    with pytest.raises(UserError, match="more than once"):
        QuantConfig("mse", layer_bits=(("conv_in", 8, 6), ("conv_in", 8, 4)))
    with pytest.raises(UserError):
        QuantConfig("mse", role_bits=(("temporal", 8, 1),))


def test_role_bits_and_layer_bits_reach_the_quantizers(run):
    model = load_model(MODEL)
    config = QuantConfig(
        "mse", 8, 8, role_bits=(("temporal", 6, 4),), layer_bits=(("conv_in", 4, 6),)
    )
    record = quantize_(model, config, stats=run)
    for layer in record.layers:
        expected = (
            (4, 6) if layer.layer == "conv_in" else (6, 4) if layer.role == "temporal" else (8, 8)
        )
        assert (layer.w_bits, layer.a_bits) == expected, layer.layer
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --------------------------------------------------------------------------- CLI


def test_cli_sensitivity_writes_a_ranked_report(run, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(
        ["sensitivity", "--stats", str(run.path), "--bits", "W8A4", "--by", "role",
         "--num-prompts", "1", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    table = pd.read_parquet(out / "sensitivity.parquet")
    roles = table[table["kind"] == "role"]
    assert set(roles["unit"]) == {run.roles.get(n, "") for n in run.roles} - {""}
    assert (out / "index.html").exists() and any((out / "figures").iterdir())
    assert "temporal" in capsys.readouterr().out
    stages = json.loads((out / "cost.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["load", "sensitivity"]
    assert all(s["wall_s"] > 0 and s["peak_host_bytes"] > 0 for s in stages)
    assert "Cost per stage" in (out / "report.md").read_text()


def test_cli_quantize_mixed_writes_the_assignment(wan_run, tmp_path):
    out = tmp_path / "record"
    code = main(
        ["quantize", "--stats", str(wan_run.path), "--method", "mse", "--bits", "W8A6",
         "--mixed", "A6", "--mixed-bits", "4,8", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    document = json.loads((out / "mixed.json").read_text())
    assert document["mean_bits"] <= 6.0 and document["budget"] == "A6"
    record = load_record(out)
    chosen = {row["layer"]: row["bits"] for row in document["layers"]}
    assert {r.layer: r.a_bits for r in record.layers} == chosen
    assert set(chosen.values()) <= {4, 8}
    assert [s["stage"] for s in record.cost] == ["load", "sensitivity", "quantize"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mixed", "A3"], "below the fewest candidate bits"),
        (["--mixed", "six"], "budget looks like"),
        (["--mixed", "A6", "--mixed-bits", "4,x"], "--mixed-bits takes"),
    ],
)
def test_cli_quantize_mixed_bad_input(run, tmp_path, capsys, argv, message):
    code = main(["quantize", "--stats", str(run.path), "--out", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_sensitivity_bad_unit(run, capsys):
    code = main(["sensitivity", "--stats", str(run.path), "--by", "block"])
    err = capsys.readouterr().err
    assert code == 2 and "--by takes" in err
