"""Layer roles: tables cover every layer, probe detection agrees with the tables."""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import torch
from torch import nn

from qvd_bench.errors import UserError
from qvd_bench.models.families import FAMILIES, family_by_name, family_names
from qvd_bench.models.family import ROLES
from qvd_bench.models.roles import (
    LayerInputCapture,
    RoleDecision,
    classify,
    detect_time_emb,
    format_roles,
    leaf_layers,
)
from qvd_bench.models.zoo import MODELS, load_model

# Single-denoiser presets (tiny-wan22's two experts are Wan's layers twice: below).
PRESETS = [name for name in MODELS if name.startswith("tiny-") and not MODELS.get(name).experts]

# Timestep-embedding layers per tiny preset, by the table (REFERENCE.md for the first seven).
TIME_EMB_COUNTS = {
    "tiny-unet3d": 10,
    "tiny-animatediff": 14,
    "tiny-svd": 26,
    "tiny-i2vgenxl": 10,
    "tiny-latte": 3,
    "tiny-cogvideox": 7,
    "tiny-wan": 3,
    "tiny-ltx": 3,
    "tiny-hunyuan": 11,
    "tiny-mochi": 7,
}
# CogVideoX, Wan, LTX-Video, HunyuanVideo and Mochi attend over all frames at once: no
# separate temporal layers.
HAS_TEMPORAL_LAYERS = {"tiny-unet3d", "tiny-animatediff", "tiny-svd", "tiny-i2vgenxl", "tiny-latte"}

# Where probe detection (inputs that change with the timestep, not with the latent) and
# the table disagree, by design:
# - time_emb layers the probe misses: HunyuanVideo's guidance embedder reads the guidance
#   scale, the same at every timestep;
# - text-stream layers the probe takes for time_emb: in the dual-stream models the text
#   tokens pass layers before they first meet the video tokens (HunyuanVideo's refiner
#   FFN, the first block's text projections); the timestep modulates them, but they
#   compute on text, not on a timestep embedding.
PROBE_MISSES = {"tiny-hunyuan": r"time_text_embed\.guidance_embedder\.linear_[12]"}
PROBE_TEXT_STREAM = {
    "tiny-hunyuan": (
        r"context_embedder\.token_refiner\.refiner_blocks\.0\.ff\.net\.(0\.proj|2)"
        r"|transformer_blocks\.0\.attn\.add_[qkv]_proj"
    ),
    "tiny-mochi": r"transformer_blocks\.0\.attn1\.add_[qkv]_proj",
}


@functools.cache
def preset(name: str):
    return load_model(name)


def test_families_are_registered_by_class_and_short_name():
    assert set(FAMILIES) == {
        "UNet3DConditionModel",
        "UNetMotionModel",
        "UNetSpatioTemporalConditionModel",
        "I2VGenXLUNet",
        "LatteTransformer3DModel",
        "CogVideoXTransformer3DModel",
        "WanTransformer3DModel",
        "LTXVideoTransformer3DModel",
        "HunyuanVideoTransformer3DModel",
        "MochiTransformer3DModel",
        "LTX2VideoTransformer3DModel",
        "HunyuanVideo15Transformer3DModel",
        "AllegroTransformer3DModel",
        "SkyReelsV2Transformer3DModel",
    }
    for short_name in family_names():
        family = family_by_name(short_name)
        assert FAMILIES.get(family.denoiser_class) is family
        assert all(role in ROLES for _, role in family.role_table)
    with pytest.raises(UserError, match="did you mean 'unet3d'"):
        family_by_name("unet3")


@pytest.mark.parametrize("name", PRESETS)
def test_table_classifies_every_leaf_layer(name):
    loaded = preset(name)
    decisions = classify(loaded)
    assert list(decisions) == list(leaf_layers(loaded.denoiser))
    assert all(d.role in ROLES and d.decided_by.startswith("table:") for d in decisions.values())


@pytest.mark.parametrize("name", PRESETS)
def test_time_emb_and_temporal_layers_where_the_architecture_has_them(name):
    roles = [d.role for d in classify(preset(name)).values()]
    assert roles.count("time_emb") == TIME_EMB_COUNTS[name]
    assert ("temporal" in roles) == (name in HAS_TEMPORAL_LAYERS)
    for role in ("self_attn", "ffn", "io"):
        assert role in roles


