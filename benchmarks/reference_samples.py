"""Sample grid of the shipped ``shapes-wan``: one row per caption (with what the detectors
read), one column per frame; CFG 3, 20 steps, sampling seed 0, through ``run_pipeline``.

Captions: two held-out seen captions per motion (varied shapes and colours), every 8th
unseen caption and the first two two-object captions.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/reference_samples.py \\
        benchmarks/results/reference_training_samples.png
"""

from __future__ import annotations

import sys

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from qvd_bench.datasets import shapes
from qvd_bench.evaluate.groundtruth import detect
from qvd_bench.models.pipelines import run_pipeline
from qvd_bench.models.zoo import load_model

SCALE = 4
PAD = 2
TEXT_WIDTH = 330


def grid_captions() -> list[str]:
    seen = [shapes.parse_caption(c)[0] for c in shapes.heldout_captions("seen")]
    picked = []
    for i, motion in enumerate(shapes.MOTIONS):
        for k in range(2):
            shape, color = shapes.SHAPES[(i + 2 * k) % 4], shapes.COLORS[(i + 3 * k) % 6]
            candidates = [s for s in seen if s.motion == motion and s.shape == shape]
            exact = [s for s in candidates if s.color == color]
            picked.append((exact or candidates)[0].phrase)
    picked += shapes.heldout_captions("unseen")[::8]
    picked += shapes.heldout_captions("two-object")[:2]
    return picked


def main(path: str) -> None:
    torch.set_num_threads(1)
    model = load_model("shapes-wan")
    captions = grid_captions()
    latents = run_pipeline(
        model,
        captions,
        steps=20,
        guidance_scale=3.0,
        seed=0,
        sample_ids=range(len(captions)),
        frames=shapes.FRAMES,
        height=shapes.HEIGHT,
        width=shapes.WIDTH,
    )
    clips = ((latents + 1) / 2).clamp(0, 1).numpy()
    tile = shapes.HEIGHT * SCALE
    image = PIL.Image.new(
        "RGB",
        (TEXT_WIDTH + shapes.FRAMES * (tile + PAD) + PAD, len(captions) * (tile + PAD) + PAD),
        (60, 60, 60),
    )
    draw = PIL.ImageDraw.Draw(image)
    for row, (caption, found) in enumerate(zip(captions, detect(clips, captions))):
        y = PAD + row * (tile + PAD)
        read = "; ".join(f"{o.color} {o.shape} {o.motion}" for o in found.objects)
        draw.text((4, y + 4), caption, fill=(255, 255, 255))
        draw.text((4, y + 20), "detected: " + read, fill=(200, 200, 120))
        for frame in range(shapes.FRAMES):
            pixels = (clips[row, :, frame].transpose(1, 2, 0) * 255).round().astype(np.uint8)
            cell = PIL.Image.fromarray(pixels).resize((tile, tile), PIL.Image.NEAREST)
            image.paste(cell, (TEXT_WIDTH + PAD + frame * (tile + PAD), y))
    image.save(path)


if __name__ == "__main__":
    main(sys.argv[1])
