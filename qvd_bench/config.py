"""Frozen run configurations, serialised with a schema version."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qvd_bench.errors import UserError

# Bumped whenever a stored file (manifest, parquet tables, config dicts) changes shape.
SCHEMA_VERSION = 1

DTYPES = ("float32", "float16", "bfloat16")


def check_schema_version(version: Any, what: str, redo: str) -> None:
    """Raises unless ``version`` is ``SCHEMA_VERSION``.

    Args:
        version: the schema version a stored document or config dict carries.
        what: what carries it, for the message ("collect config", a file's path).
        redo: what to do about another version ("recollect the statistics").

    Raises:
        UserError: another version.
    """
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{what} has schema version {version}, this qvd-bench reads {SCHEMA_VERSION}; {redo}"
        )


def unknown_fields(kind: type, data: dict[str, Any]) -> list[str]:
    """The keys of ``data`` that are not fields of the dataclass ``kind``, sorted."""
    return sorted(set(data) - {f.name for f in dataclasses.fields(kind)})


@dataclass(frozen=True)
class CollectConfig:
    """Everything that decides the statistics of a collection run.

    Sizes are in latent units (frames, height, width of the latent video).

    Attributes:
        model: zoo name, local pipeline directory, or hub id.
        weight_seed: seed of random weights (zoo presets only).
        disparity: log-normal sigma of injected per-channel gains; None = preset default.
        asymmetry: scale of injected per-channel offsets; None = preset default.
        prompts: the prompts, in order; sample i is prompt i.
        steps: sampling steps.
        guidance_scale: classifier-free guidance scale; <= 1 disables CFG.
        seed: sampling seed (initial noise of sample i depends on (seed, i) only).
        frames, height, width: latent video size.
        sampler: "auto" (the pipeline if the model has one), "pipeline" or "denoiser".
        roles: roles whose layers are hooked; empty = all.
        include: regexes (re.search) on layer names to hook; empty = all.
        exclude: regexes on layer names not to hook.
        outputs: also collect output moments.
        histograms: collect per-tensor histograms on the signed log grid.
        histogram_relative_error: bucket relative error of that grid.
        histogram_stride: count every k-th element (a token subsample).
        reservoir_capacity: rows kept per layer (0 disables the reservoir).
        temporal_stride: stride of the timestep grid for temporal features (0 disables).
        attention: also collect per-tensor statistics of q, k, v and the softmax output of
            every attention module (``quant/attention.py``; what ``--attention-bits``
            quantization calibrates on).
        device: torch device string.
        dtype: model dtype, one of DTYPES.
        timestep_groups: statistics per contiguous groups of sampling steps instead of per
            timestep (each group stored at its first timestep); 0 keeps every timestep;
            None (the default) groups in ``collect.cost.DEFAULT_TIMESTEP_GROUPS`` only when
            per-timestep state would exceed ``collect.cost.LARGE_STATE_BYTES``.
    """

    model: str = "tiny-unet3d"
    weight_seed: int = 0
    disparity: float | None = None
    asymmetry: float | None = None
    prompts: tuple[str, ...] = ()
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    frames: int = 8
    height: int = 16
    width: int = 16
    sampler: str = "auto"
    roles: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    outputs: bool = False
    histograms: bool = True
    histogram_relative_error: float = 0.01
    histogram_stride: int = 1
    reservoir_capacity: int = 256
    temporal_stride: int = 1
    attention: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)
    timestep_groups: int | None = None

    def __post_init__(self) -> None:
        if self.timestep_groups is not None and self.timestep_groups < 0:
            raise UserError(f"timestep_groups must not be negative, got {self.timestep_groups}")
        if self.steps < 1:
            raise UserError(f"steps must be at least 1, got {self.steps}")
        if not self.prompts:
            raise UserError("no prompts: give a prompt file with at least one prompt")
        for name in ("frames", "height", "width"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.sampler not in ("auto", "pipeline", "denoiser"):
            raise UserError(f"sampler must be auto, pipeline or denoiser, got {self.sampler!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.histogram_stride < 1:
            raise UserError(f"histogram_stride must be at least 1, got {self.histogram_stride}")
        if self.reservoir_capacity < 0 or self.temporal_stride < 0:
            raise UserError(
                "reservoir_capacity and temporal_stride must not be negative, got "
                f"{self.reservoir_capacity} and {self.temporal_stride}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CollectConfig:
        data = dict(data)
        check_schema_version(
            data.pop("schema_version", None), "collect config", "recollect the statistics"
        )
        unknown = unknown_fields(cls, data)
        if unknown:
            raise UserError(f"collect config has unknown fields: {', '.join(unknown)}")
        for name in ("prompts", "roles", "include", "exclude"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)
