"""The one-pass activation kernels give the PyTorch path's numbers bit for bit."""

import copy
import math

import pytest
import torch
from torch import nn

from qvd_bench.numerics import grid as G
from qvd_bench.numerics.kernels import KERNELS_ENV
from qvd_bench.quant import fused
from qvd_bench.quant import primitives as P
from qvd_bench.quant.modules import GroupActQuant, QuantWrapper, StaticActQuant, _pad_with

# 8-bit codes 0..255 around zero point 128, and a 4-bit grid: (scale, zero point, bits).
QPARAMS = [(0.037, 128, 8), (0.31, 3, 4)]


def torch_path(monkeypatch):
    """Runs what follows on PyTorch's operations only."""
    monkeypatch.setenv(KERNELS_ENV, "torch")


def awkward(shape, seed=0, scale=3.0):
    """Values with NaN, ±Inf, exact half-steps (ties) and out-of-range entries."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    flat = x.view(-1)
    flat[::97] = math.nan
    flat[5::101] = math.inf
    flat[7::103] = -math.inf
    flat[11::89] = 0.037 * (torch.arange(flat[11::89].numel()) - 40.5)  # ties at 8 bits
    flat[13::83] = 1e30
    return x


def same(a, b):
    """Bitwise equality, NaN included."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize(("scale", "zero_point", "bits"), QPARAMS)
def test_fake_quant_equals_torch_reference(scale, zero_point, bits):
    x = awkward((3, 5, 37))
    q_min, q_max = G.quant_range(bits)
    got = fused.fake_quant(x, P.per_tensor_constants(scale, zero_point, q_min, q_max))
    finite = torch.isfinite(x)
    ref = torch.fake_quantize_per_tensor_affine(x[finite], scale, zero_point, q_min, q_max)
    assert torch.equal(got[finite], ref)
    assert bool(got[x.isnan()].isnan().all())
    low, high = (q_min - zero_point) * scale, (q_max - zero_point) * scale
    assert bool((got[x == math.inf] == torch.tensor(high).float()).all())
    assert bool((got[x == -math.inf] == torch.tensor(low).float()).all())


@pytest.mark.parametrize(("scale", "zero_point", "bits"), QPARAMS)
def test_static_quantizer_fused_equals_torch_path(scale, zero_point, bits, monkeypatch):
    x = awkward((2, 6, 4, 9))
    act = StaticActQuant(scale, zero_point, bits)
    got = act(x, 1)
    torch_path(monkeypatch)
    assert same(got, act(x, 1))


def _transform_case(shape, channel_dim, seed=1):
    channels = shape[channel_dim]
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(channels, generator=g, dtype=torch.float64)
    scale = torch.rand(channels, generator=g, dtype=torch.float64) * 3 + 0.25
    return awkward(shape, seed), shift, scale


LAYER_CASES = {
    "linear": (nn.Linear(7, 5), (3, 4, 7)),
    "conv1d": (nn.Conv1d(6, 4, 3, padding=2), (2, 6, 9)),
    "conv2d": (nn.Conv2d(6, 4, 3, padding=1), (2, 6, 5, 7)),
    "conv2d-asym": (nn.Conv2d(6, 4, (3, 1), padding=(2, 0)), (2, 6, 5, 7)),
    "conv3d": (nn.Conv3d(5, 4, 3, padding=1), (2, 5, 3, 4, 6)),
    "conv3d-frames": (nn.Conv3d(5, 4, (3, 1, 1), padding=(1, 0, 0)), (2, 5, 4, 3, 3)),
    "conv2d-unpadded": (nn.Conv2d(6, 4, 3), (2, 6, 5, 7)),
}


def _quantizers(tracker):
    groups = [[999.0, 800.0], [500.0], [1.0]]
    scales = torch.tensor([0.05, 0.021, 0.3])
    return {
        "none": None,
        "static": StaticActQuant(0.037, 120, 8),
        "group": GroupActQuant(scales, torch.tensor([128, 7, 2]), 8, groups, tracker),
        "static-4bit": StaticActQuant(0.4, 6, 4),
    }


