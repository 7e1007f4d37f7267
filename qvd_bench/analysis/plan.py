"""Statistics -> QuantPlan: which quantizer each layer's input gets, and why.

A plan is decided from measurements, never from role names: the figures that decided
each choice are stored with it, so that a reader (and the report) can check them, and
statistics changed on purpose (unskewed temporal features, equal symmetric channels)
flip the decisions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qvd_bench.config import SCHEMA_VERSION
from qvd_bench.errors import UserError

PLAN_FORMAT = "qvd-bench-plan"

# Activation quantizer families and clipping rules a plan may name.
QUANTIZER_FAMILIES = ("uniform", "htdq")
CLIPPING_RULES = ("minmax", "percentile", "mse")
GRANULARITIES = ("tensor", "timestep_group")


@dataclass(frozen=True)
class PlanThresholds:
    """The thresholds a plan is decided with (documented defaults).

    Attributes:
        temporal_skew: HTDQ applies to a temporal-feature layer whose skewness across
            timesteps (over all its (timestep, dimension) values) exceeds this in
            absolute value: a uniform grid wastes levels on a long one-sided tail.
        coverage: SCRI is considered where the mean quantization-level coverage of the
            layer's channels at the plan's activation bits is below this.
        disparity: ... and the channel ranges are scattered (max/median range above
            this) ...
        asymmetry: ... or off-centre (mean |a_c| above this).
        kurtosis: clipping is searched (``mse``) where the tensor's excess kurtosis
            (median over timesteps) exceeds this; below it, ``minmax`` loses little.
        drift: per-timestep-group ranges where the layer's range moves across
            timesteps by more than this factor (max/min of per-step ranges).
    """

    temporal_skew: float = 1.0
    coverage: float = 0.5
    disparity: float = 4.0
    asymmetry: float = 0.3
    kurtosis: float = 3.0
    drift: float = 2.0


@dataclass(frozen=True)
class Decision:
    """One yes/no choice with its reason and the figures that decided it."""

    apply: bool
    reason: str
    figures: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerPlan:
    """What one layer's input activation gets.

    Attributes:
        layer: qualified layer name.
        role: its role (for reading; not used to decide).
        family: activation quantizer family, one of QUANTIZER_FAMILIES.
        clipping: clipping rule, one of CLIPPING_RULES.
        granularity: one of GRANULARITIES.
        bits: activation bits.
        htdq: whether HTDQ's level set applies (temporal features only).
        scri: whether SCRI's channel-range integration applies.
        clipping_reason: the figures behind the clipping and granularity choice.
    """

    layer: str
    role: str
    family: str
    clipping: str
    granularity: str
    bits: int
    htdq: Decision
    scri: Decision
    clipping_reason: Decision


@dataclass(frozen=True)
class QuantPlan:
    """Per-layer activation quantization choices for one statistics run.

    Attributes:
        run: the statistics run the plan was decided from.
        model: the model name in that run.
        w_bits, a_bits: the bit-widths the plan was decided for.
        thresholds: the thresholds used.
        layers: one LayerPlan per hooked layer, in module order.
    """

    run: str
    model: str
    w_bits: int
    a_bits: int
    thresholds: PlanThresholds
    layers: tuple[LayerPlan, ...]

    def layer(self, name: str) -> LayerPlan:
        for entry in self.layers:
            if entry.layer == name:
                return entry
        raise UserError(f"the plan has no layer {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantPlan:
        if data.get("format") != PLAN_FORMAT:
            raise UserError("not a qvd-bench quantization plan")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise UserError(
                f"plan has schema version {data.get('schema_version')}, this qvd-bench reads "
                f"{SCHEMA_VERSION}; rerun qvd-bench analyze"
            )
        layers = tuple(
            LayerPlan(
                **{
                    **entry,
                    "htdq": Decision(**entry["htdq"]),
                    "scri": Decision(**entry["scri"]),
                    "clipping_reason": Decision(**entry["clipping_reason"]),
                }
            )
            for entry in data["layers"]
        )
        return cls(
            run=data["run"],
            model=data["model"],
            w_bits=data["w_bits"],
            a_bits=data["a_bits"],
            thresholds=PlanThresholds(**data["thresholds"]),
            layers=layers,
        )

    def save(self, path: str | Path) -> None:
        from qvd_bench.store import write_json

        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"no plan at {path}; run qvd-bench analyze first") from None
        except (OSError, ValueError) as error:
            raise UserError(f"{path} is unreadable: {' '.join(str(error).split())}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} is not a qvd-bench quantization plan")
        return cls.from_dict(data)
