"""Tiny diffusers pipelines around the denoisers of the tiny presets.

Each builder wraps a preset's denoiser in the diffusers pipeline its family ships with,
next to a tiny VAE, a tiny text encoder, a tokenizer built in memory from a small
vocabulary, and the family's usual scheduler. Nothing is downloaded. ``zoo`` builds the
pipeline of a multi-expert preset with ``attach_tiny_pipeline`` (only the pipeline decides
which expert runs each step); ``pipelines.tiny_pipeline_model`` does it for the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from qvd_bench.errors import UserError
from qvd_bench.models.family import LoadedModel

# The diffusers pipeline class each tiny preset is wrapped in.
PRESET_PIPELINES: dict[str, str] = {
    "tiny-unet3d": "TextToVideoSDPipeline",
    "tiny-animatediff": "AnimateDiffPipeline",
    "tiny-svd": "StableVideoDiffusionPipeline",
    "tiny-i2vgenxl": "I2VGenXLPipeline",
    "tiny-latte": "LattePipeline",
    "tiny-cogvideox": "CogVideoXPipeline",
    "tiny-wan": "WanPipeline",
    "tiny-ltx": "LTXPipeline",
    "tiny-hunyuan": "HunyuanVideoPipeline",
    "tiny-mochi": "MochiPipeline",
    "tiny-wan22": "WanPipeline",
}


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


def _build_ltx(loaded: LoadedModel):
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline

    transformer = loaded.denoiser
    config = transformer.config
    # Two scaling blocks: 4x spatial and temporal compression (LTX-Video's VAE: 32x, 8x).
    vae = AutoencoderKLLTXVideo(
        latent_channels=config.in_channels,
        block_out_channels=(8, 8, 8, 8),
        spatio_temporal_scaling=(True, True, False, False),
        layers_per_block=(1, 1, 1, 1, 1),
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()
    # LTX-Video's scheduler: resolution-dependent shift, stretched to a terminal sigma.
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return LTXPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=_t5_text_encoder(config.caption_channels),
        tokenizer=_t5_tokenizer(_TINY_TEXT_LENGTH),
        transformer=transformer,
    )


def _build_hunyuan(loaded: LoadedModel):
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
    )
    from transformers import LlamaConfig, LlamaModel

    transformer = loaded.denoiser
    config = transformer.config
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=config.in_channels,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    ).eval()
    # The Llama text encoder: its states (two layers before the last, as the pipeline
    # reads them) are the transformer's text states.
    llama = LlamaModel(
        LlamaConfig(
            vocab_size=len(_t5_vocab()),
            hidden_size=config.text_embed_dim,
            intermediate_size=2 * config.text_embed_dim,
            num_hidden_layers=_TEXT_LAYERS + 1,
            num_attention_heads=_heads(config.text_embed_dim),
            num_key_value_heads=_heads(config.text_embed_dim),
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
        )
    ).eval()
    return HunyuanVideoPipeline(
        text_encoder=llama,
        tokenizer=_t5_tokenizer(_TINY_TEXT_LENGTH),
        transformer=transformer,
        vae=vae,
        # HunyuanVideo samples flow matching with shift 7.
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        # The CLIP encoder's pooled states are the transformer's pooled_projections.
        text_encoder_2=_clip_text_encoder(config.pooled_projection_dim),
        tokenizer_2=_clip_tokenizer(),
    )


def _build_mochi(loaded: LoadedModel):
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline

    transformer = loaded.denoiser
    config = transformer.config
    vae = AutoencoderKLMochi(
        latent_channels=config.in_channels,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    ).eval()
    return MochiPipeline(
        # Mochi's scheduler counts time backwards (see families/mochi.py).
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        vae=vae,
        text_encoder=_t5_text_encoder(config.text_embed_dim),
        # Mochi pads prompts to the transformer's max_sequence_length.
        tokenizer=_t5_tokenizer(config.max_sequence_length),
        transformer=transformer,
    )


# Prompt length of the tiny LTX and HunyuanVideo pipelines (their real ones: 128, 256).
_TINY_TEXT_LENGTH = 16


_BUILDERS: dict[str, Callable[[LoadedModel], Any]] = {
    "TextToVideoSDPipeline": _build_text_to_video_sd,
    "AnimateDiffPipeline": _build_animatediff,
    "StableVideoDiffusionPipeline": _build_svd,
    "I2VGenXLPipeline": _build_i2vgenxl,
    "LattePipeline": _build_latte,
    "CogVideoXPipeline": _build_cogvideox,
    "WanPipeline": _build_wan,
    "LTXPipeline": _build_ltx,
    "HunyuanVideoPipeline": _build_hunyuan,
    "MochiPipeline": _build_mochi,
}


def attach_tiny_pipeline(loaded: LoadedModel, config: dict[str, Any], weight_seed: int) -> None:
    """Builds the tiny pipeline of a preset around its denoiser(s) and sets
    ``loaded.pipeline``.

    Args:
        loaded: a zoo preset (``PRESET_PIPELINES`` names its pipeline class).
        config: the pipeline's own settings (Wan 2.2's ``boundary_ratio``).
        weight_seed: seed of the other components' weights.
    """
    _attach(loaded, PRESET_PIPELINES[loaded.name], config, weight_seed)


def pipeline_around(
    loaded: LoadedModel, seed: int = 0, pipeline_class: str | None = None
) -> LoadedModel:
    """Wraps a loaded model's denoiser in its family's diffusers pipeline, next to the tiny
    VAE, text encoder and tokenizer of ``tiny_pipeline_model`` (any size of denoiser: the
    full-size architectures get a pipeline too, for offloading and pipeline sampling).

    Args:
        loaded: a model without a pipeline, whose family has a builder here.
        seed: seed of the other components' random weights.
        pipeline_class: which of the family's pipeline classes with a builder here; None:
            the first of them.

    Returns:
        ``loaded``, with ``pipeline`` set (components on the denoiser's device and dtype).

    Raises:
        UserError: no builder for the family or for ``pipeline_class``.
    """
    built = [c for c in loaded.family.pipeline_classes if c in _BUILDERS]
    if not built:
        raise UserError(f"no pipeline can be built around a {type(loaded.denoiser).__name__}")
    builder = pipeline_class or built[0]
    if builder not in built:
        raise UserError(
            f"no tiny {builder} around a {type(loaded.denoiser).__name__}; "
            f"built: {', '.join(built)}"
        )
    _attach(loaded, builder, {}, seed)
    return loaded


def _attach(loaded: LoadedModel, builder: str, config: dict[str, Any], seed: int) -> None:
    # The other components get their own seeded weights, without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipeline = _BUILDERS[builder](loaded)
    if loaded.multi_expert or config:
        pipeline = type(pipeline)(**{**pipeline.components, **loaded.denoisers}, **config)
    # The other components follow the denoiser (``load_model`` may have moved or cast it).
    reference = next(loaded.denoiser.parameters())
    pipeline.to(device=reference.device, dtype=reference.dtype)
    pipeline.set_progress_bar_config(disable=True)
    loaded.pipeline = pipeline


# --------------------------------------------------------------------------- family pipelines
# Tiny pipelines of families without a preset (LTX-2, HunyuanVideo-1.5, Allegro,
# SkyReels-V2), built around the family's tiny config (``pipelines.tiny_family_pipeline``).


def _init_arguments(pipeline_class: type, components: dict[str, Any]) -> dict[str, Any]:
    """The components a pipeline class's constructor takes."""
    import inspect

    names = inspect.signature(pipeline_class.__init__).parameters
    return {name: value for name, value in components.items() if name in names}


def _skyreels_scheduler():
    from diffusers import UniPCMultistepScheduler

    # SkyReels-V2's scheduler: UniPC on flow sigmas with shift 8 (its text-to-video models).
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0
    )


