"""Deliberate faults in qvd-bench's own code path, for the mutation suite.

Each fault patches our functions with pytest's monkeypatch (undone after its test) and
names the first stage it changes: "collect" (the statistics), "analysis" (the measured
table and the plan) or "quant" (quantization); a faulty run reruns that stage and the
ones after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fault:
    stage: str
    inject: Callable  # (monkeypatch) -> None
    description: str


def _htdq_off(mp):
    from qvd_bench.quant.methods import qvd

    original = qvd.htdq_layer_records
    mp.setattr(qvd, "htdq_layer_records", lambda ctx, layers: original(ctx, set()))


def _scri_shift_dropped(mp):
    from qvd_bench.quant.methods import scri

    mp.setattr(scri.GroupData, "shift", property(lambda self: torch.zeros_like(self.hi)))


def _scri_wrong_sign(mp):
    from qvd_bench.quant import transforms

    original = transforms.transformed_bias

    def flipped(module, shift, weight=None, bias=None):
        return original(module, -shift, weight, bias)

    mp.setattr(transforms, "transformed_bias", flipped)


def _a_bits_one_lower(mp):
    from qvd_bench.quant.methods.base import QuantContext

    original = QuantContext.a_bits
    mp.setattr(QuantContext, "a_bits", lambda self, name: original(self, name) - 1)


def _weight_clipping_skipped(mp):
    from qvd_bench.quant.methods import base

    original = base.cached_weight_scale
    mp.setattr(
        base,
        "cached_weight_scale",
        lambda weight, bits, clipping, p: original(weight, bits, "minmax", p),
    )


def _temporal_one_timestep(mp):
    from qvd_bench.store import StatsRun

    original = StatsRun.temporal_matrix

    def first_only(self, layer):
        timesteps, vectors = original(self, layer)
        return timesteps[:1], vectors[:1]

    mp.setattr(StatsRun, "temporal_matrix", first_only)


def _cfg_swapped(mp):
    from qvd_bench.models import sampling

    # Separate forwards announce their branch; a batched one is labelled by BRANCHES.
    original = sampling.CallTracker.branch
    other = {"uncond": "cond", "cond": "uncond"}
    mp.setattr(sampling.CallTracker, "branch", lambda self, name: original(self, other[name]))
    mp.setattr(sampling, "BRANCHES", tuple(reversed(sampling.BRANCHES)))


def _one_layer_unquantized(mp):
    from qvd_bench.quant.methods.base import QuantContext

    original = QuantContext.__dict__["keep_fp"].func

    def keep_one_more(self):
        kept = original(self)
        return kept | {next(n for n in self.layers if n not in kept)}

    mp.setattr(QuantContext, "keep_fp", property(keep_one_more))


def _kurtosis_without_minus_3(mp):
    from qvd_bench.analysis import distribution

    original = distribution.moments_summary

    def plus_three(stats):
        summary = dict(original(stats))
        summary["kurtosis"] = summary["kurtosis"] + 3.0
        return summary

    mp.setattr(distribution, "moments_summary", plus_three)


FAULTS: dict[str, Fault] = {
    "HTDQ switched off": Fault("quant", _htdq_off, "qvd's HTDQ part returns mse records"),
    "SCRI's shift dropped": Fault("quant", _scri_shift_dropped, "z = 0 for every group"),
    "SCRI folded with the wrong sign": Fault(
        "quant", _scri_wrong_sign, "b̃ = b − W·z instead of b + W·z"
    ),
    "activation bits one lower": Fault("quant", _a_bits_one_lower, "every layer at a_bits − 1"),
    "weight clipping search skipped": Fault(
        "quant", _weight_clipping_skipped, "min-max weight scales where mse is asked"
    ),
    "temporal features calibrated on one timestep": Fault(
        "quant", _temporal_one_timestep, "the temporal grid's first row only"
    ),
    "CFG branches swapped in the statistics": Fault(
        "collect", _cfg_swapped, "the tracker labels [uncond, cond] as [cond, uncond]"
    ),
    "one layer left unquantized": Fault(
        "quant", _one_layer_unquantized, "the first quantized layer kept in full precision"
    ),
    "kurtosis without its -3": Fault(
        "analysis", _kurtosis_without_minus_3, "the analysis reports plain kurtosis"
    ),
}
