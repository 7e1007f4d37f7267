"""Conformance of every registered quantization method on tiny-unet3d.

The statistics come from one tiny collection (2 prompts, 2 DDIM steps without CFG, 2
frames of 8×8 latents), and every SQNR is taken on the final latents of the same short
sampling run, so calibrated ranges cover the evaluated activations exactly. Methods run on
a reduced scope (the temporal-feature layers and the first blocks; the rest kept FP) to
keep the suite fast; the minmax / mse bit-width sweep runs on every layer.
"""

from __future__ import annotations

import math

import pytest
import torch

from qvd_bench.models.zoo import load_run_model
from qvd_bench.quant.apply import quantize_
from qvd_bench.quant.config import QuantConfig
from qvd_bench.quant.methods import METHODS
from qvd_bench.quant.modules import DynamicTokenActQuant, quant_wrappers
from qvd_bench.quant.primitives import sqnr_db
from tests.quant.helpers import out_of_scope, reference, sample, tiny_stats

# Methods whose clipping does not depend on the bit-width: they clip at 16 bits too.
CLIPPING_AT_ANY_BITS = {"percentile"}
DESIGN_METHODS = (
    "fp",
    "minmax",
    "percentile",
    "mse",
    "smoothquant",
    "os+",
    "timestep_aware",
    "fsc",
    "fp-temporal",
    "htdq",
    "scri",
    "qvd",
    "qvd-htdq",
    "qvd-scri",
)


_SQNR: dict[tuple, float] = {}


def quantized_sqnr(method: str, w_bits: int, a_bits: int, full: bool = False) -> float:
    """SQNR (dB) of the quantized model's final latents against FP (memoised)."""
    key = (method, w_bits, a_bits, full)
    if key not in _SQNR:
        run = tiny_stats()
        loaded = load_run_model(run)
        keep = () if full else out_of_scope(run)
        config = QuantConfig(method, w_bits, a_bits, keep_fp_layers=keep)
        record = quantize_(loaded, config, stats=run)
        _SQNR[key] = float(sqnr_db(reference(), sample(loaded, record.tracker)))
    return _SQNR[key]


def test_registry_has_every_design_method():
    assert set(DESIGN_METHODS) <= set(METHODS)
    for name, cls in METHODS.items():
        assert cls.name == name and cls.description


@pytest.mark.parametrize("method", sorted(METHODS))
def test_conformance_w8a8(method):
    run = tiny_stats()
    loaded = load_run_model(run)
    keep = out_of_scope(run)
    record = quantize_(loaded, QuantConfig(method, 8, 8, keep_fp_layers=keep), stats=run)
    wrappers = dict(quant_wrappers(loaded.denoiser))
    in_scope = [n for n in run.roles if n not in keep]
    assert [r.layer for r in record.layers] == list(run.roles)
    for layer in record.layers:
        if layer.layer in keep:
            assert layer.is_fp and layer.layer not in wrappers
        elif layer.is_fp:  # kept FP on purpose by the method, and saying why
            assert method in ("fp", "fp-temporal") and layer.info["fp_reason"]
        else:
            assert layer.layer in wrappers, f"{method}: {layer.layer} has no quantizer"
    if method != "fp":
        assert len(wrappers) >= len(in_scope) // 2

    # Every quantized input has at most 2^b distinct values (per token when dynamic).
    worst: dict[str, int] = {}

    def count(name, quantizer):
        def hook(module, args, output):
            values = output.detach()
            if isinstance(quantizer, DynamicTokenActQuant):
                dim = wrappers[name].channel_dim
                tokens = values.movedim(dim, -1).reshape(-1, values.shape[dim])
                distinct = max(int(torch.unique(row).numel()) for row in tokens[:64])
            else:
                distinct = int(torch.unique(values).numel())
            worst[name] = max(worst.get(name, 0), distinct)

        return hook

    handles = [w.act.register_forward_hook(count(n, w.act)) for n, w in wrappers.items() if w.act]
    out = sample(loaded, record.tracker)
    for handle in handles:
        handle.remove()
    assert torch.isfinite(out).all()
    _SQNR[(method, 8, 8, False)] = float(sqnr_db(reference(), out))
    assert worst or method == "fp"
    for name, distinct in worst.items():
        assert distinct <= 2**8, f"{method}: {name} has {distinct} distinct input values"


@pytest.mark.parametrize("method", sorted(set(METHODS) - CLIPPING_AT_ANY_BITS))
def test_w16a16_matches_fp(method):
    assert quantized_sqnr(method, 16, 16) > 60.0


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"fp"}))
def test_w8a8_beats_w4a4(method):
    assert quantized_sqnr(method, 8, 8) > quantized_sqnr(method, 4, 4)


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_error_falls_with_bits(method):
    figures = [quantized_sqnr(method, b, b, full=True) for b in (8, 6, 4)]
    assert figures[0] > figures[1] > figures[2], figures
    assert all(math.isfinite(f) for f in figures)
