"""What ``qvd-bench quantize`` reports next to the record, and the command itself.

The library parts are elsewhere: ``quant.config`` (``QuantConfig``, ``parse_bits``),
``quant.record`` (``QuantRecord``, ``load_record``) and ``quant.apply`` (``quantize_``,
``apply_record``, ``unquantize_``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qvd_bench.models.roles import leaf_layers
from qvd_bench.numerics.grid import quant_range
from qvd_bench.quant.apply import check_config_names, quantize_
from qvd_bench.quant.builders import act_quantizer
from qvd_bench.quant.config import QuantConfig, parse_bits
from qvd_bench.quant.methods import get_method
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
    """Level coverage of the calibrated per-tensor ranges (DESIGN section 4).

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


def quantize_command(
    model: str | None,
    stats: str | Path,
    method: str,
    bits_spec: str,
    out_dir: str | Path,
    plan_path: str | Path | None = None,
    attention_bits: Sequence[int] = (),
    *,
    split_skip: bool = False,
    granularity: str | None = None,
    mixed: str | None = None,
    mixed_bits: Sequence[int] = (4, 6, 8),
    probe_seed: int | None = None,
) -> dict[str, Any]:
    """``qvd-bench quantize``: quantize a model from its statistics and save the record.

    Args:
        model: a zoo name or path; None takes the model the statistics were collected on
            (with the same weights and knobs).
        stats: the statistics run directory.
        method: a registered method name.
        bits_spec: e.g. "W4A8".
        out_dir: where ``record.safetensors`` and ``record.json`` go.
        plan_path: a plan JSON (``qvd-bench analyze``); decided from the statistics if None.
        attention_bits: bits of the attention matmul inputs (``QuantConfig.attention_bits``:
            one value, or four for q, k, v and softmax); () keeps attention in float.
        split_skip: split quantization of skip concatenations (``QuantConfig.split_skip``).
        granularity: activation granularity, "tensor", "timestep_group" or "token"; None
            takes the method's default.
        mixed: a mean bit budget ("A6", "W5"): bits per layer assigned from measured
            sensitivity (``evaluate.sensitivity``); the decisions go to ``mixed.json`` and
            ``mixed.parquet`` beside the record.
        mixed_bits: the candidate bit-widths of a mixed assignment.
        probe_seed: sampling seed of the sensitivity probe (default: the statistics'
            seed + 1, noise not seen in calibration).

    Returns:
        A summary: the record's counts, the output directory, level coverage of the
        calibrated ranges, per temporal-feature layer the quantizer's TDScore, the
        attention quantizers (``summary["attention"]``) and, with ``split_skip``, what
        was split (``summary["split_skip"]``).
    """
    from qvd_bench.analysis.plan import QuantPlan
    from qvd_bench.models.zoo import load_model, load_run_model

    w_bits, a_bits = parse_bits(bits_spec)
    get_method(method)  # an unknown name fails before any loading
    config = QuantConfig(
        method,
        w_bits,
        a_bits,
        granularity=granularity,
        attention_bits=tuple(attention_bits),
        split_skip=split_skip,
    )
    run = StatsRun(stats)
    plan = QuantPlan.load(plan_path) if plan_path is not None else None
    loaded = load_run_model(run) if model is None else load_model(model)
    layers = dict(leaf_layers(loaded.denoiser))
    decisions = None
    if mixed is not None:
        from qvd_bench.evaluate.sensitivity import Budget, mixed_config, probe_for_run

        budget = Budget.parse(mixed)
        check_config_names(config, {n: run.roles.get(n, "") for n in layers})
        probe = probe_for_run(loaded, run, seed=probe_seed)
        config, decisions = mixed_config(
            loaded, run, config, budget, probe, candidates=mixed_bits, plan=plan, progress=True
        )
    record = quantize_(loaded, config, stats=run, plan=plan)
    record.save(out_dir)
    summary = record.summary()
    if decisions is not None:
        from qvd_bench.evaluate.sensitivity import write_mixed

        summary["mixed"] = write_mixed(out_dir, budget, config, decisions, probe)
    summary["out_dir"] = str(out_dir)
    summary["coverage"] = coverage_report(run, record)
    summary["temporal"] = temporal_report(run, record, layers)
    return summary
