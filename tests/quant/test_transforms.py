"""Channel transforms: exact folding sites, explicit wrappers, and model equivalence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qvd_bench.models.roles import leaf_layers
from qvd_bench.models.zoo import load_model
from qvd_bench.quant.modules import CONV_TYPES, QuantWrapper, StaticActQuant
from qvd_bench.quant.transforms import apply_channel_transform, fold_sites, plan_transform

PRESETS = (
    "tiny-unet3d",
    "tiny-animatediff",
    "tiny-svd",
    "tiny-i2vgenxl",
    "tiny-latte",
    "tiny-cogvideox",
    "tiny-wan",
)

# Fold kinds each family must show (Latte's adaLN-single modulation is shared by every
# block, so nothing folds there).
EXPECTED_KINDS = {
    "tiny-unet3d": {"folded_norm", "explicit"},
    "tiny-animatediff": {"folded_norm", "explicit"},
    "tiny-svd": {"folded_norm", "explicit"},
    "tiny-i2vgenxl": {"folded_norm", "explicit"},
    "tiny-latte": {"explicit"},
    "tiny-cogvideox": {"folded_adaln", "explicit"},
    "tiny-wan": {"folded_norm", "explicit"},
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
    layers = leaf_layers(denoiser)
    sites = fold_sites(denoiser)
    # Fold sites first: a modulation Linear is itself transformed only after its rows fold.
    order = [n for n in layers if n in sites] + [n for n in layers if n not in sites]
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
    if preset in ("tiny-unet3d", "tiny-i2vgenxl"):
        # A padded ResNet conv (explicit: SiLU in between) and a q/k/v group on one norm.
        conv1 = next(r for r in records if r.layers[0].endswith("resnets.0.conv1"))
        assert conv1.explicit and denoiser.get_submodule(conv1.layers[0]).module.padding[0] == 1
        assert any(len(r.layers) == 3 and r.kind == "folded_norm" for r in records)


def test_qkv_share_one_site_and_ffn2_stays_explicit():
    loaded = load_model("tiny-unet3d")
    sites = fold_sites(loaded.denoiser)
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    site = sites[f"{block}.attn1.to_k"]
    assert site.source == f"{block}.norm1" and len(site.layers) == 3
    assert sites[f"{block}.attn2.to_q"].layers == (f"{block}.attn2.to_q",)
    assert f"{block}.attn2.to_k" not in sites  # keys come from the text states
    assert sites[f"{block}.ff.net.0.proj"].source == f"{block}.norm3"
    assert f"{block}.ff.net.2" not in sites
    record = plan_transform(loaded.denoiser, f"{block}.ff.net.2", torch.zeros(128), torch.ones(128))
    assert record.explicit and "GELU" in record.reason


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
