"""The model zoo: presets build and run, random-weight hygiene, outlier knobs, loading."""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch

from qvd_bench.errors import UserError
from qvd_bench.models.roles import LayerInputCapture, leaf_layers
from qvd_bench.models.zoo import (
    DEFAULT_ASYMMETRY,
    DEFAULT_DISPARITY,
    MODELS,
    list_models,
    load_model,
)

PRESETS = [name for name in MODELS if name.startswith("tiny-")]


@functools.cache
def preset(name: str, disparity: float | None = None, asymmetry: float | None = None):
    return load_model(name, disparity=disparity, asymmetry=asymmetry)


def small_inputs(loaded, batch: int = 1, seed: int = 0):
    """A small latent: 2 frames of 8 x 8."""
    family, denoiser = loaded.family, loaded.denoiser
    frames = 2
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(family.latent_shape(denoiser, batch, frames, 8, 8), generator=generator)
    text = torch.randn((batch, *family.text_embedding_shape(denoiser)), generator=generator)
    conditioning = family.conditioning(denoiser, batch, frames, 8, 8, generator=generator)
    return latents, text, conditioning


def test_all_presets_are_registered():
    assert set(PRESETS) == {
        "tiny-unet3d",
        "tiny-animatediff",
        "tiny-svd",
        "tiny-i2vgenxl",
        "tiny-latte",
        "tiny-cogvideox",
        "tiny-wan",
        "tiny-ltx",
        "tiny-hunyuan",
        "tiny-mochi",
        "tiny-wan22",
    }


@pytest.mark.parametrize("name", PRESETS)
def test_preset_forward_gives_latent_shape_and_finite_values(name):
    loaded = preset(name)
    latents, text, conditioning = small_inputs(loaded, batch=2)
    with torch.no_grad():
        prediction = loaded.family.forward(
            loaded.denoiser, latents, torch.tensor([100.0, 800.0]), text, conditioning
        )
    assert prediction.shape == latents.shape
    assert torch.isfinite(prediction).all()
    assert loaded.random_weights and loaded.weight_seed == 0


@pytest.mark.parametrize("name", PRESETS)
def test_probe_size_runs(name):
    loaded = preset(name)
    family, denoiser = loaded.family, loaded.denoiser
    frames, height, width = family.probe_size(denoiser)
    latents = torch.randn(family.latent_shape(denoiser, 1, frames, height, width))
    text = torch.randn((1, *family.text_embedding_shape(denoiser)))
    conditioning = family.conditioning(denoiser, 1, frames, height, width)
    with torch.no_grad():
        prediction = family.forward(denoiser, latents, torch.tensor([500.0]), text, conditioning)
    assert prediction.shape == latents.shape


def test_latte_takes_frame_counts_other_than_its_video_length():
    loaded = preset("tiny-latte")
    denoiser = loaded.denoiser
    positions = denoiser.temp_pos_embed.clone()
    assert positions.shape[1] == 8
    for frames in (2, 12):
        latents = torch.randn(loaded.family.latent_shape(denoiser, 1, frames, 4, 4))
        text = torch.randn((1, *loaded.family.text_embedding_shape(denoiser)))
        with torch.no_grad():
            prediction = loaded.family.forward(denoiser, latents, torch.tensor([10.0]), text, {})
        assert prediction.shape == latents.shape and torch.isfinite(prediction).all()
    assert torch.equal(denoiser.temp_pos_embed, positions)


@pytest.mark.parametrize("name", PRESETS)
def test_no_leaf_layer_has_all_zero_weights(name):
    zero = [n for n, layer in leaf_layers(preset(name).denoiser).items() if not layer.weight.any()]
    assert zero == []


def test_zero_initialised_temporal_convs_are_reinitialised():
    layers = leaf_layers(preset("tiny-unet3d").denoiser)
    last_temporal_convs = [n for n in layers if re.fullmatch(r".*temp_convs\.\d+\.conv4\.3", n)]
    assert len(last_temporal_convs) == 8
    for name in last_temporal_convs:
        assert layers[name].weight.abs().max() > 0


