"""Real diffusers pipelines around the tiny presets, and running a pipeline sample by sample.

``build_tiny_pipeline`` wraps a preset's denoiser (from ``zoo.load_model``) in the diffusers
pipeline its family ships with, next to a tiny VAE, a tiny text encoder, a tokenizer built
in memory from a small vocabulary, and the family's usual scheduler. Nothing is downloaded,
and the result saves with ``save_pretrained`` and reloads offline with
``DiffusionPipeline.from_pretrained(directory, local_files_only=True)``.

``run_pipeline`` drives any supported pipeline (tiny or real) one sample at a time inside
``CallTracker.batch([sample_id])``, so that layer hooks see which sample, timestep and CFG
branch each denoiser call computes.

Sizes: ``frames``, ``height`` and ``width`` are always **latent** sizes (what the denoiser
sees, as in the minimal sampler); they are converted to the pixel sizes a pipeline takes
with its VAE's spatial and temporal compression factors.

Image-to-video pipelines (StableVideoDiffusionPipeline, I2VGenXLPipeline) need a
conditioning image. There is no dataset behind the benchmark prompts, so each sample gets a
synthetic one: a smooth random RGB image (a 4x4 grid of random colours, bilinearly
upsampled to the pixel size), seeded from (seed, sample id).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import nn

from qvd_bench.errors import UserError
from qvd_bench.models.family import LoadedModel
from qvd_bench.models.sampling import CallTracker
from qvd_bench.models.zoo import pipeline_denoisers

# The diffusers pipeline class each tiny preset is wrapped in.
PRESET_PIPELINES: dict[str, str] = {
    "tiny-unet3d": "TextToVideoSDPipeline",
    "tiny-animatediff": "AnimateDiffPipeline",
    "tiny-svd": "StableVideoDiffusionPipeline",
    "tiny-i2vgenxl": "I2VGenXLPipeline",
    "tiny-latte": "LattePipeline",
    "tiny-cogvideox": "CogVideoXPipeline",
    "tiny-wan": "WanPipeline",
}


@dataclass(frozen=True)
class _CallSpec:
    """How ``run_pipeline`` calls one pipeline class.

    Attributes:
        frames_arg: keyword of the frame count ("num_frames" or "video_length").
        image: the pipeline takes a conditioning image (image-to-video).
        text: the pipeline takes a text prompt.
        separate_cfg: the pipeline runs the CFG branches as two denoiser calls per step,
            conditional first (instead of one call on cat([uncond, cond])).
        extra: fixed keyword arguments.
    """

    frames_arg: str = "num_frames"
    image: bool = False
    text: bool = True
    separate_cfg: bool = False
    extra: tuple[tuple[str, Any], ...] = ()


_CALL_SPECS: dict[str, _CallSpec] = {
    "TextToVideoSDPipeline": _CallSpec(),
    "AnimateDiffPipeline": _CallSpec(),
    "StableVideoDiffusionPipeline": _CallSpec(image=True, text=False),
    # I2VGenXL's default clip_skip=1 reaches ``text_encoder.text_model``, which
    # transformers 5's CLIPTextModel no longer has: use the last layer's states.
    "I2VGenXLPipeline": _CallSpec(image=True, extra=(("clip_skip", None),)),
    # Latte's caption cleaning needs bs4/ftfy and is meant for real captions only.
    "LattePipeline": _CallSpec(frames_arg="video_length", extra=(("clean_caption", False),)),
    "CogVideoXPipeline": _CallSpec(),
    "WanPipeline": _CallSpec(separate_cfg=True),
}

SUPPORTED_PIPELINES: tuple[str, ...] = tuple(_CALL_SPECS)

# Tiny text encoder / VAE sizes (the denoiser's dims come from its own config).
_TEXT_LAYERS = 2
_TEXT_HEADS = 2
_T5_HEAD_DIM = 8
_CLIP_MAX_LENGTH = 77
# CLIP vision tower for the image-to-video pipelines: 224 px is what their preprocessing
# resizes PIL images to; 32 px patches keep it to 49 tokens.
_IMAGE_SIZE = 224
_IMAGE_PATCH = 32


# --------------------------------------------------------------------------- tokenizers


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary over printable ASCII, with a few merges."""
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    chars = [chr(c) for c in range(33, 127)]
    tokens += chars + [c + "</w>" for c in chars]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("e", "r")]
    tokens += ["th", "the</w>", "an", "and</w>", "in", "er"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_CLIP_MAX_LENGTH)


