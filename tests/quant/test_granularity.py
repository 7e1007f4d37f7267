"""Activation granularity as a method option: dynamic per-token quantizers."""

from __future__ import annotations

import pytest
import torch

from qvd_bench.models.zoo import load_run_model
from qvd_bench.quant.apply import quantize_
from qvd_bench.quant.config import QuantConfig
from qvd_bench.quant.methods import METHODS
from qvd_bench.quant.modules import DynamicTokenActQuant, quant_wrappers
from qvd_bench.quant.observers import token_clip_ratio
from tests.quant.helpers import end_to_end_sqnr, out_of_scope, tiny_run, tiny_stats


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("model", ["tiny-unet3d", "tiny-wan"])
def test_dynamic_per_token_beats_static_per_tensor_at_a4(model, seed):
    run = tiny_run(model, seed)
    figures = {
        granularity: end_to_end_sqnr(
            run, model, QuantConfig("mse", 8, 4, granularity=granularity), seed=seed
        )
        for granularity in ("tensor", "token")
    }
    print(f"{model} seed {seed} W8A4 end-to-end SQNR (dB): {figures}")
    assert figures["token"] > figures["tensor"], figures


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"fp"}))
def test_every_method_honours_token_granularity(method):
    run = tiny_stats()
    keep = out_of_scope(run)
    loaded = load_run_model(run)
    config = QuantConfig(method, 8, 8, granularity="token", keep_fp_layers=keep)
    record = quantize_(loaded, config, stats=run)
    assert record.config.granularity == "token"
    temporal = set(run.temporal["layer"].astype(str))
    wrappers = dict(quant_wrappers(loaded.denoiser))
    quantized = [layer for layer in record.layers if layer.act != "none"]
    assert quantized
    for layer in quantized:
        if layer.act == "dynamic":
            assert isinstance(wrappers[layer.layer].act, DynamicTokenActQuant)
        else:
            # Only the temporal-feature quantizers of HTDQ (level sets) and fsc (one
            # range per stored timestep) are their own.
            assert layer.layer in temporal and layer.act in ("levels", "group"), layer.layer
            assert method in ("htdq", "fsc", "qvd", "qvd-htdq"), layer.layer


def _per_token_reference(rows: torch.Tensor, bits: int, ratio: float) -> torch.Tensor:
    """Each row through torch's per-tensor fake quant with its own (clipped) min-max range."""
    out = []
    for row in rows.to(torch.float32):
        lo, hi = min(float(row.min()), 0.0) * ratio, max(float(row.max()), 0.0) * ratio
        scale = max((hi - lo) / (2**bits - 1), 1e-12)
        zero_point = int(min(max(round(-lo / scale), 0), 2**bits - 1))
        out.append(torch.fake_quantize_per_tensor_affine(row, scale, zero_point, 0, 2**bits - 1))
    return torch.stack(out)


@pytest.mark.parametrize("ratio", [1.0, 0.8, 0.55])
def test_dynamic_per_token_with_clip_ratio_matches_torch(ratio):
    rows = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    quantizer = DynamicTokenActQuant(4, clip_ratio=ratio)
    torch.testing.assert_close(
        quantizer(rows), _per_token_reference(rows, 4, ratio), atol=1e-5, rtol=0
    )


def test_token_clip_ratio_is_the_brute_force_argmin():
    generator = torch.Generator().manual_seed(1)
    # Long heavy-tailed tokens: the extremes are rare, clipping them pays at 4 bits.
    rows = torch.randn(100, 512, generator=generator, dtype=torch.float64) ** 3
    ratio = token_clip_ratio(rows, 4, p=2.4, grid=20)
    errors = {
        alpha: float((_per_token_reference(rows, 4, alpha).double() - rows).abs().pow(2.4).mean())
        for alpha in [1 - i / 20 for i in range(20)]
    }
    best = min(errors, key=errors.get)
    assert ratio == pytest.approx(best)
    assert ratio < 1.0
    assert token_clip_ratio(rows[:0], 4) == 1.0


def test_token_records_carry_their_clip_ratio():
    run = tiny_stats()
    loaded = load_run_model(run)
    record = quantize_(loaded, QuantConfig("mse", 8, 4, granularity="token"), stats=run)
    wrappers = dict(quant_wrappers(loaded.denoiser))
    dynamic = [layer for layer in record.layers if layer.act == "dynamic"]
    assert dynamic
    for layer in dynamic:
        ratio = layer.info["clip_ratio"]
        assert 0.0 < ratio <= 1.0
        assert wrappers[layer.layer].act.clip_ratio == ratio
    minmax = quantize_(
        load_run_model(run), QuantConfig("minmax", 8, 4, granularity="token"), stats=run
    )
    assert all("clip_ratio" not in layer.info for layer in minmax.layers)
