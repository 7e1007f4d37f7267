"""Trains a pixel-space Wan DiT on the shapes dataset: the reference model with ground truth.

The model is a diffusers ``WanTransformer3DModel`` whose "latents" are the clips themselves
(in_channels = out_channels = 3, (N, 3, 8, 16, 16) scaled to [−1, 1]), conditioned on its
caption through the text encoder a ``WanPipeline`` uses: a frozen, randomly initialised
tiny ``UMT5EncoderModel`` behind a word-level tokenizer over the dataset's closed
vocabulary, both built in memory (nothing downloads).

Training is rectified flow as Wan's ``FlowMatchEulerDiscreteScheduler`` samples it:
x_σ = (1 − σ)·x0 + σ·ε, timestep = 1000·σ, and the model predicts the velocity ε − x0
(the scheduler steps x ← x + (σ_next − σ)·v with σ falling from 1 to 0). σ is drawn
logit-normal or uniform, optionally shifted as Wan shifts its sampling schedule. The
caption is replaced by the empty one (the pipeline's default negative prompt) with
probability ``--caption-dropout``, so classifier-free guidance works; EMA weights are kept
beside the trained ones; the optimiser is AdamW after a linear warm-up.

Determinism and resumption: the batch of step s is ``shapes.make_clips(seed, batch,
start=s·batch)`` (training split), and its noise, σ and dropped captions come from a
generator seeded with (seed, s), so the data stream is a pure function of (seed, step).
A checkpoint (model, EMA, optimiser, torch RNG state, step, configuration) is written
atomically every ``--checkpoint-every`` steps; ``--resume`` continues from it and gives
the same weights, bit for bit, as an uninterrupted run (on the same machine and torch).

Evaluation, every ``--eval-every`` steps and at the end: the EMA model samples the 144
held-out *seen* captions (``shapes.heldout_captions("seen")``) through a ``WanPipeline``
with ``vae=None`` and ``output_type="latent"`` (its latents are the pixels; without a VAE
the pipeline assumes ×4 temporal and ×8 spatial compression, so it is asked for
29 frames of 128×128 to get 8 latent frames of 16×16), once per guidance scale, and
``qvd_bench.evaluate.groundtruth.score_clips`` scores the clips; ``direction_probe`` also
logs whether the model reads the caption's direction word at all. The EMA pipeline is also
saved (safetensors, ``pipeline/`` under the output folder, loadable with
``WanPipeline.from_pretrained(folder, vae=None, transformer_2=None)``).

``--score seen,unseen,two-object`` scores the checkpoint's EMA model on those held-out
caption sets (with shape and motion confusions) and ``--export DIR`` writes it as the
files of the ``shapes-wan`` zoo model (``qvd_bench.models.shapes_wan.save_weights``), printing
their SHA-256; both take the model flags of the run and do not train.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/train_reference.py --out runs/shapes-wan \\
        [--steps 20000] [--resume] [--eval-every 2000] [--guidance 1,3] \\
        [--decay-start STEP --lr-min 1e-4]

Output folder: ``checkpoint.pt`` (resumption state), ``log.jsonl`` (one JSON record per
logged step and per evaluation), ``pipeline/`` (EMA weights as a diffusers pipeline).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qvd_bench.datasets import shapes
from qvd_bench.evaluate.groundtruth import detect, score_clips
from qvd_bench.models import shapes_wan

# Pixel-space sizes as the pipeline sees them without a VAE (×4 temporal, ×8 spatial).
PIPELINE_FRAMES = shapes_wan.PIPELINE_FRAMES
PIPELINE_HEIGHT = shapes_wan.PIPELINE_HEIGHT
PIPELINE_WIDTH = shapes_wan.PIPELINE_WIDTH
TEXT_LENGTH = shapes_wan.TEXT_LENGTH
NUM_TRAIN_TIMESTEPS = 1000
# Settings that shape the model or the data stream: a resumed run must keep them.
_FIXED_ON_RESUME = (
    "seed",
    "batch",
    "patch",
    "dim",
    "heads",
    "layers",
    "ffn_mult",
    "text_dim",
    "text_layers",
    "text_seed",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--steps", type=int, default=20000, help="total training steps")
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="stop (and checkpoint) after this wall time"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    # Model.
    parser.add_argument(
        "--patch",
        default="4,2,2",
        help="patch size (frames, height, width); keep 3 x their product <= --dim, the "
        "velocity carries every value of a patch's noise through the hidden size",
    )
    parser.add_argument("--dim", type=int, default=64, help="hidden size")
    parser.add_argument(
        "--heads", type=int, default=2, help="attention heads (head dim = dim / heads)"
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn-mult", type=int, default=4, help="feed-forward size / hidden size")
    parser.add_argument("--text-dim", type=int, default=32, help="text encoder width")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--text-seed", type=int, default=0, help="seed of the frozen text encoder")
    # Optimisation.
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    parser.add_argument(
        "--decay-start",
        type=int,
        default=None,
        help="step where the learning rate starts its linear decay to --lr-min (default: none)",
    )
    parser.add_argument("--lr-min", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument(
        "--sigma-sampling", choices=("logit-normal", "uniform"), default="logit-normal"
    )
    parser.add_argument(
        "--train-shift",
        type=float,
        default=3.0,
        help="shift applied to the drawn sigma (more high-noise steps)",
    )
    # Sampling and evaluation.
    parser.add_argument(
        "--sample-shift", type=float, default=3.0, help="scheduler shift at sampling"
    )
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", default="1,3", help="guidance scales evaluated")
    parser.add_argument(
        "--eval-every", type=int, default=2000, help="evaluation interval in steps; 0: none"
    )
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    # Instead of training: score or export the checkpoint's EMA weights.
    parser.add_argument(
        "--score",
        default=None,
        help="score OUT/checkpoint.pt's EMA model on these held-out caption sets "
        "(comma-separated: seen, unseen, two-object), log it and stop",
    )
    parser.add_argument(
        "--export",
        type=Path,
        default=None,
        help="write OUT/checkpoint.pt's EMA model as shipped weights to this folder and stop",
    )
    args = parser.parse_args(argv)
    args.patch = tuple(int(p) for p in args.patch.split(","))
    args.guidance = tuple(float(g) for g in args.guidance.split(","))
    if len(args.patch) != 3 or args.steps < 1 or args.batch < 1:
        parser.error("--patch needs 3 sizes; --steps and --batch must be at least 1")
    if args.dim % args.heads:
        parser.error("--dim must be a multiple of --heads")
    return args


# --- model, text encoder, pipeline ---------------------------------------------------------


def build_tokenizer():
    """The word-level tokenizer of ``qvd_bench.models.shapes_wan`` (the shipped model's)."""
    return shapes_wan.build_tokenizer()


def build_text_encoder(args, vocab_size: int):
    """The frozen tiny UMT5 encoder (random weights from ``text_seed``)."""
    config = shapes_wan.text_encoder_config(args.text_dim, args.text_layers, vocab_size)
    return shapes_wan.build_text_encoder(config, seed=args.text_seed)


def build_transformer(args):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(args.seed)
    return WanTransformer3DModel(
        patch_size=args.patch,
        num_attention_heads=args.heads,
        attention_head_dim=args.dim // args.heads,
        in_channels=shapes.CHANNELS,
        out_channels=shapes.CHANNELS,
        text_dim=args.text_dim,
        freq_dim=256,
        ffn_dim=args.ffn_mult * args.dim,
        num_layers=args.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def build_pipeline(transformer, tokenizer, text_encoder, sample_shift: float):
    return shapes_wan.build_pipeline(transformer, tokenizer, text_encoder, sample_shift)


def caption_embeddings(pipeline, captions) -> torch.Tensor:
    """(len(captions), TEXT_LENGTH, text_dim) embeddings, exactly as the pipeline makes them."""
    with torch.no_grad():
        embeds, _ = pipeline.encode_prompt(
            list(captions),
            do_classifier_free_guidance=False,
            max_sequence_length=TEXT_LENGTH,
            device=torch.device("cpu"),
        )
    return embeds


# --- the data stream -----------------------------------------------------------------------


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s noise, sigma and caption dropout."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def draw_sigmas(args, count: int, generator: torch.Generator) -> torch.Tensor:
    if args.sigma_sampling == "logit-normal":
        u = torch.sigmoid(torch.randn(count, generator=generator))
    else:
        u = torch.rand(count, generator=generator)
    shift = args.train_shift
    return shift * u / (1.0 + (shift - 1.0) * u)


def training_batch(args, step: int, caption_index: dict[str, int]):
    """The batch of one step: a pure function of (seed, step).

    Returns:
        x0 (B, 3, F, H, W) in [−1, 1], noise like x0, sigmas (B,), caption indices (B,)
        into the embedding table (index 0 is the empty caption).
    """
    clips, truths = shapes.make_clips(args.seed, args.batch, start=step * args.batch)
    x0 = torch.from_numpy(clips) * 2.0 - 1.0
    generator = step_generator(args.seed, step)
    noise = torch.randn(x0.shape, generator=generator)
    sigmas = draw_sigmas(args, args.batch, generator)
    dropped = torch.rand(args.batch, generator=generator) < args.caption_dropout
    index = torch.tensor([caption_index[t.caption] for t in truths])
    index = torch.where(dropped, torch.zeros_like(index), index)
    return x0, noise, sigmas, index


def flow_matching_loss(model, x0, noise, sigmas, text) -> torch.Tensor:
    """Mean squared error of the velocity ε − x0 at x_σ = (1 − σ)·x0 + σ·ε."""
    s = sigmas.view(-1, 1, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    prediction = model(
        hidden_states=noisy,
        timestep=sigmas * NUM_TRAIN_TIMESTEPS,
        encoder_hidden_states=text,
        return_dict=False,
    )[0]
    return torch.nn.functional.mse_loss(prediction, noise - x0)


def learning_rate(args, step: int) -> float:
    """Linear warm-up, then constant; from ``decay_start`` on, linear decay to ``lr_min``
    at the last step."""
    rate = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
    if args.decay_start is not None and step >= args.decay_start:
        done = (step - args.decay_start) / max(args.steps - args.decay_start, 1)
        rate = args.lr + (args.lr_min - args.lr) * min(done, 1.0)
    return rate


@torch.no_grad()
def update_ema(ema, model, step: int, decay: float) -> None:
    # Short runs average over fewer steps at first (the usual (1 + t) / (10 + t) warm-up).
    d = min(decay, (1.0 + step) / (10.0 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - d)


# --- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def sample_clips(pipeline, captions, guidance: float, steps: int, seed: int) -> torch.Tensor:
    """Clips (N, 3, F, H, W) in [0, 1] sampled by the pipeline in pixel space."""
    generator = torch.Generator().manual_seed(seed)
    latents = pipeline(
        prompt=list(captions),
        height=PIPELINE_HEIGHT,
        width=PIPELINE_WIDTH,
        num_frames=PIPELINE_FRAMES,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="latent",
        max_sequence_length=TEXT_LENGTH,
    ).frames
    expected = (len(captions), *shapes.CLIP_SHAPE)
    if tuple(latents.shape) != expected:
        raise RuntimeError(f"pipeline returned {tuple(latents.shape)}, expected {expected}")
    return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)


_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
PROBE_SIGMAS = (0.7, 0.85, 0.95, 1.0)


def _travel_along(clips, specs) -> np.ndarray:
    """(N,) centroid travel (pixels, first to last present frame) along each caption's direction."""
    travel = []
    for found, spec in zip(detect(clips, [(s,) for s in specs]), specs):
        centers = [c for c in found.objects[0].centers if c is not None]
        along = (
            np.asarray(centers[-1]) - np.asarray(centers[0]) if len(centers) > 1 else np.zeros(2)
        )
        travel.append(float(along @ np.asarray(shapes.DIRECTIONS[spec.motion])))
    return np.asarray(travel)


@torch.no_grad()
def direction_probe(pipeline, seed: int, count: int = 96) -> dict[str, list[float]]:
    """Whether the model reads the direction word: the caption-swap probe.

    Dataset clips that translate are noised to each σ of ``PROBE_SIGMAS`` and denoised in
    one step (x̂0 = x_σ − σ·v) under their caption and under the caption with the opposite
    direction. A model that uses the word moves x̂0 along the true direction more with the
    true caption; one that ignores it gives the same travel for both.

    Returns:
        {"sigma{σ}": [mean travel with the true caption, with the opposite caption]}.
    """
    clips, truths = shapes.make_clips(seed, 8 * count, split="train")
    keep = [i for i, t in enumerate(truths) if t.objects[0].motion in _OPPOSITE][:count]
    specs = [truths[i].specs[0] for i in keep]
    swapped = [shapes.ObjectSpec(s.shape, s.color, _OPPOSITE[s.motion]) for s in specs]
    x0 = torch.from_numpy(clips[keep]) * 2.0 - 1.0
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    texts = [caption_embeddings(pipeline, [s.phrase for s in group]) for group in (specs, swapped)]
    result = {}
    for sigma in PROBE_SIGMAS:
        noisy = (1.0 - sigma) * x0 + sigma * noise
        timestep = torch.full((len(keep),), sigma * NUM_TRAIN_TIMESTEPS)
        travels = []
        for text in texts:
            v = pipeline.transformer(
                hidden_states=noisy,
                timestep=timestep,
                encoder_hidden_states=text,
                return_dict=False,
            )[0]
            x0_hat = ((noisy - sigma * v + 1.0) / 2.0).clamp(0.0, 1.0)
            travels.append(round(float(_travel_along(x0_hat, specs).mean()), 3))
        result[f"sigma{sigma:g}"] = travels
    return result


def confusion(clips, captions) -> dict[str, dict[str, dict[str, int]]]:
    """Per attribute ("shape", "motion"): caption value -> detected value -> count, over
    every caption object (detected "erratic" / "none" included)."""
    counts: dict[str, dict[str, dict[str, int]]] = {"shape": {}, "motion": {}}
    for found, caption in zip(detect(clips, captions), captions):
        for spec, obj in zip(shapes.parse_caption(caption), found.objects):
            for attribute in counts:
                row = counts[attribute].setdefault(getattr(spec, attribute), {})
                seen = str(getattr(obj, attribute))
                row[seen] = row.get(seen, 0) + 1
    return counts


def evaluate(args, pipeline, caption_sets=("seen",), probe: bool = True) -> dict:
    """Ground-truth scores of the EMA pipeline's samples, per caption set and guidance.

    Returns:
        {"cfg3": scores} for the "seen" set alone (the training log's format), else
        {"seen/cfg3": scores with their "confusion", "unseen/cfg3": ...}; plus
        "direction_probe" when ``probe``.
    """
    scores = {}
    for caption_set in caption_sets:
        captions = shapes.heldout_captions(caption_set)
        for guidance in args.guidance:
            clips = sample_clips(pipeline, captions, guidance, args.sample_steps, args.eval_seed)
            key = (
                f"cfg{guidance:g}"
                if tuple(caption_sets) == ("seen",)
                else (f"{caption_set}/cfg{guidance:g}")
            )
            scores[key] = score_clips(clips, captions)
            if not probe:
                scores[key]["confusion"] = confusion(clips, captions)
    if probe:
        scores["direction_probe"] = direction_probe(pipeline, args.eval_seed)
    return scores


# --- checkpoints -----------------------------------------------------------------------------


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_pipeline(pipeline, folder: Path) -> None:
    """Saves the (EMA) pipeline as safetensors, replacing the folder in one rename."""
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def config_of(args) -> dict:
    return {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"
    }


def truncate_log(path: Path, step: int) -> None:
    """Drops log records written after the checkpoint a run resumes from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = args.out / "checkpoint.pt"
    log_path = args.out / "log.jsonl"

    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(args, len(tokenizer))
    model = build_transformer(args)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start = 0
    if args.score or args.export:
        args.resume = True
    if args.resume:
        state = torch.load(checkpoint_path, weights_only=True)
        for key in _FIXED_ON_RESUME:
            saved = state["config"][key]
            current = config_of(args)[key]
            if saved != current:
                print(f"error: checkpoint has {key}={saved}, this run {current}", file=sys.stderr)
                return 2
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        if args.export:
            hashes = shapes_wan.save_weights(args.export, ema, text_encoder, args.sample_shift)
            print(json.dumps({"step": start, "sha256": hashes}, indent=1))
            return 0
        if not args.score:
            truncate_log(log_path, start)
            print(f"resumed at step {start}")
    elif log_path.exists():
        log_path.unlink()
    if not args.score:
        (args.out / "config.json").write_text(json.dumps(config_of(args), indent=1) + "\n")

    pipeline = build_pipeline(ema, tokenizer, text_encoder, args.sample_shift)
    pipeline.set_progress_bar_config(disable=True)
    train_captions = [""] + [spec.phrase for spec in shapes.combinations("train")]
    caption_index = {caption: i for i, caption in enumerate(train_captions)}
    table = caption_embeddings(pipeline, train_captions)
    if args.score:
        t0 = time.perf_counter()
        ema.eval()
        scores = evaluate(args, pipeline, args.score.split(","), probe=False)
        record = {"step": start, "score": scores, "eval_s": round(time.perf_counter() - t0, 1)}
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        return 0
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.3f} M parameters, {start} -> {args.steps} steps")

    def log(record: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    def checkpoint(step: int) -> None:
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "config": config_of(args),
        }
        atomic_torch_save(state, checkpoint_path)
        save_pipeline(pipeline, args.out / "pipeline")

    def run_eval(step: int) -> None:
        t0 = time.perf_counter()
        ema.eval()
        scores = evaluate(args, pipeline)
        log({"step": step, "eval": scores, "eval_s": round(time.perf_counter() - t0, 1)})

    began = time.perf_counter()
    window_loss, window_start = [], time.perf_counter()
    model.train()
    step = start
    while step < args.steps:
        x0, noise, sigmas, index = training_batch(args, step, caption_index)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step)
        loss = flow_matching_loss(model, x0, noise, sigmas, table[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        update_ema(ema, model, step, args.ema_decay)
        step += 1
        window_loss.append(loss.item())
        if not math.isfinite(window_loss[-1]):
            print(f"error: loss is {window_loss[-1]} at step {step}", file=sys.stderr)
            return 1
        if step % args.log_every == 0:
            elapsed = time.perf_counter() - window_start
            log(
                {
                    "step": step,
                    "loss": round(float(np.mean(window_loss)), 5),
                    "lr": learning_rate(args, step - 1),
                    "s_per_step": round(elapsed / len(window_loss), 4),
                }
            )
            window_loss, window_start = [], time.perf_counter()
        out_of_time = (
            args.max_minutes is not None and time.perf_counter() - began > 60 * args.max_minutes
        )
        if step % args.checkpoint_every == 0 or step == args.steps or out_of_time:
            checkpoint(step)
        if args.eval_every > 0 and (
            step % args.eval_every == 0 or step == args.steps or out_of_time
        ):
            run_eval(step)
            window_start = time.perf_counter()
        if out_of_time:
            print(f"stopped after {args.max_minutes} minutes at step {step}")
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
