"""SmoothQuant, OS+ and SCRI: coverage, SQNR and valid quantized models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvd_bench.collect.collector import collect
from qvd_bench.config import CollectConfig
from qvd_bench.models.roles import leaf_layers
from qvd_bench.models.zoo import load_model
from qvd_bench.quant.api import QuantConfig, quantize_
from qvd_bench.quant.methods.base import QuantContext
from qvd_bench.quant.methods.scri import scri_records
from qvd_bench.quant.modules import quant_wrappers
from qvd_bench.quant.primitives import sqnr_db
from qvd_bench.store import StatsRun


def _collect(path, model, **knobs):
    config = CollectConfig(
        model=model,
        prompts=("a cat",),
        steps=2,
        frames=2,
        height=8,
        width=8,
        temporal_stride=100,
        reservoir_capacity=96,
        **knobs,
    )
    collect(config, path, progress=False)
    return StatsRun(path)


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    return _collect(tmp_path_factory.mktemp("stats") / "run", "tiny-unet3d")


def _context(run, a_bits):
    loaded = load_model("tiny-unet3d")
    layers = leaf_layers(loaded.denoiser)
    config = QuantConfig(method="scri", w_bits=8, a_bits=a_bits, weight_clipping="mse")
    roles = {n: run.roles.get(n, "") for n in layers}
    return QuantContext(loaded, loaded.denoiser, run, None, config, None, layers, roles)


@pytest.mark.parametrize("a_bits", [8, 4])
def test_scri_raises_coverage_without_lowering_held_out_sqnr(unet_run, a_bits):
    ctx = _context(unet_run, a_bits)
    # Every second layer keeps the test fast; q/k/v sites fold only when complete.
    chosen = list(ctx.layers)[::2]
    records = scri_records(ctx, chosen)
    figures = [r.info["transform"] for r in records.values() if "transform" in r.info]
    assert len(figures) >= len(chosen) // 2
    ours = np.mean([f["coverage"] for f in figures])
    base = np.mean([f["coverage_mse"] for f in figures])
    assert ours > base
    for f in figures:
        for layer, value in f["sqnr_db"].items():
            assert value >= f["sqnr_mse_db"][layer] - 1e-9


@pytest.mark.parametrize("method", ["smoothquant", "os+", "scri"])
def test_methods_make_valid_quantized_models(unet_run, method):
    loaded = load_model("tiny-unet3d")
    record = quantize_(loaded, QuantConfig(method=method, w_bits=8, a_bits=8), stats=unet_run)
    wrappers = dict(quant_wrappers(loaded.denoiser))
    assert set(wrappers) == set(leaf_layers(load_model("tiny-unet3d").denoiser))
    placements = {r.info["transform"]["placement"] for r in record.layers if "transform" in r.info}
    assert placements == {"folded_norm", "explicit"}
    # The quantized model still computes a close, finite prediction.
    family, denoiser = loaded.family, loaded.denoiser
    latents = torch.randn(
        family.latent_shape(denoiser, 1, 2, 8, 8), generator=torch.Generator().manual_seed(0)
    )
    text = torch.randn(1, 8, family.text_embedding_shape(denoiser)[1])
    timestep = torch.tensor([500.0])
    with torch.no_grad():
        out = family.forward(denoiser, latents, timestep, text, {})
        for wrapper in wrappers.values():
            wrapper.enabled = False
        reference = family.forward(denoiser, latents, timestep, text, {})
    # Validity, not quality: finite and clearly correlated with the float prediction
    # (end-to-end quality is compared in the report, not asserted here).
    assert torch.isfinite(out).all()
    assert float(sqnr_db(reference, out)) > 3.0


def _end_to_end_sqnr(run, model, seed, method, w_bits, a_bits, knobs):
    loaded = load_model(model, weight_seed=seed, **knobs)
    family, denoiser = loaded.family, loaded.denoiser
    generator = torch.Generator().manual_seed(123)
    latents = torch.randn(family.latent_shape(denoiser, 1, 2, 8, 8), generator=generator)
    text = torch.randn(1, 8, family.text_embedding_shape(denoiser)[1], generator=generator)
    timestep = torch.tensor([500.0])
    with torch.no_grad():
        reference = family.forward(denoiser, latents, timestep, text, {})
        quantize_(loaded, QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits), stats=run)
        out = family.forward(denoiser, latents, timestep, text, {})
    return float(sqnr_db(reference, out))


E2E_MODEL = "tiny-wan"
E2E_KNOBS = {"asymmetry": 2.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scri_end_to_end_sqnr_beats_mse_with_asymmetry(tmp_path, seed):
    run = _collect(tmp_path / "run", E2E_MODEL, weight_seed=seed, **E2E_KNOBS)
    figures = {
        method: _end_to_end_sqnr(run, E2E_MODEL, seed, method, 8, 4, E2E_KNOBS)
        for method in ("mse", "scri")
    }
    print(f"seed {seed}: {figures}")
    assert figures["scri"] > figures["mse"], figures