@pytest.mark.parametrize("name", PRESETS)
def test_probe_detection_finds_exactly_the_table_time_emb_layers(name):
    loaded = preset(name)
    decisions = classify(loaded)
    table = {n for n, d in decisions.items() if d.role == "time_emb"}
    missed = {n for n in table if re.fullmatch(PROBE_MISSES.get(name, "(?!)"), n)}
    text_stream = {n for n in decisions if re.fullmatch(PROBE_TEXT_STREAM.get(name, "(?!)"), n)}
    assert (name in PROBE_MISSES) == bool(missed)
    assert (name in PROBE_TEXT_STREAM) == bool(text_stream)
    assert not any(decisions[n].role == "time_emb" for n in text_stream)
    detected = detect_time_emb(loaded)
    assert detected == (table - missed) | text_stream
    assert len(table) == TIME_EMB_COUNTS[name]


def test_conditioning_only_embeddings_are_not_time_emb():
    svd = classify(preset("tiny-svd"))
    i2v = classify(preset("tiny-i2vgenxl"))
    assert svd["add_embedding.linear_1"].role == "io"
    assert i2v["fps_embedding.0"].role == "io"
    assert svd["down_blocks.0.resnets.0.temporal_res_block.time_emb_proj"].role == "time_emb"


def test_detect_classifies_every_layer_and_records_how():
    loaded = preset("tiny-unet3d")
    detected = classify(loaded, detect=True)
    table = classify(loaded)
    assert list(detected) == list(table)
    assert all(
        d.decided_by == "probe" or d.decided_by.startswith("heuristic:") for d in detected.values()
    )
    assert {n for n, d in detected.items() if d.decided_by == "probe"} == {
        n for n, d in table.items() if d.role == "time_emb"
    }
    assert detected["down_blocks.0.temp_convs.0.conv1.2"].role == "temporal"
    assert (
        detected["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].role == "cross_attn"
    )


def test_a_layer_no_pattern_matches_is_an_error_naming_it():
    loaded = preset("tiny-wan")
    family = loaded.family
    partial = type("PartialWan", (type(family),), {"role_table": family.role_table[:-1]})()
    with pytest.raises(UserError, match="proj_out"):
        classify(dataclasses.replace(loaded, family=partial))


def test_an_empty_table_falls_back_to_detection():
    loaded = preset("tiny-wan")
    tableless = type("TablelessWan", (type(loaded.family),), {"role_table": ()})()
    decisions = classify(dataclasses.replace(loaded, family=tableless))
    assert sum(d.decided_by == "probe" for d in decisions.values()) == 3


class _CustomLinear(nn.Linear):
    pass


class _KeywordCaller(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 1)
        self.norm = nn.LayerNorm(3)
        self.linear = _CustomLinear(3, 2)

    def forward(self, x):
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.linear(input=self.norm(x))


def test_leaf_layers_include_subclasses_in_module_order():
    assert list(leaf_layers(_KeywordCaller())) == ["conv", "linear"]


def test_leaf_layers_by_name_equal_the_walk():
    denoiser = load_model("tiny-unet3d").denoiser
    every = leaf_layers(denoiser)
    names = [*list(every)[::7], "down_blocks.0", "no.such.layer"]  # a non-leaf, a missing one
    picked = leaf_layers(denoiser, names)
    assert list(picked) == [n for n in names if n in every]
    assert all(picked[n] is every[n] for n in picked)


def test_input_capture_sees_keyword_inputs():
    module = _KeywordCaller()
    x = torch.randn(2, 4, 3)
    with LayerInputCapture(module) as inputs:
        module(x)
    assert inputs["linear"][0].shape == (2, 4, 3)
    assert len(inputs["conv"]) == 1
    # Hooks are removed on exit.
    module(x)
    assert len(inputs["linear"]) == 1


def test_format_roles_lists_layers_and_counts():
    text = format_roles(
        {
            "time_embedding.linear_1": RoleDecision("time_emb", "table:time_embedding\\..*"),
            "conv_in": RoleDecision("io", "heuristic:io-name"),
        }
    )
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "role", "decided", "by"]
    assert "time_embedding.linear_1" in text and "heuristic:io-name" in text
    assert lines[-1] == "2 layers: time_emb 1, io 1"


def test_two_expert_preset_classifies_both_experts_layers_as_the_single_one():
    single, double = classify(preset("tiny-wan")), classify(preset("tiny-wan22"))
    assert list(preset("tiny-wan22").experts) == ["transformer", "transformer_2"]
    assert {n: (d.role, d.decided_by) for n, d in double.items()} == {
        f"{expert}.{n}": (d.role, d.decided_by)
        for expert in ("transformer", "transformer_2")
        for n, d in single.items()
    }