def _skyreels_builder(pipeline_class: str) -> Callable[[LoadedModel], Any]:
    def build(loaded: LoadedModel):
        import diffusers

        # Wan's tiny components: SkyReels-V2 is a Wan architecture with Wan's VAE and UMT5.
        components = {**_build_wan(loaded).components, "scheduler": _skyreels_scheduler()}
        cls = getattr(diffusers, pipeline_class)
        return cls(**_init_arguments(cls, components))

    return build


def _build_allegro(loaded: LoadedModel):
    from diffusers import AllegroPipeline, AutoencoderKLAllegro, EulerAncestralDiscreteScheduler

    transformer = loaded.denoiser
    config = transformer.config
    # Four blocks: 8x spatial and 4x temporal compression, as Allegro's VAE.
    vae = AutoencoderKLAllegro(
        block_out_channels=(8, 8, 8, 8),
        latent_channels=config.in_channels,
        layers_per_block=1,
        norm_num_groups=2,
    ).eval()
    # Allegro's scheduler: ancestral Euler on linear betas.
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", timestep_spacing="linspace"
    )
    return AllegroPipeline(
        tokenizer=_t5_tokenizer(_TINY_TEXT_LENGTH),
        text_encoder=_t5_text_encoder(config.caption_channels),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


# A chat template in the shape of Qwen's: the pipeline renders a system and a user message.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_tokenizer():
    """A byte-level BPE tokenizer of Qwen's kind: the 256 byte symbols, no merges, Qwen's
    special tokens and a chat template."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    symbols = list(bytes_to_unicode().values())
    tokenizer = Qwen2Tokenizer(
        vocab={token: i for i, token in enumerate(symbols + specials)},
        merges=[],
        additional_special_tokens=specials[1:],
    )
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    return tokenizer


def _qwen_text_encoder(dim: int, tokenizer):
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    head_dim = dim // _heads(dim)
    config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=dim,
        intermediate_size=2 * dim,
        # The pipeline reads the states two layers before the last.
        num_hidden_layers=_TEXT_LAYERS + 1,
        num_attention_heads=_heads(dim),
        num_key_value_heads=_heads(dim),
        # Multimodal rotary sections (temporal, height, width) over half a head.
        rope_scaling={
            "type": "mrope",
            "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
        },
    )
    return Qwen2_5_VLTextModel(config).eval()


def _build_hunyuan15(loaded: LoadedModel):
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
    )
    from transformers import ByT5Tokenizer

    transformer = loaded.denoiser
    config = transformer.config
    # Five blocks: 16x spatial and 4x temporal compression, as HunyuanVideo-1.5's VAE.
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=config.out_channels,
        block_out_channels=(8, 8, 8, 8, 8),
        layers_per_block=1,
    ).eval()
    tokenizer = _qwen_tokenizer()
    return HunyuanVideo15Pipeline(
        text_encoder=_qwen_text_encoder(config.text_embed_dim, tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        # HunyuanVideo-1.5 (480p) samples flow matching with shift 5.
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        # The ByT5 glyph encoder: byte tokens, a T5 encoder of the transformer's width.
        text_encoder_2=_t5_text_encoder(config.text_embed_2_dim),
        tokenizer_2=ByT5Tokenizer(extra_ids=0),
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )


def _gemma_tokenizer():
    """A Gemma-style BPE tokenizer: Gemma's special tokens, "▁" for spaces, printable
    ASCII, no merges."""
    from transformers import GemmaTokenizer

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁"]
    tokens += [chr(c) for c in range(33, 127)]
    return GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def _gemma3_text_encoder(dim: int, tokenizer):
    """A Gemma 3 with a tiny SigLIP tower (the class LTX2Pipeline loads; only its language
    model runs on text)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    heads = _heads(dim)
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": dim,
        "intermediate_size": 2 * dim,
        "num_hidden_layers": _TEXT_LAYERS,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": dim // heads,
        "sliding_window": 8,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    # 28 px images in 14 px patches: 2 x 2 patches, pooled to 4 image tokens.
    vision_config = {
        "hidden_size": dim,
        "intermediate_size": 2 * dim,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "image_size": 28,
        "patch_size": 14,
    }
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.unk_token_id,
        eoi_token_index=tokenizer.unk_token_id,
        image_token_index=tokenizer.convert_tokens_to_ids("<mask>"),
    )
    return Gemma3ForConditionalGeneration(config).eval()


