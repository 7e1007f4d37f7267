"""Per-layer and per-role sensitivity, and mixed precision driven by it.

Sensitivity of a unit (one layer, or every layer of one role — of every expert together
and, with several experts, of each expert alone) at a bit-width: the
end-to-end SQNR of the model with that unit alone quantized and everything else in full
precision. The float model has infinite SQNR, so the drop is reported as the SQNR the model
falls to (``sqnr_db``, lower = more sensitive) and as the relative noise power it adds
(``noise`` = 10^(−sqnr_db/10)); units rank by noise, largest first.

End-to-end SQNR (``FidelityProbe``) is the teacher-forced fidelity of the evaluation
harness: the quantized denoiser is fed the FP trajectory's inputs at every step and its
CFG-combined prediction is compared with the FP one in x0-space, pooled over steps and
prompts. Teacher forcing measures what a layer adds at each step without the trajectories
drifting apart, so small effects stay measurable.

The whole model is quantized once per bit-width (``quantized``), every quantizer is
turned off, and the unit's quantizers alone are turned back on for its measurement. A
layer's quantizer depends only on its own statistics, so this equals quantizing the unit
alone with ``keep_fp_layers`` naming the rest (a test checks it); methods that fold
transforms into shared norms keep every transform in place, in float, elsewhere.

Mixed precision (``assign_bits``): bits per layer from candidate bit-widths so that the
mean over quantized layers meets a budget (e.g. ``A6``: activations at 6 bits on average,
layers weighted equally). Greedy on the measured noise tables, assuming per-layer noise
adds up: start every layer at the fewest candidate bits and repeatedly take the upgrade
with the largest noise reduction per added bit that keeps the mean within the budget;
where the budget itself is a candidate, uniform bits are kept instead if they add less
estimated noise.

Sensitivity generates and scores quantized trajectories, so it is an evaluation; its
report (ranked tables and a figure) is ``report.sensitivity``, fed the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from qvd_bench.errors import UserError
from qvd_bench.evaluate import fidelity
from qvd_bench.evaluate.generate import Generation, GenerationSettings, generate, scheduler_for
from qvd_bench.models.family import LoadedModel, split_layer_name
from qvd_bench.numerics.grid import check_bits
from qvd_bench.quant.apply import quantize_
from qvd_bench.quant.config import QuantConfig
from qvd_bench.quant.modules import quant_wrappers, set_enabled, unwrap
from qvd_bench.quant.record import QuantRecord
from qvd_bench.registry import did_you_mean
from qvd_bench.store import StatsRun

UNITS = ("layer", "role")
SENSITIVITY_COLUMNS = [
    "unit",
    "kind",
    "role",
    "layers",
    "method",
    "w_bits",
    "a_bits",
    "sqnr_db",
    "noise",
    "rank",
]


# --------------------------------------------------------------------------- measuring


class FidelityProbe:
    """End-to-end SQNR of a model against its own full-precision generations.

    Args:
        loaded: the model, unquantized when the probe is made (its FP generations are the
            reference; later calls measure whatever the model is then).
        prompts: the prompts; video i is prompt i with sample id i.
        settings: sampling settings.
    """

    def __init__(self, loaded: LoadedModel, prompts: Sequence[str], settings: GenerationSettings):
        if not prompts:
            raise UserError("no prompts: sensitivity needs at least one")
        self.loaded = loaded
        self.prompts = list(prompts)
        self.settings = settings
        self.scheduler = scheduler_for(loaded, settings)
        self.reference: list[Generation] = [
            generate(loaded, prompt, i, settings, keep_calls=True)
            for i, prompt in enumerate(self.prompts)
        ]
        self._reference_x0 = torch.cat([g.x0(self.scheduler) for g in self.reference], dim=1)

    def sqnr_db(self, tracker: Any = None) -> float:
        """Teacher-forced SQNR (dB) of the model's CFG-combined x0 predictions, all steps.

        Args:
            tracker: the CallTracker per-timestep quantizers read (``record.tracker``).
        """
        forced = [
            generate(self.loaded, prompt, i, self.settings, tracker=tracker, teacher=ref)
            for i, (prompt, ref) in enumerate(zip(self.prompts, self.reference))
        ]
        test = torch.cat(
            [g.x0(self.scheduler, "cfg", r.model_inputs) for g, r in zip(forced, self.reference)],
            dim=1,
        )
        return float(fidelity.sqnr(self._reference_x0, test))


def probe_for_run(
    loaded: LoadedModel,
    run: StatsRun,
    *,
    seed: int | None = None,
    num_prompts: int | None = None,
    steps: int | None = None,
) -> FidelityProbe:
    """A probe sampling as the statistics run did (prompts, steps, CFG, latent size, the
    pipeline call's ``pipeline_kwargs``).

    Args:
        loaded: the model, unquantized.
        run: its statistics.
        seed: sampling seed; default the run's seed + 1, noise calibration did not see.
        num_prompts: use the first N of the run's prompts (default: all).
        steps: sampling steps (default: the run's).
    """
    config = run.manifest["config"]
    prompts = list(config["prompts"])
    if num_prompts is not None:
        if num_prompts < 1:
            raise UserError(f"the number of prompts must be at least 1, got {num_prompts}")
        prompts = prompts[:num_prompts]
    settings = GenerationSettings(
        steps=config["steps"] if steps is None else steps,
        guidance_scale=config["guidance_scale"],
        seed=config["seed"] + 1 if seed is None else seed,
        frames=config["frames"],
        height=config["height"],
        width=config["width"],
        # The pipeline call of the collection (its guidance passes, its true CFG).
        pipeline_kwargs=run.pipeline_kwargs,
    )
    return FidelityProbe(loaded, prompts, settings)


@contextlib.contextmanager
def quantized(
    loaded: LoadedModel, config: QuantConfig, run: StatsRun, **kwargs: Any
) -> Iterator[QuantRecord]:
    """Quantizes ``loaded`` for the duration of the block, then restores it exactly.

    Unwrapping alone would leave folded parameters (norm affines rewritten by SCRI,
    SmoothQuant, OS+) changed; the state dict taken before is loaded back.

    Yields:
        The record of ``quantize_(loaded, config, stats=run, **kwargs)``.
    """
    denoiser = loaded.layer_root  # every expert's layers
    saved = {k: v.detach().clone() for k, v in denoiser.state_dict().items()}
    record = None
    try:
        record = quantize_(loaded, config, stats=run, **kwargs)
        yield record
    finally:
        unwrap(denoiser)
        denoiser.load_state_dict(saved)
        tracker = getattr(record, "tracker", None)
        if tracker is not None and hasattr(tracker, "detach"):
            tracker.detach()


def _noise(sqnr_db: float) -> float:
    return 10.0 ** (-sqnr_db / 10.0) if math.isfinite(sqnr_db) else 0.0


def _units(record: QuantRecord, by: str, experts: Sequence[str] = ()) -> dict[str, list[str]]:
    """Unit name -> its quantized layers, in module order.

    With several experts a role is a unit over every expert ("ffn") and one per expert
    ("transformer_2.ffn"): the experts denoise different noise levels, so a role may be
    sensitive in one and not the other.
    """
    quantized = [layer for layer in record.layers if not layer.is_fp]
    units: dict[str, list[str]] = {}
    for layer in quantized:
        units.setdefault(layer.layer if by == "layer" else layer.role, []).append(layer.layer)
    if by == "role" and len(experts) > 1:
        for layer in quantized:
            expert = split_layer_name(layer.layer, experts)[0]
            units.setdefault(f"{expert}.{layer.role}", []).append(layer.layer)
    return units


def sensitivity(
    loaded: LoadedModel,
    run: StatsRun,
    config: QuantConfig,
    probe: FidelityProbe,
    *,
    by: Sequence[str] = UNITS,
    only: Sequence[str] | None = None,
    plan: Any = None,
    progress: bool = False,
) -> pd.DataFrame:
    """The sensitivity of every layer and/or role at the config's bits.

    Args:
        loaded: the model (left as it was).
        run: its statistics.
        config: method and bits; the units are its quantized layers.
        probe: the end-to-end measurement, made on the FP model.
        by: "layer", "role" or both.
        only: measure just these units (layer or role names); all when None.
        plan: the QuantPlan for methods that read one (decided from ``run`` when None).
        progress: show a progress bar.

    Returns:
        One row per unit (``SENSITIVITY_COLUMNS``) plus one ``kind="model"`` row with every
        layer quantized; ``rank`` 1 is the most sensitive unit of its kind. With several
        experts (``loaded.multi_expert``) an ``expert`` column after ``unit`` names each
        layer's expert ("" for roles and the model, which span them all).
    """
    for unit in by:
        if unit not in UNITS:
            raise UserError(f"sensitivity is by {' or '.join(UNITS)}, not {unit!r}")
    rows = []
    with quantized(loaded, config, run, plan=plan) as record:
        wrappers = dict(quant_wrappers(loaded.layer_root))
        roles = {layer.layer: layer.role for layer in record.layers}
        experts = list(loaded.experts) if loaded.multi_expert else []
        jobs = [
            (kind, name, layers)
            for kind in by
            for name, layers in _units(record, kind, experts).items()
        ]
        if only is not None:
            known = [name for _, name, _ in jobs]
            for name in only:
                if name not in known:
                    raise UserError(
                        f"no quantized {' or '.join(by)} {name!r}{did_you_mean(name, known)}"
                    )
            jobs = [job for job in jobs if job[1] in set(only)]
        bar = tqdm(total=len(jobs) + 1, desc="sensitivity", unit="unit", disable=not progress)
        rows.append(_row("all", "model", "", len(wrappers), config, probe.sqnr_db(record.tracker)))
        bar.update()
        set_enabled(loaded.layer_root, False)
        for kind, name, layers in jobs:
            for layer in layers:
                wrappers[layer].enabled = True
            role = roles[layers[0]]
            w_bits, a_bits = config.bits_for(layers[0], roles[layers[0]])
            value = probe.sqnr_db(record.tracker)
            rows.append(_row(name, kind, role, len(layers), config, value, w_bits, a_bits))
            for layer in layers:
                wrappers[layer].enabled = False
            bar.update()
        bar.close()
    frame = pd.DataFrame(rows, columns=SENSITIVITY_COLUMNS)
    scope = frame["kind"]
    if loaded.multi_expert:
        # Which expert a unit is in, so that reports show the experts side by side (the
        # whole model and the roles over every expert: "").
        frame.insert(
            1, "expert", [_unit_expert(u, k, loaded) for u, k in zip(frame["unit"], frame["kind"])]
        )
        # Layers rank among all layers; roles among the roles of the same scope (every
        # expert together, or one expert).
        scope = frame["kind"] + "/" + frame["expert"].where(frame["kind"] == "role", "")
    noise = frame.groupby(scope)["noise"]
    frame["rank"] = noise.rank(ascending=False, method="first").astype(int)
    return frame.sort_values(["kind", "rank"], kind="stable").reset_index(drop=True)


def _unit_expert(unit: str, kind: str, loaded: LoadedModel) -> str:
    """The expert of a layer or per-expert role unit of a multi-expert model; "" for the
    whole model and the roles over every expert."""
    return split_layer_name(unit, loaded.experts)[0] if kind in ("layer", "role") else ""


def _row(unit, kind, role, layers, config, sqnr_db, w_bits=None, a_bits=None) -> dict:
    return {
        "unit": unit,
        "kind": kind,
        "role": role,
        "layers": int(layers),
        "method": config.method,
        "w_bits": int(config.w_bits if w_bits is None else w_bits),
        "a_bits": int(config.a_bits if a_bits is None else a_bits),
        "sqnr_db": float(sqnr_db),
        "noise": _noise(float(sqnr_db)),
        "rank": 0,
    }


# --------------------------------------------------------------------------- mixed precision


@dataclass(frozen=True)
class Budget:
    """A mean bit budget: ``A6`` (activations) or ``W5.5`` (weights).

    Attributes:
        tensor: "a" (activation bits vary) or "w" (weight bits vary).
        mean: the largest allowed mean bits over quantized layers.
    """

    tensor: str
    mean: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        match = re.fullmatch(r"([aAwW])(\d+(?:\.\d+)?)", str(text).strip())
        if match is None:
            raise UserError(f"a mixed-precision budget looks like A6 or W5.5, got {text!r}")
        return cls(match.group(1).lower(), float(match.group(2)))

    def __str__(self) -> str:
        return f"{self.tensor.upper()}{self.mean:g}"


def check_candidates(candidates: Sequence[int], budget: Budget) -> tuple[int, ...]:
    """Sorted, distinct candidate bit-widths that can meet the budget.

    Raises:
        UserError: fewer than one candidate, bits out of range, or a budget below the
            fewest candidate bits (no assignment can meet it).
    """
    bits = tuple(sorted({check_bits(int(b)) for b in candidates}))
    if not bits:
        raise UserError("mixed precision needs at least one candidate bit-width")
    if budget.mean < bits[0]:
        raise UserError(
            f"budget {budget} is below the fewest candidate bits ({bits[0]}); "
            f"raise the budget or add smaller candidates (candidates: {', '.join(map(str, bits))})"
        )
    return bits


def assign_bits(noise: pd.DataFrame, budget: float) -> dict[str, int]:
    """Greedy bits per layer meeting a mean budget (see the module docstring).

    Args:
        noise: layers × candidate bits (columns, int) of measured relative noise power.
        budget: the largest allowed mean bits.

    Returns:
        layer -> bits; the mean over layers never exceeds ``budget``.
    """
    candidates = sorted(int(c) for c in noise.columns)
    if budget < candidates[0]:
        raise UserError(f"budget {budget:g} is below the fewest candidate bits {candidates[0]}")
    layers = list(noise.index)
    table = noise.to_numpy(dtype=np.float64)
    level = np.zeros(len(layers), dtype=int)  # index into candidates
    allowed = budget * len(layers) + 1e-9
    total = candidates[0] * len(layers)
    while True:
        best, best_gain = None, 0.0
        for i in range(len(layers)):
            if level[i] + 1 >= len(candidates):
                continue
            step = candidates[level[i] + 1] - candidates[level[i]]
            if total + step > allowed:
                continue
            gain = (table[i, level[i]] - table[i, level[i] + 1]) / step
            if best is None or gain > best_gain:
                best, best_gain = i, gain
        if best is None:
            break
        total += candidates[best_level := level[best] + 1] - candidates[level[best]]
        level[best] = best_level
    greedy = {name: candidates[k] for name, k in zip(layers, level)}
    greedy_noise = float(sum(table[i, k] for i, k in enumerate(level)))
    uniform = max((c for c in candidates if c <= budget), default=None)
    if uniform is not None:
        column = candidates.index(uniform)
        if float(table[:, column].sum()) < greedy_noise:
            return {name: uniform for name in layers}
    return greedy


def mixed_config(
    loaded: LoadedModel,
    run: StatsRun,
    config: QuantConfig,
    budget: Budget,
    probe: FidelityProbe,
    *,
    candidates: Sequence[int] = (4, 6, 8),
    plan: Any = None,
    progress: bool = False,
) -> tuple[QuantConfig, pd.DataFrame]:
    """A mixed-precision config meeting ``budget``, and the figures that decided it.

    Per candidate bit-width the per-layer sensitivity is measured (the other tensor at the
    config's bits); ``assign_bits`` picks the bits.

    Args:
        loaded: the model (left as it was).
        run: its statistics.
        config: method and the fixed bits of the other tensor.
        budget: the mean budget.
        probe: the end-to-end measurement.
        candidates: bit-widths a layer may get.
        plan: the QuantPlan for methods that read one.
        progress: progress bars.

    Returns:
        (config with ``layer_bits`` set, decisions: one row per layer with its role, the
        chosen bits, and the measured sqnr_db / noise at every candidate).
    """
    bits = check_candidates(candidates, budget)
    if config.is_mixed:
        raise UserError("the config already has bits per layer or role; give a uniform one")
    tables = {}
    for b in bits:
        probe_config = dataclasses.replace(
            config, **({"a_bits": b} if budget.tensor == "a" else {"w_bits": b})
        )
        table = sensitivity(
            loaded, run, probe_config, probe, by=("layer",), plan=plan, progress=progress
        )
        tables[b] = table[table["kind"] == "layer"].set_index("unit")
    first = tables[bits[0]]
    noise = pd.DataFrame({b: tables[b]["noise"] for b in bits}).loc[first.index]
    chosen = assign_bits(noise, budget.mean)
    decisions = pd.DataFrame({"layer": first.index, "role": first["role"].to_numpy()})
    decisions["bits"] = [chosen[name] for name in first.index]
    for b in bits:
        decisions[f"sqnr_db_{b}"] = tables[b]["sqnr_db"].loc[first.index].to_numpy()
        decisions[f"noise_{b}"] = tables[b]["noise"].loc[first.index].to_numpy()
    if budget.tensor == "a":
        layer_bits = [(name, config.w_bits, chosen[name]) for name in first.index]
    else:
        layer_bits = [(name, chosen[name], config.a_bits) for name in first.index]
    return dataclasses.replace(config, layer_bits=tuple(layer_bits)), decisions


def mean_bits(config: QuantConfig, layers: Sequence[tuple[str, str]], tensor: str) -> float:
    """Mean bits of ``tensor`` ("a" or "w") over (layer, role) pairs under a config."""
    index = 1 if tensor == "a" else 0
    return float(np.mean([config.bits_for(name, role)[index] for name, role in layers]))


def write_mixed(
    out_dir: str | Path,
    budget: Budget,
    config: QuantConfig,
    decisions: pd.DataFrame,
    probe: FidelityProbe,
) -> dict[str, Any]:
    """``mixed.json`` (the assignment and what decided it) and ``mixed.parquet`` (per layer).

    Returns:
        The JSON document.
    """
    from qvd_bench.store import atomic_write, write_json

    out_dir = Path(out_dir)
    pairs = list(zip(decisions["layer"], decisions["role"]))
    document = {
        "budget": str(budget),
        "candidates": sorted({int(b) for b in decisions["bits"]} | _candidates(decisions)),
        "mean_bits": mean_bits(config, pairs, budget.tensor),
        "layers_per_bits": {str(k): int(v) for k, v in decisions["bits"].value_counts().items()},
        "method": config.method,
        "default_bits": config.bits,
        "probe": {"prompts": probe.prompts, **probe.settings.to_dict()},
        "sensitivity": "end-to-end SQNR (teacher-forced, x0) with one layer quantized alone",
        "layers": json.loads(decisions.to_json(orient="records")),
    }
    write_json(out_dir / "mixed.json", document)
    atomic_write(out_dir / "mixed.parquet", lambda p: decisions.to_parquet(p, index=False))
    return document


def _candidates(decisions: pd.DataFrame) -> set[int]:
    return {int(c.split("_")[-1]) for c in decisions.columns if c.startswith("noise_")}