class _Tracker:
    current = type("Call", (), {"timestep": 500.0})()


@pytest.mark.parametrize("layer", list(LAYER_CASES))
@pytest.mark.parametrize("quantizer", ["none", "static", "group", "static-4bit"])
def test_transformed_layer_fused_equals_torch_path(layer, quantizer, monkeypatch):
    """(x − z)/s, quantized, padded: the wrapper's output is the PyTorch path's, bit for bit."""
    torch.manual_seed(0)
    module, shape = LAYER_CASES[layer]
    module = copy.deepcopy(module)
    channel_dim = -1 if isinstance(module, nn.Linear) else 1
    x, shift, scale = _transform_case(shape, channel_dim)
    x = torch.nan_to_num(x, nan=0.5, posinf=7.0, neginf=-9.0)  # the layer mixes values
    act = _quantizers(_Tracker())[quantizer]
    weight = module.weight.detach() * scale.float().reshape(1, -1, *[1] * (module.weight.ndim - 2))
    wrapper = QuantWrapper(module, 8, act, weight=weight)
    wrapper.set_input_transform(shift, scale)
    assert fused.covers(x)
    got_input, got_bias = wrapper._transformed(x, act)
    got = wrapper(x)
    torch_path(monkeypatch)
    assert not fused.covers(x)
    ref_input, ref_bias = wrapper._transformed(x, act)
    assert same(got_input, ref_input) and torch.equal(got_bias, ref_bias)
    assert same(got, wrapper(x))


@pytest.mark.parametrize("pads", [[1, 1, 1, 1], [0, 0, 2, 1], [3, 0, 0, 0], [1, 2, 0, 0, 2, 1]])
def test_transform_pads_like_pad_with(pads):
    """The padded kernel against the PyTorch pieces on raw inputs, NaN and ±Inf included."""
    shape = (2, 3, 4, 5) if len(pads) == 4 else (2, 3, 4, 3, 5)
    x, shift, scale = _transform_case(shape, 1, seed=4)
    view = [1, -1] + [1] * (len(shape) - 2)
    z, s = shift.float().reshape(view), scale.float().reshape(view)
    constants = P.per_tensor_constants(0.05, 100, 0, 255)
    fill = P.fake_quant_constants(-z / s, constants)
    got = fused.transform(x, 1, z, s, constants, pads, fill)
    ref = _pad_with(P.fake_quant_constants((x - z) / s, constants), pads, fill)
    assert same(got, ref)


def test_subclass_with_its_own_forward_is_not_fused():
    class Halving(StaticActQuant):
        def forward(self, x, channel_dim=-1):
            return super().forward(x, channel_dim) / 2

    assert StaticActQuant(0.1, 3, 8).current_constants() is not None
    assert Halving(0.1, 3, 8).current_constants() is None
    module = nn.Linear(4, 3)
    x, shift, scale = _transform_case((5, 4), -1)
    x = torch.nan_to_num(x)
    wrapper = QuantWrapper(module, None, Halving(0.1, 128, 8), weight=module.weight.detach())
    wrapper.set_input_transform(shift, scale)
    quantized, _ = wrapper._transformed(x, wrapper.act)
    z, s = shift.float(), scale.float()
    expected = P.fake_quant_constants((x - z) / s, P.per_tensor_constants(0.1, 128, 0, 255)) / 2
    assert same(quantized, expected)


def test_covers_only_contiguous_float32_cpu_inference(monkeypatch):
    x = torch.randn(4, 6)
    assert fused.covers(x)
    assert not fused.covers(x.t())
    assert not fused.covers(x.double())
    assert not fused.covers(torch.empty(0, 6))
    leaf = x.clone().requires_grad_()
    assert not fused.covers(leaf)
    with torch.no_grad():
        assert fused.covers(leaf)
    torch_path(monkeypatch)
    assert not fused.covers(x)


