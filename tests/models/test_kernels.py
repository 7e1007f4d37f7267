"""The fast CPU kernels agree with PyTorch's operations and stay out of everything else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qvd_bench.models import kernels
from qvd_bench.models.kernels import (
    KEY_BLOCK,
    PADDED_KEYS_MAX,
    SHORT_HEAD_CHANNELS,
    SHORT_KEYS,
    TORCH_SDPA,
    FrameConv3d,
    frame_conv3d,
    short_attention,
    use_fast_kernels,
)
from qvd_bench.models.zoo import load_model
from tests.models.test_zoo import PRESETS, small_inputs


def heads_layout(batch, heads, length, channels, generator, dtype=torch.float64):
    """(B, H, L, E) as diffusers' processors make it: a transposed view of (B, L, H, E)."""
    x = torch.randn(batch, length, heads, channels, generator=generator, dtype=dtype)
    return x.transpose(1, 2)


@pytest.mark.parametrize(
    ("length", "keys", "channels", "value_channels", "scale"),
    [(8, 8, 4, 4, None), (8, 8, 8, 8, None), (5, 3, 4, 6, 0.3), (1, 1, 1, 1, None)],
)
def test_short_attention_matches_torch(length, keys, channels, value_channels, scale):
    g = torch.Generator().manual_seed(length * 100 + keys)
    q = heads_layout(3, 2, length, channels, g)
    k = heads_layout(3, 2, keys, channels, g)
    v = heads_layout(3, 2, keys, value_channels, g)
    got = short_attention(q, k, v, scale=scale)
    want = TORCH_SDPA(q, k, v, scale=scale)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_short_attention_takes_float32_and_any_leading_dims():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 4, 8, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(short_attention(q, k, v), TORCH_SDPA(q, k, v))
    q3, k3, v3 = (torch.randn(6, 8, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(short_attention(q3, k3, v3), TORCH_SDPA(q3, k3, v3))


def _spy(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return TORCH_SDPA(*args, **kwargs)

    monkeypatch.setattr(kernels, "TORCH_SDPA", spy)
    return calls


@pytest.mark.parametrize(
    "case",
    ["long", "wide", "mask", "causal", "dropout", "grad", "broadcast", "half"],
)
def test_short_attention_hands_what_it_does_not_cover_to_torch(monkeypatch, case):
    g = torch.Generator().manual_seed(2)
    keys = SHORT_KEYS + 1 if case == "long" else SHORT_KEYS
    channels = SHORT_HEAD_CHANNELS + 1 if case == "wide" else 4
    q = torch.randn(2, 2, keys, channels, generator=g)
    k = torch.randn(1 if case == "broadcast" else 2, 2, keys, channels, generator=g)
    v = torch.randn(k.shape, generator=g)
    kwargs = {}
    if case == "mask":
        kwargs["attn_mask"] = torch.ones(keys, keys, dtype=torch.bool).tril()
    if case == "causal":
        kwargs["is_causal"] = True
    if case == "dropout":
        kwargs["dropout_p"] = 0.5
        torch.manual_seed(0)
    if case == "grad":
        q.requires_grad_(True)
    if case == "half":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    calls = _spy(monkeypatch)
    if case == "dropout":
        short_attention(q, k, v, **kwargs)
    else:
        torch.testing.assert_close(
            short_attention(q, k, v, **kwargs), TORCH_SDPA(q, k, v, **kwargs)
        )
    assert len(calls) == 1
    assert all(calls[0][name] == value for name, value in kwargs.items() if name != "attn_mask")


def test_short_attention_computes_covered_calls_itself(monkeypatch):
    calls = _spy(monkeypatch)
    q = torch.randn(2, 2, SHORT_KEYS, SHORT_HEAD_CHANNELS)
    short_attention(q, q, q)
    assert calls == []


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "groups"),
    [(3, 1, 1, 1, 1), (3, 2, 1, 1, 1), (2, 1, 0, 2, 2), (1, 1, 0, 1, 4), (3, 1, 2, 1, 1)],
)
def test_frame_conv_matches_conv3d(kernel, stride, padding, dilation, groups):
    g = torch.Generator().manual_seed(kernel + 10 * stride)
    conv = nn.Conv3d(
        4,
        8,
        (kernel, 1, 1),
        stride=(stride, 1, 1),
        padding=(padding, 0, 0),
        dilation=(dilation, 1, 1),
        groups=groups,
    ).double()
    x = torch.randn(2, 4, 7, 3, 5, generator=g, dtype=torch.float64)
    want = conv(x)
    assert kernels.is_frame_conv(conv)
    got = frame_conv3d(x, conv.weight, conv.bias, stride, padding, dilation, groups)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    conv.__class__ = FrameConv3d
    torch.testing.assert_close(conv(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv(x[0]), want[0], rtol=1e-12, atol=1e-12)  # unbatched


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv3d(4, 4, (3, 3, 3), padding=1),
        nn.Conv3d(4, 4, (3, 1, 1), stride=(1, 2, 1)),
        nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 1, 0)),
        nn.Conv3d(4, 4, (3, 1, 1), padding="same"),
        nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0), padding_mode="replicate"),
        nn.Conv2d(4, 4, (3, 1)),
    ],
)
def test_other_convs_are_not_frame_convs(conv):
    assert not kernels.is_frame_conv(conv)
    assert use_fast_kernels(nn.Sequential(conv)) == 0
    assert type(conv) in (nn.Conv3d, nn.Conv2d)


