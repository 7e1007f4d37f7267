"""What to evaluate: ``EvalConfig``, checked when it is made, and the bit-width specs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qvd_bench.config import DTYPES
from qvd_bench.errors import UserError
from qvd_bench.evaluate.generate import GenerationSettings, checked_pipeline_kwargs
from qvd_bench.evaluate.metrics import FIDELITY_METRICS, METRICS, check_metrics
from qvd_bench.evaluate.reference import check_real_videos


def check_methods(names: Sequence[str]) -> tuple[str, ...]:
    """Checks method names against the quantization registry (did-you-mean on a typo)."""
    from qvd_bench.quant.methods import get_method

    if not names:
        raise UserError("no quantization method given")
    for name in names:
        get_method(name)
    return tuple(dict.fromkeys(names))


MIXED_SUFFIX = "-mixed"


def split_bits_spec(spec: str) -> tuple[int, int, bool]:
    """``"W8A6"`` -> (8, 6, False); ``"W8A6-mixed"`` -> (8, 6, True).

    A mixed spec keeps weights at W bits and gives activations bits per layer from measured
    sensitivity with a mean of at most A (``evaluate.sensitivity.mixed_config``, candidates
    4, 6 and 8).
    """
    from qvd_bench.quant.config import parse_bits

    text = str(spec).strip()
    mixed = text.lower().endswith(MIXED_SUFFIX)
    w_bits, a_bits = parse_bits(text[: -len(MIXED_SUFFIX)] if mixed else text)
    return w_bits, a_bits, mixed


def normalise_bits_specs(specs: Sequence[str]) -> tuple[str, ...]:
    """Normalises bit-width specs ("w4a8" -> "W4A8", "w8a6-MIXED" -> "W8A6-mixed")."""
    if not specs:
        raise UserError("no bit-width given (e.g. W8A8,W4A8)")
    normalised = []
    for spec in specs:
        w_bits, a_bits, mixed = split_bits_spec(spec)
        normalised.append(f"W{w_bits}A{a_bits}{MIXED_SUFFIX if mixed else ''}")
    return tuple(dict.fromkeys(normalised))


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate.

    Attributes:
        model: zoo name or path.
        weight_seeds: one evaluation per weight seed (random-weight presets).
        methods: quantization method names.
        bits: bit-width specs ("W4A8").
        metrics: metric names (the fidelity metrics are always added).
        prompts: the prompts; video i is prompt i with sample id i.
        settings: sampling settings shared by every model.
        disparity, asymmetry: outlier knobs of presets (None: preset defaults).
        stats: a statistics run to quantize from (one weight seed only); None collects.
        reference: "fp" (FP generations paired by seed) or a directory of real videos
            (``videos.safetensors`` holding ``videos``, uint8 (N, T, H, W, 3), N >= 1)
            for the Frechet metrics; checked here, before anything runs.
        weights: metric name -> local weights path (FVD detectors, Inception, CLIP dir);
            a path given must exist (checked here, before anything runs), while a network
            metric without one is skipped with a notice.
        device: where the models run ("cpu", "cuda", ...).
        dtype: the models' dtype (``config.DTYPES``); None takes the statistics' dtype
            (``stats``), float32 for statistics collected here.
        pipeline_kwargs: further keyword arguments of the pipeline call, for the
            statistics collected here (``CollectConfig.extra["pipeline_kwargs"]``) and
            every video (``GenerationSettings.pipeline_kwargs``): one set for both. Given
            here or in ``settings``, not differently in both; a zoo preset without a
            pipeline takes none.
    """

    model: str = "tiny-unet3d"
    weight_seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = ("fp", "minmax")
    bits: tuple[str, ...] = ("W8A8",)
    metrics: tuple[str, ...] = FIDELITY_METRICS
    prompts: tuple[str, ...] = ()
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    disparity: float | None = None
    asymmetry: float | None = None
    stats: str | None = None
    reference: str = "fp"
    weights: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str | None = None
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._merge_pipeline_kwargs()
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.prompts:
            raise UserError("no prompts: give a prompt file with at least one prompt")
        if not self.weight_seeds:
            raise UserError("no weight seed: weight_seeds is empty")
        if self.stats is not None and len(self.weight_seeds) > 1:
            raise UserError("stats describes one model; it cannot serve several weight seeds")
        object.__setattr__(self, "metrics", check_metrics(self.metrics))
        if "groundtruth" in self.metrics:
            from qvd_bench.datasets.shapes import FRAMES, HEIGHT, WIDTH
            from qvd_bench.evaluate.groundtruth import check_captions

            # Scored against their captions: the prompts must be dataset captions.
            check_captions(self.prompts)
            sizes = (self.settings.frames, self.settings.height, self.settings.width)
            if sizes != (FRAMES, HEIGHT, WIDTH):
                raise UserError(
                    f"metric groundtruth scores clips of {FRAMES}x{HEIGHT}x{WIDTH}: frames, "
                    f"height and width must be {FRAMES}, {HEIGHT} and {WIDTH}, got "
                    f"{', '.join(map(str, sizes))}"
                )
        object.__setattr__(self, "methods", check_methods(self.methods))
        object.__setattr__(self, "bits", normalise_bits_specs(self.bits))
        for name, path in self.weights.items():
            METRICS.get(name)
            if not Path(path).exists():
                raise UserError(f"weights[{name!r}]: {path} does not exist")
        if self.reference != "fp":
            if not Path(self.reference).is_dir():
                raise UserError(
                    f"reference must be 'fp' or a directory of real videos; "
                    f"{self.reference} is neither"
                )
            check_real_videos(self.reference)

    def _merge_pipeline_kwargs(self) -> None:
        """One set of pipeline_kwargs, held both here and in ``settings``."""
        from qvd_bench.models.zoo import MODELS

        own = checked_pipeline_kwargs(self.pipeline_kwargs)
        given = self.settings.pipeline_kwargs
        if own and given and own != given:
            raise UserError(
                "pipeline_kwargs and settings.pipeline_kwargs differ; give them in one place"
            )
        merged = own or given
        if merged and self.model in MODELS and not MODELS.get(self.model).with_pipeline:
            raise UserError(
                f"pipeline_kwargs need a model with a diffusers pipeline; {self.model} is a "
                "bare denoiser (minimal sampler)"
            )
        object.__setattr__(self, "pipeline_kwargs", merged)
        object.__setattr__(self, "settings", replace(self.settings, pipeline_kwargs=merged))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["settings"] = self.settings.to_dict()
        if not self.pipeline_kwargs:  # as ``GenerationSettings.to_dict``
            del data["pipeline_kwargs"]
        return data
