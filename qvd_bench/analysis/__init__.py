"""Measurements from stored statistics: pure functions from the store's tables to tidy tables.

- ``distribution``: skewness and excess kurtosis at declared levels (per channel within a
  timestep, per tensor per timestep, per temporal channel across timesteps), quartile
  (Bowley) skew from histograms, and summaries per role.
- ``channels``: per-channel ranges and asymmetry, inter-channel disparity, quantization-level
  coverage, temporal drift of ranges, weight statistics per layer.
- ``temporal``: TDScore of a quantizer on a temporal-feature layer, and reference quantizers.
- ``summary``: one row per layer with all of the above, per-role aggregates, the headline
  table, and ``analyze`` (what ``qvd-bench analyze`` runs).
- ``plan``: measurements -> QuantPlan (HTDQ, SCRI, clipping and granularity per layer).

Every function takes DataFrames shaped like ``StatsRun.channels`` / ``histograms`` /
``temporal`` / ``weights`` (or plain arrays, or a ``StatsRun``) and never touches a live
model.
"""

from qvd_bench.analysis.plan import (
    Decision,
    LayerPlan,
    PlanThresholds,
    QuantPlan,
    make_plan,
)
from qvd_bench.analysis.summary import (
    analyze,
    headline,
    layer_summary,
    require_temporal,
    role_summary,
)

__all__ = [
    "Decision",
    "LayerPlan",
    "PlanThresholds",
    "QuantPlan",
    "analyze",
    "headline",
    "layer_summary",
    "make_plan",
    "require_temporal",
    "role_summary",
]
