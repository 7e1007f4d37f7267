"""``qvd-bench info``: a summary of a stored statistics run."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="summarise a stored statistics run")
    parser.add_argument("run", help="the run directory (stats/NAME)")


def run(args: argparse.Namespace) -> int:
    from qvd_bench.store import StatsRun

    stats = StatsRun(args.run)
    m = stats.manifest
    model = m["model"]
    print(
        f"{stats.path}: {model['name']} ({model['denoiser_class']}, {model['parameters']:,} parameters)"
    )
    if model["random_weights"]:
        knobs = ", ".join(f"{k} {v:g}" for k, v in sorted(model["knobs"].items()))
        print(f"  random weights: seed {model['weight_seed']}" + (f", {knobs}" if knobs else ""))
    else:
        print("  trained weights")
    config = m["config"]
    print(
        f"  sampling: {len(m['prompts'])} prompts, {config['steps']} steps, guidance "
        f"{config['guidance_scale']:g}, seed {config['seed']}, latent "
        f"{config['frames']}x{config['height']}x{config['width']}"
    )
    print(f"  timesteps: {len(m['schedule'])}, layers: {len(m['layers'])}, created {m['created']}")
    counts = stats.layers.groupby("role").size()
    print("  roles: " + ", ".join(f"{role} {n}" for role, n in counts.items()))
    for name in ("channels", "histograms", "temporal", "weights"):
        print(f"  {name + '.parquet':<20} {len(getattr(stats, name)):>10,} rows")
    print(f"  reservoir.safetensors {len(stats.reservoir):>8,} layers")
    return 0
