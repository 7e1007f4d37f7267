"""The quantization engine: fake quantization of Linear/Conv weights and inputs.

- ``primitives``: pure functions — affine qparams and fake quantization (per tensor, per
  channel, dynamic per token), timestep groups, level sets (uniform, signed log, mixed)
  and nearest-level rounding, Lp error and SQNR.
- ``observers``: range estimators from stored statistics — min-max, percentile (from
  histograms), MSE clipping search (on reservoir rows), per-channel weight qparams.
- ``modules``: ``QuantWrapper`` around Linear/Conv layers with static, per-timestep-group,
  dynamic per-token or level-set input quantizers; ``swap_module`` / ``unwrap``.
- ``attention``: ``QuantAttnProcessor``, the attention processor that quantizes q, k, v and
  the softmax output; ``attention_records`` / ``install_attention``.
"""

from qvd_bench.quant.modules import (
    DynamicTokenActQuant,
    GroupActQuant,
    LevelActQuant,
    QuantWrapper,
    StaticActQuant,
    quant_wrappers,
    set_enabled,
    swap_module,
    unwrap,
)
from qvd_bench.quant.observers import (
    minmax_channel_range,
    minmax_range,
    mse_range,
    percentile_range,
    reservoir_rows,
    shrink_search,
    weight_qparams,
)
from qvd_bench.quant.primitives import (
    LOG_BASES,
    TimestepLookup,
    affine_qparams,
    check_bits,
    fake_quant_affine,
    fake_quant_dynamic_per_token,
    fake_quant_levels,
    group_of,
    lp_error,
    mixed_levels,
    quant_levels,
    quant_range,
    signed_log_levels,
    sqnr_db,
    timestep_groups,
    uniform_levels,
)

__all__ = [
    "LOG_BASES",
    "DynamicTokenActQuant",
    "GroupActQuant",
    "LevelActQuant",
    "QuantWrapper",
    "StaticActQuant",
    "TimestepLookup",
    "affine_qparams",
    "check_bits",
    "fake_quant_affine",
    "fake_quant_dynamic_per_token",
    "fake_quant_levels",
    "group_of",
    "lp_error",
    "minmax_channel_range",
    "minmax_range",
    "mixed_levels",
    "mse_range",
    "percentile_range",
    "quant_levels",
    "quant_range",
    "quant_wrappers",
    "reservoir_rows",
    "set_enabled",
    "shrink_search",
    "signed_log_levels",
    "sqnr_db",
    "swap_module",
    "timestep_groups",
    "unwrap",
    "uniform_levels",
    "weight_qparams",
]
