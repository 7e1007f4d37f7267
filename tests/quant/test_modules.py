from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qvd_bench.errors import UserError
from qvd_bench.models.sampling import CallTracker
from qvd_bench.numerics import grid as G
from qvd_bench.quant import modules as M
from qvd_bench.quant import observers as O
from qvd_bench.quant import primitives as P


def _layers():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(12, 7), (2, 5, 12)),
        "conv1d": (nn.Conv1d(6, 5, 3, padding=1), (2, 6, 9)),
        "conv2d": (nn.Conv2d(6, 5, 3, padding=1, padding_mode="reflect"), (2, 6, 7, 7)),
        "conv3d": (nn.Conv3d(4, 3, (1, 3, 3), padding=(0, 1, 1), bias=False), (1, 4, 2, 5, 5)),
    }


LAYERS = list(_layers())


def _layer(kind):
    module, shape = _layers()[kind]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    return module, x


def _static(x, bits):
    scale, zero_point = G.affine_qparams(x.min(), x.max(), bits)
    return M.StaticActQuant(scale, zero_point, bits)


def _capture(wrapper):
    """Records the input that reaches the wrapped computation (after the act quantizer)."""
    seen = []
    handle = wrapper.act.register_forward_hook(lambda m, args, out: seen.append(out))
    return seen, handle


# --------------------------------------------------------------------------- passthrough and accuracy


@pytest.mark.parametrize("kind", LAYERS)
def test_disabled_is_exact_passthrough(kind):
    module, x = _layer(kind)
    wrapper = M.QuantWrapper(module, 4, _static(x, 4))
    wrapper.enabled = False
    assert torch.equal(wrapper(x), module(x))
    assert torch.equal(wrapper(input=x), module(x))
    assert wrapper.original is module and wrapper.module is module


@pytest.mark.parametrize("kind", LAYERS)
def test_w16a16_sqnr(kind):
    module, x = _layer(kind)
    wrapper = M.QuantWrapper(module, 16, _static(x, 16))
    with torch.no_grad():
        assert float(P.sqnr_db(module(x), wrapper(x))) > 60


@pytest.mark.parametrize("kind", LAYERS)
def test_w8a8_static_matches_the_primitives(kind):
    module, x = _layer(kind)
    act = _static(x, 8)
    wrapper = M.QuantWrapper(module, 8, act)
    scale, zp = O.weight_qparams(module.weight, 8)
    wq = P.fake_quant_affine(module.weight, scale, zp, 8, axis=0, symmetric=True)
    xq = P.fake_quant_affine(x, act.scale, act.zero_point, 8)
    with torch.no_grad():
        expected = (
            F.linear(xq, wq, module.bias)
            if kind == "linear"
            else module._conv_forward(xq, wq, module.bias)
        )
        assert torch.equal(wrapper(input=x), expected)
        assert float(P.sqnr_db(module(x), wrapper(x))) > 25
    assert torch.equal(wrapper.qweight, wq)
    assert wrapper.weight_scale.shape == (module.out_channels if kind != "linear" else 7,)


def test_weights_only_and_overrides():
    module, x = _layer("linear")
    wrapper = M.QuantWrapper(module, 6)
    assert wrapper.act is None
    scale, zp = O.weight_qparams(module.weight, 6)
    wq = P.fake_quant_affine(module.weight, scale, zp, 6, axis=0, symmetric=True)
    with torch.no_grad():
        assert torch.equal(wrapper(x), F.linear(x, wq, module.bias))
    # Weight bits None: the module's own float weight, live.
    plain = M.QuantWrapper(module)
    with torch.no_grad():
        assert torch.equal(plain(x), module(x))
    # A replacement weight and bias are used (and quantized) instead of the module's.
    weight, bias = module.weight.detach() * 2, torch.ones(7)
    swapped = M.QuantWrapper(module, None, weight=weight, bias=bias)
    with torch.no_grad():
        assert torch.allclose(swapped(x), F.linear(x, weight, bias))
    mse = M.QuantWrapper(module, 4, weight_method="mse")
    assert torch.all(mse.weight_scale <= M.QuantWrapper(module, 4).weight_scale * (1 + 1e-6))
    with pytest.raises(UserError):
        M.QuantWrapper(module, 8, weight=torch.zeros(3, 3))


def test_only_linear_and_conv():
    with pytest.raises(UserError):
        M.QuantWrapper(nn.ConvTranspose2d(2, 2, 3))
    with pytest.raises(UserError):
        M.QuantWrapper(M.QuantWrapper(nn.Linear(2, 2)))
    with pytest.raises(UserError):
        M.QuantWrapper(nn.Linear(2, 2), 17)


# --------------------------------------------------------------------------- distinct values


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_quantized_inputs_have_at_most_2b_values(bits, kind):
    module, x = _layer(kind)
    channel_dim = -1 if kind == "linear" else 1
    levels = G.signed_log_levels(float(x.abs().max()), bits, 2**0.5)
    for act in (_static(x, bits), M.DynamicTokenActQuant(bits), M.LevelActQuant(levels)):
        wrapper = M.QuantWrapper(module, bits, act)
        seen, handle = _capture(wrapper)
        with torch.no_grad():
            wrapper(x)
        handle.remove()
        xq = seen[0]
        if isinstance(act, M.DynamicTokenActQuant):
            tokens = xq.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
            assert max(t.unique().numel() for t in tokens) <= 2**bits
            assert torch.equal(xq, P.fake_quant_dynamic_per_token(x, bits, channel_dim))
        else:
            assert xq.unique().numel() <= 2**bits
        if isinstance(act, M.LevelActQuant):
            assert set(xq.unique().tolist()) <= set(levels.float().tolist())


