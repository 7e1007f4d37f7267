"""What the suite needs to know about one denoiser class, and a loaded model.

Each file in ``qvd_bench/models/families/`` defines one ``Family`` subclass for one
diffusers denoiser class (UNet3DConditionModel, LatteTransformer3DModel, ...). Model
knowledge is kept declarative (role tables, outlier targets, tiny configs); core code
never branches on a model's name, only calls these methods.

Tensor layouts: ``latents`` are in the family's own layout, "BCFHW" (UNet3D, Motion,
I2VGenXL, Latte, Wan, LTX-Video, LTX-2, HunyuanVideo, HunyuanVideo-1.5, Mochi, Allegro,
SkyReels-V2) or "BFCHW" (SVD, CogVideoX), and hold only the channels the denoiser
predicts (extra conditioning channels such as SVD's image latents are added
inside ``forward``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from qvd_bench.errors import UserError
from qvd_bench.store import split_layer_name  # noqa: F401  (models and collect import it here)

Layout = Literal["BCFHW", "BFCHW"]

# The roles every leaf Linear/Conv gets exactly one of.
ROLES: tuple[str, ...] = (
    "time_emb",
    "temporal",
    "spatial_conv",
    "self_attn",
    "cross_attn",
    "ffn",
    "io",
)


@dataclass(frozen=True)
class Guidance:
    """How a pipeline combines the predictions of a step's branches into the one it
    steps with.

    prediction = cond + Σ_b scales[b]·(cond − pred_b) over the other branches b the step
    ran (CFG's uncond + g·(cond − uncond) is cond + (g − 1)·(cond − uncond)); then, with
    ``rescale`` φ > 0 and guidance in the step, diffusers' ``rescale_noise_cfg`` toward
    cond: the result r becomes φ·r·std(cond)/std(r) + (1 − φ)·r, the stds over every axis
    but the batch, in x0-space where ``rescale_in_x0`` (LTX-2 guides there), else on the
    predictions.

    Attributes:
        branches: the branches the pipeline runs at each step (``sampling.ALL_BRANCHES``
            names): what a collection's statistics keys count.
        scales: branch -> weight of (cond − the branch's prediction), for every branch
            but "cond".
        rescale: the guidance rescale φ; 0: none.
        rescale_in_x0: ``rescale`` acts on x0-space predictions.
    """

    branches: tuple[str, ...] = ("uncond", "cond")
    scales: Mapping[str, float] = field(default_factory=dict)
    rescale: float = 0.0
    rescale_in_x0: bool = False

    def combine(
        self,
        predictions: Mapping[str, torch.Tensor],
        x0_map: tuple[float, float, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The guided prediction of one step, float32 (or wider).

        Args:
            predictions: branch -> the denoiser's prediction (1, ...) at the step; "cond"
                always, any of ``scales``' branches.
            x0_map: (a, b, model_input) with x0 = a·model_input + b·prediction at the
                step; needed only when ``rescale_in_x0``.

        Raises:
            UserError: a branch this guidance does not combine.
        """
        unknown = sorted(set(predictions) - set(self.scales) - {"cond"})
        if unknown:
            raise UserError(
                f"a pipeline step ran the branch(es) {', '.join(unknown)}, whose combination "
                "with the others qvd-bench does not know (it knows CFG, true CFG and LTX-2's "
                "spatio-temporal and modality passes)"
            )
        dtype = torch.promote_types(predictions["cond"].dtype, torch.float32)
        cond = predictions["cond"].to(dtype)
        guided = cond
        for branch, scale in self.scales.items():
            if branch in predictions:
                guided = guided + scale * (cond - predictions[branch].to(dtype))
        if self.rescale <= 0 or len(predictions) == 1:
            return guided
        if not self.rescale_in_x0:
            return _rescaled(guided, cond, self.rescale)
        if x0_map is None:
            raise ValueError("guidance rescaled in x0-space needs the step's x0 map")
        a, b, model_input = x0_map
        offset = a * model_input.to(dtype)
        rescaled = _rescaled(offset + b * guided, offset + b * cond, self.rescale)
        return (rescaled - offset) / b


def _rescaled(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """diffusers' ``rescale_noise_cfg`` of ``guided`` toward ``cond`` (see ``Guidance``)."""
    axes = list(range(1, guided.ndim))
    ratio = cond.std(dim=axes, keepdim=True) / guided.std(dim=axes, keepdim=True)
    return rescale * guided * ratio + (1 - rescale) * guided


class Family:
    """Declarative knowledge of one denoiser class plus the adapters to call it.

    Class attributes:
        name: short family name ("unet3d").
        denoiser_class: diffusers class name ("UNet3DConditionModel").
        pipeline_classes: diffusers pipeline class names whose denoiser is this class.
        layout: "BCFHW" or "BFCHW".
        prediction_type: "epsilon", "v_prediction" or "flow" (what ``forward`` returns).
        role_table: ordered (regex, role) pairs matched with ``re.fullmatch`` against
            the qualified module name; the first match wins.
        outlier_targets: (regex, kind) pairs naming where the ``disparity`` /
            ``asymmetry`` knobs act; kind is one of "norm", "time_mlp", "ffn_in",
            "attn_out".
        pipeline_call_defaults: keyword arguments the family's pipelines need besides
            those derived from their call signature (``pipelines.call_arguments``),
            applied where the signature has them.
        pipeline_modules: pipeline class name ("" for every pipeline of the family) ->
            modules it uses without checking that they are installed (the prompt
            cleaning of SkyReels-V2's and Wan's image-to-video pipelines calls ``ftfy``): a
            pipeline whose own module did not import one of them cannot run.
    """

    name: ClassVar[str]
    denoiser_class: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    layout: ClassVar[Layout]
    prediction_type: ClassVar[str] = "epsilon"
    role_table: ClassVar[tuple[tuple[str, str], ...]] = ()
    outlier_targets: ClassVar[tuple[tuple[str, str], ...]] = ()
    pipeline_call_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    pipeline_modules: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType({})

    def tiny_config(self) -> dict[str, Any]:
        """Config dict of the tiny preset (random weights, builds offline)."""
        raise NotImplementedError

    def build(self, config: dict[str, Any]) -> nn.Module:
        """Builds the denoiser from a config dict (random weights, current RNG state).

        By default the diffusers class named ``denoiser_class`` called with the config.
        """
        import diffusers

        return getattr(diffusers, self.denoiser_class)(**config)

    def latent_shape(
        self, denoiser: nn.Module, batch: int, frames: int, height: int, width: int
    ) -> tuple[int, ...]:
        """Shape of the latents in this family's layout (5-D).

        By default the denoiser's ``in_channels`` placed as ``layout`` says.
        """
        channels = denoiser.config.in_channels
        if self.layout == "BFCHW":
            return (batch, frames, channels, height, width)
        return (batch, channels, frames, height, width)

    def probe_size(self, denoiser: nn.Module) -> tuple[int, int, int]:
        """Smallest valid (frames, height, width) latent, for probe forwards.

        By default one patch: ``patch_size_t`` (1 when absent or None) by ``patch_size``
        squared, the DiTs' config fields.
        """
        config = denoiser.config
        return (getattr(config, "patch_size_t", None) or 1, config.patch_size, config.patch_size)

    def check_latent_size(self, denoiser: nn.Module, frames: int, height: int, width: int):
        """Refuses a latent that is not a whole number of patches (a DiT's patch
        embedding would fail on it); denoisers without ``patch_size`` take any size.

        Raises:
            UserError: frames, height or width not a multiple of the patch.
        """
        if getattr(denoiser.config, "patch_size", None) is None:
            return
        patch = tuple(int(p) for p in self.probe_size(denoiser))
        size = (frames, height, width)
        if any(n % p for n, p in zip(size, patch)):
            raise UserError(
                "latent frames, height and width must be multiples of the patch "
                f"{'x'.join(map(str, patch))} of {type(denoiser).__name__}, "
                f"got {'x'.join(map(str, size))}"
            )

    def text_embedding_shape(self, denoiser: nn.Module) -> tuple[int, int]:
        """(sequence length, dim) of the text (or image) states the denoiser attends to."""
        raise NotImplementedError

    def conditioning(
        self,
        denoiser: nn.Module,
        batch: int,
        frames: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Extra per-sample conditioning (image latents, added_time_ids, fps ...).

        Returns tensors with the batch as leading dimension, or an empty dict.
        """
        return {}

    def pipeline_latents(
        self, denoiser: nn.Module, latents: torch.Tensor, frames: int, height: int, width: int
    ) -> torch.Tensor:
        """The final latents a pipeline returns with ``output_type="latent"``, in this
        family's 5-D layout (by default they already are).

        Args:
            latents: the pipeline's output ``frames``.
            frames, height, width: the latent size.
        """
        return latents

    def decode_video(
        self, pipeline: Any, latents: torch.Tensor, frames: int, height: int, width: int
    ) -> torch.Tensor:
        """The final latents decoded by the pipeline's VAE, as the pipeline's call decodes
        them before its ``video_processor`` (``models.decode.decode_frames``).

        By default the pipeline's own ``decode_latents`` (TextToVideoSD, AnimateDiff, SVD,
        I2VGenXL, Latte, CogVideoX), given the frame count and ``decode_chunk_size`` as
        its call gives them (the call's default, or the family's
        ``pipeline_call_defaults``; None means all frames at once, SVD's rule). Families
        whose pipelines decode inline (un-normalising the latents first) override this.

        Args:
            pipeline: the diffusers pipeline, with a ``vae``.
            latents: final latents as ``pipeline_latents`` returns them (family layout,
                on the VAE's device).
            frames, height, width: the pixel sizes the pipeline was called with.

        Returns:
            The VAE's video, (B, C, T, H, W) in about [-1, 1].
        """
        import inspect

        decode = getattr(pipeline, "decode_latents", None)
        if decode is None:
            raise UserError(
                f"{type(pipeline).__name__} has no decode_latents and family {self.name!r} "
                "does not say how its pipelines decode latents"
            )
        arguments: dict[str, Any] = {}
        parameters = inspect.signature(decode).parameters
        for name in ("num_frames", "video_length"):
            if name in parameters:
                arguments[name] = frames
        if "decode_chunk_size" in parameters:
            chunk = call_default(pipeline, "decode_chunk_size", self.pipeline_call_defaults)
            arguments["decode_chunk_size"] = frames if chunk is None else chunk
        return decode(latents.to(pipeline.vae.dtype), **arguments)

    def guidance(self, pipeline: Any, guidance_scale: float, call: Mapping[str, Any]) -> Guidance:
        """How the family's pipelines combine a step's branches (``Guidance``).

        By default classifier-free guidance: an unconditional branch when the scale is
        above 1, combined as uncond + g·(cond − uncond), with the call's
        ``guidance_rescale`` on the predictions (LTX-Video); a pipeline driven by a
        diffusers guider (HunyuanVideo-1.5) combines as its ``ClassifierFreeGuidance``
        does, with the run's scale.

        Args:
            pipeline: the diffusers pipeline.
            guidance_scale: the run's guidance scale (``pipelines.run_pipeline``).
            call: every argument of the pipeline call as the pipeline sees it: the
                signature's defaults overlaid with the arguments given.
        """
        branches = ("uncond", "cond") if guidance_scale > 1 else ("cond",)
        guider = getattr(pipeline, "guider", None)
        if guider is not None and "guidance_scale" not in call:
            original = bool(getattr(guider, "use_original_formulation", False))
            return Guidance(
                branches,
                {"uncond": guidance_scale if original else guidance_scale - 1},
                rescale=float(getattr(guider, "guidance_rescale", 0.0) or 0.0),
            )
        return Guidance(
            branches,
            {"uncond": guidance_scale - 1},
            rescale=float(call.get("guidance_rescale", 0.0) or 0.0),
        )

    def forward(
        self,
        denoiser: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text_states: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """One denoiser call.

        Args:
            latents: (B, C, F, H, W) or (B, F, C, H, W), per ``layout``.
            timestep: (B,) timestep values (may differ per sample).
            text_states: (B, L, D).
            conditioning: the output of ``conditioning`` for these B samples.

        Returns:
            The model prediction with the shape of ``latents``.
        """
        raise NotImplementedError


@dataclass
class LoadedModel:
    """A denoiser (or several experts) ready to use, with where it came from.

    A pipeline may hold more than one denoiser: Wan 2.2 runs ``transformer`` on high-noise
    timesteps and ``transformer_2`` on low-noise ones. ``denoisers`` then maps each
    pipeline attribute to its module, and every layer is named by its attribute and its
    name inside that expert (``transformer_2.blocks.0.attn1.to_q``): ``layer_root`` is
    the module whose ``named_modules`` give those names. With a single denoiser names are
    the denoiser's own and ``layer_root`` is ``denoiser``.

    Attributes:
        name: zoo name or the path / hub id it was loaded from.
        family: the Family of its denoiser class (every expert has the same class).
        denoiser: the nn.Module; with several experts, the first one (the one the family's
            size methods read their config from).
        pipeline: the diffusers pipeline it came from, or None for a bare denoiser.
        random_weights: True for zoo presets and architectures.
        weight_seed: seed of the random weights, or None.
        knobs: outlier injection settings ({"disparity": float, "asymmetry": float}).
        denoisers: pipeline attribute -> denoiser, in the pipeline's order, when the model
            came from a pipeline with more than one denoiser; empty otherwise.
        encode_prompts: for a model whose text conditioning is known (a trained zoo
            model with its text encoder): prompts -> (cond, uncond) text states, each
            (N, L, D); None: the minimal sampler uses pseudo embeddings
            (``sampling.text_states_for_prompts``).
    """

    name: str
    family: Family
    denoiser: nn.Module
    pipeline: Any = None
    random_weights: bool = True
    weight_seed: int | None = None
    knobs: dict[str, float] = field(default_factory=dict)
    denoisers: dict[str, nn.Module] = field(default_factory=dict)
    encode_prompts: Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def trained(self) -> bool:
        """Whether the weights are trained ones (a shipped or loaded model), not random."""
        return not self.random_weights

    @property
    def multi_expert(self) -> bool:
        """Whether layer names carry the pipeline attribute of their expert."""
        return len(self.denoisers) > 1

    @property
    def experts(self) -> dict[str, nn.Module]:
        """Expert name -> denoiser: the pipeline attributes with several experts, else
        {"": denoiser}. The name is the prefix of the expert's layer names."""
        return dict(self.denoisers) if self.multi_expert else {"": self.denoiser}

    @property
    def layer_root(self) -> nn.Module:
        """The module whose qualified names are the layer names (see the class docstring).

        With several experts a ``ModuleDict`` holding them (the experts themselves, not
        copies: swapping a layer in it swaps it in the expert).
        """
        return nn.ModuleDict(self.denoisers) if self.multi_expert else self.denoiser

    def expert_model(self, expert: str) -> LoadedModel:
        """This model restricted to one expert (``experts`` key), as a single denoiser."""
        if not self.multi_expert:
            return self
        return dataclasses.replace(self, denoiser=self.denoisers[expert], denoisers={})

    @property
    def param_count(self) -> int:
        return sum(p.numel() for p in self.layer_root.parameters())


def expert_layer_name(expert: str, name: str) -> str:
    """The layer name of ``name`` inside ``expert`` ("" for a single denoiser)."""
    return f"{expert}.{name}" if expert else name


def call_default(pipeline: Any, name: str, family_defaults: Mapping[str, Any]) -> Any:
    """The value of argument ``name`` in a pipeline call that does not give it: the
    family's ``pipeline_call_defaults``, else the default of the pipeline's ``__call__``
    (None when it has neither)."""
    import inspect

    if name in family_defaults:
        return family_defaults[name]
    parameter = inspect.signature(pipeline.__call__).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default
