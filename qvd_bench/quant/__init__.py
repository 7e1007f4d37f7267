"""The quantization engine: fake quantization of Linear/Conv weights and inputs.

- ``primitives``: pure functions — fake quantization (per tensor, per channel, dynamic per
  token), timestep groups, Lp error and SQNR; the grids they apply (bit-widths, affine
  qparams, level sets and nearest-level rounding) are ``qvd_bench.numerics.grid``.
- ``observers``: range estimators from stored statistics — min-max, percentile (from
  histograms), MSE clipping search (on reservoir rows), per-channel weight qparams.
- ``modules``: ``QuantWrapper`` around Linear/Conv layers with static, per-timestep-group,
  dynamic per-token or level-set input quantizers; ``swap_module`` / ``unwrap``.
- ``attention``: ``QuantAttnProcessor``, the attention processor that quantizes q, k, v and
  the softmax output; ``attention_records`` / ``install_attention``.
- ``config``: ``QuantConfig`` and the options of single methods; ``record``: the
  quantization record and its files; ``builders``: wrappers built from records;
  ``apply``: ``quantize_``, ``apply_record``, ``unquantize_``; ``methods``: one handler per
  method.
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
    TimestepLookup,
    fake_quant_affine,
    fake_quant_dynamic_per_token,
    group_of,
    lp_error,
    sqnr_db,
    timestep_groups,
)

__all__ = [
    "DynamicTokenActQuant",
    "GroupActQuant",
    "LevelActQuant",
    "QuantWrapper",
    "StaticActQuant",
    "TimestepLookup",
    "fake_quant_affine",
    "fake_quant_dynamic_per_token",
    "group_of",
    "lp_error",
    "minmax_channel_range",
    "minmax_range",
    "mse_range",
    "percentile_range",
    "quant_wrappers",
    "reservoir_rows",
    "set_enabled",
    "shrink_search",
    "sqnr_db",
    "swap_module",
    "timestep_groups",
    "unwrap",
    "weight_qparams",
]