def test_level_quantizer_float64_input():
    levels = G.mixed_levels(-0.278, 4.0, 3, 0.5, 4)
    act = M.LevelActQuant(levels)
    x = torch.linspace(-1, 5, 50, dtype=torch.float64)
    assert torch.equal(act(x), G.fake_quant_levels(x, levels))
    assert act.bits == 3


# --------------------------------------------------------------------------- timestep groups


def _group_quantizer(tracker, bits=4):
    groups = P.timestep_groups([999, 750, 500, 250, 1], 2)  # [999, 750, 500] [250, 1]
    scale = torch.tensor([0.5, 0.01])
    zero_point = torch.tensor([3, 8])
    return M.GroupActQuant(scale, zero_point, bits, groups, tracker, name="blk.proj"), groups


def test_group_quantizer_uses_the_right_group():
    tracker = SimpleNamespace(current=None)
    act, _ = _group_quantizer(tracker)
    module, x = _layer("linear")
    wrapper = M.QuantWrapper(module, None, act)
    for t, g in ((999.0, 0), (500.0, 0), (620.0, 0), (250.0, 1), (3.0, 1), (260.0, 1)):
        tracker.current = SimpleNamespace(timestep=t)
        scale, zero_point = act.scale[g], act.zero_point[g]
        xq = P.fake_quant_affine(x, scale, zero_point, 4)
        with torch.no_grad():
            assert torch.equal(wrapper(x), F.linear(xq, module.weight, module.bias))
        assert act.group() == g
    tracker.current = None
    with pytest.raises(RuntimeError, match="blk.proj"):
        wrapper(x)


class _Denoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, sample, timestep):
        return self.proj(sample)


def test_group_quantizer_with_a_call_tracker():
    torch.manual_seed(0)
    denoiser = _Denoiser()
    tracker = CallTracker(denoiser).attach()
    act, _ = _group_quantizer(tracker, bits=8)
    M.swap_module(denoiser, "proj", M.QuantWrapper(denoiser.proj, 8, act))
    x = torch.randn(1, 3, 8)
    with torch.no_grad():
        denoiser(x, timestep=torch.tensor([990]))
        assert act.group() == 0
        denoiser(x, timestep=torch.tensor([10]))
        assert act.group() == 1
    tracker.detach()
    with pytest.raises(RuntimeError):
        denoiser(x, timestep=torch.tensor([10]))


def test_group_quantizer_checks_table_size():
    groups = P.timestep_groups([3, 2, 1], 3)
    with pytest.raises(UserError):
        M.GroupActQuant(torch.ones(2), torch.zeros(2), 8, groups, None)


# --------------------------------------------------------------------------- state and surgery


def test_static_quantizer_state_dict_round_trip():
    a = M.StaticActQuant(0.1, 5, 8)
    b = M.StaticActQuant(1.0, 0, 8)
    b.load_state_dict(a.state_dict())
    x = torch.linspace(-2, 2, 30)
    assert torch.equal(a(x), b(x))
    with pytest.raises(UserError):
        M.StaticActQuant(0.1, 300, 8)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.SiLU(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4 * 25, 6)),
    )


def test_swap_and_unwrap_restore_the_model():
    model = _model()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        reference = model(x)
    originals = {name: m for name, m in model.named_modules() if name}
    for name in ("0", "2.0", "2.2"):
        old = M.swap_module(model, name, M.QuantWrapper(model.get_submodule(name), 4))
        assert old is originals[name]
    assert [n for n, _ in M.quant_wrappers(model)] == ["0", "2.0", "2.2"]
    with torch.no_grad():
        assert not torch.equal(model(x), reference)
        M.set_enabled(model, False)
        assert torch.equal(model(x), reference)
        M.set_enabled(model, True)
    assert M.unwrap(model) is model
    assert not list(M.quant_wrappers(model))
    assert {name: m for name, m in model.named_modules() if name} == originals
    with torch.no_grad():
        assert torch.equal(model(x), reference)
    linear = nn.Linear(2, 2)
    assert M.unwrap(M.QuantWrapper(linear, 8)) is linear


def test_swap_module_unknown_name():
    model = _model()
    for name in ("", "3", "2.7", "0.weight", "nope.0"):
        with pytest.raises(UserError):
            M.swap_module(model, name, nn.Identity())


def test_static_quantizer_dtypes():
    x = torch.linspace(-3, 5, 101)
    act = M.StaticActQuant(*G.affine_qparams(-3.0, 5.0, 4), 4)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        out = act(x.to(dtype))
        ref = P.fake_quant_affine(x.to(dtype), act.scale, act.zero_point, 4)
        assert out.dtype == dtype and torch.equal(out, ref)
        assert out.unique().numel() <= 16