def test_same_seed_gives_identical_weights_and_another_seed_different():
    a = load_model("tiny-wan", weight_seed=3).denoiser.state_dict()
    b = load_model("tiny-wan", weight_seed=3).denoiser.state_dict()
    c = load_model("tiny-wan", weight_seed=4).denoiser.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_building_a_preset_leaves_the_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny-cogvideox", weight_seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_knobs_are_recorded_with_defaults_for_presets():
    assert preset("tiny-latte").knobs == {
        "disparity": DEFAULT_DISPARITY,
        "asymmetry": DEFAULT_ASYMMETRY,
    }
    assert preset("tiny-latte", 0.0, 0.0).knobs == {"disparity": 0.0, "asymmetry": 0.0}
    assert DEFAULT_DISPARITY > 0 and DEFAULT_ASYMMETRY > 0


def _range_disparity(loaded) -> float:
    """Median over FFN-output and attention-output layers of max/median channel range."""
    latents, text, conditioning = small_inputs(loaded)
    with LayerInputCapture(loaded.denoiser) as inputs, torch.no_grad():
        loaded.family.forward(loaded.denoiser, latents, torch.tensor([500.0]), text, conditioning)
    ratios = []
    for name, calls in inputs.items():
        if not re.fullmatch(r".*(\.net\.2|to_out\.0)", name):
            continue
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in calls])
        ranges = rows.max(0).values - rows.min(0).values
        if ranges.median() == 0:
            continue  # cross-attention over a single key (SVD's image embedding): constant
        ratios.append(float(ranges.max() / ranges.median()))
    assert ratios
    return float(torch.tensor(ratios).median())


@pytest.mark.parametrize("name", PRESETS)
def test_disparity_raises_inter_channel_range_disparity(name):
    without = _range_disparity(preset(name, 0.0, 0.0))
    with_default = _range_disparity(preset(name))
    assert with_default > 2.5 * without


def test_knobs_change_only_targeted_parameters():
    plain = preset("tiny-wan", 0.0, 0.0).denoiser.state_dict()
    knobbed = preset("tiny-wan").denoiser.state_dict()
    changed = {k for k in plain if not torch.equal(plain[k], knobbed[k])}
    assert "condition_embedder.time_embedder.linear_1.weight" in changed
    assert "blocks.0.ffn.net.0.proj.weight" in changed
    assert "blocks.0.attn1.to_out.0.weight" in changed
    assert "blocks.0.attn1.to_q.weight" not in changed
    assert "proj_out.weight" not in changed


def test_negative_knob_is_a_user_error():
    with pytest.raises(UserError, match="disparity"):
        load_model("tiny-wan", disparity=-1.0)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(UserError, match="did you mean 'tiny-unet3d'"):
        load_model("tiny-unet3")


def test_missing_hub_model_is_a_one_line_offline_error():
    with pytest.raises(UserError, match="offline") as error:
        load_model("no-such-org/no-such-video-model")
    assert "\n" not in str(error.value)


def test_missing_local_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        load_model(str(tmp_path / "missing" / "model"))


def test_local_model_directory_loads_and_picks_the_family(tmp_path):
    original = preset("tiny-wan", 0.0, 0.0)
    original.denoiser.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.family.name == "wan"
    assert not loaded.random_weights and loaded.knobs == {"disparity": 0.0, "asymmetry": 0.0}
    state = loaded.denoiser.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in original.denoiser.state_dict().items())


def test_unsupported_denoiser_class_lists_supported_classes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(UserError, match="not supported.*UNet3DConditionModel"):
        load_model(str(tmp_path))


def test_list_models_counts_parameters_without_materialising():
    rows = {row.name: row for row in list_models()}
    assert set(PRESETS) <= set(rows)
    modelscope = rows["modelscope-t2v-arch"]
    assert modelscope.denoiser_class == "UNet3DConditionModel"
    assert modelscope.family == "unet3d"
    assert abs(modelscope.parameters - 1.4112e9) < 0.001e9
    assert rows["tiny-unet3d"].parameters == preset("tiny-unet3d").param_count
