"""Statistics -> QuantPlan: which quantizer each layer's input gets, and why.

A plan is decided from measurements, never from role names: the figures that decided
each choice are stored with it, so that a reader (and the report) can check them, and
statistics changed on purpose (unskewed temporal features, equal symmetric channels)
flip the decisions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from qvd_bench.analysis.channels import channel_ranges, layer_coverage
from qvd_bench.config import SCHEMA_VERSION
from qvd_bench.errors import UserError
from qvd_bench.numerics.grid import check_bits

if TYPE_CHECKING:
    from qvd_bench.store import StatsRun

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


DEFAULT_THRESHOLDS = PlanThresholds()


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
        """The inverse of ``to_dict`` (``load`` checks the format and schema version)."""
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
        from qvd_bench.store import read_json_document

        data = read_json_document(
            Path(path),
            format=PLAN_FORMAT,
            what="quantization plan",
            redo="rerun qvd-bench analyze",
            missing=f"no plan at {path}; run qvd-bench analyze first",
        )
        return cls.from_dict(data)


# ----------------------------------------------------------------------------- deciding


def _figure(value: Any) -> float | None:
    """A JSON-safe figure: a float, or None where it is NaN or infinite."""
    value = float(value)
    return value if math.isfinite(value) else None


def _num(value: Any, digits: str = ".2f") -> str:
    value = float(value)
    return format(value, digits) if math.isfinite(value) else str(value)


def decide_htdq(row: pd.Series, thresholds: PlanThresholds, run_has_temporal: bool) -> Decision:
    """HTDQ for a layer whose stored temporal features are skewed across timesteps.

    Args:
        row: one row of ``layer_summary``.
        thresholds: ``temporal_skew`` is used.
        run_has_temporal: whether the run stores temporal features for any layer (to
            say why a layer has none).
    """
    if not row["has_temporal"]:
        if not run_has_temporal and row["role"] == "time_emb":
            reason = (
                "no temporal features in this run, so HTDQ was not considered; "
                "recollect with temporal_stride=1"
            )
        else:
            reason = "no temporal features stored for this layer, so HTDQ does not apply"
        return Decision(False, reason, {})
    skew = float(row["temporal_skew"])
    figures = {
        "temporal_skew": _figure(skew),
        "temporal_channel_skew_median": _figure(row["temporal_channel_skew_median"]),
        "temporal_low_share": _figure(row["temporal_low_share"]),
        "temporal_timesteps": _figure(row["temporal_timesteps"]),
    }
    limit = thresholds.temporal_skew
    if not math.isfinite(skew):
        return Decision(False, "temporal features are constant across timesteps", figures)
    if abs(skew) > limit:
        reason = (
            f"temporal features are skewed across timesteps (|skew| {abs(skew):.2f} > "
            f"{limit:g}), so a non-uniform level set keeps timesteps apart"
        )
        return Decision(True, reason, figures)
    reason = (
        f"temporal features are near-symmetric across timesteps (|skew| {abs(skew):.2f} "
        f"<= {limit:g}), so a uniform grid suffices"
    )
    return Decision(False, reason, figures)


def decide_scri(row: pd.Series, a_bits: int, thresholds: PlanThresholds) -> Decision:
    """SCRI for a layer whose channels reach few levels because their ranges are scattered.

    Args:
        row: one row of ``layer_summary`` with ``coverage_mean_a<a_bits>``.
        a_bits: the activation bits of the plan.
        thresholds: ``coverage``, ``disparity`` and ``asymmetry`` are used.
    """
    cov = float(row[f"coverage_mean_a{a_bits}"])
    spread = float(row["disparity"])
    asym = float(row["asymmetry_abs_mean"])
    figures = {
        "coverage_mean": _figure(cov),
        "disparity": _figure(spread),
        "asymmetry_abs_mean": _figure(asym),
        "bits": float(a_bits),
    }
    t = thresholds
    if math.isnan(cov):
        return Decision(False, "no channel ranges were recorded for this layer", figures)
    low = cov < t.coverage
    scattered = spread > t.disparity  # NaN compares False: no spread measured
    off_centre = asym > t.asymmetry
    shares = f"channels reach {100 * cov:.0f}% of the A{a_bits} levels on average"
    if not low:
        reason = f"{shares} (>= {100 * t.coverage:.0f}%), so SCRI is not needed"
        return Decision(False, reason, figures)
    if math.isnan(spread) and math.isnan(asym):
        reason = f"{shares} but every channel is constant over the run, so SCRI cannot help"
        return Decision(False, reason, figures)
    causes = []
    if scattered:
        causes.append(f"their ranges are scattered (max/median {_num(spread)} > {t.disparity:g})")
    if off_centre:
        causes.append(f"off-centre (mean |a| {asym:.2f} > {t.asymmetry:g})")
    if causes:
        reason = (
            f"{shares} (< {100 * t.coverage:.0f}%) and {' and '.join(causes)}, so "
            "integrating the channel ranges recovers levels"
        )
        return Decision(True, reason, figures)
    reason = (
        f"{shares} (< {100 * t.coverage:.0f}%) but their ranges are neither scattered "
        f"(max/median {_num(spread)} <= {t.disparity:g}) nor off-centre (mean |a| "
        f"{asym:.2f} <= {t.asymmetry:g}), so SCRI cannot help"
    )
    return Decision(False, reason, figures)


def decide_clipping(row: pd.Series, thresholds: PlanThresholds) -> tuple[str, str, Decision]:
    """Clipping rule and granularity from the tensor kurtosis and the range drift.

    Args:
        row: one row of ``layer_summary``.
        thresholds: ``kurtosis`` and ``drift`` are used.

    Returns:
        (clipping, granularity, the Decision; ``apply`` means clipping is searched).
    """
    kurt = float(row["kurtosis_median"])
    drift = float(row["drift"])
    figures = {"kurtosis_median": _figure(kurt), "drift": _figure(drift)}
    t = thresholds
    heavy = kurt > t.kurtosis
    moving = drift > t.drift  # inf (a step with zero range) counts as moving
    clipping = "mse" if heavy else "minmax"
    granularity = "timestep_group" if moving else "tensor"
    if math.isnan(kurt):
        first = "excess kurtosis is undefined (constant input), so min-max clipping"
    elif heavy:
        first = f"excess kurtosis {kurt:.2f} > {t.kurtosis:g}, so clipping is searched (mse)"
    else:
        first = f"excess kurtosis {kurt:.2f} <= {t.kurtosis:g}, so min-max clipping"
    if math.isnan(drift):
        second = "no range drift measured, so one range per tensor"
    elif moving:
        second = (
            f"the range drifts {_num(drift)}x > {t.drift:g}x across timesteps, so one range "
            "per timestep group"
        )
    else:
        second = (
            f"the range drifts {_num(drift)}x <= {t.drift:g}x across timesteps, so one range "
            "per tensor"
        )
    return clipping, granularity, Decision(heavy, f"{first}; {second}", figures)


def make_plan(
    run: StatsRun,
    layer_table: pd.DataFrame,
    *,
    w_bits: int,
    a_bits: int,
    thresholds: PlanThresholds = DEFAULT_THRESHOLDS,
) -> QuantPlan:
    """Decides each layer's activation quantizer from its measurements.

    Per layer (see ``PlanThresholds`` for the numbers):

    - HTDQ (family ``"htdq"``) when the layer has temporal features in the run and their
      |skewness| across timesteps exceeds ``temporal_skew``; otherwise ``"uniform"``. The
      role is never consulted to apply it: a time_emb layer with near-symmetric temporal
      features stays uniform;
    - SCRI when the mean level coverage at ``a_bits`` is below ``coverage`` and the channel
      ranges are scattered (disparity above ``disparity``) or off-centre (mean |asymmetry|
      above ``asymmetry``);
    - clipping ``"mse"`` when the tensor's median excess kurtosis exceeds ``kurtosis``,
      else ``"minmax"``;
    - granularity ``"timestep_group"`` when the range drift exceeds ``drift``, else
      ``"tensor"``.

    Args:
        run: the statistics run the table was measured on.
        layer_table: the output of ``layer_summary``; coverage at ``a_bits`` is measured
            from ``run`` when the table does not report it.
        w_bits, a_bits: the plan's bit-widths (2..16).
        thresholds: the decision thresholds.

    Returns:
        The plan, one LayerPlan per row of ``layer_table`` in its order.

    Raises:
        UserError: a bit-width is out of range.
    """
    w_bits, a_bits = check_bits(w_bits), check_bits(a_bits)
    table = layer_table
    if f"coverage_mean_a{a_bits}" not in table.columns:
        channels = run.channels
        ranges = channel_ranges(channels[channels["tensor"] == "input"])
        table = table.join(layer_coverage(ranges, a_bits), on="layer")
    run_has_temporal = bool(table["has_temporal"].any())
    layers = []
    for _, row in table.iterrows():
        htdq = decide_htdq(row, thresholds, run_has_temporal)
        clipping, granularity, clip = decide_clipping(row, thresholds)
        layers.append(
            LayerPlan(
                layer=str(row["layer"]),
                role=str(row["role"]),
                family="htdq" if htdq.apply else "uniform",
                clipping=clipping,
                granularity=granularity,
                bits=a_bits,
                htdq=htdq,
                scri=decide_scri(row, a_bits, thresholds),
                clipping_reason=clip,
            )
        )
    model = run.manifest.get("model")
    return QuantPlan(
        run=str(run.path),
        model=str(model.get("name", "")) if isinstance(model, dict) else str(model or ""),
        w_bits=w_bits,
        a_bits=a_bits,
        thresholds=thresholds,
        layers=tuple(layers),
    )
