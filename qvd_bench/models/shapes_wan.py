"""``shapes-wan``: a pixel-space Wan DiT trained on the shapes dataset, shipped with qvd-bench.

The model is a diffusers ``WanTransformer3DModel`` whose "latents" are clips of
``qvd_bench.datasets.shapes`` scaled to [−1, 1], (N, 3, 8, 16, 16), inside a ``WanPipeline``
with ``vae=None``: without a VAE the pipeline assumes ×4 temporal and ×8 spatial
compression, so it is called for 29 frames of 128×128 pixels and ``output_type="latent"``
to get 8 frames of 16×16 (``run_pipeline`` does this from the latent sizes). The text
encoder is a frozen tiny ``UMT5EncoderModel`` (random weights, shipped as well) behind a
word-level tokenizer over the dataset's vocabulary, built here; prompts are padded to
``TEXT_LENGTH`` tokens. The scheduler is ``FlowMatchEulerDiscreteScheduler`` with the
shift the model was trained for. ``benchmarks/train_reference.py`` made the weights
(EMA), its command and scores are in ``benchmarks/results/reference_training.md``.

The files live in ``WEIGHTS_DIR``; ``SHA256`` holds their expected hashes, checked at
every load, so a corrupt or foreign file is refused instead of silently sampling noise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from qvd_bench.datasets import shapes
from qvd_bench.errors import UserError
from qvd_bench.models.families import family_by_name
from qvd_bench.models.family import LoadedModel

NAME = "shapes-wan"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / NAME
CONFIG_FILE = "config.json"
TRANSFORMER_FILE = "transformer.safetensors"
TEXT_ENCODER_FILE = "text_encoder.safetensors"
# Expected SHA-256 of each shipped file (written by ``save_weights``, recorded here).
SHA256: dict[str, str] = {
    CONFIG_FILE: "5bbd72570eef374eb75effe72891351f1a4a95d15047594254b8ed170aac5eda",
    TRANSFORMER_FILE: "4e7b83bf7bd5e465dad4d77312c570a42aeb548e29127d8b3b884ee8a6b84dc2",
    TEXT_ENCODER_FILE: "7527175b0bc3e2639cd97c2102d87485b6be96a76e332e53ebec5e8c7001055d",
}
# Prompts are padded (with zero embeddings) to this many tokens, in training and sampling.
TEXT_LENGTH = 16
# What the pipeline's pixel sizes must be for 8 x 16 x 16 latents without a VAE.
PIPELINE_FRAMES = (shapes.FRAMES - 1) * 4 + 1
PIPELINE_HEIGHT = shapes.HEIGHT * 8
PIPELINE_WIDTH = shapes.WIDTH * 8


def build_tokenizer():
    """A word-level tokenizer over the dataset's vocabulary, T5-style: "</s>" ends every text.

    Returns:
        ``PreTrainedTokenizerFast`` with pad id 0, eos id 1, unk id 2 (as UMT5 expects)
        and ``model_max_length`` ``TEXT_LENGTH``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in shapes.VOCABULARY:
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TEXT_LENGTH,
    )