def _t5_vocab() -> list[tuple[str, float]]:
    """A unigram vocabulary: specials, word-start and inner letters, digits, a few words."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces += [("▁" + c, -3.0) for c in letters]
    pieces += [(c, -4.0) for c in letters + "0123456789.,'-"]
    pieces += [("▁" + w, -1.0) for w in ("a", "the", "of", "in", "on", "and", "is", "with")]
    return pieces


def _t5_tokenizer(max_length: int):
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=max_length)


# --------------------------------------------------------------------------- components


def _heads(dim: int) -> int:
    return _TEXT_HEADS if dim % _TEXT_HEADS == 0 else 1


def _clip_text_encoder(dim: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = _clip_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=dim,
        intermediate_size=2 * dim,
        projection_dim=dim,
        num_hidden_layers=_TEXT_LAYERS,
        num_attention_heads=_heads(dim),
        max_position_embeddings=_CLIP_MAX_LENGTH,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return CLIPTextModel(config).eval()


def _t5_text_encoder(dim: int, umt5: bool = False):
    """A T5 encoder (or UMT5, Wan's text encoder class) with ``dim`` output features."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (
        (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    )
    config = config_class(
        vocab_size=len(_t5_vocab()),
        d_model=dim,
        d_kv=_T5_HEAD_DIM,
        d_ff=2 * dim,
        num_layers=_TEXT_LAYERS,
        num_heads=_TEXT_HEADS,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return model_class(config).eval()


def _clip_image_encoder(dim: int):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    config = CLIPVisionConfig(
        hidden_size=dim,
        intermediate_size=2 * dim,
        projection_dim=dim,
        num_hidden_layers=_TEXT_LAYERS,
        num_attention_heads=_heads(dim),
        image_size=_IMAGE_SIZE,
        patch_size=_IMAGE_PATCH,
    )
    processor = CLIPImageProcessor(crop_size=_IMAGE_SIZE, size=_IMAGE_SIZE)
    return CLIPVisionModelWithProjection(config).eval(), processor


def _autoencoder_kl(latent_channels: int):
    from diffusers import AutoencoderKL

    # Two blocks: 2x spatial compression.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=32,
    ).eval()


def _ddim(**overrides: Any):
    from diffusers import DDIMScheduler

    config: dict[str, Any] = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    config.update(overrides)
    return DDIMScheduler(**config)


def _denoiser_prediction(loaded: LoadedModel) -> str:
    prediction = getattr(loaded.family, "prediction_type", "epsilon")
    return prediction if prediction in ("epsilon", "v_prediction", "sample") else "epsilon"


def _build_text_to_video_sd(loaded: LoadedModel):
    from diffusers import TextToVideoSDPipeline

    unet = loaded.denoiser
    dim = unet.config.cross_attention_dim
    return TextToVideoSDPipeline(
        vae=_autoencoder_kl(unet.config.in_channels),
        text_encoder=_clip_text_encoder(dim),
        tokenizer=_clip_tokenizer(),
        unet=unet,
        # ModelScope T2V: DDIM on the SD scaled-linear betas.
        scheduler=_ddim(prediction_type=_denoiser_prediction(loaded)),
    )


def _build_animatediff(loaded: LoadedModel):
    from diffusers import AnimateDiffPipeline

    unet = loaded.denoiser
    dim = unet.config.cross_attention_dim
    return AnimateDiffPipeline(
        vae=_autoencoder_kl(unet.config.in_channels),
        text_encoder=_clip_text_encoder(dim),
        tokenizer=_clip_tokenizer(),
        unet=unet,
        # The motion adapter's weights are already inside the UNetMotionModel.
        motion_adapter=None,
        # AnimateDiff's published setting: linear betas, linspace spacing.
        scheduler=_ddim(
            beta_schedule="linear",
            timestep_spacing="linspace",
            set_alpha_to_one=True,
            prediction_type=_denoiser_prediction(loaded),
        ),
    )


def _build_svd(loaded: LoadedModel):
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
    )

    unet = loaded.denoiser
    image_encoder, processor = _clip_image_encoder(unet.config.cross_attention_dim)
    # The UNet's input is the noisy latent concatenated with the image latent.
    latent_channels = unet.config.out_channels
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        sample_size=32,
    ).eval()
    # SVD's published scheduler: continuous-time Euler with Karras sigmas, v-prediction.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=processor,
    )


