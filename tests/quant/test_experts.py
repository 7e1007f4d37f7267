"""quantize_ on a two-expert pipeline (Wan 2.2): both experts' layers are quantized."""

import pytest
import torch

from qvd_bench.models import pipelines
from qvd_bench.models.zoo import load_model
from qvd_bench.quant.apply import apply_record, quantize_, unquantize_
from qvd_bench.quant.config import QuantConfig
from qvd_bench.quant.modules import quant_wrappers
from qvd_bench.quant.record import load_record
from tests.experts import EXPERTS, STEPS


def generate(loaded):
    return pipelines.run_pipeline(
        loaded,
        ["a cat jumps onto a table"],
        steps=STEPS,
        guidance_scale=5.0,
        seed=0,
        sample_ids=[0],
        frames=2,
        height=8,
        width=8,
    )


@pytest.mark.parametrize("method", ["minmax", "qvd", "timestep_aware", "fsc"])
def test_quantize_covers_both_experts(method, two_expert_wan_dir, two_expert_run, tmp_path):
    loaded = load_model(str(two_expert_wan_dir))
    names = list(two_expert_run.layers["name"])
    state = {k: v.clone() for k, v in loaded.layer_root.state_dict().items()}
    fp = generate(loaded)

    record = quantize_(loaded, QuantConfig(method, 4, 4), stats=two_expert_run)
    assert [r.layer for r in record.layers] == names
    assert {name for name, _ in quant_wrappers(loaded.layer_root)} == {
        r.layer for r in record.layers if not r.is_fp
    }
    for expert in EXPERTS:
        # The wrappers sit in the pipeline's own experts, which is what it runs.
        module = getattr(loaded.pipeline, expert)
        inside = {f"{expert}.{name}" for name, _ in quant_wrappers(module)}
        assert inside and inside == {
            r.layer for r in record.layers if not r.is_fp and r.layer.startswith(expert + ".")
        }
    quantized = generate(loaded)
    assert not torch.allclose(quantized, fp)

    # A record reloaded onto a fresh model reproduces the quantized output.
    record.save(tmp_path)
    fresh = load_model(str(two_expert_wan_dir))
    apply_record(fresh, load_record(tmp_path))
    torch.testing.assert_close(generate(fresh), quantized, rtol=0, atol=0)

    unquantize_(loaded, record)
    assert next(quant_wrappers(loaded.layer_root), None) is None
    for key, value in loaded.layer_root.state_dict().items():
        assert torch.equal(value, state[key]), key
    torch.testing.assert_close(generate(loaded), fp, rtol=0, atol=0)


def test_quantizing_one_expert_changes_only_its_steps(two_expert_wan_dir, two_expert_run):
    """Keeping transformer_2 in full precision leaves the steps it runs unquantized: the
    output differs from FP (transformer ran quantized) and from all-quantized."""
    loaded = load_model(str(two_expert_wan_dir))
    fp = generate(loaded)
    record = quantize_(loaded, QuantConfig("minmax", 4, 4), stats=two_expert_run)
    both = generate(loaded)
    unquantize_(loaded, record)
    first_only = QuantConfig(
        "minmax",
        4,
        4,
        keep_fp_layers=tuple(
            n for n in two_expert_run.layers["name"] if n.startswith("transformer_2.")
        ),
    )
    quantize_(loaded, first_only, stats=two_expert_run)
    one = generate(loaded)
    assert not torch.allclose(one, fp)
    assert not torch.allclose(one, both)


@pytest.mark.parametrize("method", ["timestep_aware", "fsc"])
def test_per_timestep_quantizers_cover_only_their_experts_timesteps(method, two_expert_run):
    from qvd_bench.models.zoo import load_run_model

    ran = {}
    for t, expert in two_expert_run.manifest["timestep_experts"]:
        ran.setdefault(expert, set()).add(t)
    record = quantize_(
        load_run_model(two_expert_run), QuantConfig(method, 4, 8), stats=two_expert_run
    )
    grouped = [r for r in record.layers if r.act == "group"]
    assert {r.layer.partition(".")[0] for r in grouped} == set(EXPERTS)
    for r in grouped:
        covered = {t for group in r.info["groups"] for t in group}
        assert covered == ran[r.layer.partition(".")[0]], r.layer
