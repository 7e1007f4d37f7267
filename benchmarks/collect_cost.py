"""Estimated collection cost of large video models, from their published configs.

Builds each denoiser on the meta device (shapes only, no memory), classifies its layers
with the family's role table and prints ``collect.cost.estimate_cost`` at 50 steps with
CFG, with qvd-bench's collection defaults (histograms on the 1 % grid, 256 reservoir
rows per layer, temporal features at every training timestep). The configs are the
diffusers ``config.json`` fields of the published checkpoints.

    python benchmarks/collect_cost.py

With ``--measure MODEL`` it runs a collection of a zoo model instead (the collection
defaults, two prompts) and prints the estimate against the accumulator state and the
store it measured:

    python benchmarks/collect_cost.py --measure modelscope-t2v-arch --steps 2 \
        --frames 4 --height 16 --width 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import diffusers
import torch

from qvd_bench.collect.collector import collect, timestep_grid
from qvd_bench.collect.cost import estimate_cost, format_bytes
from qvd_bench.collect.hooks import describe_layer
from qvd_bench.models.families import FAMILIES
from qvd_bench.models.roles import _classify_by_table, leaf_layers
from qvd_bench.numerics.edges import SignedLogEdges

# Wan-AI/Wan2.2-T2V-A14B-Diffusers, transformer/config.json (each of the two experts).
WAN22_A14B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
# hunyuanvideo-community/HunyuanVideo, transformer/config.json.
HUNYUAN_VIDEO = {
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "num_layers": 20,
    "num_single_layers": 40,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": True,
    "text_embed_dim": 4096,
    "pooled_projection_dim": 768,
}
# Lightricks/LTX-Video, transformer/config.json.
LTX_VIDEO = {
    "in_channels": 128,
    "out_channels": 128,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 32,
    "attention_head_dim": 64,
    "cross_attention_dim": 2048,
    "num_layers": 28,
    "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 4096,
    "attention_bias": True,
    "attention_out_bias": True,
}
MODELS = {
    "Wan 2.2 A14B (one expert)": ("WanTransformer3DModel", WAN22_A14B),
    "HunyuanVideo": ("HunyuanVideoTransformer3DModel", HUNYUAN_VIDEO),
    "LTX-Video": ("LTXVideoTransformer3DModel", LTX_VIDEO),
}


def layer_infos(class_name: str, config: dict):
    """The LayerInfo of every leaf Linear/Conv of a denoiser built on the meta device."""
    with torch.device("meta"):
        denoiser = getattr(diffusers, class_name)(**config)
    family = FAMILIES.get(class_name)
    layers = leaf_layers(denoiser)
    roles = _classify_by_table(layers, family.role_table, class_name)
    return [
        describe_layer(name, module, roles[name].role, roles[name].decided_by)
        for name, module in layers.items()
    ]


def estimate(class_name: str, config: dict, *, steps: int = 50, samples: int = 16, **options):
    """``estimate_cost`` of every layer at ``steps`` steps with CFG; ``options`` override
    the collection defaults (histogram_bins, reservoir_capacity, temporal_grid, roles)."""
    roles = options.pop("roles", None)
    infos = [i for i in layer_infos(class_name, config) if roles is None or i.role in roles]
    settings = {
        "histogram_bins": SignedLogEdges(relative_error=0.01).num_bins,
        "reservoir_capacity": 256,
        "temporal_grid": len(timestep_grid(1)),
        **options,
    }
    return estimate_cost(
        infos,
        dict.fromkeys((i.name for i in infos), steps),
        branches=2,
        samples=samples,
        **settings,
    )


def measure(model: str, *, steps: int, frames: int, height: int, width: int) -> None:
    """Collects ``model`` and prints the estimate against what the collection measured."""
    from qvd_bench.config import CollectConfig

    config = CollectConfig(
        model=model,
        prompts=("a red fox running through snow", "a sailing boat on a calm sea at sunset"),
        steps=steps,
        frames=frames,
        height=height,
        width=width,
    )
    run_dir = Path(tempfile.mkdtemp(prefix="collect-cost-")) / "run"
    collect(config, run_dir, progress=False)
    cost = json.loads((run_dir / "manifest.json").read_text())["cost"]
    estimate, measured = cost["estimate"], cost["measured"]
    on_disk = {p.name: p.stat().st_size for p in run_dir.iterdir() if p.is_file()}
    print(f"{model}, {steps} steps, latent {frames}x{height}x{width}, 2 prompts, CFG")
    print(f"reservoir rows: {estimate['reservoir_rows']}")
    print("| part | estimated | measured | estimate / measured |")
    print("|---|---:|---:|---:|")
    rows = [
        (name, estimate["accumulator_parts"][name], measured["accumulator_parts"][name])
        for name in estimate["accumulator_parts"]
    ]
    rows.append(
        ("accumulators in all", estimate["accumulator_bytes"], measured["accumulator_bytes"])
    )
    rows += [(name, size, on_disk.get(name, 0)) for name, size in estimate["store_parts"].items()]
    rows.append(("store in all", estimate["store_bytes"], sum(on_disk.values())))
    for name, guess, real in rows:
        ratio = f"{guess / real:.3f}" if real else "–"
        print(f"| {name} | {guess:,} | {real:,} | {ratio} |")
    for stage in cost["stages"]:
        print(
            f"stage {stage['stage']}: {stage['wall_s']:.1f} s, peak host {format_bytes(stage['peak_host_bytes'])}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", metavar="MODEL", help="collect a zoo model and compare")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--height", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args()
    if args.measure:
        measure(
            args.measure, steps=args.steps, frames=args.frames, height=args.height, width=args.width
        )
        return
    print(
        "| model | layers hooked | input channels | keys | moments | histograms | "
        "accumulators in all | store (est.) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, (class_name, config) in MODELS.items():
        cost = estimate(class_name, config)
        layers = cost.keys // 100
        parts = cost.accumulator_parts
        print(
            f"| {label} | {layers} | {cost.channels:,} | {cost.keys:,} | "
            f"{format_bytes(parts['moments'])} | {format_bytes(parts['histograms'])} | "
            f"{format_bytes(cost.accumulator_bytes)} | {format_bytes(cost.store_bytes)} |"
        )


if __name__ == "__main__":
    main()