def _build_i2vgenxl(loaded: LoadedModel):
    from diffusers import I2VGenXLPipeline

    unet = loaded.denoiser
    dim = unet.config.cross_attention_dim
    image_encoder, processor = _clip_image_encoder(dim)
    return I2VGenXLPipeline(
        vae=_autoencoder_kl(unet.config.in_channels),
        text_encoder=_clip_text_encoder(dim),
        tokenizer=_clip_tokenizer(),
        image_encoder=image_encoder,
        feature_extractor=processor,
        unet=unet,
        scheduler=_ddim(prediction_type=_denoiser_prediction(loaded)),
    )


def _build_latte(loaded: LoadedModel):
    from diffusers import LattePipeline

    transformer = loaded.denoiser
    # Latte pads prompts to 120 tokens.
    return LattePipeline(
        tokenizer=_t5_tokenizer(120),
        text_encoder=_t5_text_encoder(transformer.config.caption_channels),
        vae=_autoencoder_kl(transformer.config.in_channels),
        transformer=transformer,
        # Latte: DDIM on linear betas; DDIM has no learned variance, so the pipeline drops
        # the variance half of the transformer's output.
        scheduler=_ddim(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    )


def _build_cogvideox(loaded: LoadedModel):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    transformer = loaded.denoiser
    config = transformer.config
    # Four blocks: 8x spatial compression; time is compressed as the transformer expects.
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=config.in_channels,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=config.temporal_compression_ratio,
    ).eval()
    # CogVideoX-2b's scheduler: zero-terminal-SNR v-prediction DDIM, trailing spacing.
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=3.0,
        timestep_spacing="trailing",
    )
    return CogVideoXPipeline(
        tokenizer=_t5_tokenizer(config.max_text_seq_length),
        text_encoder=_t5_text_encoder(config.text_embed_dim),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


def _build_wan(loaded: LoadedModel):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    transformer = loaded.denoiser
    channels = transformer.config.in_channels
    # 8x spatial, 4x temporal compression, as Wan 2.1's VAE.
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=channels,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * channels,
        latents_std=[1.0] * channels,
    ).eval()
    return WanPipeline(
        tokenizer=_t5_tokenizer(_WAN_TEXT_LENGTH),
        text_encoder=_t5_text_encoder(transformer.config.text_dim, umt5=True),
        vae=vae,
        # Wan 2.1 samples flow matching with a shifted schedule (shift 3 at 480p).
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


# Wan pads prompts to ``max_sequence_length``; its real default (512) is wasteful here.
_WAN_TEXT_LENGTH = 16

_BUILDERS: dict[str, Callable[[LoadedModel], Any]] = {
    "TextToVideoSDPipeline": _build_text_to_video_sd,
    "AnimateDiffPipeline": _build_animatediff,
    "StableVideoDiffusionPipeline": _build_svd,
    "I2VGenXLPipeline": _build_i2vgenxl,
    "LattePipeline": _build_latte,
    "CogVideoXPipeline": _build_cogvideox,
    "WanPipeline": _build_wan,
}


# --------------------------------------------------------------------------- public API


def tiny_pipeline_model(preset: str, weight_seed: int = 0, **load_kwargs: Any) -> LoadedModel:
    """Loads a tiny preset and wraps its denoiser in its family's diffusers pipeline.

    Args:
        preset: a tiny preset name ("tiny-latte", ...), see ``PRESET_PIPELINES``.
        weight_seed: seed of the random weights of the denoiser and of the other components.
        **load_kwargs: passed to ``zoo.load_model`` (outlier knobs, ...).

    Returns:
        The ``LoadedModel`` of ``zoo.load_model`` with ``pipeline`` set; the pipeline's
        denoiser is ``loaded.denoiser`` itself.
    """
    from qvd_bench.models import zoo

    if preset not in PRESET_PIPELINES:
        raise UserError(
            f"no tiny pipeline for {preset!r}; presets with one: {', '.join(PRESET_PIPELINES)}"
        )
    loaded = zoo.load_model(preset, weight_seed=weight_seed, **load_kwargs)
    # The other components get their own seeded weights, without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weight_seed)
        pipeline = _BUILDERS[PRESET_PIPELINES[preset]](loaded)
    # The other components follow the denoiser (``load_model`` may have moved or cast it).
    reference = next(loaded.denoiser.parameters())
    pipeline.to(device=reference.device, dtype=reference.dtype)
    pipeline.set_progress_bar_config(disable=True)
    loaded.pipeline = pipeline
    return loaded


def pipeline_around(loaded: LoadedModel, seed: int = 0) -> LoadedModel:
    """Wraps a loaded model's denoiser in its family's diffusers pipeline, next to the tiny
    VAE, text encoder and tokenizer of ``tiny_pipeline_model`` (any size of denoiser: the
    full-size architectures get a pipeline too, for offloading and pipeline sampling).

    Args:
        loaded: a model without a pipeline, whose family has a builder here.
        seed: seed of the other components' random weights.

    Returns:
        ``loaded``, with ``pipeline`` set (components on the denoiser's device and dtype).
    """
    builder = next((c for c in loaded.family.pipeline_classes if c in _BUILDERS), None)
    if builder is None:
        raise UserError(f"no pipeline can be built around a {type(loaded.denoiser).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipeline = _BUILDERS[builder](loaded)
    reference = next(loaded.denoiser.parameters())
    pipeline.to(device=reference.device, dtype=reference.dtype)
    pipeline.set_progress_bar_config(disable=True)
    loaded.pipeline = pipeline
    return loaded


def build_tiny_pipeline(preset: str, weight_seed: int = 0, **load_kwargs: Any):
    """Builds the diffusers pipeline of a tiny preset, offline and deterministically.

    Args:
        preset: a tiny preset name, see ``PRESET_PIPELINES``.
        weight_seed: seed of all random weights.
        **load_kwargs: passed to ``zoo.load_model``.

    Returns:
        A ``diffusers.DiffusionPipeline`` (e.g. ``LattePipeline``).
    """
    return tiny_pipeline_model(preset, weight_seed, **load_kwargs).pipeline


def save_tiny_pipeline(preset: str, directory: str | Path, weight_seed: int = 0) -> Path:
    """Saves a tiny pipeline so that ``DiffusionPipeline.from_pretrained`` reloads it offline.

    Args:
        preset: a tiny preset name.
        directory: where to write (model_index.json, one folder per component).
        weight_seed: seed of all random weights.

    Returns:
        The directory.
    """
    directory = Path(directory)
    build_tiny_pipeline(preset, weight_seed).save_pretrained(directory)
    return directory


def sample_seed(seed: int, sample_id: int) -> int:
    """A 63-bit generator seed for one sample that depends only on (seed, sample id)."""
    state = np.random.SeedSequence([int(seed), int(sample_id)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def resolve_sampler(loaded: LoadedModel, sampler: str) -> str:
    """The sampler a run uses: "pipeline" or "denoiser".

    Args:
        loaded: the model.
        sampler: "auto" (the pipeline when the model has one), "pipeline" or "denoiser".

    Raises:
        UserError: sampler "pipeline" for a model without one.
    """
    if sampler == "pipeline" and loaded.pipeline is None:
        raise UserError(f"{loaded.name} has no pipeline; use sampler='denoiser'")
    return "pipeline" if loaded.pipeline is not None and sampler != "denoiser" else "denoiser"


def sampling_record(
    loaded: LoadedModel,
    sampler: str,
    seed: int,
    sample_ids: Sequence[int],
    scheduler: str = "ddim",
) -> dict[str, Any]:
    """What reproducing each sample outside qvd-bench needs: the sampler, its scheduler
    and every sample's generator seeds.

    Args:
        loaded: the model.
        sampler: "auto", "pipeline" or "denoiser" (resolved with ``resolve_sampler``).
        seed: the sampling seed.
        sample_ids: the samples, e.g. ``range(len(prompts))``.
        scheduler: the minimal sampler's scheduler name (``sampling.make_scheduler``;
            flow-prediction models always get "flow-euler"); a pipeline uses its own.

    Returns:
        JSON data: ``sampler``, ``scheduler`` (class and config) and per sample its seeds:
        the pipeline's ``torch.Generator("cpu")`` seed (also the global RNG's during the
        call; an image-to-video sample's image is ``synthetic_image(seed, sample_id)``), or
        the minimal sampler's noise and conditioning generator seeds (its text states come
        from ``text_states_for_prompts``, seeded by the prompt's CRC-32).
    """
    from qvd_bench import store
    from qvd_bench.models import sampling

    resolved = resolve_sampler(loaded, sampler)
    if resolved == "pipeline":
        made = loaded.pipeline.scheduler
        samples = [{"sample": i, "generator_seed": sample_seed(seed, i)} for i in sample_ids]
    else:
        made = sampling.make_scheduler(scheduler, loaded.family.prediction_type)
        samples = [
            {
                "sample": i,
                "noise_seed": sampling.sample_seed(seed, i, 0),
                "conditioning_seed": sampling.sample_seed(seed, i, 1),
            }
            for i in sample_ids
        ]
    return {
        "sampler": resolved,
        "scheduler": {"class": type(made).__name__, "config": store.json_safe(dict(made.config))},
        "seed": seed,
        "samples": samples,
    }


def synthetic_image(seed: int, sample_id: int, height: int, width: int) -> PIL.Image.Image:
    """The conditioning image of one sample for image-to-video pipelines.

    A 4x4 grid of random colours bilinearly upsampled to (height, width) pixels: smooth,
    like a natural image, and the same for a given (seed, sample id).
    """
    rng = np.random.default_rng([int(seed), int(sample_id), 1])
    grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return PIL.Image.fromarray(grid, mode="RGB").resize((width, height), PIL.Image.BILINEAR)


def run_pipeline(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    steps: int,
    guidance_scale: float,
    seed: int,
    sample_ids: Sequence[int],
    frames: int,
    height: int,
    width: int,
    tracker: CallTracker | None = None,
    progress: Callable[[], Any] | None = None,
) -> torch.Tensor:
    """Generates one video per prompt with ``loaded.pipeline``, one sample at a time.

    Each sample runs as its own pipeline call (batch of one prompt) with a generator seeded
    from (seed, sample id), so a sample does not depend on the others or on how prompts are
    sharded. Pipelines that batch [uncond, cond] in one denoiser call are split by the
    tracker; for pipelines that run the branches as separate calls (WanPipeline: conditional
    first), the branch of each call is announced to the tracker.

    Args:
        loaded: a model whose ``pipeline`` is one of ``SUPPORTED_PIPELINES``.
        prompts: one prompt per sample (ignored by StableVideoDiffusionPipeline, which
            has no text input).
        steps: number of denoising steps.
        guidance_scale: CFG scale; <= 1 disables CFG (one "cond" call per step). For
            StableVideoDiffusionPipeline it is used as both its min and max guidance scale.
        seed: run seed.
        sample_ids: global id of each sample, same length as ``prompts``.
        frames: latent frames.
        height: latent height.
        width: latent width.
        tracker: if given, attached to the denoiser for the run, and told each sample's id.
        progress: called with no argument once per denoising step (e.g. ``tqdm.update``).

    Returns:
        The final latents of every sample, in ``sample_ids`` order, in the family's layout:
        (N, C, F, H, W) or (N, F, C, H, W), float32.
    """
    pipeline = loaded.pipeline
    if pipeline is None:
        raise UserError(
            f"model {loaded.name!r} has no diffusers pipeline; load a pipeline directory "
            "or use tiny_pipeline_model() for a tiny preset"
        )
    class_name = type(pipeline).__name__
    spec = _CALL_SPECS.get(class_name)
    if spec is None:
        raise UserError(
            f"pipeline class {class_name} is not supported; "
            f"supported pipeline classes: {', '.join(SUPPORTED_PIPELINES)}"
        )
    if len(prompts) != len(sample_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(sample_ids)} sample ids")

    denoiser = _pipeline_denoiser(pipeline)
    denoisers = list(pipeline_denoisers(pipeline).values())
    if tracker is not None:
        _check_tracked(pipeline, tracker)
    pipeline.set_progress_bar_config(disable=True)
    parameters = inspect.signature(pipeline.__call__).parameters
    spatial, temporal = _compression(pipeline)
    pixel_height, pixel_width = height * spatial, width * spatial
    pixel_frames = (frames - 1) * temporal + 1

    outputs = []
    with contextlib.ExitStack() as stack:
        if tracker is not None:
            stack.enter_context(_attached(tracker))
        if spec.separate_cfg and tracker is not None:
            stack.enter_context(_separate_branches(pipeline, denoisers, tracker))
        step_kwargs, hook_progress = _progress_kwargs(parameters, progress)
        if hook_progress is not None:
            stack.enter_context(_call_counter(denoisers, hook_progress))
        tracked_timesteps: list[float] = []
        if tracker is not None:
            stack.enter_context(
                _call_counter(denoisers, lambda: _record_timestep(tracker, tracked_timesteps))
            )
        for prompt, sample_id in zip(prompts, sample_ids):
            kwargs: dict[str, Any] = dict(spec.extra)
            kwargs.update(step_kwargs)
            kwargs[spec.frames_arg] = pixel_frames
            if spec.text:
                kwargs["prompt"] = prompt
            if spec.image:
                kwargs["image"] = synthetic_image(seed, sample_id, pixel_height, pixel_width)
            if class_name == "StableVideoDiffusionPipeline":
                kwargs["min_guidance_scale"] = guidance_scale
                kwargs["max_guidance_scale"] = guidance_scale
            else:
                kwargs["guidance_scale"] = guidance_scale
            if "guidance_scale_2" in parameters and getattr(
                pipeline.config, "boundary_ratio", None
            ):
                # The low-noise expert's scale (Wan 2.2): the same guidance for both.
                kwargs["guidance_scale_2"] = guidance_scale
            if "max_sequence_length" in parameters:
                kwargs["max_sequence_length"] = _text_length(pipeline)
            generator = torch.Generator(device="cpu").manual_seed(sample_seed(seed, sample_id))
            batch = tracker.batch([sample_id]) if tracker is not None else contextlib.nullcontext()
            with batch, _global_rng(sample_seed(seed, sample_id), denoiser):
                output = pipeline(
                    height=pixel_height,
                    width=pixel_width,
                    num_inference_steps=steps,
                    generator=generator,
                    output_type="latent",
                    **kwargs,
                )
            if tracker is not None:
                _check_every_step_tracked(pipeline, tracked_timesteps)
                tracked_timesteps.clear()
            # Every supported pipeline's output has ``frames`` (here the final latents).
            outputs.append(torch.as_tensor(output.frames).float().cpu())
    return torch.cat(outputs, dim=0)


# --------------------------------------------------------------------------- helpers


def _pipeline_denoiser(pipeline: Any) -> nn.Module:
    for name in ("transformer", "unet"):
        module = getattr(pipeline, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UserError(f"pipeline {type(pipeline).__name__} has neither a unet nor a transformer")


def _check_tracked(pipeline: Any, tracker: CallTracker) -> None:
    """Every denoiser of the pipeline must be hooked, or its calls would go unrecorded."""
    untracked = [a for a, m in pipeline_denoisers(pipeline).items() if not tracker.hooks(m)]
    if untracked:
        raise UserError(
            f"pipeline {type(pipeline).__name__}'s {', '.join(untracked)} would run unrecorded: "
            "the call tracker hooks only "
            f"{', '.join(e or type(m).__name__ for e, m in tracker.experts.items())}; "
            "track every denoiser of the pipeline (LoadedModel.experts)"
        )


def _record_timestep(tracker: CallTracker, timesteps: list[float]) -> None:
    if tracker.current is not None:
        timesteps.append(tracker.current.timestep)


def _check_every_step_tracked(pipeline: Any, timesteps: list[float]) -> None:
    """Each step of the scheduler must have had at least one tracked denoiser call."""
    scheduled = getattr(pipeline.scheduler, "timesteps", None)
    steps = 0 if scheduled is None else len(scheduled)
    if len(set(timesteps)) < steps:
        raise UserError(
            f"pipeline {type(pipeline).__name__} ran {steps} steps but the tracked denoiser "
            f"calls cover {len(set(timesteps))} timesteps: a denoiser ran outside the tracker"
        )


def _compression(pipeline: Any) -> tuple[int, int]:
    """(spatial, temporal) compression of the pipeline's VAE."""
    spatial = getattr(pipeline, "vae_scale_factor_spatial", None)
    if spatial is None:
        spatial = pipeline.vae_scale_factor
    return int(spatial), int(getattr(pipeline, "vae_scale_factor_temporal", 1))


def _text_length(pipeline: Any) -> int:
    """Prompt length for pipelines that take ``max_sequence_length``."""
    transformer = getattr(pipeline, "transformer", None)
    length = getattr(getattr(transformer, "config", None), "max_text_seq_length", None)
    if length is not None:
        # CogVideoX's positional embedding is sized for exactly this many text tokens.
        return int(length)
    return int(min(pipeline.tokenizer.model_max_length, 512))


def _progress_kwargs(
    parameters: Any, progress: Callable[[], Any] | None
) -> tuple[dict[str, Any], Callable[[], Any] | None]:
    """Step-callback keyword arguments for ``progress``, or a hook fallback.

    Returns:
        (kwargs for the pipeline call, callable to run once per denoiser call or None).
    """
    if progress is None:
        return {}, None
    if "callback_on_step_end" in parameters:

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            progress()
            return tensors

        return {"callback_on_step_end": on_step_end}, None
    if "callback" in parameters:
        # Older pipelines (TextToVideoSDPipeline): callback(step, timestep, latents).
        return {"callback": lambda step, timestep, latents: progress(), "callback_steps": 1}, None
    # No step callback (I2VGenXLPipeline): one batched CFG denoiser call per step.
    return {}, progress


@contextlib.contextmanager
def _global_rng(seed: int, module: nn.Module) -> Iterator[None]:
    """Seeds the global RNG for one pipeline call and restores it afterwards.

    Some pipelines draw from the global RNG besides the generator they are given
    (I2VGenXLPipeline samples its image latents with ``latent_dist.sample()``).
    """
    device = next(module.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _attached(tracker: CallTracker) -> Iterator[None]:
    """Attaches the tracker for the run unless the caller already did."""
    was_attached = tracker._handle is not None
    tracker.attach()
    try:
        yield
    finally:
        if not was_attached:
            tracker.detach()


@contextlib.contextmanager
def _call_counter(denoisers: Sequence[nn.Module], callback: Callable[[], Any]) -> Iterator[None]:
    """Calls ``callback`` after every call of any of ``denoisers``."""
    handles = [
        denoiser.register_forward_hook(lambda module, args, output: callback())
        for denoiser in denoisers
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _separate_branches(
    pipeline: Any, denoisers: Sequence[nn.Module], tracker: CallTracker
) -> Iterator[None]:
    """Tells the tracker the branch of each call of a pipeline that runs CFG as two calls.

    WanPipeline calls the denoiser on the conditional input first, then (when CFG is on)
    on the unconditional one; with two experts both calls of a step go to the same one,
    so one count over all experts' calls gives the branch. The branch is announced in a
    pre-hook that runs before the tracker's and withdrawn after the call.
    """
    stack = contextlib.ExitStack()
    calls = [0]

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cfg = bool(getattr(pipeline, "do_classifier_free_guidance", False))
        name = "uncond" if cfg and calls[0] % 2 == 1 else "cond"
        calls[0] += 1
        stack.enter_context(tracker.branch(name))

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        stack.close()

    handles = []
    for denoiser in denoisers:
        handles.append(denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
        handles.append(denoiser.register_forward_hook(post_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        stack.close()
