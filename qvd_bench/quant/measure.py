"""What a quantization did, measured from its record: the level coverage of every
quantized input and, for temporal features, TDScore of the quantizers against the float
features (reported by ``qvd-bench quantize`` next to the record)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qvd_bench.numerics.grid import quant_range
from qvd_bench.quant.builders import act_quantizer
from qvd_bench.quant.record import LayerRecord, QuantRecord
from qvd_bench.store import StatsRun

# --------------------------------------------------------------------------- reporting


def act_range(record: LayerRecord) -> tuple[float, float] | None:
    """The [lo, hi] an activation quantizer covers (union over groups); None if dynamic/none."""
    t = record.tensors
    if record.act in ("static", "group"):
        q_min, q_max = quant_range(record.a_bits)
        scale = t["act_scale"].to(torch.float64)
        zero = t["act_zero_point"].to(torch.float64)
        return float(((q_min - zero) * scale).min()), float(((q_max - zero) * scale).max())
    if record.act == "levels":
        return float(t["levels"].min()), float(t["levels"].max())
    return None


def quantize_features(record: LayerRecord, timesteps: np.ndarray, features: Tensor) -> Tensor:
    """Temporal features as the layer's quantizer sees them, back in the input domain.

    Args:
        record: the layer's record.
        timesteps: (T,) the timestep of each row (a per-group quantizer picks its row's group).
        features: (T, D) float64.

    Returns:
        (T, D) float64: z + s·Q((e − z)/s) with the record's input transform (identity
        when none), e where the layer keeps float inputs.
    """
    call = SimpleNamespace(current=None)
    quantizer = act_quantizer(record, call)
    if quantizer is None:
        return features
    shift = record.tensors.get("input_shift")
    scale = record.tensors.get("input_scale")
    rows = []
    for t, e in zip(np.asarray(timesteps).tolist(), features):
        call.current = SimpleNamespace(timestep=float(t))
        z = torch.zeros(()) if shift is None else shift.to(torch.float64)
        if z.ndim == 2:  # a bias table per timestep group
            z = z[quantizer.group()] if hasattr(quantizer, "group") else z[0]
        s = torch.ones(()) if scale is None else scale.to(torch.float64)
        rows.append(z + s * quantizer((e - z) / s))
    return torch.stack(rows)


def temporal_report(run: StatsRun, record: QuantRecord, layers: dict[str, nn.Module]) -> list:
    """TDScore, relative MSE and collisions of each temporal-feature layer's quantizer."""
    from qvd_bench.analysis.temporal import tdscore

    temporal = run.temporal
    if temporal.empty:
        return []
    out = []
    for name in sorted(set(temporal["layer"].astype(str))):
        if name not in layers:
            continue
        layer = record[name]
        timesteps, vectors = run.temporal_matrix(name)
        features = torch.from_numpy(np.asarray(vectors, dtype=np.float64))
        weight = layers[name].weight.detach()
        scores = tdscore(
            features, weight, lambda e, r=layer, t=timesteps: quantize_features(r, t, e)
        )
        out.append({"layer": name, "act": layer.act, **layer.info.get("htdq", {}), **scores})
    return out


def coverage_report(run: StatsRun, record: QuantRecord) -> dict[str, Any]:
    """Level coverage of the calibrated per-tensor ranges.

    Layers with an explicit input transform, dynamic or no activation quantizer are left
    out: their calibrated range is not on the stored input statistics' scale.

    Returns:
        layers (count), mean (of the per-layer mean coverage) and table (per layer:
        mean_coverage, median_coverage, share_below_threshold).
    """
    from qvd_bench.analysis.channels import channel_ranges, coverage, coverage_summary

    ranges = {}
    for layer in record.layers:
        span = act_range(layer) if layer.a_bits is not None else None
        # A transformed layer's range is on X̃ = (X − z)/s, not on the stored X.
        if (
            span is not None
            and "transform" not in layer.info
            and "input_shift" not in layer.tensors
        ):
            ranges[layer.layer] = span
    if not ranges:
        return {"layers": 0, "mean": float("nan"), "table": None}
    frame = channel_ranges(run.channels)
    frame = frame[frame["tensor"] == "input"] if "tensor" in frame.columns else frame
    frame = frame[frame["layer"].astype(str).isin(list(ranges))]
    table = coverage_summary(coverage(frame, record.config.a_bits, ranges))
    return {
        "layers": int(len(table)),
        "mean": float(table["mean_coverage"].mean()),
        "table": table,
    }


def transform_figures(record: QuantRecord) -> list[dict[str, Any]]:
    """What each layer's transform or level set changed, as before → after figures.

    Read from the record alone (no statistics): SCRI / OS+ / SmoothQuant transforms keep
    the ``mse`` baseline's level coverage and layer-output SQNR beside their own where
    they measured them; HTDQ keeps the uniform-MSE level set's TDScore beside the chosen
    set's, and the chosen family (``uniform-mse`` means HTDQ kept the uniform grid).

    Returns:
        One row per (layer, figure): layer, role, change ("scri", "os+", "smoothquant",
        "htdq"), figure ("transformed" for every transformed layer, NaN figures;
        "coverage", "sqnr_db", "tdscore"), before, after, detail (the HTDQ level-set
        label, else "").
    """
    rows: list[dict[str, Any]] = []
    for layer in record.layers:
        base = {"layer": layer.layer, "role": layer.role}
        transform = layer.info.get("transform")
        if isinstance(transform, dict):
            change = str(transform.get("method", "transform"))
            # Every transformed layer, with or without figures of its own.
            rows.append({**base, "change": change, "figure": "transformed",
                         "before": float("nan"), "after": float("nan"), "detail": ""})  # fmt: skip
            if "coverage" in transform and "coverage_mse" in transform:
                rows.append({**base, "change": change, "figure": "coverage",
                             "before": float(transform["coverage_mse"]),
                             "after": float(transform["coverage"]), "detail": ""})  # fmt: skip
            sqnr, baseline = transform.get("sqnr_db"), transform.get("sqnr_mse_db")
            if isinstance(sqnr, dict) and isinstance(baseline, dict) and layer.layer in sqnr:
                rows.append({**base, "change": change, "figure": "sqnr_db",
                             "before": float(baseline[layer.layer]),
                             "after": float(sqnr[layer.layer]), "detail": ""})  # fmt: skip
        htdq = layer.info.get("htdq")
        if isinstance(htdq, dict) and "tdscore" in htdq:
            rows.append({**base, "change": "htdq", "figure": "tdscore",
                         "before": float(htdq.get("uniform_mse_tdscore", float("nan"))),
                         "after": float(htdq["tdscore"]),
                         "detail": str(htdq.get("label", htdq.get("family", "")))})  # fmt: skip
    return rows
