"""Split quantization of skip-connection concatenations (``quant/split.py``)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qvd_bench.commands.main import main
from qvd_bench.errors import UserError
from qvd_bench.models.families import FAMILIES
from qvd_bench.models.family import LoadedModel
from qvd_bench.models.roles import leaf_layers
from qvd_bench.models.zoo import load_model
from qvd_bench.numerics.grid import quant_range
from qvd_bench.quant.apply import apply_record, quantize_
from qvd_bench.quant.config import QuantConfig
from qvd_bench.quant.methods.base import QuantContext, uniform_range
from qvd_bench.quant.modules import QuantWrapper, quant_wrappers
from qvd_bench.quant.primitives import sqnr_db
from qvd_bench.quant.record import load_record
from qvd_bench.quant.split import SplitActQuant, SplitQuantWrapper, skip_splits
from tests.quant.helpers import tiny_run

UNET_PRESETS = ("tiny-unet3d", "tiny-animatediff", "tiny-svd", "tiny-i2vgenxl")
DIT_PRESETS = ("tiny-latte", "tiny-cogvideox", "tiny-wan")
MODEL = "tiny-unet3d"


def _probe_inputs(loaded: LoadedModel, seed: int = 0):
    """Latents, timestep, text states and conditioning of one small denoiser call."""
    family, denoiser = loaded.family, loaded.denoiser
    frames, height, width = family.probe_size(denoiser)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(
        family.latent_shape(denoiser, 1, frames, height, width), generator=generator
    )
    text = torch.randn(1, *family.text_embedding_shape(denoiser), generator=generator)
    conditioning = family.conditioning(denoiser, 1, frames, height, width, generator=generator)
    return latents, torch.tensor([500.0]), text, conditioning


def _forward(loaded: LoadedModel, inputs) -> torch.Tensor:
    with torch.no_grad():
        return loaded.family.forward(loaded.denoiser, *inputs)


def concat_readers(loaded: LoadedModel) -> dict[str, int]:
    """Leaf layers that read a channel concatenation made inside the denoiser, found by
    running it: ``torch.cat`` of two feature maps along channels is recorded, its result
    followed through GroupNorm and SiLU (which keep the channel order) into the leaf
    layers reading it.

    Returns:
        Layer -> channels of the first part of the concatenation it reads.
    """
    tracked: dict[int, tuple[torch.Tensor, int]] = {}  # id -> (tensor kept alive, C_h)
    inside = [False]
    readers: dict[str, int] = {}
    original_cat = torch.cat

    def recording_cat(tensors, dim=0, **kwargs):
        out = original_cat(tensors, dim=dim, **kwargs)
        # Channels of feature maps (B, C, ...); a (B, L, D) token sequence's dim 1 is not.
        if inside[0] and out.ndim >= 4 and dim in (1, 1 - out.ndim) and len(tensors) == 2:
            tracked[id(out)] = (out, tensors[0].shape[1])
        return out

    def follow(module, args, output):
        if args and id(args[0]) in tracked:
            tracked[id(output)] = (output, tracked[id(args[0])][1])

    def read(name):
        def hook(module, args):
            if args and id(args[0]) in tracked:
                readers[name] = tracked[id(args[0])][1]

        return hook

    denoiser = loaded.denoiser
    handles = [
        denoiser.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
        denoiser.register_forward_hook(lambda *_: inside.__setitem__(0, False)),
    ]
    for module in denoiser.modules():
        if isinstance(module, (nn.GroupNorm, nn.SiLU)):
            handles.append(module.register_forward_hook(follow))
    for name, module in leaf_layers(denoiser).items():
        handles.append(module.register_forward_pre_hook(read(name)))
    torch.cat = recording_cat
    try:
        _forward(loaded, _probe_inputs(loaded))
    finally:
        torch.cat = original_cat
        for handle in handles:
            handle.remove()
    return readers


def _three_level_unet3d() -> LoadedModel:
    """A UNet3D with three levels of unequal widths and two resnets per down block."""
    family = FAMILIES.get("UNet3DConditionModel")
    config = {
        **family.tiny_config(),
        "block_out_channels": (16, 24, 40),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock3D", "DownBlock3D", "DownBlock3D"),
        "up_block_types": ("UpBlock3D", "UpBlock3D", "CrossAttnUpBlock3D"),
    }
    torch.manual_seed(0)
    return LoadedModel(name="unet3d-3-levels", family=family, denoiser=family.build(config).eval())


@pytest.mark.parametrize("preset", [*UNET_PRESETS, *DIT_PRESETS, "three-level-unet3d"])
def test_detection_matches_the_concatenations_seen_in_a_forward(preset):
    loaded = _three_level_unet3d() if preset == "three-level-unet3d" else load_model(preset)
    found = skip_splits(loaded.denoiser)
    seen = concat_readers(loaded)
    assert found == seen
    if preset in DIT_PRESETS:
        assert found == {}
    else:
        # Every up-block resnet: conv1 and conv_shortcut, and h's width varies.
        assert len(found) >= 8 and {n.rsplit(".", 1)[1] for n in found} == {
            "conv1",
            "conv_shortcut",
        }
        layers = leaf_layers(loaded.denoiser)
        assert all(0 < c < layers[n].in_channels for n, c in found.items())


def test_detection_rejects_an_unknown_denoiser_class():
    with pytest.raises(UserError, match="skip concatenations of Sequential"):
        skip_splits(nn.Sequential(nn.Linear(2, 2)))


# --------------------------------------------------------------------------- quantizers


def _quantized(run, **config):
    loaded = load_model(MODEL)
    record = quantize_(loaded, QuantConfig(method="mse", **config), stats=run)
    return loaded, record


def _layer_inputs(loaded: LoadedModel, names) -> dict[str, torch.Tensor]:
    """Inputs of some leaf layers in one probe forward (of the model as it is)."""
    modules = dict(loaded.denoiser.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        modules[n].register_forward_pre_hook(
            lambda m, args, n=n: inputs.setdefault(n, args[0].detach().clone())
        )
        for n in names
    ]
    _forward(loaded, _probe_inputs(loaded, seed=1))
    for handle in handles:
        handle.remove()
    return inputs


def test_split_records_and_wrappers(unet_run):
    loaded, record = _quantized(unet_run, w_bits=8, a_bits=4, split_skip=True)
    splits = skip_splits(load_model(MODEL).denoiser)
    split_records = {r.layer: r for r in record.layers if r.builder == "split"}
    assert set(split_records) == set(splits)
    wrappers = dict(quant_wrappers(loaded.denoiser))
    for name, layer in split_records.items():
        out_channels = wrappers[name].module.weight.shape[0]
        assert layer.info["split"] == splits[name]
        assert layer.act == "static" and layer.tensors["act_scale"].shape == (2,)
        assert layer.tensors["weight_scale"].shape == (2, out_channels)
        assert isinstance(wrappers[name], SplitQuantWrapper)
        assert isinstance(wrappers[name].act, SplitActQuant)
    others = [w for n, w in wrappers.items() if n not in splits]
    assert others and not any(isinstance(w, SplitQuantWrapper) for w in others)
    summary = record.summary()["split_skip"]
    assert summary["layers"] == len(splits) and "note" not in summary


@pytest.mark.parametrize("a_bits", [4, 8])
def test_each_part_is_quantized_with_its_own_qparams(unet_run, a_bits):
    loaded, record = _quantized(unet_run, w_bits=4, a_bits=a_bits, split_skip=True)
    wrappers = dict(quant_wrappers(loaded.denoiser))
    splits = skip_splits(loaded.denoiser)
    inputs = _layer_inputs(loaded, splits)
    q_min, q_max = quant_range(a_bits)
    w_min, w_max = quant_range(4, symmetric=True)
    for name, split in splits.items():
        wrapper, layer, x = wrappers[name], record[name], inputs[name]
        quantized = wrapper.act(x, wrapper.channel_dim)
        weight = wrapper.module.weight.detach()
        for part, channels in enumerate((slice(0, split), slice(split, None))):
            scale = float(layer.tensors["act_scale"][part])
            zero_point = int(layer.tensors["act_zero_point"][part])
            expected = torch.fake_quantize_per_tensor_affine(
                x[:, channels], scale, zero_point, q_min, q_max
            )
            assert torch.equal(quantized[:, channels], expected), (name, part)
            assert torch.unique(quantized[:, channels]).numel() <= 2**a_bits
            weight_scale = layer.tensors["weight_scale"][part]
            zeros = torch.zeros_like(weight_scale, dtype=torch.int32)
            expected_weight = torch.fake_quantize_per_channel_affine(
                weight[:, channels], weight_scale, zeros, 0, w_min, w_max
            )
            assert torch.equal(wrapper.qweight[:, channels], expected_weight), (name, part)
        # The two parts have different ranges: the split is used, not duplicated.
        assert layer.tensors["act_scale"][0] != layer.tensors["act_scale"][1]


def test_split_beats_no_split_on_layer_output_sqnr(unet_run):
    figures = {}
    for split_skip in (False, True):
        loaded, _ = _quantized(unet_run, w_bits=8, a_bits=4, split_skip=split_skip)
        splits = skip_splits(loaded.denoiser)
        wrappers = dict(quant_wrappers(loaded.denoiser))
        # Inputs of the float model: each layer is measured on the same data either way.
        inputs = _layer_inputs(load_model(MODEL), splits)
        with torch.no_grad():
            figures[split_skip] = {
                name: float(sqnr_db(wrappers[name].module(x), wrappers[name](x)))
                for name, x in inputs.items()
            }
    mean = {k: sum(v.values()) / len(v) for k, v in figures.items()}
    print(f"layer-output SQNR (dB) at W8A4, no split / split: {mean[False]:.2f} / {mean[True]:.2f}")
    for name in figures[True]:
        print(f"  {name}: {figures[False][name]:.2f} / {figures[True][name]:.2f}")
    assert mean[True] > mean[False], figures


@pytest.mark.parametrize("granularity", ["tensor", "timestep_group", "token"])
def test_export_and_reload_reproduce_the_split_model(unet_run, tmp_path, granularity):
    loaded, record = _quantized(
        unet_run, w_bits=4, a_bits=4, split_skip=True, granularity=granularity
    )
    expected_act = {"tensor": "static", "timestep_group": "group", "token": "dynamic"}
    split_records = [r for r in record.layers if r.builder == "split"]
    assert split_records and all(r.act == expected_act[granularity] for r in split_records)
    if granularity == "timestep_group":
        groups = len(split_records[0].info["groups"])
        assert split_records[0].tensors["act_scale"].shape == (2, groups)
    inputs = _probe_inputs(loaded)
    out = _forward(loaded, inputs)
    record.save(tmp_path / "rec")
    meta = json.loads((tmp_path / "rec" / "record.json").read_text())
    assert meta["config"]["split_skip"] is True
    fresh = load_model(MODEL)
    apply_record(fresh, load_record(tmp_path / "rec"))
    assert isinstance(dict(quant_wrappers(fresh.denoiser))[split_records[0].layer], QuantWrapper)
    assert torch.equal(_forward(fresh, inputs), out)


def test_split_off_when_quantization_is_disabled(unet_run):
    loaded, _ = _quantized(unet_run, w_bits=4, a_bits=4, split_skip=True)
    inputs = _probe_inputs(loaded)
    for _, wrapper in quant_wrappers(loaded.denoiser):
        wrapper.enabled = False
    assert torch.equal(_forward(loaded, inputs), _forward(load_model(MODEL), inputs))


def test_percentile_layers_are_not_split_and_say_why(unet_run):
    loaded = load_model(MODEL)
    record = quantize_(
        loaded, QuantConfig(method="percentile", a_bits=4, split_skip=True), stats=unet_run
    )
    skipped = record.summary()["split_skip"]["skipped"]
    assert set(skipped) == set(skip_splits(loaded.denoiser))
    assert all("percentile" in why for why in skipped.values())
    assert not any(r.builder == "split" for r in record.layers)


def test_part_ranges_need_per_channel_rules(unet_run):
    loaded = load_model(MODEL)
    layers = leaf_layers(loaded.denoiser)
    config = QuantConfig(method="percentile", a_bits=4)
    ctx = QuantContext(loaded, loaded.denoiser, unet_run, None, config, None, layers, {})
    name = next(iter(skip_splits(loaded.denoiser)))
    lo, hi = uniform_range(ctx, name, "minmax", channels=slice(0, 4))
    full_lo, full_hi = uniform_range(ctx, name, "minmax")
    assert full_lo <= lo <= hi <= full_hi
    with pytest.raises(UserError, match="'minmax' or 'mse'"):
        uniform_range(ctx, name, "percentile", channels=slice(0, 4))


def test_split_skip_on_a_dit_quantizes_normally():
    run = tiny_run("tiny-wan")
    records = {}
    for split_skip in (False, True):
        config = QuantConfig(method="mse", a_bits=4, split_skip=split_skip)
        records[split_skip] = quantize_(load_model("tiny-wan"), config, stats=run)
    plain, split = records[False], records[True]
    assert [r.builder for r in split.layers] == ["standard"] * len(split.layers)
    for a, b in zip(plain.layers, split.layers):
        assert a.layer == b.layer and a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert "skip-connection" in split.summary()["split_skip"]["note"]
    assert "split_skip" not in plain.summary()


# --------------------------------------------------------------------------- CLI


def test_cli_split_skip_and_granularity(unet_run, tmp_path, capsys):
    args = ["quantize", "--stats", unet_run.path, "--method", "mse", "--bits", "W8A4"]
    code = main(
        [*map(str, args), "--split-skip", "--granularity", "token", "--out", str(tmp_path / "r")]
    )
    assert code == 0
    printed = capsys.readouterr().out
    splits = len(skip_splits(load_model(MODEL).denoiser))
    assert f"split skip concatenations: {splits} layers split" in printed
    config = json.loads((tmp_path / "r" / "record.json").read_text())["config"]
    assert config["split_skip"] is True and config["granularity"] == "token"
    code = main([*map(str, args), "--granularity", "tokens", "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "granularity must be one of" in err
