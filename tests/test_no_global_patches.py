"""Nothing patches torch process-wide and nothing rewrites a module's class.

On every tiny preset: collect statistics (attention included), quantize (layers and
attention), score the quantized prediction against the float one, and take it all back;
then PyTorch's attention function is still its own, and every module's type is the one
diffusers built, or a wrapper put in its place by the one module-replacement function
(``quant.modules.swap_module``) around the original module, unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qvd_bench.collect.collector import collect
from qvd_bench.config import CollectConfig
from qvd_bench.evaluate.fidelity import sqnr
from qvd_bench.models.zoo import MODELS, load_model
from qvd_bench.quant.apply import quantize_, unquantize_
from qvd_bench.quant.config import QuantConfig
from qvd_bench.quant.modules import QuantWrapper, quant_wrappers
from qvd_bench.store import StatsRun

PRESETS = [name for name in MODELS if name.startswith("tiny-")]

# The C function PyTorch's Python name stands for: what the name must still be bound to.
TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


def assert_torch_attention() -> None:
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert torch.nn.functional.scaled_dot_product_attention is TORCH_SDPA


def module_types(model: torch.nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


def probe_inputs(loaded):
    """One denoiser call on a 2-frame 8×8 latent, text states and conditioning."""
    family, denoiser = loaded.family, loaded.denoiser
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(family.latent_shape(denoiser, 1, 2, 8, 8), generator=generator)
    text = torch.randn((1, *family.text_embedding_shape(denoiser)), generator=generator)
    conditioning = family.conditioning(denoiser, 1, 2, 8, 8, generator=generator)
    return latents, torch.tensor([500.0]), text, conditioning


@pytest.mark.parametrize("preset", PRESETS)
def test_collect_quantize_and_score_leave_torch_and_module_types_alone(preset, tmp_path):
    assert_torch_attention()
    config = CollectConfig(
        model=preset,
        prompts=("a cat",),
        steps=2,
        frames=2,
        height=8,
        width=8,
        temporal_stride=0,
        reservoir_capacity=16,
        attention=True,
    )
    collect(config, tmp_path / "stats", progress=False)
    assert_torch_attention()

    loaded = load_model(preset)
    denoiser = loaded.denoiser
    before = module_types(denoiser)
    # Loading installs nothing of qvd-bench's: diffusers' and torch's classes, no hooks.
    assert all(not t.__module__.startswith("qvd_bench") for t in before.values())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in denoiser.modules())

    inputs = probe_inputs(loaded)
    with torch.no_grad():
        reference = loaded.family.forward(denoiser, *inputs)
        record = quantize_(
            loaded, QuantConfig(attention_bits=(8,)), stats=StatsRun(tmp_path / "stats")
        )
        quantized = loaded.family.forward(denoiser, *inputs)
    assert_torch_attention()
    # Quantized, and still computing the layers: a finite score, short of a copy's.
    score = float(sqnr(reference, quantized))
    assert math.isfinite(score) and score > 0.0

    wrappers = dict(quant_wrappers(denoiser))
    assert wrappers
    for name, module in denoiser.named_modules():
        inside = next((w for w in wrappers if name.startswith(w + ".")), None)
        if name in wrappers:
            # Swapped in at the original's name; the original inside keeps its class.
            assert type(module) is QuantWrapper
            assert type(module.module) is before[name]
        elif inside is None:
            assert type(module) is before[name], name
        elif name == inside + ".module":
            assert type(module) is before[inside]
        else:  # the wrapper's own parts (its activation quantizer) or the original's
            assert type(module).__module__.startswith("qvd_bench") or name.startswith(
                inside + ".module."
            ), name

    unquantize_(loaded, record)
    assert module_types(denoiser) == before
    assert_torch_attention()