def text_encoder_config(width: int, layers: int, vocab_size: int) -> dict[str, Any]:
    """The ``UMT5Config`` fields of the tiny text encoder."""
    return {
        "vocab_size": vocab_size,
        "d_model": width,
        "d_kv": width // 4,
        "d_ff": 2 * width,
        "num_layers": layers,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def build_text_encoder(config: dict[str, Any], seed: int | None = None):
    """The frozen tiny UMT5 encoder, in eval mode without gradients.

    Args:
        config: ``text_encoder_config``'s fields.
        seed: seeds its random weights (through the global RNG); None leaves the RNG
            alone (for weights loaded afterwards, the caller forks the RNG).
    """
    from transformers import UMT5Config, UMT5EncoderModel

    if seed is not None:
        torch.manual_seed(seed)
    encoder = UMT5EncoderModel(UMT5Config(**config)).eval()
    encoder.requires_grad_(False)
    return encoder


def build_pipeline(transformer, tokenizer, text_encoder, shift: float):
    """The ``WanPipeline`` (``vae=None``) of a shapes model."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipeline = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        transformer=transformer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_weights(folder: str | Path, transformer, text_encoder, shift: float) -> dict[str, str]:
    """Writes the files ``load_shapes_wan`` reads and returns their SHA-256.

    Args:
        folder: where to write ``CONFIG_FILE``, ``TRANSFORMER_FILE``, ``TEXT_ENCODER_FILE``.
        transformer: the ``WanTransformer3DModel`` (float32 weights are written as they are).
        text_encoder: the ``UMT5EncoderModel``.
        shift: the scheduler shift the model samples with.

    Returns:
        File name -> SHA-256 hex digest (what ``SHA256`` must hold).
    """
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = text_encoder.config
    config = {
        "transformer": {k: v for k, v in transformer.config.items() if not k.startswith("_")},
        "text_encoder": text_encoder_config(text.d_model, text.num_layers, text.vocab_size),
        "scheduler_shift": float(shift),
        "text_length": TEXT_LENGTH,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    save_model(transformer, str(folder / TRANSFORMER_FILE))
    save_model(text_encoder, str(folder / TEXT_ENCODER_FILE))
    return {name: file_sha256(folder / name) for name in SHA256}


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: Path, expected: str) -> None:
    """Refuses a missing file or one whose SHA-256 is not ``expected``.

    Raises:
        UserError: naming the file and the expected hash.
    """
    if not path.is_file():
        raise UserError(f"{path} is missing (expected SHA-256 {expected}); reinstall qvd-bench")
    actual = file_sha256(path)
    if actual != expected:
        raise UserError(
            f"{path} has SHA-256 {actual}, expected {expected}: the file is corrupt or "
            "not the one shipped; reinstall qvd-bench"
        )


def _read_config(folder: Path, hashes: dict[str, str]) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    check_file(path, hashes[CONFIG_FILE])
    return json.loads(path.read_text())


def transformer_config(
    folder: str | Path | None = None, hashes: dict[str, str] | None = None
) -> dict[str, Any]:
    """The ``WanTransformer3DModel`` config dict of the shipped model (hash checked)."""
    folder = Path(WEIGHTS_DIR if folder is None else folder)
    return dict(_read_config(folder, SHA256 if hashes is None else hashes)["transformer"])


def load_shapes_wan(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    folder: str | Path | None = None,
    hashes: dict[str, str] | None = None,
) -> LoadedModel:
    """Loads the trained model and its ``WanPipeline``, checking every file's SHA-256.

    Args:
        device: where the pipeline goes.
        dtype: its floating dtype.
        folder: where the files are; None: the shipped ``WEIGHTS_DIR``.
        hashes: file name -> expected SHA-256 (``SHA256``).

    Returns:
        A ``LoadedModel`` named ``NAME`` with ``pipeline`` set, ``random_weights`` False
        and no outlier knobs; the denoiser is the pipeline's transformer.

    Raises:
        UserError: a missing file, or one whose SHA-256 differs from the expected one.
    """
    from safetensors.torch import load_model

    folder = Path(WEIGHTS_DIR if folder is None else folder)
    hashes = SHA256 if hashes is None else hashes
    config = _read_config(folder, hashes)
    for name in (TRANSFORMER_FILE, TEXT_ENCODER_FILE):
        check_file(folder / name, hashes[name])
    family = family_by_name("wan")
    # Building draws random init weights, about to be overwritten: keep the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        transformer = family.build(config["transformer"])
        text_encoder = build_text_encoder(config["text_encoder"])
    load_model(transformer, str(folder / TRANSFORMER_FILE), strict=True)
    load_model(text_encoder, str(folder / TEXT_ENCODER_FILE), strict=True)
    transformer.eval()
    pipeline = build_pipeline(
        transformer, build_tokenizer(), text_encoder, config["scheduler_shift"]
    )
    pipeline.to(device=device)
    if dtype != torch.float32:
        pipeline.to(dtype=dtype)
    return LoadedModel(
        name=NAME,
        family=family,
        denoiser=transformer,
        pipeline=pipeline,
        random_weights=False,
        weight_seed=None,
        knobs={},
        encode_prompts=lambda prompts: encode_prompts(pipeline, prompts),
    )


@torch.no_grad()
def encode_prompts(pipeline, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) text states of prompts, as the pipeline makes them for CFG.

    The unconditional branch is the empty caption (the pipeline's default negative prompt,
    and the caption the model was trained on with caption dropout).

    Returns:
        Two (N, ``TEXT_LENGTH``, text_dim) tensors on the pipeline's device and dtype.
    """
    reference = next(pipeline.transformer.parameters())
    cond, uncond = pipeline.encode_prompt(
        list(prompts),
        negative_prompt=[""] * len(prompts),
        do_classifier_free_guidance=True,
        max_sequence_length=TEXT_LENGTH,
        device=reference.device,
    )
    return cond.to(reference.dtype), uncond.to(reference.dtype)
