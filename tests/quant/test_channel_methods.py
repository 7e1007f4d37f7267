"""SmoothQuant, OS+ and SCRI: coverage, SQNR and valid quantized models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvd_bench.models.roles import leaf_layers
from qvd_bench.models.zoo import load_model
from qvd_bench.quant.apply import apply_record, quantize_, unquantize_
from qvd_bench.quant.config import QuantConfig
from qvd_bench.quant.methods.base import QuantContext
from qvd_bench.quant.methods.scri import scri_records
from qvd_bench.quant.modules import QuantWrapper, quant_wrappers, set_enabled
from qvd_bench.quant.primitives import sqnr_db
from tests.quant.helpers import collect_tiny as _collect
from tests.quant.helpers import end_to_end_sqnr, tiny_run


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


def _probe(loaded, dtype=torch.float32):
    """Fixed inputs of one denoiser call (2 frames of 8×8 latents, timestep 500)."""
    family, denoiser = loaded.family, loaded.denoiser
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(family.latent_shape(denoiser, 1, 2, 8, 8), generator=generator)
    length, dim = family.text_embedding_shape(denoiser)
    # Long text contexts (Wan, Latte) are cut short; CogVideoX needs its exact length.
    text = torch.randn(1, length if length < 64 else 8, dim, generator=generator)
    cond = family.conditioning(denoiser, 1, 2, 8, 8, generator)
    cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
    return latents.to(dtype), torch.tensor([500.0], dtype=dtype), text.to(dtype), cond


def _forward(loaded, probe):
    with torch.no_grad():
        return loaded.family.forward(loaded.denoiser, *probe)


def _relative_error(out, reference):
    return float((out - reference).norm() / reference.norm())


def _placements(record):
    return {r.info["transform"]["placement"] for r in record.layers if "transform" in r.info}


def _assert_restored(denoiser, original):
    assert not any(isinstance(m, QuantWrapper) for m in denoiser.modules())
    state = denoiser.state_dict()
    assert state.keys() == original.keys()
    changed = [k for k in original if not torch.equal(state[k], original[k])]
    assert not changed, changed[:3]


@pytest.mark.parametrize("method", ["smoothquant", "os+", "scri"])
def test_methods_make_valid_quantized_models(unet_run, method):
    loaded = load_model("tiny-unet3d")
    original = {k: v.clone() for k, v in loaded.denoiser.state_dict().items()}
    probe = _probe(loaded)
    float_out = _forward(loaded, probe)
    record = quantize_(loaded, QuantConfig(method=method, w_bits=8, a_bits=8), stats=unet_run)
    wrappers = dict(quant_wrappers(loaded.denoiser))
    assert set(wrappers) == set(leaf_layers(load_model("tiny-unet3d").denoiser))
    # GEGLU FFNs: the output layer's scale folds into the projection's linear half.
    assert _placements(record) == {"folded_norm", "folded_geglu_scale", "explicit"}
    # The quantized model still computes a close, finite prediction.
    out = _forward(loaded, probe)
    set_enabled(loaded.denoiser, False)
    reference = _forward(loaded, probe)
    # Validity, not quality: finite and clearly correlated with the float prediction
    # (end-to-end quality is compared in the report, not asserted here).
    assert torch.isfinite(out).all()
    assert float(sqnr_db(reference, out)) > 3.0
    # Off, the transformed model is the float model (float32 rounding apart).
    assert _relative_error(reference, float_out) < 1e-5
    unquantize_(loaded, record)
    _assert_restored(loaded.denoiser, original)
    assert torch.equal(_forward(loaded, probe), float_out)


# Fold kinds a channel method must place on each DiT (all of them, with their partial
# folds: Latte and Wan modulate from per-block tables, CogVideoX from a Linear per block).
DIT_PLACEMENTS = {
    "tiny-latte": {"folded_adaln_shift", "folded_geglu_scale", "explicit"},
    "tiny-cogvideox": {"folded_adaln", "explicit"},
    "tiny-wan": {"folded_norm", "folded_adaln_shift", "explicit"},
}


@pytest.mark.parametrize("preset", sorted(DIT_PLACEMENTS))
def test_dit_folds_reproduce_the_model_off_and_undo_exactly(preset):
    run = tiny_run(preset)
    for method in ("smoothquant", "os+", "scri"):
        loaded = load_model(preset, dtype=torch.float64)
        original = {k: v.clone() for k, v in loaded.denoiser.state_dict().items()}
        probe = _probe(loaded, torch.float64)
        float_out = _forward(loaded, probe)
        record = quantize_(loaded, QuantConfig(method, 8, 8), stats=run)
        assert _placements(record) == DIT_PLACEMENTS[preset], method
        assert record.originals and all(r.folded.keys() <= record.originals.keys()
                                        for r in record.layers)  # fmt: skip
        set_enabled(loaded.denoiser, False)
        assert _relative_error(_forward(loaded, probe), float_out) < 1e-5, method
        unquantize_(loaded, record)
        _assert_restored(loaded.denoiser, original)
        # The record reapplied without statistics, and taken back again.
        apply_record(loaded, record)
        assert record.originals.keys() == {k for r in record.layers for k in r.folded}
        unquantize_(loaded, record)
        _assert_restored(loaded.denoiser, original)


def test_a_fold_site_is_used_only_whole(unet_run):
    """A subset with q but not k and v of one norm (as a plan may choose) keeps q explicit
    and leaves k and v untouched: folding would change their inputs too."""
    ctx = _context(unet_run, 8)
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    records = scri_records(ctx, [f"{block}.attn1.to_q"])
    assert list(records) == [f"{block}.attn1.to_q"]
    record = records[f"{block}.attn1.to_q"]
    assert not record.folded
    if "transform" in record.info:  # SCRI may also keep the layer plain mse
        assert record.info["transform"]["placement"] == "explicit"
        assert f"not folded into {block}.norm1" in record.info["transform"]["reason"]


def test_modulation_source_kept_out_keeps_the_model_exact():
    """CogVideoX with its adaLN modulation Linears kept FP: q/k/v cannot fold into them
    (their records would not match), so they go explicit and the model stays exact."""
    preset = "tiny-cogvideox"
    loaded = load_model(preset, dtype=torch.float64)
    sources = tuple(n for n in leaf_layers(loaded.denoiser) if n.endswith("norm1.linear"))
    probe = _probe(loaded, torch.float64)
    float_out = _forward(loaded, probe)
    config = QuantConfig("scri", 8, 8, keep_fp_layers=sources)
    record = quantize_(loaded, config, stats=tiny_run(preset))
    for layer in record.layers:
        if layer.layer.endswith("attn1.to_q") and "transform" in layer.info:
            assert layer.info["transform"]["placement"] == "explicit"
    assert not any(key.startswith(sources) for r in record.layers for key in r.folded)
    set_enabled(loaded.denoiser, False)
    assert _relative_error(_forward(loaded, probe), float_out) < 1e-5


E2E_MODEL = "tiny-wan"
E2E_KNOBS = {"asymmetry": 2.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scri_end_to_end_sqnr_beats_mse_with_asymmetry(tmp_path, seed):
    run = _collect(tmp_path / "run", E2E_MODEL, weight_seed=seed, **E2E_KNOBS)
    figures = {
        method: end_to_end_sqnr(
            run, E2E_MODEL, QuantConfig(method, 8, 4), seed=seed, knobs=E2E_KNOBS
        )
        for method in ("mse", "scri")
    }
    print(f"seed {seed}: {figures}")
    assert figures["scri"] > figures["mse"], figures
