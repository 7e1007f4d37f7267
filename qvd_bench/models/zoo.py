"""The model zoo: named presets with random weights, trained models shipped with the
package (``shapes-wan``), and loading diffusers pipelines.

Presets are built from config dicts (nothing is downloaded) with weights drawn from a
fixed seed. Random weights lack what makes trained models hard to quantize, so presets:

- re-initialise the layers diffusers zero-initialises (they would contribute nothing);
- inject outlier channels: ``disparity`` is the sigma of log-normal per-channel gains,
  ``asymmetry`` the scale of per-channel offsets, applied where the family's
  ``outlier_targets`` say (norm affines, timestep MLP, FFN input rows, attention value
  and output projections).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from qvd_bench.errors import UserError
from qvd_bench.models.device import check_device
from qvd_bench.models.families import FAMILIES, family_by_name
from qvd_bench.models.family import Family, LoadedModel
from qvd_bench.models.roles import leaf_layers
from qvd_bench.registry import Registry

# Knob defaults for presets: per-channel gains spread over about e^(+-2) and offsets of
# about half a channel standard deviation make inter-channel disparity (max/median range
# well above 1) and asymmetric channel ranges clearly measurable.
DEFAULT_DISPARITY = 1.0
DEFAULT_ASYMMETRY = 0.5

# Layers diffusers zero-initialises get their module's default init times this factor:
# small, but they contribute.
ZERO_INIT_SCALE = 0.5

# diffusers activation modules whose projection holds [value, gate] rows.
_GATED_FFN = ("GEGLU", "SwiGLU")

# Keeps the knobs' random stream apart from the weights' stream of the same seed.
_KNOB_SEED_OFFSET = 0x5EED


@dataclass(frozen=True)
class ModelSpec:
    """A named model of the zoo.

    Attributes:
        name: zoo name ("tiny-unet3d").
        family: short family name ("unet3d").
        config: returns the config dict the family builds the denoiser from.
        description: one line for ``qvd-bench models``.
        experts: for a preset of several experts (Wan 2.2), the pipeline attribute of each
            ("transformer", "transformer_2"): each gets its own weights (seed
            ``weight_seed + index``) and the preset comes with its pipeline, which decides
            which expert runs each step. Empty for a single denoiser.
        pipeline_config: the pipeline's own settings of a multi-expert preset
            (``boundary_ratio``).
        trained: ships trained weights (loaded by ``load``, with their pipeline) instead
            of random ones; the outlier knobs do not apply to it.
        load: for a trained model, ``load(device, dtype) -> LoadedModel``.
    """

    name: str
    family: str
    config: Callable[[], dict[str, Any]]
    description: str
    experts: tuple[str, ...] = ()
    pipeline_config: tuple[tuple[str, Any], ...] = ()
    trained: bool = False
    load: Callable[[torch.device, torch.dtype], LoadedModel] | None = None

    @property
    def with_pipeline(self) -> bool:
        """Loads with its pipeline: several experts (which only the pipeline switches) or
        trained weights (with their own text encoder)."""
        return bool(self.experts) or self.trained


class ModelRow(NamedTuple):
    """One line of ``list_models()``."""

    name: str
    family: str
    denoiser_class: str
    parameters: int
    description: str
    trained: bool = False


MODELS: Registry[ModelSpec] = Registry("model")


def _tiny_config(family: str) -> Callable[[], dict[str, Any]]:
    return lambda: family_by_name(family).tiny_config()


def _modelscope_t2v_config() -> dict[str, Any]:
    # The denoiser of ModelScope text-to-video (damo-vilab/text-to-video-ms-1.7b).
    return {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": (
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "DownBlock3D",
        ),
        "up_block_types": (
            "UpBlock3D",
            "CrossAttnUpBlock3D",
            "CrossAttnUpBlock3D",
            "CrossAttnUpBlock3D",
        ),
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": 1024,
        "attention_head_dim": 64,
    }


for _name, _family, _description in (
    ("tiny-unet3d", "unet3d", "UNet3DConditionModel (ModelScope/ZeroScope family), tiny"),
    (
        "tiny-animatediff",
        "motion",
        "UNetMotionModel (AnimateDiff: 2-D UNet + motion modules), tiny",
    ),
    ("tiny-svd", "svd", "UNetSpatioTemporalConditionModel (Stable Video Diffusion), tiny"),
    ("tiny-i2vgenxl", "i2vgenxl", "I2VGenXLUNet (I2VGen-XL), tiny"),
    ("tiny-latte", "latte", "LatteTransformer3DModel (Latte), tiny"),
    ("tiny-cogvideox", "cogvideox", "CogVideoXTransformer3DModel (CogVideoX), tiny"),
    ("tiny-wan", "wan", "WanTransformer3DModel (Wan 2.x), tiny"),
    ("tiny-ltx", "ltx", "LTXVideoTransformer3DModel (LTX-Video), tiny"),
    ("tiny-hunyuan", "hunyuan-video", "HunyuanVideoTransformer3DModel (HunyuanVideo), tiny"),
    ("tiny-mochi", "mochi", "MochiTransformer3DModel (Mochi 1), tiny"),
):
    MODELS.register(_name, ModelSpec(_name, _family, _tiny_config(_family), _description))

MODELS.register(
    "tiny-wan22",
    ModelSpec(
        "tiny-wan22",
        "wan",
        _tiny_config("wan"),
        "two WanTransformer3DModel experts (Wan 2.2 A14B: high noise, then low noise), tiny",
        experts=("transformer", "transformer_2"),
        # Wan 2.2 T2V-A14B switches experts at t = 0.875 * 1000.
        pipeline_config=(("boundary_ratio", 0.875),),
    ),
)

MODELS.register(
    "modelscope-t2v-arch",
    ModelSpec(
        "modelscope-t2v-arch",
        "unet3d",
        _modelscope_t2v_config,
        "ModelScope T2V denoiser architecture, full size, random weights (about 6 GiB in fp32)",
    ),
)


def _shapes_wan_config() -> dict[str, Any]:
    from qvd_bench.models import shapes_wan

    return shapes_wan.transformer_config()


def _load_shapes_wan(device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from qvd_bench.models import shapes_wan

    return shapes_wan.load_shapes_wan(device, dtype)


MODELS.register(
    "shapes-wan",
    ModelSpec(
        "shapes-wan",
        "wan",
        _shapes_wan_config,
        "WanTransformer3DModel trained on the shapes dataset (pixel space, 8x16x16 RGB, "
        "WanPipeline without VAE)",
        trained=True,
        load=_load_shapes_wan,
    ),
)


def load_model(
    name_or_path: str,
    *,
    weight_seed: int = 0,
    disparity: float | None = None,
    asymmetry: float | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
) -> LoadedModel:
    """Builds a zoo preset or loads a diffusers pipeline and finds its denoiser.

    Args:
        name_or_path: a zoo name, a local pipeline directory (with model_index.json) or
            model directory (with config.json), or a hub id already in the local cache.
        weight_seed: seed of the random weights of presets (and of the knobs' draws).
        disparity: sigma of the log-normal per-channel gains; None means
            ``DEFAULT_DISPARITY`` for presets and 0 (off) for loaded models.
        asymmetry: scale of the per-channel offsets, in units of each channel's
            standard deviation; None means ``DEFAULT_ASYMMETRY`` for presets, 0 otherwise.
        device: where the denoiser goes ("cpu", "cuda", "cuda:1", ...).
        dtype: its floating dtype, one of ``config.DTYPES`` (a name or the torch dtype).

    Returns:
        The LoadedModel; ``knobs`` records the outlier settings applied. A trained zoo
        model (``ModelSpec.trained``) comes with its pipeline, ignores ``weight_seed`` and
        has no knobs.

    Raises:
        UserError: unknown name, unsupported denoiser class, a model not available offline,
            a device this machine lacks or a dtype without kernels there
            (``device.check_device``, checked before anything is built), an outlier knob
            given for a trained zoo model, a shipped weights file whose SHA-256 is wrong.
    """
    device, dtype = check_device(device, dtype)
    for knob_name, value in (("disparity", disparity), ("asymmetry", asymmetry)):
        if value is not None and value < 0:
            raise UserError(f"{knob_name} must be >= 0, got {value}")
    if name_or_path in MODELS:
        spec = MODELS.get(name_or_path)
        if spec.trained:
            for knob_name, value in (("disparity", disparity), ("asymmetry", asymmetry)):
                if value is not None:
                    raise UserError(
                        f"{spec.name} has trained weights: {knob_name} applies only to "
                        "presets with random weights"
                    )
            return spec.load(device, dtype)
        family = family_by_name(spec.family)
        knobs = _knobs(disparity, asymmetry, DEFAULT_DISPARITY, DEFAULT_ASYMMETRY)
        denoisers = []
        for index in range(max(1, len(spec.experts))):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(weight_seed + index)
                denoiser = family.build(spec.config())
                reinit_zero_layers(denoiser)
            inject_outliers(denoiser, family, seed=weight_seed + index, **knobs)
            _move(denoiser, device, dtype)
            denoisers.append(denoiser)
        loaded = LoadedModel(
            name=spec.name,
            family=family,
            denoiser=denoisers[0],
            random_weights=True,
            weight_seed=weight_seed,
            knobs=knobs,
            denoisers=dict(zip(spec.experts, denoisers)) if spec.experts else {},
        )
        if spec.experts:
            # Only the pipeline knows which expert runs each step.
            from qvd_bench.models.tiny_pipelines import attach_tiny_pipeline

            attach_tiny_pipeline(loaded, dict(spec.pipeline_config), weight_seed)
        return loaded
    loaded = _load_pretrained(name_or_path)
    knobs = _knobs(disparity, asymmetry, 0.0, 0.0)
    # Each expert draws its own gains and offsets (the first from the seed itself).
    for index, denoiser in enumerate(loaded.experts.values()):
        inject_outliers(denoiser, loaded.family, seed=weight_seed + index, **knobs)
    loaded.knobs = knobs
    if loaded.pipeline is not None:
        loaded.pipeline.to(device=device, dtype=dtype)
    for denoiser in loaded.experts.values():
        _move(denoiser, device, dtype)
    return loaded


def load_run_model(
    run, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> LoadedModel:
    """The model a statistics run was collected on, with the same weights and knobs.

    Args:
        run: a ``store.StatsRun``.
        device: where the denoiser goes.
        dtype: its dtype (a name of ``config.DTYPES`` or the torch dtype); the run's dtype
            when None.
    """
    config, model = run.manifest["config"], run.manifest["model"]
    knobs = model.get("knobs") or {}
    return load_model(
        config["model"],
        weight_seed=config["weight_seed"],
        disparity=knobs.get("disparity"),
        asymmetry=knobs.get("asymmetry"),
        device=device,
        dtype=dtype if dtype is not None else config["dtype"],
    )


def _move(denoiser: nn.Module, device: str | torch.device, dtype: torch.dtype) -> None:
    """Moves to device and dtype (casting only when needed: diffusers warns on every cast),
    in eval mode."""
    denoiser.to(device=device)
    if next(denoiser.parameters()).dtype != dtype:
        denoiser.to(dtype=dtype)
    denoiser.eval()


def _knobs(
    disparity: float | None,
    asymmetry: float | None,
    default_disparity: float,
    default_asymmetry: float,
) -> dict[str, float]:
    return {
        "disparity": float(default_disparity if disparity is None else disparity),
        "asymmetry": float(default_asymmetry if asymmetry is None else asymmetry),
    }


# A hub id: "org/name" with no path syntax around it.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _load_pretrained(name_or_path: str) -> LoadedModel:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _load_pipeline(str(path), name_or_path)
        if (path / "config.json").is_file():
            return _load_bare_denoiser(path, name_or_path)
        raise UserError(
            f"{name_or_path}: neither model_index.json (a pipeline) nor config.json (a model) in it"
        )
    if _HUB_ID.fullmatch(name_or_path) and not os.path.exists(name_or_path):
        return _load_pipeline(name_or_path, name_or_path)
    if os.sep in name_or_path or name_or_path.startswith((".", "~")):
        raise UserError(f"{name_or_path}: no such directory")
    # An unknown zoo name: the registry's did-you-mean message.
    raise UserError(MODELS.unknown_message(name_or_path))


def _family_for(denoiser: nn.Module, source: str) -> Family:
    class_name = type(denoiser).__name__
    if class_name not in FAMILIES:
        raise UserError(
            f"{source}: denoiser class {class_name} is not supported "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES.get(class_name)


# Pipeline attributes that hold a denoiser, in the order a pipeline runs them (Wan 2.2:
# ``transformer`` on high-noise timesteps, then ``transformer_2``).
DENOISER_ATTRIBUTES: tuple[str, ...] = ("unet", "transformer", "transformer_2")


def pipeline_denoisers(pipeline: Any) -> dict[str, nn.Module]:
    """The denoisers of a diffusers pipeline by attribute, skipping those that are None."""
    found = {}
    for attribute in DENOISER_ATTRIBUTES:
        module = getattr(pipeline, attribute, None)
        if isinstance(module, nn.Module):
            found[attribute] = module
    return found


def _load_pipeline(location: str, source: str) -> LoadedModel:
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # No loading progress bars (diffusers' components, transformers' weights): an error
    # after loading stays one line. Restored afterwards.
    bars = [
        log for log in (diffusers_logging, transformers_logging) if log.is_progress_bar_enabled()
    ]
    for log in bars:
        log.disable_progress_bar()
    try:
        pipeline = DiffusionPipeline.from_pretrained(location, local_files_only=True)
    except Exception as error:  # diffusers raises many types for a missing model
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"could not load {source} offline ({reason}); download it and pass the local directory"
        ) from None
    finally:
        for log in bars:
            log.enable_progress_bar()
    return pipeline_model(pipeline, source)


def pipeline_model(pipeline: Any, source: str | None = None) -> LoadedModel:
    """A LoadedModel around a diffusers pipeline object (loaded or built in memory).

    Args:
        pipeline: the pipeline; its denoisers are used as they are (not copied).
        source: the model's name; by default the directory or hub id the pipeline was
            loaded from (``name_or_path``), else its class name.

    Raises:
        UserError: a pipeline without a supported denoiser.
    """
    if source is None:
        source = getattr(pipeline, "name_or_path", None) or type(pipeline).__name__
    denoisers = pipeline_denoisers(pipeline)
    if not denoisers:
        raise UserError(
            f"{source}: the pipeline has no denoiser (none of {', '.join(DENOISER_ATTRIBUTES)})"
        )
    families = {attribute: _family_for(module, source) for attribute, module in denoisers.items()}
    if len(set(map(id, families.values()))) > 1:
        classes = ", ".join(f"{a}: {type(m).__name__}" for a, m in denoisers.items())
        raise UserError(f"{source}: experts of different denoiser classes ({classes})")
    first = next(iter(denoisers))
    return LoadedModel(
        name=source,
        family=families[first],
        denoiser=denoisers[first],
        pipeline=pipeline,
        random_weights=False,
        weight_seed=None,
        denoisers=denoisers if len(denoisers) > 1 else {},
    )


def _load_bare_denoiser(path: Path, source: str) -> LoadedModel:
    import diffusers

    class_name = json.loads((path / "config.json").read_text()).get("_class_name", "")
    if class_name not in FAMILIES or not hasattr(diffusers, class_name):
        raise UserError(
            f"{source}: model class {class_name or '(none)'} is not supported "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    denoiser = getattr(diffusers, class_name).from_pretrained(str(path), local_files_only=True)
    return LoadedModel(
        name=source,
        family=FAMILIES.get(class_name),
        denoiser=denoiser,
        random_weights=False,
        weight_seed=None,
    )


@torch.no_grad()
def reinit_zero_layers(denoiser: nn.Module, scale: float = ZERO_INIT_SCALE) -> list[str]:
    """Gives every leaf layer whose weights are all zero a small random init.

    Uses the module type's default init (``reset_parameters``, from the global RNG)
    times ``scale``.

    Returns:
        Names of the re-initialised layers.
    """
    reinitialised = []
    for name, module in leaf_layers(denoiser).items():
        if module.weight.device.type != "meta" and not module.weight.any():
            module.reset_parameters()
            module.weight.mul_(scale)
            if module.bias is not None:
                module.bias.mul_(scale)
            reinitialised.append(name)
    return reinitialised


@torch.no_grad()
def inject_outliers(
    denoiser: nn.Module, family: Family, *, disparity: float, asymmetry: float, seed: int
) -> None:
    """Applies per-channel gains and offsets where ``family.outlier_targets`` say.

    For each targeted channel c (output row of a Linear, channel of a norm affine):
    weight_c *= exp(disparity * z_c) and bias_c += asymmetry * u_c * s_c, with
    z_c, u_c ~ N(0, 1) and s_c the channel's output scale (|weight_c| for a norm, the
    row norm for a Linear; only the value rows of a gated FFN). Draws come from a generator seeded by ``seed``, in module
    order, and are made whatever the knob values, so each knob alone changes only its
    own effect. Does nothing when both knobs are 0.
    """
    if disparity == 0 and asymmetry == 0:
        return
    generator = torch.Generator().manual_seed(seed + _KNOB_SEED_OFFSET)
    targets = [(re.compile(pattern), kind) for pattern, kind in family.outlier_targets]
    gated = {
        name for name, module in denoiser.named_modules() if type(module).__name__ in _GATED_FFN
    }
    for name, module in denoiser.named_modules():
        kinds = {kind for regex, kind in targets if regex.fullmatch(name)}
        if not kinds:
            continue
        is_norm = isinstance(module, (nn.GroupNorm, nn.LayerNorm))
        if "norm" in kinds and is_norm and getattr(module, "weight", None) is not None:
            channels = module.weight.shape[0]
            gains, offsets = _draw(generator, channels, disparity, asymmetry)
            module.weight.mul_(gains.to(module.weight))
            if module.bias is not None:
                module.bias.add_((offsets * module.weight.float().abs().cpu()).to(module.bias))
        elif kinds - {"norm"} and isinstance(module, nn.Linear):
            rows = slice(0, module.out_features)
            if "ffn_in" in kinds and name.rsplit(".", 1)[0] in gated:
                # Gated FFN (GEGLU, SwiGLU): output = value * act(gate) with the value in
                # the first half of the rows; scaling both halves would square the gains.
                rows = slice(0, module.out_features // 2)
            channels = rows.stop - rows.start
            gains, offsets = _draw(generator, channels, disparity, asymmetry)
            module.weight[rows].mul_(gains.to(module.weight).unsqueeze(1))
            if module.bias is not None:
                row_norms = module.weight[rows].float().norm(dim=1).cpu()
                module.bias[rows].add_((offsets * row_norms).to(module.bias))


def _draw(
    generator: torch.Generator, channels: int, disparity: float, asymmetry: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gains, offsets in channel-scale units), each (channels,)."""
    gains = torch.exp(disparity * torch.randn(channels, generator=generator))
    offsets = asymmetry * torch.randn(channels, generator=generator)
    return gains, offsets


@functools.cache
def _parameter_count(name: str) -> tuple[str, int]:
    """(denoiser class, parameter count) of a preset, built on the meta device."""
    spec = MODELS.get(name)
    family = family_by_name(spec.family)
    with torch.device("meta"):
        denoiser = family.build(spec.config())
    return type(denoiser).__name__, sum(p.numel() for p in denoiser.parameters())


def list_models() -> list[ModelRow]:
    """One row per zoo model: name, family, denoiser class, parameter count, description,
    whether its weights are trained."""
    rows = []
    for name, spec in MODELS.items():
        denoiser_class, parameters = _parameter_count(name)
        rows.append(
            ModelRow(name, spec.family, denoiser_class, parameters, spec.description, spec.trained)
        )
    return rows
