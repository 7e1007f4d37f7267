"""``qvd`` and its ablations: ``mse`` + HTDQ on temporal features + SCRI where the plan says.

- ``qvd``: HTDQ on the temporal-feature layers where ``plan.layer(name).htdq.apply``,
  SCRI where ``plan.layer(name).scri.apply`` (HTDQ wins on a layer the plan gives both:
  its level set is calibrated on the untransformed features), ``mse`` elsewhere;
- ``qvd-htdq``: the HTDQ part only; ``qvd-scri``: the SCRI part only.

The plan comes from ``analyze`` (decided at the config's bits) when none is given. SCRI
itself lives in ``scri.py``: its ``scri_records(ctx, layers)`` when it provides one,
else its registered method run with every other layer kept in full precision.
"""

from __future__ import annotations

import dataclasses
import importlib

from qvd_bench.errors import UserError
from qvd_bench.quant.methods.base import METHODS, Method, QuantContext, register_method
from qvd_bench.quant.methods.htdq import htdq_layer_records
from qvd_bench.quant.record import LayerRecord


def _plan_layers(ctx: QuantContext, what: str) -> set[str]:
    """Quantized layers whose plan entry applies ``what`` ("htdq" or "scri")."""
    if ctx.plan is None:
        raise UserError(f"method {ctx.config.method!r} needs a plan; run qvd-bench analyze")
    chosen = set()
    for entry in ctx.plan.layers:
        if entry.layer in ctx.layers and getattr(entry, what).apply:
            chosen.add(entry.layer)
    if what == "htdq":
        chosen &= set(ctx.temporal_layers)
    return chosen - ctx.keep_fp


def scri_for(ctx: QuantContext, layers: set[str]) -> dict[str, LayerRecord]:
    """SCRI records of ``layers`` (from ``scri.py``).

    Raises:
        UserError: SCRI is not available in this installation.
    """
    if not layers:
        return {}
    try:
        scri = importlib.import_module("qvd_bench.quant.methods.scri")
    except ModuleNotFoundError as error:
        if error.name != "qvd_bench.quant.methods.scri":
            raise
        raise UserError(
            f"method {ctx.config.method!r} needs SCRI (qvd_bench/quant/methods/scri.py), "
            "which this installation lacks; use qvd-htdq"
        ) from None
    ordered = [name for name in ctx.layers if name in layers]
    if hasattr(scri, "scri_records"):
        return dict(scri.scri_records(ctx, ordered))
    others = tuple(name for name in ctx.layers if name not in layers)
    config = dataclasses.replace(
        ctx.config, keep_fp_layers=tuple(ctx.config.keep_fp_layers) + others
    )
    sub = dataclasses.replace(ctx, config=config)
    records = METHODS.get("scri")().prepare(sub)
    return {r.layer: r for r in records if r.layer in layers}


def qvd_records(ctx: QuantContext, htdq: bool, scri: bool) -> list[LayerRecord]:
    htdq_layers = _plan_layers(ctx, "htdq") if htdq else set()
    scri_layers = (_plan_layers(ctx, "scri") - htdq_layers) if scri else set()
    records = htdq_layer_records(ctx, htdq_layers)
    transformed = scri_for(ctx, scri_layers)
    return [transformed.get(r.layer, r) for r in records]


@register_method("qvd")
class Qvd(Method):
    description = "QVD: mse + HTDQ on temporal features + SCRI, per the plan"
    uses_plan = True

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        return qvd_records(ctx, htdq=True, scri=True)


@register_method("qvd-htdq")
class QvdHtdq(Method):
    description = "QVD ablation: mse + HTDQ on temporal features, per the plan"
    uses_plan = True

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        return qvd_records(ctx, htdq=True, scri=False)


@register_method("qvd-scri")
class QvdScri(Method):
    description = "QVD ablation: mse + SCRI, per the plan"
    uses_plan = True

    def prepare(self, ctx: QuantContext) -> list[LayerRecord]:
        return qvd_records(ctx, htdq=False, scri=True)
