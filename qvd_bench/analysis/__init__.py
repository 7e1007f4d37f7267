"""Measurements from stored statistics: pure functions from the store's tables to tidy tables.

- ``distribution``: skewness and excess kurtosis at declared levels (per channel within a
  timestep, per tensor per timestep, per temporal channel across timesteps), quartile
  (Bowley) skew from histograms, and summaries per role.
- ``channels``: per-channel ranges and asymmetry, inter-channel disparity, quantization-level
  coverage, temporal drift of ranges, weight statistics per layer.
- ``temporal``: TDScore of a quantizer on a temporal-feature layer, and reference quantizers.

Every function takes DataFrames shaped like ``StatsRun.channels`` / ``histograms`` /
``temporal`` / ``weights`` (or plain arrays) and never touches a live model.
"""
