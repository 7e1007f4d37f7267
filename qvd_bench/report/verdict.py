"""The verdict of an evaluation: the best method per bit-width, by how much, and why.

Everything is computed from plain tables, so that a test can recompute it independently:

- ``results``: ``results.parquet``'s rows. The verdict's figure is teacher-forced SQNR of
  the CFG output over all steps (``VERDICT_METRIC``), mean over weight seeds; the
  reference method (``fp``) is not a candidate.
- ``transforms``: ``transforms.parquet``'s rows (``quant.measure.transform_figures`` per
  configuration): the before → after figures each "why" sentence cites.
- ``plan``: the statistics run's plan (``analysis.plan.QuantPlan``) for the measured
  properties (temporal skewness, coverage, disparity) of the layers each transform chose.

Methods whose SQNR equals another's at every weight seed (to ``IDENTICAL_RTOL``) are
"identical": they tie, and the margin is taken over the next method that differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

# The verdict's figure: (metric, mode) of results rows at step -1 (all steps), CFG output.
VERDICT_METRIC = ("sqnr", "teacher-forced")
VERDICT_LABEL = "SQNR tf (dB)"
REFERENCE_METHODS = frozenset({"fp"})
IDENTICAL_RTOL = 1e-9
# (method, baseline, what the method adds to the baseline): the ablations of the recipe.
ABLATIONS = (
    ("qvd-htdq", "mse", "HTDQ"),
    ("qvd-scri", "mse", "SCRI"),
    ("qvd", "qvd-scri", "HTDQ on top of SCRI"),
    ("qvd", "qvd-htdq", "SCRI on top of HTDQ"),
    ("os+", "smoothquant", "OS+'s shift over SmoothQuant's scale"),
)
# What each change (``transform_figures``' "change") is called in sentences.
CHANGE_NAMES = {"scri": "SCRI", "htdq": "HTDQ", "os+": "OS+", "smoothquant": "SmoothQuant"}
NO_SPREAD = "1 seed: no spread"


def verdict_values(results: pd.DataFrame) -> pd.DataFrame:
    """The verdict's figure per (bits, method, weight_seed), candidates only.

    Returns:
        Columns bits, method, weight_seed, value (dB), in the results' order.
    """
    metric, mode = VERDICT_METRIC
    sel = results[
        (results["step"] == -1)
        & (results["branch"] == "cfg")
        & (results["metric"] == metric)
        & (results["mode"] == mode)
        & ~results["method"].isin(REFERENCE_METHODS)
    ]
    return sel[["bits", "method", "weight_seed", "value"]].reset_index(drop=True)


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=IDENTICAL_RTOL, atol=0.0))


@dataclass(frozen=True)
class BitsVerdict:
    """The verdict at one bit-width.

    Attributes:
        bits: the bit-width.
        best: the winning method; ``tied`` lists methods identical to it.
        best_db: its mean SQNR over seeds (dB).
        runner_up: the best method that differs from the winner ("" when none).
        margin_db: best_db minus the runner-up's mean (NaN when none).
        seeds: number of weight seeds.
        spread_db: sample sd over seeds of the winner's SQNR (NaN with one seed).
        wins: seeds at which the winner beats the runner-up.
    """

    bits: str
    best: str
    tied: tuple[str, ...]
    best_db: float
    runner_up: str
    margin_db: float
    seeds: int
    spread_db: float
    wins: int


def bits_verdicts(results: pd.DataFrame) -> list[BitsVerdict]:
    """One ``BitsVerdict`` per bit-width, in the results' order."""
    values = verdict_values(results)
    out = []
    for bits in dict.fromkeys(values["bits"]):
        at = values[values["bits"] == bits]
        per_seed = at.pivot_table(index="weight_seed", columns="method", values="value")
        # +inf (a configuration identical to FP) can win; NaN and -inf cannot be ranked.
        per_seed = per_seed.replace(-np.inf, np.nan).dropna(axis=1)
        if per_seed.empty:
            continue
        means = per_seed.mean().sort_values(ascending=False, kind="stable")
        best = str(means.index[0])
        best_values = per_seed[best].to_numpy()
        tied = tuple(
            str(m) for m in means.index[1:] if _identical(per_seed[m].to_numpy(), best_values)
        )
        others = [str(m) for m in means.index[1:] if str(m) not in tied]
        runner_up = others[0] if others else ""
        margin = float(means[best] - means[runner_up]) if runner_up else float("nan")
        wins = int((per_seed[best] > per_seed[runner_up]).sum()) if runner_up else 0
        seeds = len(per_seed)
        spread = float(per_seed[best].std(ddof=1)) if seeds > 1 else float("nan")
        out.append(
            BitsVerdict(
                bits, best, tied, float(means[best]), runner_up, margin, seeds, spread, wins
            )
        )
    return out