def _build_ltx2(loaded: LoadedModel):
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    transformer = loaded.denoiser
    config = transformer.config
    tokenizer = _gemma_tokenizer()
    text_encoder = _gemma3_text_encoder(config.caption_channels, tokenizer)
    heads = _heads(config.caption_channels)
    # The connectors read every Gemma layer's states (and the embeddings') and give the
    # transformer text states of its caption width for both streams.
    connector = {
        "num_attention_heads": heads,
        "attention_head_dim": config.caption_channels // heads,
        "num_layers": 1,
        "num_learnable_registers": None,
    }
    connectors = LTX2TextConnectors(
        caption_channels=config.caption_channels,
        text_proj_in_factor=_TEXT_LAYERS + 1,
        **{f"video_connector_{k}": v for k, v in connector.items()},
        **{f"audio_connector_{k}": v for k, v in connector.items()},
        connector_rope_base_seq_len=32,
    )
    # Two scaling blocks: 4x spatial and temporal compression (LTX-2's VAE: 32x, 8x), so
    # that 8 latent rows are the 32 pixels LTX2Pipeline takes at least.
    vae = AutoencoderKLLTX2Video(
        latent_channels=config.in_channels,
        block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, True),
        decoder_spatio_temporal_scaling=(True, True),
        decoder_inject_noise=(False, False, False),
        downsample_type=("spatiotemporal", "spatiotemporal"),
        upsample_residual=(False, False),
        upsample_factor=(1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
    ).eval()
    # The audio VAE's latent (2 channels x 8 mel bins / 4) is the transformer's audio input.
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=None,
        in_channels=2,
        resolution=32,
        latent_channels=config.audio_in_channels // 2,
        norm_type="pixel",
        causality_axis="height",
        mid_block_add_attention=False,
        mel_bins=8,
    ).eval()
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * audio_vae.config.mel_bins,
        hidden_channels=8,
        out_channels=2,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
    ).eval()
    # LTX-2's scheduler: as LTX-Video's, resolution-dependent shift to a terminal sigma.
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return LTX2Pipeline(
        scheduler=scheduler,
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        connectors=connectors,
        transformer=transformer,
        vocoder=vocoder,
    )


_BUILDERS.update(
    {
        "LTX2Pipeline": _build_ltx2,
        "HunyuanVideo15Pipeline": _build_hunyuan15,
        "AllegroPipeline": _build_allegro,
        "SkyReelsV2Pipeline": _skyreels_builder("SkyReelsV2Pipeline"),
        "SkyReelsV2DiffusionForcingPipeline": _skyreels_builder(
            "SkyReelsV2DiffusionForcingPipeline"
        ),
    }
)
