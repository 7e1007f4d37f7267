"""Channel transforms: exact folding sites, explicit wrappers, and model equivalence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qvd_bench.models.roles import leaf_layers
from qvd_bench.models.zoo import load_model
from qvd_bench.quant.modules import CONV_TYPES, QuantWrapper, StaticActQuant
from qvd_bench.quant.transforms import (
    apply_channel_transform,
    fold_order,
    fold_sites,
    plan_transform,
    undo_channel_transforms,
)

PRESETS = (
    "tiny-unet3d",
    "tiny-animatediff",
    "tiny-svd",
    "tiny-i2vgenxl",
    "tiny-latte",
    "tiny-cogvideox",
    "tiny-wan",
)

# Fold kinds each family must show: UNet FFNs are GEGLU (s folds into the projection's
# linear half); Latte and Wan modulate from a per-block table plus one Linear shared by
# every block (z folds into the table, s stays explicit); CogVideoX has a modulation
# Linear per block (both fold); Wan's cross-attention norm has an affine.
EXPECTED_KINDS = {
    "tiny-unet3d": {"folded_norm", "folded_geglu_scale", "explicit"},
    "tiny-animatediff": {"folded_norm", "folded_geglu_scale", "explicit"},
    "tiny-svd": {"folded_norm", "folded_geglu_scale", "explicit"},
    "tiny-i2vgenxl": {"folded_norm", "folded_geglu_scale", "explicit"},
    "tiny-latte": {"folded_adaln_shift", "folded_geglu_scale", "explicit"},
    "tiny-cogvideox": {"folded_adaln", "explicit"},
    "tiny-wan": {"folded_norm", "folded_adaln_shift", "explicit"},
}


def _inputs(loaded):
    """Small fixed inputs of one denoiser call (float64)."""
    family, denoiser = loaded.family, loaded.denoiser
    frames, height, width = family.probe_size(denoiser)
    frames = max(frames, 2)
    shape = family.latent_shape(denoiser, 1, frames, 2 * height, 2 * width)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(shape, generator=generator, dtype=torch.float64)
    length, dim = family.text_embedding_shape(denoiser)
    # Long text contexts (Wan, Latte) are cut short; CogVideoX needs its exact length.
    text = torch.randn(1, length if length < 64 else 8, dim, generator=generator)
    n_frames = shape[2] if family.layout == "BCFHW" else shape[1]
    cond = family.conditioning(denoiser, 1, n_frames, shape[-2], shape[-1], generator)
    cond = {k: v.double() if v.is_floating_point() else v for k, v in cond.items()}
    return latents, torch.tensor([500.0], dtype=torch.float64), text.double(), cond


def _channels(module: nn.Module) -> int:
    groups = module.groups if isinstance(module, CONV_TYPES) else 1
    return module.weight.shape[1] * groups


@pytest.mark.parametrize("preset", PRESETS)
def test_every_layer_transformed_reproduces_outputs(preset):
    loaded = load_model(preset, dtype=torch.float64)
    denoiser = loaded.denoiser.eval()
    args = _inputs(loaded)
    with torch.no_grad():
        reference = loaded.family.forward(denoiser, *args)
    original = {k: v.clone() for k, v in denoiser.state_dict().items()}
    layers = leaf_layers(denoiser)
    sites = fold_sites(denoiser)
    # Fold sites first, in fold order: a modulation Linear or a GEGLU projection is itself
    # transformed only after the fold into its rows.
    order = [n for site in fold_order(sites) for n in site.layers]
    order += [n for n in layers if n not in sites]
    generator = torch.Generator().manual_seed(2)
    done, records = set(), []
    for name in order:
        if name in done:
            continue
        channels = _channels(layers[name])
        shift = 0.5 * torch.randn(channels, generator=generator, dtype=torch.float64)
        scale = torch.exp(0.5 * torch.randn(channels, generator=generator, dtype=torch.float64))
        assert shift.abs().min() > 0 and (scale - 1).abs().min() > 0
        record = apply_channel_transform(loaded, name, shift, scale)
        done.update(record.layers)
        records.append(record)
    assert done == set(layers)
    with torch.no_grad():
        out = loaded.family.forward(denoiser, *args)
    error = ((out - reference).norm() / reference.norm()).item()
    assert error < 1e-5, error
    assert {r.kind for r in records} == EXPECTED_KINDS[preset]
    for record in records:
        # Partial folds leave the wrapper only the part that cannot fold.
        if record.kind == "folded_adaln_shift":
            assert record.input_shift is None and record.input_scale is not None
        elif record.kind == "folded_geglu_scale":
            assert record.input_scale is None and record.input_shift is not None
        elif not record.explicit:
            assert not record.has_input_transform
    if preset in ("tiny-unet3d", "tiny-i2vgenxl"):
        # A padded ResNet conv (explicit: SiLU in between) and a q/k/v group on one norm.
        conv1 = next(r for r in records if r.layers[0].endswith("resnets.0.conv1"))
        assert conv1.explicit and denoiser.get_submodule(conv1.layers[0]).module.padding[0] == 1
        assert any(len(r.layers) == 3 and r.kind == "folded_norm" for r in records)
    # Undone: the original modules and parameters, bit for bit.
    undo_channel_transforms(loaded, records)
    assert not any(isinstance(m, QuantWrapper) for m in denoiser.modules())
    restored = denoiser.state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_qkv_share_one_site_and_geglu_folds_the_scale_only():
    loaded = load_model("tiny-unet3d")
    sites = fold_sites(loaded.denoiser)
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    site = sites[f"{block}.attn1.to_k"]
    assert site.source == f"{block}.norm1" and len(site.layers) == 3
    assert sites[f"{block}.attn2.to_q"].layers == (f"{block}.attn2.to_q",)
    assert f"{block}.attn2.to_k" not in sites  # keys come from the text states
    assert sites[f"{block}.ff.net.0.proj"].source == f"{block}.norm3"
    geglu = sites[f"{block}.ff.net.2"]
    assert (geglu.kind, geglu.source) == ("folded_geglu_scale", f"{block}.ff.net.0.proj")
    # The GEGLU site folds into the projection before the projection's own site.
    order = fold_order(sites)
    assert order.index(geglu) < order.index(sites[f"{block}.ff.net.0.proj"])
    proj = loaded.denoiser.get_submodule(f"{block}.ff.net.0.proj")
    channels = proj.out_features // 2
    generator = torch.Generator().manual_seed(0)
    scale = torch.exp(torch.randn(channels, generator=generator, dtype=torch.float64))
    shift = torch.randn(channels, generator=generator, dtype=torch.float64)
    # s alone (SmoothQuant) folds completely: the linear half's rows divided by s.
    smooth = plan_transform(loaded.denoiser, f"{block}.ff.net.2", torch.zeros(channels), scale)
    assert smooth.kind == "folded_geglu_scale" and not smooth.has_input_transform
    folded = smooth.folded[f"{block}.ff.net.0.proj.weight"].double()
    weight = proj.weight.detach().double()
    torch.testing.assert_close(folded[:channels], weight[:channels] / scale[:, None])
    assert torch.equal(folded[channels:], weight[channels:])  # the gate half is untouched
    # With a shift, z/s stays on the wrapper.
    shifted = plan_transform(loaded.denoiser, f"{block}.ff.net.2", shift, scale)
    torch.testing.assert_close(shifted.input_shift, shift / scale)
    assert shifted.input_scale is None and "shift stays explicit" in shifted.reason


def test_gelu_ffn_output_stays_explicit():
    loaded = load_model("tiny-cogvideox")
    layer = "transformer_blocks.0.ff.net.2"
    assert layer not in fold_sites(loaded.denoiser)
    channels = loaded.denoiser.get_submodule(layer).in_features
    record = plan_transform(loaded.denoiser, layer, torch.zeros(channels), torch.ones(channels))
    assert record.explicit and "GELU" in record.reason


@pytest.mark.parametrize("preset", ["tiny-latte", "tiny-wan"])
def test_shared_modulation_folds_the_shift_into_the_block_table(preset):
    loaded = load_model(preset)
    denoiser = loaded.denoiser
    sites = fold_sites(denoiser)
    tables = [site for site in fold_order(sites) if site.kind == "folded_adaln_shift"]
    # q/k/v and the FFN input of every block, and the output projection.
    blocks = {site.source for site in tables if site.source != "scale_shift_table"}
    assert len(tables) == 2 * len(blocks) + 1
    site = next(site for site in tables if len(site.layers) == 3)
    channels = denoiser.get_submodule(site.layers[0]).in_features
    generator = torch.Generator().manual_seed(0)
    shift = torch.randn(channels, generator=generator, dtype=torch.float64)
    record = plan_transform(denoiser, site.layers[0], shift, torch.ones(channels))
    assert record.layers == site.layers and not record.has_input_transform
    table = denoiser.get_parameter(site.source).detach().double().reshape(6, channels)
    new = record.folded[site.source].double().reshape(6, channels)
    torch.testing.assert_close(new[0], table[0] - shift)  # shift_msa
    assert torch.equal(new[1:], table[1:])
    scaled = plan_transform(denoiser, site.layers[0], shift, torch.full((channels,), 2.0))
    assert scaled.input_shift is None and bool((scaled.input_scale == 2.0).all())


@pytest.mark.parametrize("groups", [1, 2])
def test_padded_conv_pad_then_shift(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64) + 3.0
    shift = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    scale = torch.tensor([2.0, 1.0, 4.0, 0.5], dtype=torch.float64)
    record = plan_transform(nn.Sequential(conv), "0", shift, scale)
    assert record.explicit
    wrapper = QuantWrapper(conv, None, None, weight=record.weights["0"])
    wrapper.set_input_transform(shift, scale)
    torch.testing.assert_close(wrapper(x), conv(x), rtol=0, atol=1e-12)
    # Quantized: the pad value −z/s goes through the same quantizer as X̃.
    act = StaticActQuant(0.01, 128, 8)
    wrapper = QuantWrapper(conv, None, act, weight=record.weights["0"])
    wrapper.set_input_transform(shift, scale)
    x_t = act((x - shift.view(1, -1, 1, 1)) / scale.view(1, -1, 1, 1), 1)
    pad = act((-shift / scale).view(1, -1, 1, 1), 1).expand(2, 4, 7, 7).clone()
    pad[:, :, 1:6, 1:6] = x_t
    expected = nn.functional.conv2d(
        pad, record.weights["0"], wrapper.transform_bias[0], groups=groups
    )
    torch.testing.assert_close(wrapper(x), expected)
    # Off: the float layer with the transform, still the original function.
    wrapper.enabled = False
    torch.testing.assert_close(wrapper(x), conv(x), rtol=0, atol=1e-12)


def test_shift_table_per_timestep_group():
    class Tracker:
        current = None

    class Call:
        def __init__(self, timestep):
            self.timestep = timestep

    torch.manual_seed(0)
    linear = nn.Linear(3, 2).double()
    tracker = Tracker()
    shift = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    scale = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    record = plan_transform(nn.Sequential(linear), "0", shift[0], scale, fold=False)
    wrapper = QuantWrapper(linear, None, None, weight=record.weights["0"])
    wrapper.set_input_transform(shift, scale, groups=[[900.0], [100.0]], tracker=tracker)
    x = torch.randn(4, 3, dtype=torch.float64)
    for timestep in (900.0, 100.0):
        tracker.current = Call(timestep)
        torch.testing.assert_close(wrapper(x), linear(x), rtol=0, atol=1e-12)
