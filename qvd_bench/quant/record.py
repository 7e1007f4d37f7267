"""Quantization records: every quantizer's parameters, saved as safetensors + JSON.

    record = quantize_(loaded, QuantConfig(method="qvd", w_bits=8, a_bits=8), stats=run)
    record.save("out/")                      # record.safetensors + record.json
    apply_record(fresh, load_record("out/"))  # the same quantized model, no statistics

``LayerRecord`` holds one layer's quantizer (its tensors under ``TENSOR_KEYS``, its
activation quantizer kind from ``ACT_KINDS``, parameters of other modules an exact fold
rewrote, JSON-safe facts); ``QuantRecord`` the config, the model's identity, one
LayerRecord per in-scope layer and one ``AttentionRecord`` per quantized attention module.
Wrappers are built from records alone (``quant.builders``), so a reloaded record
reproduces the quantized model bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from qvd_bench.config import SCHEMA_VERSION
from qvd_bench.errors import UserError
from qvd_bench.quant.attention import AttentionRecord, attention_summary
from qvd_bench.quant.config import QuantConfig
from qvd_bench.store import atomic_write, json_safe, read_json_document, write_json

RECORD_FORMAT = "qvd-bench-quant-record"
RECORD_JSON = "record.json"
RECORD_TENSORS = "record.safetensors"

# Activation quantizer kinds a record may name.
ACT_KINDS = ("none", "static", "group", "dynamic", "levels")

# Tensor keys of a LayerRecord (all optional; shapes for a layer with O outputs, C inputs):
TENSOR_KEYS = {
    "weight_scale": "(O,) float32 per-output-channel symmetric weight scales; (2, O) split",
    "weight": "a replacement float weight, shaped like the layer's (transformed / folded)",
    "bias": "(O,) a replacement bias",
    "act_scale": "() static, or (G,) per timestep group, activation scale; split: (2,), (2, G)",
    "act_zero_point": "like act_scale, int32 zero points",
    "levels": "(L,) float64 level set of a 'levels' activation quantizer",
    "input_shift": "(C,) or (G, C) per-input-channel shift z of X̃ = (X − z)/s",
    "input_scale": "(C,) per-input-channel scale s of X̃ = (X − z)/s",
}


@dataclass
class LayerRecord:
    """Everything needed to rebuild one layer's quantizer, without statistics.

    Attributes:
        layer: qualified module name in the denoiser.
        role: its role (for reading).
        kind: "linear" or "conv".
        w_bits: weight bits, None for a float weight.
        weight_clipping: "minmax", "mse" or "none".
        act: one of ``ACT_KINDS``.
        a_bits: activation bits, None when ``act`` is "none".
        tensors: see ``TENSOR_KEYS``.
        folded: parameters of other modules rewritten by an exact fold, by state-dict name.
        info: JSON-safe facts: "groups" (timestep groups of a "group" quantizer),
            "family" (level-set description), figures, notes.
        builder: the registered builder that makes the wrapper ("standard").
    """

    layer: str
    role: str
    kind: str
    w_bits: int | None
    weight_clipping: str
    act: str
    a_bits: int | None
    tensors: dict[str, Tensor] = field(default_factory=dict)
    folded: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    builder: str = "standard"

    @property
    def is_fp(self) -> bool:
        """True when neither weights nor inputs are quantized and nothing is replaced."""
        return (
            self.w_bits is None
            and self.act == "none"
            and not self.folded
            and not set(self.tensors) & {"weight", "bias", "input_shift", "input_scale"}
        )

    def meta(self) -> dict[str, Any]:
        """The JSON part (everything but tensors)."""
        return {
            "layer": self.layer,
            "role": self.role,
            "kind": self.kind,
            "w_bits": self.w_bits,
            "weight_clipping": self.weight_clipping,
            "act": self.act,
            "a_bits": self.a_bits,
            "tensors": sorted(self.tensors),
            "folded": sorted(self.folded),
            "info": self.info,
            "builder": self.builder,
        }


@dataclass
class QuantRecord:
    """Every quantizer's parameters, per layer, and what produced them.

    Attributes:
        config: the config, with the method's defaults filled in.
        model: identity of the model (name, weight seed, knobs) when known.
        layers: one LayerRecord per in-scope layer, in module order.
        tracker: the CallTracker the per-timestep quantizers read (not saved).
        attention: one AttentionRecord per attention module when
            ``config.attention_bits`` is set (q, k, v and softmax quantizers), else empty.
        originals: the values the layers' folds overwrote in the model, by ``state_dict``
            name (in memory, not saved): what ``unquantize_`` writes back.
        owns_tracker: True when ``tracker`` was made by ``quantize_`` / ``apply_record``
            (``unquantize_`` then detaches it).
        cost: what making the record cost, one ``resources.StageCost.to_dict()`` per
            stage (wall time, peak host and device memory), when the caller measured it.
    """

    config: QuantConfig
    model: dict[str, Any]
    layers: list[LayerRecord]
    tracker: Any = field(default=None, repr=False, compare=False)
    attention: list[AttentionRecord] = field(default_factory=list)
    originals: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)
    owns_tracker: bool = field(default=False, repr=False, compare=False)
    cost: list[dict[str, Any]] = field(default_factory=list, compare=False)

    def __getitem__(self, layer: str) -> LayerRecord:
        for record in self.layers:
            if record.layer == layer:
                return record
        raise KeyError(layer)

    @property
    def quantized(self) -> list[str]:
        """Layers with a quantizer (not kept in full precision)."""
        return [r.layer for r in self.layers if not r.is_fp]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "config": self.config.to_dict(),
            "model": self.model,
            "layers": [json_safe(r.meta()) for r in self.layers],
            "attention": [json_safe(r.meta()) for r in self.attention],
            **({"cost": self.cost} if self.cost else {}),
        }

    def tensors(self) -> dict[str, Tensor]:
        """Flat safetensors dict: ``layers/<layer>/<key>``, ``folded/<layer>/<param>`` and
        ``attention/<module>/<tensor>_scale`` / ``_zero_point``."""
        out: dict[str, Tensor] = {}
        for record in self.layers:
            for key, value in record.tensors.items():
                out[f"layers/{record.layer}/{key}"] = value.detach().cpu().contiguous().clone()
            for name, value in record.folded.items():
                out[f"folded/{record.layer}/{name}"] = value.detach().cpu().contiguous().clone()
        for record in self.attention:
            for key, value in record.tensors.items():
                out[f"attention/{record.module}/{key}"] = value.detach().cpu().contiguous().clone()
        return out

    def save(self, directory: str | Path) -> Path:
        """Writes ``record.safetensors`` and ``record.json`` into ``directory`` (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.tensors()
        atomic_write(directory / RECORD_TENSORS, lambda p: save_file(tensors, str(p)))
        write_json(directory / RECORD_JSON, self.to_json())
        return directory

    def summary(self) -> dict[str, Any]:
        """Counts of layers per activation quantizer kind, and the config."""
        kinds: dict[str, int] = {}
        for record in self.layers:
            kinds[record.act] = kinds.get(record.act, 0) + 1
        return {
            "method": self.config.method,
            "bits": self.config.bits,
            "layers": len(self.layers),
            "quantized": len(self.quantized),
            "activation_quantizers": kinds,
            "attention": attention_summary(self.attention),
            **({"split_skip": split_summary(self.layers)} if self.config.split_skip else {}),
        }


def load_record(directory: str | Path) -> QuantRecord:
    """Reads a record written by ``QuantRecord.save``.

    Raises:
        UserError: missing, unreadable or foreign files.
    """
    directory = Path(directory)
    json_path, tensor_path = directory / RECORD_JSON, directory / RECORD_TENSORS
    data = read_json_document(
        json_path,
        format=RECORD_FORMAT,
        what="quantization record",
        redo="quantize again with this version",
        missing=f"no quantization record at {directory} ({RECORD_JSON} missing)",
    )
    try:
        flat = load_file(str(tensor_path))
    except FileNotFoundError:
        raise UserError(f"{tensor_path} is missing from the quantization record") from None
    except (OSError, SafetensorError) as error:
        raise UserError(f"{tensor_path} is corrupt: {' '.join(str(error).split())}") from None
    tensors: dict[str, dict[str, Tensor]] = {}
    folded: dict[str, dict[str, Tensor]] = {}
    attention: dict[str, dict[str, Tensor]] = {}
    groups = {"layers": tensors, "folded": folded, "attention": attention}
    for name, value in flat.items():
        kind, layer, key = name.split("/", 2)
        if kind not in groups:
            raise UserError(f"{tensor_path} holds an unknown tensor {name!r}")
        groups[kind].setdefault(layer, {})[key] = value
    layers = []
    for meta in data["layers"]:
        name = meta["layer"]
        layers.append(
            LayerRecord(
                layer=name,
                role=meta["role"],
                kind=meta["kind"],
                w_bits=meta["w_bits"],
                weight_clipping=meta["weight_clipping"],
                act=meta["act"],
                a_bits=meta["a_bits"],
                tensors=tensors.get(name, {}),
                folded=folded.get(name, {}),
                info=meta["info"],
                builder=meta.get("builder", "standard"),
            )
        )
    attention_layers = [
        AttentionRecord.from_meta(meta, attention.get(meta["module"], {}))
        for meta in data.get("attention", [])
    ]
    return QuantRecord(
        QuantConfig.from_dict(data["config"]),
        data["model"],
        layers,
        attention=attention_layers,
        cost=data.get("cost", []),
    )


def split_summary(records: Sequence[LayerRecord]) -> dict[str, Any]:
    """What ``split_skip`` did, for ``QuantRecord.summary``.

    Returns:
        layers (split layers), skipped (layer -> why a concatenation reader was not
        split) and note (why nothing was split, when nothing was).
    """
    split = [r.layer for r in records if r.builder == "split"]
    skipped = {r.layer: r.info["split_skipped"] for r in records if "split_skipped" in r.info}
    out: dict[str, Any] = {"layers": len(split), "skipped": skipped}
    if not split and not skipped:
        out["note"] = (
            "no quantized layer reads a skip-connection concatenation (no UNet up blocks): "
            "quantized without splitting"
        )
    return out