def test_non_contiguous_input_takes_the_torch_path():
    """A transposed Linear input (diffusers hands some over) still gives the right numbers."""
    module = nn.Linear(6, 4)
    x, shift, scale = _transform_case((6, 5, 3), 0)
    x = torch.nan_to_num(x).transpose(0, 2)  # (3, 5, 6), channels last, not contiguous
    act = StaticActQuant(0.05, 128, 8)
    wrapper = QuantWrapper(module, None, act, weight=module.weight.detach() * scale.float())
    wrapper.set_input_transform(shift, scale)
    got, _ = wrapper._transformed(x, act)
    expected = act((x - shift.float()) / scale.float())
    assert same(got, expected)


def test_temporal_conv_padding_fused(monkeypatch):
    """A k×1×1 Conv3d with a transform: the fused padded input gives the same output."""
    torch.manual_seed(2)
    conv = nn.Conv3d(4, 6, (3, 1, 1), padding=(1, 0, 0))
    x, shift, scale = _transform_case((2, 4, 5, 3, 3), 1, seed=6)
    x = torch.nan_to_num(x)
    weight = conv.weight.detach() * scale.float().view(1, -1, 1, 1, 1)
    wrapper = QuantWrapper(conv, 8, StaticActQuant(0.02, 100, 8), weight=weight)
    wrapper.set_input_transform(shift, scale)
    got = wrapper(x)
    torch_path(monkeypatch)
    assert same(got, wrapper(x))


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_transform_rounds_each_operation_like_torch(bits, channel_dim):
    """Many values on a fine grid: any change of rounding (a reciprocal for the division,
    a fused multiply-add) would flip some codes."""
    shape = (4, 24, 32, 32) if channel_dim == 1 else (4096, 24)
    x, shift, scale = _transform_case(shape, channel_dim, seed=bits)
    view = [1] * len(shape)
    view[channel_dim] = -1
    z, s = shift.float().reshape(view), scale.float().reshape(view)
    q_min, q_max = G.quant_range(bits)
    constants = P.per_tensor_constants(6.0 / (q_max - q_min), (q_max + 1) // 2, q_min, q_max)
    for quantized in (constants, None):
        got = fused.transform(x, channel_dim, z, s, quantized)
        ref = (x - z) / s
        if quantized is not None:
            ref = P.fake_quant_constants(ref, quantized)
        assert same(got, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_takes_the_torch_path_in_float32(dtype):
    """Half-precision inputs fall back to PyTorch, quantized with float32 arithmetic and
    cast back: the float32 result of the same values, rounded to the dtype."""
    x = awkward((2, 6, 4, 9)).nan_to_num().to(dtype)
    assert not fused.covers(x)
    act = StaticActQuant(0.037, 120, 8)
    got = act(x, 1)
    assert got.dtype == dtype and torch.equal(got, act(x.float(), 1).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", ["linear", "conv3d"])
@pytest.mark.parametrize("quantizer", ["static", "group"])
def test_wrapper_off_the_cpu_takes_the_torch_path(layer, quantizer, dtype):
    """A layer on another device (the meta device stands for CUDA here: no data, so no
    NumPy kernel can touch it) runs the PyTorch path end to end in the model's dtype."""
    module, shape = LAYER_CASES[layer]
    channel_dim = -1 if isinstance(module, nn.Linear) else 1
    _, shift, scale = _transform_case(shape, channel_dim)
    act = _quantizers(_Tracker())[quantizer]
    module = copy.deepcopy(module).to(dtype)  # a model loaded in its dtype, then quantized
    wrapper = QuantWrapper(module, 8, act, weight=module.weight.detach())
    wrapper.set_input_transform(shift, scale)
    wrapper = wrapper.to("meta")  # as quantize_ places a wrapper on its layer's device
    assert act.scale.dtype == torch.float32  # the scale arithmetic stays in float32
    x = torch.empty(shape, device="meta", dtype=dtype)
    assert not fused.covers(x)
    out = wrapper(x)
    assert out.device.type == "meta" and out.dtype == dtype