class _Attending(nn.Module):
    """Looks the attention function up at call time, as diffusers' processors do."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail = fail
        self.seen = []

    def forward(self, x):
        self.seen.append(F.scaled_dot_product_attention)
        if self.fail:
            raise RuntimeError("boom")
        return F.scaled_dot_product_attention(x, x, x)


def test_denoiser_calls_route_attention_and_restore_it():
    inner, outer = _Attending(), _Attending()
    model = nn.Sequential(outer)
    use_fast_kernels(model)
    use_fast_kernels(model)  # idempotent: one pair of hooks
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    x = torch.randn(2, 3, 8, 4)
    torch.testing.assert_close(model(x), TORCH_SDPA(x, x, x))
    assert outer.seen == [short_attention]
    assert F.scaled_dot_product_attention is TORCH_SDPA
    # Nested denoiser calls restore once, at the outermost end.
    nested = nn.Sequential(nn.Sequential(inner))
    use_fast_kernels(nested)
    use_fast_kernels(nested[0])
    nested(x)
    assert inner.seen == [short_attention]
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_route_is_restored_when_the_forward_raises():
    model = nn.Sequential(_Attending(fail=True))
    use_fast_kernels(model)
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(1, 1, 2, 2))
    assert F.scaled_dot_product_attention is TORCH_SDPA
    ok = nn.Sequential(_Attending())
    use_fast_kernels(ok)
    ok(torch.randn(1, 1, 2, 2))
    assert ok[0].seen == [short_attention]


def test_an_existing_reroute_wins(monkeypatch):
    def other(*args, **kwargs):
        return TORCH_SDPA(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", other)
    model = nn.Sequential(_Attending())
    use_fast_kernels(model)
    model(torch.randn(1, 1, 2, 2))
    assert model[0].seen == [other]
    assert F.scaled_dot_product_attention is other


@pytest.mark.parametrize("name", PRESETS)
def test_presets_give_the_same_output_with_and_without_fast_kernels(monkeypatch, name):
    fast = load_model(name, dtype=torch.float64)
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    plain = load_model(name, dtype=torch.float64)
    assert not any(isinstance(m, FrameConv3d) for m in plain.denoiser.modules())
    assert not plain.denoiser._forward_pre_hooks
    assert fast.denoiser.state_dict().keys() == plain.denoiser.state_dict().keys()
    latents, text, conditioning = small_inputs(fast, batch=2)
    latents, text = latents.double(), text.double()
    conditioning = {
        key: value.double() if value.is_floating_point() else value
        for key, value in conditioning.items()
    }
    timesteps = torch.tensor([100.0, 800.0], dtype=torch.float64)
    with torch.no_grad():
        got = fast.family.forward(fast.denoiser, latents, timesteps, text, conditioning)
        want = plain.family.forward(plain.denoiser, latents, timesteps, text, conditioning)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_unet3d_temporal_convs_become_frame_convs():
    denoiser = load_model("tiny-unet3d").denoiser
    frame_convs = [n for n, m in denoiser.named_modules() if isinstance(m, FrameConv3d)]
    temporal = [
        n for n, m in denoiser.named_modules() if isinstance(m, nn.Conv3d) and "temp_convs" in n
    ]
    assert frame_convs and frame_convs == temporal


@pytest.mark.parametrize(("keys", "channels"), [(77, 4), (9, 8), (50, 1), (PADDED_KEYS_MAX - 1, 4)])
def test_padded_keys_match_torch(keys, channels, monkeypatch):
    """Narrow heads over a key count off the KEY_BLOCK grid: PyTorch's kernel on keys padded
    with masked zeros, the same attention to float32 rounding."""
    g = torch.Generator().manual_seed(keys)
    q = heads_layout(2, 3, 40, channels, g, torch.float32)
    k = heads_layout(2, 3, keys, channels, g, torch.float32) * 3
    v = heads_layout(2, 3, keys, channels, g, torch.float32)
    calls = _spy(monkeypatch)
    got = short_attention(q, k, v)
    assert len(calls) == 1
    assert calls[0]["attn_mask"].shape == (1, keys - keys % -KEY_BLOCK)
    assert int(calls[0]["attn_mask"].sum()) == keys
    want = TORCH_SDPA(q.double(), k.double(), v.double()).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["block", "wide", "double", "mask", "many", "short"])
def test_keys_are_padded_only_where_it_pays(case, monkeypatch):
    keys = {"block": 2 * KEY_BLOCK, "many": PADDED_KEYS_MAX + 1, "short": SHORT_KEYS}.get(case, 77)
    channels = SHORT_HEAD_CHANNELS + 1 if case == "wide" else 4
    dtype = torch.float64 if case == "double" else torch.float32
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 16, channels, generator=g, dtype=dtype)
    k = torch.randn(2, 2, keys, channels, generator=g, dtype=dtype)
    v = torch.randn(2, 2, keys, channels, generator=g, dtype=dtype)
    kwargs = {"attn_mask": torch.ones(16, keys, dtype=torch.bool)} if case == "mask" else {}
    calls = _spy(monkeypatch)
    torch.testing.assert_close(short_attention(q, k, v, **kwargs), TORCH_SDPA(q, k, v, **kwargs))
    assert all(c.get("attn_mask") is None or c["attn_mask"].shape[-1] == keys for c in calls)
