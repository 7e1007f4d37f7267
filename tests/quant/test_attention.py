"""Quantized attention matmuls: the explicit kernel, the processor on every preset, the
statistics it collects, quantization through ``quantize_`` and the record, and bad input.

Statistics come from short collections (1 prompt, 2 steps, 2 frames of 8×8 latents) and
every figure is taken on the same sampling run, so calibrated ranges cover the evaluated
tensors exactly.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qvd_bench.collect import collector as collector_module
from qvd_bench.collect.attention import (
    ATTENTION_TENSORS,
    AttentionStats,
    attention_modules,
    attention_processors,
    explicit_attention,
    restore_processors,
)
from qvd_bench.collect.collector import collect
from qvd_bench.commands.main import main
from qvd_bench.config import CollectConfig
from qvd_bench.errors import UserError
from qvd_bench.models.sampling import CallTracker, sample_denoiser, text_states_for_prompts
from qvd_bench.models.zoo import load_model, load_run_model
from qvd_bench.quant.apply import apply_record, quantize_
from qvd_bench.quant.attention import (
    AttentionRecord,
    QuantAttnProcessor,
    attention_records,
    install_attention,
)
from qvd_bench.quant.config import QuantConfig
from qvd_bench.quant.modules import quant_wrappers, set_enabled, unwrap
from qvd_bench.quant.primitives import sqnr_db
from qvd_bench.quant.record import load_record
from qvd_bench.store import StatsRun

PRESETS = (
    "tiny-unet3d",
    "tiny-animatediff",
    "tiny-svd",
    "tiny-i2vgenxl",
    "tiny-latte",
    "tiny-cogvideox",
    "tiny-wan",
)
PROMPT = "a cat"
SAMPLING = {"steps": 2, "guidance_scale": 1.0, "frames": 2, "height": 8, "width": 8}
# With CFG: both branches are collected (separate forwards of the minimal sampler).
SAMPLING_CFG = {**SAMPLING, "guidance_scale": 2.0}


def _collect(name: str, **overrides) -> StatsRun:
    root = tempfile.mkdtemp(prefix="qvd-attention-stats-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    settings = {
        "model": name,
        "prompts": (PROMPT,),
        **SAMPLING,
        "reservoir_capacity": 0,
        "temporal_stride": 0,
        "attention": True,
        **overrides,
    }
    collect(CollectConfig(**settings), f"{root}/run", progress=False)
    return StatsRun(f"{root}/run")


@functools.cache
def preset_stats(name: str) -> StatsRun:
    """Attention statistics of a preset (layer statistics of its io layers only)."""
    return _collect(name, roles=("io",))


@functools.cache
def unet3d_stats() -> StatsRun:
    """Every layer and the attention of tiny-unet3d, with CFG (what quantize_ needs)."""
    return _collect("tiny-unet3d", **SAMPLING_CFG)


def sample(loaded, sampling=SAMPLING, tracker=None) -> torch.Tensor:
    """Final latents of the sampling run the statistics were collected on."""
    cond, uncond = text_states_for_prompts(loaded, [PROMPT])
    return sample_denoiser(
        loaded, cond, uncond, seed=0, sample_ids=[0], tracker=tracker, **sampling
    )


# --------------------------------------------------------------------------- the kernel


def _qkv(generator, batch=2, heads=4, kv_heads=4, length=5, source=7, dim=8):
    q = torch.randn(batch, heads, length, dim, generator=generator)
    k = torch.randn(batch, kv_heads, source, dim, generator=generator)
    v = torch.randn(batch, kv_heads, source, dim + 3, generator=generator)
    return q, k, v


@pytest.mark.parametrize("case", ["plain", "bool_mask", "float_mask", "causal", "scale", "gqa"])
def test_explicit_attention_equals_sdpa(case):
    generator = torch.Generator().manual_seed(0)
    q, k, v = _qkv(generator, kv_heads=2 if case == "gqa" else 4)
    kwargs = {}
    if case == "bool_mask":
        mask = torch.rand(2, 1, 5, 7, generator=generator) > 0.3
        mask[..., 0] = True  # every query attends to something
        kwargs["attn_mask"] = mask
    elif case == "float_mask":
        kwargs["attn_mask"] = torch.randn(5, 7, generator=generator)
    elif case == "causal":
        kwargs["is_causal"] = True
    elif case == "scale":
        kwargs["scale"] = 0.37
    elif case == "gqa":
        kwargs["enable_gqa"] = True
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    got = explicit_attention(q, k, v, **kwargs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_explicit_attention_quantizes_each_operand():
    generator = torch.Generator().manual_seed(1)
    q, k, v = _qkv(generator)
    seen = {}
    record = AttentionRecord("m", dict(zip(ATTENTION_TENSORS, (4, 5, 6, 3))))
    for tensor, bits in record.bits.items():
        scale = torch.tensor(0.05 if tensor == "softmax" else 0.3)
        zero_point = torch.tensor(0 if tensor == "softmax" else 2 ** (bits - 1), dtype=torch.int32)
        record.tensors[f"{tensor}_scale"] = scale
        record.tensors[f"{tensor}_zero_point"] = zero_point
    quantizers = record.quantizers()
    out = explicit_attention(
        q, k, v, quantizers=quantizers, observe=lambda name, x: seen.setdefault(name, x)
    )
    assert set(seen) == set(ATTENTION_TENSORS)
    for tensor, bits in record.bits.items():
        assert torch.unique(seen[tensor]).numel() <= 2**bits, tensor
        assert torch.equal(seen[tensor], quantizers[tensor](seen[tensor]))  # on the grid
    assert torch.equal(out, seen["softmax"] @ seen["v"])
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v))


def test_explicit_attention_rejects_what_it_cannot_compute():
    q, k, v = _qkv(torch.Generator().manual_seed(2), heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="heads"):
        explicit_attention(q, k, v, enable_gqa=True)
    q, k, v = _qkv(torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="dropout"):
        explicit_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="is_causal"):
        explicit_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True)


# --------------------------------------------------------------------------- the processor


@pytest.mark.parametrize("preset", ["tiny-unet3d", "tiny-cogvideox", "tiny-wan"])
def test_processor_declares_the_original_signature(preset):
    # diffusers' Attention.forward drops keyword arguments a processor does not declare.
    for name, module in attention_modules(load_model(preset).denoiser).items():
        processor = QuantAttnProcessor(module.processor, name)
        original = inspect.signature(module.processor.__call__)
        assert inspect.signature(processor.__call__) == original


def _teacher_forced_sqnr(denoiser, run_model) -> dict[str, float]:
    """Per attention module: SQNR (dB) of its quantized output against its float output on
    the same inputs (the module run again with its processor off)."""
    sums: dict[str, list[float]] = {}
    busy = []

    def hook(name):
        def compare(module, args, kwargs, output):
            if busy:
                return
            busy.append(name)
            module.processor.enabled = False
            try:
                reference = module(*args, **kwargs)
            finally:
                module.processor.enabled = True
                busy.pop()
            pairs = zip(
                output if isinstance(output, tuple) else (output,),
                reference if isinstance(reference, tuple) else (reference,),
            )
            total = sums.setdefault(name, [0.0, 0.0])
            for got, expected in pairs:
                total[0] += float(expected.double().square().sum())
                total[1] += float((got.double() - expected.double()).square().sum())

        return compare

    modules = attention_modules(denoiser)
    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    return {name: 10 * math.log10(signal / noise) for name, (signal, noise) in sums.items()}


@pytest.mark.parametrize("preset", PRESETS)
def test_16_bits_reproduce_every_attention_output(preset):
    run = preset_stats(preset)
    loaded = load_run_model(run)
    modules = attention_modules(loaded.denoiser)
    assert modules, f"{preset} has no attention modules"
    install_attention(loaded.denoiser, attention_records(loaded.denoiser, run, (16,)))
    figures = _teacher_forced_sqnr(loaded.denoiser, lambda: sample(loaded))
    processors = dict(attention_processors(loaded.denoiser))
    assert set(processors) == set(modules)
    for name, processor in processors.items():
        # Every attention computation went through the quantizers, 2 steps at least.
        assert processor.intercepted >= SAMPLING["steps"], name
    assert set(figures) == set(modules)
    for name, sqnr in figures.items():
        # Finite: the quantizers did change something; above 60 dB: only 16-bit rounding.
        assert 60.0 < sqnr < math.inf, f"{preset} {name}: {sqnr:.1f} dB"


def test_error_falls_with_attention_bits():
    run = preset_stats("tiny-unet3d")
    loaded = load_run_model(run)
    reference = sample(loaded)
    figures = []
    for bits in (16, 8, 4):
        install_attention(loaded.denoiser, attention_records(loaded.denoiser, run, (bits,)))
        figures.append(float(sqnr_db(reference, sample(loaded))))
        assert restore_processors(loaded.denoiser) == len(attention_modules(loaded.denoiser))
    assert figures[0] > figures[1] > figures[2], figures
    assert torch.equal(sample(loaded), reference)  # restored: float again


def test_8_bits_distinct_values_seen_by_the_matmuls():
    run = preset_stats("tiny-unet3d")
    loaded = load_run_model(run)
    bits = dict(zip(ATTENTION_TENSORS, (8, 8, 8, 6)))
    install_attention(
        loaded.denoiser, attention_records(loaded.denoiser, run, tuple(bits.values()))
    )
    distinct: dict[tuple[str, str], int] = {}

    def count(module: str, tensor: str, x: torch.Tensor) -> None:
        key = (module, tensor)
        distinct[key] = max(distinct.get(key, 0), int(torch.unique(x).numel()))

    for _, processor in attention_processors(loaded.denoiser):
        processor.observe = count
    sample(loaded)
    modules = attention_modules(loaded.denoiser)
    assert set(distinct) == {(m, t) for m in modules for t in ATTENTION_TENSORS}
    for (module, tensor), n in distinct.items():
        assert n <= 2 ** bits[tensor], f"{module} {tensor}: {n} distinct values"
    # The operands do use the grid (not collapsed onto a few levels).
    assert max(n for (_, t), n in distinct.items() if t == "q") > 2**6


# --------------------------------------------------------------------------- statistics


def _reference_statistics(loaded, sampling) -> dict[tuple, tuple[float, float, int]]:
    """(module, tensor, timestep, branch) -> (min, max, count) of q, k, v and the softmax,
    from the projections' outputs and a softmax computed here (not by the processor).

    The sampling runs with the observing processors in place, as in the collection, so
    both follow the same trajectory: with PyTorch's attention kernels instead, the
    latents of the second step differ by float rounding, and so do the extremes of the
    softmax (the least probability is relatively sensitive: ~2e-5)."""
    tracker = CallTracker(loaded.denoiser).attach()
    modules = attention_modules(loaded.denoiser)
    projections: dict[str, dict[str, torch.Tensor]] = {}
    found: dict[tuple, tuple[float, float, int]] = {}

    def add(module, tensor, x):
        call = tracker.current
        key = (module, tensor, call.timestep, call.branches[0])
        lo, hi, n = found.get(key, (math.inf, -math.inf, 0))
        found[key] = (min(lo, float(x.min())), max(hi, float(x.max())), n + x.numel())

    def projection_hook(module_name, tensor):
        def hook(_, args, output):
            projections.setdefault(module_name, {})[tensor] = output.detach()
            add(module_name, tensor, output)

        return hook

    def attention_hook(module_name):
        def hook(attn, args, output):
            q, k = projections[module_name]["q"], projections[module_name]["k"]
            heads = attn.heads
            q = q.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, L, D)
            k = k.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, S, D)
            scores = torch.einsum("bhld,bhsd->bhls", q.double(), k.double()) * attn.scale
            add(module_name, "softmax", torch.softmax(scores, dim=-1))

        return hook

    handles = []
    for name, module in modules.items():
        for tensor in ("q", "k", "v"):
            layer = getattr(module, f"to_{tensor}")
            handles.append(layer.register_forward_hook(projection_hook(name, tensor)))
        handles.append(module.register_forward_hook(attention_hook(name)))
    try:
        with AttentionStats(loaded.denoiser, tracker):
            sample(loaded, sampling, tracker=tracker)
    finally:
        for handle in handles:
            handle.remove()
        tracker.detach()
    return found


def test_collected_statistics_match_a_reference():
    run = unet3d_stats()
    frame = run.attention
    assert set(frame["branch"]) == {"uncond", "cond"}
    assert frame["timestep"].nunique() == SAMPLING_CFG["steps"]
    reference = _reference_statistics(load_run_model(run), SAMPLING_CFG)
    stored = {
        (str(r.module), str(r.tensor), float(r.timestep), str(r.branch)): r
        for r in frame.itertuples()
    }
    assert set(stored) == set(reference)
    for key, (lo, hi, n) in reference.items():
        row = stored[key]
        assert row.count == n and row.nan_count == 0 and row.inf_count == 0, key
        assert row.min == pytest.approx(lo, rel=1e-5, abs=1e-6), key
        assert row.max == pytest.approx(hi, rel=1e-5, abs=1e-6), key
    # Histograms count every value once (stride 1).
    bins = run.attention_histograms.groupby(
        ["module", "tensor", "timestep", "branch"], observed=True
    )["count"].sum()
    for key, row in stored.items():
        assert bins[key] == row.count, key
    assert run.manifest["attention"]["modules"] == list(
        attention_modules(load_run_model(run).denoiser)
    )


def test_interrupted_collection_resumes_attention_statistics(tmp_path, monkeypatch):
    settings = dict(roles=("io",), prompts=("a cat", "a dog"))
    whole = _collect("tiny-latte", **settings).attention
    config = CollectConfig(
        model="tiny-latte",
        **SAMPLING,
        reservoir_capacity=0,
        temporal_stride=0,
        attention=True,
        **settings,
    )
    original = collector_module.run_sample
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(collector_module, "run_sample", fail_second)
    with pytest.raises(KeyboardInterrupt):
        collect(config, tmp_path / "run", progress=False, checkpoint_every=0)
    monkeypatch.setattr(collector_module, "run_sample", original)
    summary = collect(config, tmp_path / "run", progress=False, checkpoint_every=0)
    assert summary.resumed == 1
    resumed = StatsRun(tmp_path / "run").attention
    columns = ["module", "tensor", "timestep", "branch", "count", "min", "max"]
    assert resumed[columns].astype(str).equals(whole[columns].astype(str))


# --------------------------------------------------------------------------- quantize_ and records


@functools.cache
def fp_reference() -> torch.Tensor:
    """Final latents of the float tiny-unet3d on the CFG run."""
    return sample(load_run_model(unet3d_stats()), SAMPLING_CFG)


def test_quantize_record_round_trip(tmp_path):
    run = unet3d_stats()
    loaded = load_run_model(run)
    config = QuantConfig("minmax", 8, 8, attention_bits=(8, 8, 8, 6))
    record = quantize_(loaded, config, stats=run)
    modules = list(attention_modules(loaded.denoiser))
    assert [r.module for r in record.attention] == modules
    assert record.attention[0].bits == {"q": 8, "k": 8, "v": 8, "softmax": 6}
    assert record.summary()["attention"]["modules"] == len(modules)
    expected = sample(loaded, SAMPLING_CFG, record.tracker)

    record.save(tmp_path)
    saved = json.loads((tmp_path / "record.json").read_text())
    assert [a["module"] for a in saved["attention"]] == modules
    fresh = load_run_model(run)
    reloaded = apply_record(fresh, load_record(tmp_path))
    assert torch.equal(sample(fresh, SAMPLING_CFG, reloaded.tracker), expected)
    assert [a.meta() for a in reloaded.attention] == [a.meta() for a in record.attention]
    for ours, theirs in zip(record.attention, reloaded.attention):
        assert ours.tensors.keys() == theirs.tensors.keys()
        assert all(torch.equal(ours.tensors[k], theirs.tensors[k]) for k in ours.tensors)

    # Off, then unwrapped: the float model again, bit for bit.
    set_enabled(fresh.denoiser, False)
    assert torch.equal(sample(fresh, SAMPLING_CFG), fp_reference())
    set_enabled(fresh.denoiser, True)
    unwrap(fresh.denoiser)
    assert next(attention_processors(fresh.denoiser), None) is None
    assert next(quant_wrappers(fresh.denoiser), None) is None
    assert torch.equal(sample(fresh, SAMPLING_CFG), fp_reference())


def test_quantize_applies_attention_bits():
    # At W16A16 the layers add almost no error, so the attention quantizers' share shows.
    run = unet3d_stats()
    figures = {}
    for attention_bits in ((), (8,)):
        loaded = load_run_model(run)
        record = quantize_(
            loaded, QuantConfig("minmax", 16, 16, attention_bits=attention_bits), stats=run
        )
        out = sample(loaded, SAMPLING_CFG, record.tracker)
        figures[attention_bits] = float(sqnr_db(fp_reference(), out))
    assert figures[()] > 60.0, figures
    assert 10.0 < figures[(8,)] < figures[()] - 10.0, figures


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", [(1,), (17,), (8, 8), (8, 8, 8, 8, 8), (True,)])
def test_attention_bits_out_of_range(bits):
    with pytest.raises(UserError):
        QuantConfig("minmax", attention_bits=bits)


def _without_attention(run: StatsRun, directory: Path) -> StatsRun:
    """A copy of a run as collected before attention statistics existed."""
    shutil.copytree(run.path, directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    for name in ("attention", "attention_histograms"):
        (directory / manifest["files"].pop(name)).unlink()
    manifest.pop("attention")
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return StatsRun(directory)


def test_missing_attention_statistics(tmp_path):
    old = _without_attention(unet3d_stats(), tmp_path / "old")
    assert old.attention.empty and old.attention_histograms.empty
    loaded = load_run_model(old)
    with pytest.raises(UserError, match="attention=True"):
        quantize_(loaded, QuantConfig("minmax", attention_bits=(8,)), stats=old)
    # The model was left untouched, and the run still quantizes without attention.
    assert next(quant_wrappers(loaded.denoiser), None) is None
    record = quantize_(loaded, QuantConfig("minmax"), stats=old)
    assert record.attention == [] and record.summary()["attention"] == {"modules": 0}


def test_attention_of_another_model():
    run = preset_stats("tiny-latte")
    with pytest.raises(UserError, match="another model"):
        attention_records(load_model("tiny-cogvideox").denoiser, run, (8,))
    records = attention_records(load_run_model(run).denoiser, run, (8,))
    renamed = AttentionRecord("no.such.attn", records[0].bits, records[0].tensors)
    with pytest.raises(UserError, match="no.such.attn"):
        install_attention(load_model("tiny-latte").denoiser, [renamed])


def test_attention_quantized_twice():
    run = preset_stats("tiny-latte")
    loaded = load_run_model(run)
    records = attention_records(loaded.denoiser, run, (8,))
    install_attention(loaded.denoiser, records)
    with pytest.raises(UserError, match="already quantized"):
        install_attention(loaded.denoiser, records)
    with pytest.raises(UserError, match="already quantized"):
        quantize_(loaded, QuantConfig("minmax"), stats=run)


@pytest.mark.parametrize(
    "value, message",
    [("8,8", "or four"), ("1", "between 2 and 16"), ("eight", "comma-separated")],
)
def test_cli_bad_attention_bits(value, message, tmp_path, capsys):
    run = preset_stats("tiny-latte")
    args = ["quantize", "--stats", run.path, "--out", tmp_path / "q", "--attention-bits", value]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and message in err, err
    assert not (tmp_path / "q").exists()


def test_cli_collect_attention_then_quantize(tmp_path, capsys):
    stats, out = tmp_path / "stats", tmp_path / "q"
    small = ["--steps", "2", "--frames", "2", "--height", "8", "--width", "8"]
    common = ["--num-prompts", "1", "--reservoir", "0", "--temporal-stride", "0", "--no-progress"]
    args = ["collect", "--model", "tiny-latte", "--attention", "--out", stats, *small, *common]
    assert main([str(a) for a in args]) == 0
    args = ["quantize", "--stats", stats, "--method", "minmax", "--out", out]
    assert main([str(a) for a in [*args, "--attention-bits", "8,8,8,6"]]) == 0
    printed = capsys.readouterr().out
    modules = attention_modules(load_model("tiny-latte").denoiser)
    assert f"attention: {len(modules)} modules quantized" in printed
    saved = json.loads((out / "record.json").read_text())
    assert [a["module"] for a in saved["attention"]] == list(modules)
    assert all(a["bits"] == {"q": 8, "k": 8, "v": 8, "softmax": 6} for a in saved["attention"])