def verdict_table(results: pd.DataFrame) -> pd.DataFrame:
    """The first table of a results report: one row per bit-width.

    Columns: bits, best method (ties named), its SQNR, runner-up, margin (dB), spread over
    seeds (sd of the winner's SQNR and the seeds it wins, or ``NO_SPREAD``).
    """
    rows = []
    for v in bits_verdicts(results):
        best = v.best + (f" (= {', '.join(v.tied)})" if v.tied else "")
        if v.seeds > 1:
            spread = f"sd {v.spread_db:.2f} dB over {v.seeds} seeds; wins {v.wins}/{v.seeds}"
        else:
            spread = NO_SPREAD
        rows.append(
            {
                "bits": v.bits,
                "best method": best,
                VERDICT_LABEL: round(v.best_db, 2),
                "runner-up": v.runner_up or "–",
                "margin (dB)": f"+{v.margin_db:.2f}" if v.runner_up else "–",
                "spread": spread,
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- why


def _mean_change(changes: pd.DataFrame, change: str, figure: str) -> tuple[float, float, int]:
    rows = changes[(changes["change"] == change) & (changes["figure"] == figure)]
    rows = rows[np.isfinite(rows["before"]) & np.isfinite(rows["after"])]
    return float(rows["before"].mean()), float(rows["after"].mean()), rows["layer"].nunique()


def _plan_figure(plan, which: str, figure: str) -> tuple[float, int]:
    """The median of a plan figure over the layers the plan gives ``which`` (htdq/scri).

    A figure stored as None (an infinite disparity: a channel that is zero throughout,
    as in HunyuanVideo-1.5's text-to-video x_embedder input) has no place in the median.
    """
    if plan is None:
        return float("nan"), 0
    values = [
        float(getattr(p, which).figures[figure])
        for p in plan.layers
        if getattr(p, which).apply and getattr(p, which).figures.get(figure) is not None
    ]
    return (float(np.median(np.abs(values))), len(values)) if values else (float("nan"), 0)


def change_sentence(changes: pd.DataFrame, method: str, bits: str, plan=None) -> str:
    """What ``method``'s transforms changed at ``bits``, with before → after figures.

    Args:
        changes: ``transforms.parquet``'s rows.
        method, bits: the configuration.
        plan: the statistics run's plan, for the measured properties (optional).

    Returns:
        One sentence, or "" when the configuration changed nothing it records.
    """
    mine = changes[(changes["method"] == method) & (changes["bits"] == bits)]
    parts = []
    if not mine[mine["change"] == "htdq"].empty:
        before, after, layers = _mean_change(mine, "htdq", "tdscore")
        kept = mine[(mine["change"] == "htdq") & (mine["detail"] == "uniform-mse")]
        changed = layers - kept["layer"].nunique()
        skew, _ = _plan_figure(plan, "htdq", "temporal_skew")
        measured = (
            f" (temporal features with median |skew| {skew:.2f})" if np.isfinite(skew) else ""
        )
        if changed == 0:
            parts.append(
                f"HTDQ kept the uniform grid on all {layers} temporal-feature layers{measured}: "
                f"TDScore {before:.3f} → {after:.3f}"
            )
        else:
            parts.append(
                f"HTDQ chose a non-uniform level set on {changed} of {layers} temporal-feature "
                f"layers{measured}: TDScore {before:.3f} → {after:.3f}"
            )
    for change in ("scri", "os+", "smoothquant"):
        rows = mine[mine["change"] == change]
        if rows.empty:
            continue
        name = CHANGE_NAMES[change]
        text = f"{name} transformed {rows['layer'].nunique()} layers"
        if rows[rows["figure"].isin(["coverage", "sqnr_db"])].empty:
            text += " (its record keeps no per-layer before → after figure)"
        if not rows[rows["figure"] == "coverage"].empty:
            before, after, _ = _mean_change(rows, change, "coverage")
            text += f": mean level coverage {100 * before:.1f} % → {100 * after:.1f} %"
            if change == "scri":
                disparity, _ = _plan_figure(plan, "scri", "disparity")
                if np.isfinite(disparity):
                    text += f" (channel ranges scattered {disparity:.1f}× max/median)"
        if not rows[rows["figure"] == "sqnr_db"].empty:
            before, after, _ = _mean_change(rows, change, "sqnr_db")
            text += (
                f", layer-output SQNR {before:.1f} → {after:.1f} dB (mse's calibration → {name}'s)"
            )
        parts.append(text)
    return "; ".join(parts)


def ablation_sentences(results: pd.DataFrame, changes: pd.DataFrame, plan=None) -> list[str]:
    """What each ablation of the recipe (``ABLATIONS``) added, or that it added nothing."""
    values = verdict_values(results)
    methods = set(values["method"])
    bits_order = list(dict.fromkeys(values["bits"]))
    out = []
    for method, baseline, adds in ABLATIONS:
        if method not in methods or baseline not in methods:
            continue
        deltas, same = [], []
        for bits in bits_order:
            a = values[(values["method"] == method) & (values["bits"] == bits)].sort_values(
                "weight_seed"
            )
            b = values[(values["method"] == baseline) & (values["bits"] == bits)].sort_values(
                "weight_seed"
            )
            x, y = a["value"].to_numpy(np.float64), b["value"].to_numpy(np.float64)
            same.append(_identical(x, y))
            deltas.append((bits, float(np.mean(x) - np.mean(y)) if len(x) and len(y) else np.nan))
        if all(same):
            text = f"{method} equals {baseline} at every bit-width: {adds} changed nothing here"
            cited = (
                change_sentence(changes, method, bits_order[0], plan) if not changes.empty else ""
            )
            out.append(text + (f" ({cited} at {bits_order[0]})." if cited else "."))
            continue
        shown = ", ".join(
            f"{'identical' if s else f'{d:+.2f} dB'} at {bits}"
            for (bits, d), s in zip(deltas, same)
        )
        out.append(f"{adds} ({method} against {baseline}): {shown}.")
    return out


def why_sentences(
    results: pd.DataFrame, changes: pd.DataFrame | None = None, plan=None
) -> list[str]:
    """One sentence per bit-width on its winner, then one per ablation.

    Args:
        results: ``results.parquet``'s rows.
        changes: ``transforms.parquet``'s rows (None or empty: the sentences say the run
            recorded no transform figures).
        plan: the statistics run's plan (optional).
    """
    changes = _changes(changes)
    out = []
    for v in bits_verdicts(results):
        lead = f"{v.bits}: {v.best} wins"
        if v.runner_up:
            lead += f" by {v.margin_db:.2f} dB over {v.runner_up}"
        if v.tied:
            lead += f" (identical to {', '.join(v.tied)})"
        cited = change_sentence(changes, v.best, v.bits, plan)
        against = _against_mse(results, v.best, v.bits)
        if cited:
            out.append(f"{lead}. {cited}{against}.")
        elif changes.empty:
            out.append(f"{lead}; the run recorded no transform figures (transforms.parquet).")
        else:
            out.append(f"{lead}; {v.best} applies no transform or level set of its own here.")
    return out + ablation_sentences(results, changes, plan)


def _against_mse(results: pd.DataFrame, method: str, bits: str) -> str:
    """ "; end-to-end SQNR mse → method a → b dB": what the method changed end to end
    against the plain ``mse`` calibration it builds on ("" for mse itself or without it)."""
    if method == "mse":
        return ""
    values = verdict_values(results)
    at = values[values["bits"] == bits]
    mine, mse = at[at["method"] == method]["value"], at[at["method"] == "mse"]["value"]
    if mse.empty or mine.empty:
        return ""
    return f"; end-to-end SQNR with mse's calibration → {method}: {mse.mean():.2f} → {mine.mean():.2f} dB"


def _changes(changes: pd.DataFrame | None) -> pd.DataFrame:
    columns = ["weight_seed", "method", "bits", "layer", "role", "change", "figure", "before",
               "after", "detail"]  # fmt: skip
    if changes is None or changes.empty:
        return pd.DataFrame(columns=columns)
    return changes


def identical_groups(results: pd.DataFrame, methods: Sequence[str]) -> dict[str, str]:
    """Method -> the earlier method (in ``methods``' order) it is identical to at every
    bit-width and seed, for methods whose lines would hide each other in a figure."""
    values = verdict_values(results)
    out: dict[str, str] = {}
    series = {
        m: values[values["method"] == m].sort_values(["bits", "weight_seed"])["value"].to_numpy()
        for m in methods
    }
    for i, method in enumerate(methods):
        for earlier in methods[:i]:
            if (
                earlier not in out
                and len(series[method])
                and _identical(series[method], series[earlier])
            ):
                out[method] = earlier
                break
    return out
