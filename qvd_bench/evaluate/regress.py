"""Regression check of a results directory's headline figures against a baseline JSON.

Headline figures (means over weight seeds):

- ``skew/<role>``, ``coverage_a<b>/<role>``: per role, the median |tensor skewness| and the
  median mean level coverage at b bits, from each statistics run's ``analysis.parquet``
  (``analysis.summary.role_summary``);
- ``sqnr_tf/<method>/<bits>``, ``cosine_tf/...``: teacher-forced fidelity of the CFG
  output over all steps; ``sqnr_final/...``, ``psnr_final/...``: free-running final latents;
- ``<metric>/<method>/<bits>`` for Frechet and CLIP metrics, with their protocol id kept
  beside the value: a baseline and results under different protocol ids are refused.

A figure passes when |current − baseline| <= abs + rel·|baseline| (the tolerances are
stored per figure in the baseline, from ``TOLERANCES``); +inf matches only +inf. A
figure of the baseline missing from the results fails; new figures are listed, not
failed. ``write_baseline`` writes the current figures as the new baseline, with the
configuration they came from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qvd_bench import store
from qvd_bench.errors import UserError

BASELINE_FORMAT = "qvd-bench-baseline"
# (absolute, relative) tolerance per figure kind. Generation is deterministic on one CPU
# with the same seeds, but the fidelity of a quantized model is not stable under float
# rounding: a last-bit difference in an FP kernel moves activations across quantization
# level boundaries, and the flips compound through the layers and the sampling steps. On
# the committed baseline's reduced configuration, computations that differ only in
# rounding (PyTorch's attention and conv kernels against qvd-bench's, padded against
# unpadded attention keys) moved SQNR and PSNR by up to 0.92 dB and the cosine by up to
# 0.018; the tolerances are about 1.6x those, so other CPUs, BLAS builds and kernels
# pass, and a regression of a couple of dB (a broken quantizer, a lost transform) fails.
# Finer comparisons need more prompts, steps and weight seeds than a CI check affords.
TOLERANCES: dict[str, tuple[float, float]] = {
    "skew": (0.05, 0.05),
    "coverage": (0.02, 0.0),
    "sqnr_tf": (1.5, 0.02),
    "cosine_tf": (0.03, 0.0),
    "sqnr_final": (1.5, 0.02),
    "psnr_final": (1.5, 0.02),
    "frechet": (0.0, 0.05),
}
# The reduced configuration of the committed baseline (stats/baselines/tiny-unet3d.json):
# one prompt, 2 latent frames, 3 steps, four methods at two bit-widths; about half a
# minute on one CPU core.
BASELINE_RUN: dict[str, Any] = {
    "model": "tiny-unet3d",
    "num_prompts": 1,
    "frames": 2,
    "height": 16,
    "width": 16,
    "steps": 3,
    "methods": ("fp", "minmax", "mse", "qvd-htdq"),
    "bits": ("W8A8", "W4A4"),
    "seeds": 1,
}
_FIDELITY = {
    "sqnr_tf": ("sqnr", "teacher-forced"),
    "cosine_tf": ("cosine", "teacher-forced"),
    "sqnr_final": ("sqnr", "free-running"),
    "psnr_final": ("psnr", "free-running"),
}


def find_results(path: str | Path) -> Path:
    """The results directory: ``path`` itself, or the one ``results/<model>/`` under it.

    Raises:
        UserError: none, or several.
    """
    from qvd_bench.evaluate.results import RESULTS_FILE

    path = Path(path)
    if (path / RESULTS_FILE).is_file():
        return path
    found = sorted(path.glob(f"results/*/{RESULTS_FILE}"))
    if len(found) == 1:
        return found[0].parent
    if not found:
        raise UserError(f"no {RESULTS_FILE} in {path} or {path / 'results'}/*/")
    raise UserError(
        f"{path} holds several results ({', '.join(str(f.parent) for f in found)}); pass one"
    )


def headline_figures(results_dir: str | Path) -> tuple[dict[str, float], dict[str, str]]:
    """The headline figures of a results directory.

    Returns:
        (figure name -> value, metric -> protocol id for the Frechet / CLIP metrics).
    """
    from qvd_bench.analysis.summary import ANALYSIS_FILE, role_summary
    from qvd_bench.evaluate.metrics import FIDELITY_METRICS
    from qvd_bench.evaluate.results import RESULTS_FILE, SETTINGS_FILE, stats_paths

    results_dir = find_results(results_dir)
    try:
        results = pd.read_parquet(results_dir / RESULTS_FILE)
        settings = json.loads((results_dir / SETTINGS_FILE).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{results_dir} is unreadable: {' '.join(str(error).split())}") from None
    figures: dict[str, float] = {}
    per_role: dict[str, list[float]] = {}
    for run_dir in stats_paths(results_dir, settings).values():
        path = run_dir / ANALYSIS_FILE
        if not path.is_file():
            raise UserError(f"{path} is missing; run qvd-bench analyze {run_dir}")
        roles = role_summary(pd.read_parquet(path))
        roles = roles[roles["level"] == "tensor"]
        for row in roles.itertuples(index=False):
            per_role.setdefault(f"skew/{row.role}", []).append(row.median_abs_skew)
            for column in roles.columns:
                if column.startswith("median_coverage_mean_a"):
                    bits = column.rsplit("_a", 1)[1]
                    value = getattr(row, column)
                    per_role.setdefault(f"coverage_a{bits}/{row.role}", []).append(value)
    figures.update({k: float(np.mean(v)) for k, v in per_role.items()})

    overall = results[(results["step"] == -1) & (results["branch"] == "cfg")]
    for (method, bits), group in overall.groupby(["method", "bits"], sort=False):
        for kind, (metric, mode) in _FIDELITY.items():
            values = group[(group["metric"] == metric) & (group["mode"] == mode)]["value"]
            if len(values):
                figures[f"{kind}/{method}/{bits}"] = _mean(values)
    protocols: dict[str, str] = {}
    other = results[~results["metric"].isin(FIDELITY_METRICS)]
    for (metric, method, bits), group in other.groupby(["metric", "method", "bits"], sort=False):
        ids = sorted(set(group["protocol"]))
        if len(ids) > 1:
            raise UserError(f"{metric} is measured under several protocol ids: {', '.join(ids)}")
        protocols[metric] = ids[0]
        figures[f"{metric}/{method}/{bits}"] = _mean(group["value"])
    return figures, protocols


def _mean(values: pd.Series) -> float:
    array = values.to_numpy(dtype=np.float64)
    return float("inf") if np.isposinf(array).all() else float(array.mean())


def tolerance_for(name: str) -> tuple[float, float]:
    kind = name.split("/", 1)[0]
    if kind.startswith("coverage"):
        kind = "coverage"
    return TOLERANCES.get(kind, TOLERANCES["frechet"])


def compare(
    current: dict[str, float], baseline: dict[str, dict[str, Any]]
) -> tuple[pd.DataFrame, bool]:
    """The diff table (figure, baseline, current, delta, tolerance, status) and whether
    every baseline figure is within its tolerance."""
    rows, ok = [], True
    for name, entry in baseline.items():
        base = _from_json(entry["value"])
        allowed = entry["abs"] + entry["rel"] * (abs(base) if math.isfinite(base) else 0.0)
        value = current.get(name)
        if value is None:
            status, delta = "MISSING", float("nan")
        elif math.isinf(base) or math.isinf(value):
            delta = 0.0 if value == base else float("inf")
            status = "ok" if value == base else "REGRESSION"
        elif math.isnan(base) or math.isnan(value):
            delta = float("nan")
            status = "ok" if math.isnan(base) and math.isnan(value) else "REGRESSION"
        else:
            delta = value - base
            status = "ok" if abs(delta) <= allowed else "REGRESSION"
        ok &= status == "ok"
        rows.append((name, base, value, delta, allowed, status))
    for name in sorted(set(current) - set(baseline)):
        rows.append((name, float("nan"), current[name], float("nan"), float("nan"), "new"))
    table = pd.DataFrame(
        rows, columns=["figure", "baseline", "current", "delta", "tolerance", "status"]
    )
    return table, ok


def _to_json(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _from_json(value: float | str | None) -> float:
    return float("nan") if value is None else float(value)


def load_baseline(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no baseline at {path}; write one with write_baseline") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is unreadable: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise UserError(f"{path} is not a qvd-bench baseline")
    return data


def write_baseline(path: str | Path, results_dir: str | Path) -> dict[str, Any]:
    """Writes the figures of ``results_dir`` as a baseline, with their configuration."""
    results_dir = find_results(results_dir)
    figures, protocols = headline_figures(results_dir)
    settings = json.loads((results_dir / "settings.json").read_text())
    run_record = results_dir / "run.json"
    config = settings["config"]
    data = {
        "format": BASELINE_FORMAT,
        "configuration": {
            "description": (
                "reduced qvd-bench run that CI can afford; regenerate with commands.run.run_job(out, "
                "**BASELINE_RUN) then evaluate.regress.write_baseline(this file, out)"
            ),
            "run": json.loads(run_record.read_text())["settings"] if run_record.is_file() else None,
            "model": config["model"],
            "weight_seeds": config["weight_seeds"],
            "prompts": config["prompts"],
            "settings": config["settings"],
        },
        "tolerance_rule": "|current - baseline| <= abs + rel * |baseline|; inf matches inf",
        "protocols": protocols,
        "figures": {
            name: {
                "value": _to_json(value),
                "abs": tolerance_for(name)[0],
                "rel": tolerance_for(name)[1],
            }
            for name, value in figures.items()
        },
    }
    store.write_json(Path(path), data)
    return data


def compare_with_baseline(results: str | Path, baseline: str | Path) -> tuple[pd.DataFrame, bool]:
    """Compares the headline figures of a results directory with a stored baseline.

    Args:
        results: a results directory, or an output root holding one (``find_results``).
        baseline: the baseline JSON (``write_baseline``).

    Returns:
        (the diff table of ``compare``, whether every baseline figure is within its
        tolerance).

    Raises:
        UserError: unreadable results or baseline, or Frechet metrics under different
            protocol ids in the two.
    """
    reference = load_baseline(baseline)
    current, protocols = headline_figures(results)
    for metric, protocol in protocols.items():
        expected = reference.get("protocols", {}).get(metric)
        if expected is not None and expected != protocol:
            raise UserError(
                f"{metric}: the results use protocol {protocol}, the baseline {expected}; "
                "numbers of different protocols are never compared"
            )
    return compare(current, reference["figures"])
