"""The statistics store: ``stats/<run>/`` on disk, and loading it back as DataFrames.

A run directory holds::

    manifest.json          what was collected, how, from which model (written last)
    channels.parquet       per (tensor, layer, timestep, branch, channel) sufficient moments
    histograms.parquet     per (layer, timestep, branch) non-zero bins of the shared grid
    temporal.parquet       per (layer, timestep) the full input vector of time_emb layers
    weights.parquet        per (layer, output channel) weight statistics
    reservoir.safetensors  per layer the sampled input rows and their keys
    attention.parquet      (collected with attention only) per (attention module, tensor,
                           timestep, branch) moments of q, k, v and the softmax output
    attention_histograms.parquet   their non-zero histogram bins (with histograms on)

Every file is written to a temporary name and renamed, and a run is assembled in
``<run>.partial/`` and renamed into place at the end, so an interrupted write never
leaves a half run. While collecting, ``<run>.partial/`` also holds a checkpoint of the
accumulators so that a rerun resumes after the last finished sample.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qvd_bench.config import SCHEMA_VERSION, check_schema_version
from qvd_bench.errors import UserError

FORMAT = "qvd-bench-stats"
MANIFEST = "manifest.json"
MOMENT_FIELDS = ("count", "nan_count", "inf_count", "min", "max", "mean", "m2", "m3", "m4")
WEIGHT_FIELDS = ("min", "max", "absmax", "mean", "variance", "skewness", "kurtosis")
TABLE_COLUMNS = {
    "channels": ("tensor", "layer", "role", "timestep", "branch", "channel", *MOMENT_FIELDS),
    "histograms": ("layer", "role", "timestep", "branch", "bin", "count"),
    "temporal": ("layer", "timestep", "vector"),
    "weights": ("layer", "role", "out_channel", *WEIGHT_FIELDS),
    "attention": ("module", "tensor", "timestep", "branch", *MOMENT_FIELDS),
    "attention_histograms": ("module", "tensor", "timestep", "branch", "bin", "count"),
}
CATEGORICAL = ("tensor", "layer", "role", "branch", "module")
# Tables only some runs have: a run without one loads it as an empty frame.
OPTIONAL_TABLES = ("attention", "attention_histograms")


# ----------------------------------------------------------------------------- writing


def umask_mode(mode: int) -> int:
    """``mode`` as the user's umask lets it be: what ``open`` (0o666) or ``mkdir`` (0o777)
    would give; for files and directories that ``tempfile`` creates private (0o600, 0o700)."""
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return mode & ~umask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp)`` on a temporary file beside ``path``, then renames it.

    The file gets the mode a plain ``open`` would give it (0o666 less the umask).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json_document(path: Path, *, format: str, what: str, redo: str, missing: str) -> dict:
    """Reads one of qvd-bench's JSON documents, checking its format tag and schema version.

    Args:
        path: the file.
        format: the expected ``format`` tag.
        what: what the document is, for messages ("statistics manifest").
        redo: what to do about another schema version ("recollect it with this version").
        missing: the message when the file does not exist.

    Raises:
        UserError: the file is missing, unreadable, foreign or of another schema version.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(missing) from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is unreadable: {_one_line(error)}") from None
    if not isinstance(data, dict) or data.get("format") != format:
        raise UserError(f"{path} is not a qvd-bench {what}")
    check_schema_version(data.get("schema_version"), str(path), redo)
    return data


def json_safe(value: Any, *, names_non_finite: bool = False) -> Any:
    """``value`` as plain JSON data: dicts with string keys, lists, Python scalars.

    Tuples become lists; tensors and arrays their nested lists; NumPy scalars Python ones.

    Args:
        value: nested dicts, lists, tuples, tensors, arrays and scalars.
        names_non_finite: write NaN and infinities as their names ("nan", "inf"); by
            default they become None (JSON has no such numbers).
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v, names_non_finite=names_non_finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, names_non_finite=names_non_finite) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return json_safe(value.tolist(), names_non_finite=names_non_finite)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value) if names_non_finite else None
    return value


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=False)))


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    atomic_write(path, lambda p: pq.write_table(table, p, compression="zstd"))


def _categorical(frame: pd.DataFrame) -> pd.DataFrame:
    for column in CATEGORICAL:
        if column in frame:
            frame[column] = frame[column].astype("category")
    return frame


def _key_columns(keys: list[tuple], sizes: np.ndarray, roles: dict[str, str]) -> dict:
    """Columns (layer, role, timestep, branch) repeated ``sizes[i]`` times for key i."""
    layers = [key[1] for key in keys]
    return {
        "layer": np.repeat(np.array(layers, dtype=object), sizes),
        "role": np.repeat(np.array([roles[layer] for layer in layers], dtype=object), sizes),
        "timestep": np.repeat(np.array([key[2] for key in keys], dtype=np.float64), sizes),
        "branch": np.repeat(np.array([key[3] for key in keys], dtype=object), sizes),
    }


def channels_frame(moments: dict, roles: dict[str, str]) -> pd.DataFrame:
    """Long table of per-channel sufficient moments.

    Args:
        moments: (tensor, layer, timestep, branch) -> ChannelMoments.
        roles: layer -> role.
    """
    keys = sorted(moments)
    if not keys:
        return _concat([], "channels")
    states = [moments[key].state_dict() for key in keys]
    sizes = np.array([state["mean"].numel() for state in states])
    columns = {
        "tensor": np.repeat(np.array([key[0] for key in keys], dtype=object), sizes),
        **_key_columns(keys, sizes, roles),
        "channel": np.concatenate([np.arange(n, dtype=np.int32) for n in sizes]),
    }
    for field in MOMENT_FIELDS:
        values = torch.cat([state[field].detach().cpu().reshape(-1) for state in states]).numpy()
        columns[field] = values.astype(np.int64 if "count" in field else np.float64)
    frame = pd.DataFrame(columns)
    return _categorical(frame[list(TABLE_COLUMNS["channels"])])


def histograms_frame(histograms: dict, roles: dict[str, str]) -> pd.DataFrame:
    """Long table of the non-zero histogram bins of every (layer, timestep, branch)."""
    keys = sorted(histograms)
    if not keys:
        return _concat([], "histograms")
    counts = torch.stack([histograms[key].state_dict()["counts"].detach().cpu() for key in keys])
    key_index, bins = torch.nonzero(counts, as_tuple=True)
    sizes = np.bincount(key_index.numpy(), minlength=len(keys))
    columns = {
        **_key_columns(keys, sizes, roles),
        "bin": bins.numpy().astype(np.int32),
        "count": counts[key_index, bins].numpy().astype(np.int64),
    }
    return _categorical(pd.DataFrame(columns))


def temporal_frame(temporal: dict) -> pd.DataFrame:
    """One row per (layer, timestep) with the input vector as a list column."""
    rows = []
    for layer, acc in sorted(temporal.items()):
        timesteps, vectors = acc.as_matrix()
        for t, v in zip(timesteps.tolist(), vectors.cpu().numpy().astype(np.float32)):
            rows.append((layer, float(t), v))
    frame = pd.DataFrame(rows, columns=list(TABLE_COLUMNS["temporal"]))
    return _categorical(frame)


def weights_frame(
    weights: dict[str, dict[str, torch.Tensor]], roles: dict[str, str]
) -> pd.DataFrame:
    parts = []
    for layer, stats in sorted(weights.items()):
        n = stats["mean"].numel()
        part = {
            "layer": [layer] * n,
            "role": [roles[layer]] * n,
            "out_channel": np.arange(n, dtype=np.int32),
        }
        for field in WEIGHT_FIELDS:
            part[field] = stats[field].detach().cpu().numpy().astype(np.float64)
        parts.append(pd.DataFrame(part))
    return _categorical(_concat(parts, "weights"))


def _concat(parts: list[pd.DataFrame], table: str) -> pd.DataFrame:
    if parts:
        return pd.concat(parts, ignore_index=True)
    return pd.DataFrame({c: [] for c in TABLE_COLUMNS[table]})


def attention_frame(moments: dict) -> pd.DataFrame:
    """One row of per-tensor moments per (attention module, tensor, timestep, branch).

    Args:
        moments: (module, tensor, timestep, branch) -> one-channel ChannelMoments.
    """
    keys = sorted(moments)
    columns: dict[str, Any] = {
        "module": [key[0] for key in keys],
        "tensor": [key[1] for key in keys],
        "timestep": np.array([key[2] for key in keys], dtype=np.float64),
        "branch": [key[3] for key in keys],
    }
    states = [moments[key].state_dict() for key in keys]
    for field in MOMENT_FIELDS:
        values = [float(state[field].reshape(-1)[0]) for state in states]
        columns[field] = np.array(values, dtype=np.int64 if "count" in field else np.float64)
    return _categorical(pd.DataFrame(columns, columns=list(TABLE_COLUMNS["attention"])))


def attention_histograms_frame(histograms: dict) -> pd.DataFrame:
    """Non-zero histogram bins per (attention module, tensor, timestep, branch)."""
    parts = []
    for key in sorted(histograms):
        counts = histograms[key].state_dict()["counts"].detach().cpu()
        bins = torch.nonzero(counts).reshape(-1)
        n = bins.numel()
        parts.append(
            pd.DataFrame(
                {
                    "module": [key[0]] * n,
                    "tensor": [key[1]] * n,
                    "timestep": np.full(n, key[2], dtype=np.float64),
                    "branch": [key[3]] * n,
                    "bin": bins.numpy().astype(np.int32),
                    "count": counts[bins].numpy().astype(np.int64),
                }
            )
        )
    return _categorical(_concat(parts, "attention_histograms"))


def reservoir_tensors(reservoirs: dict) -> dict[str, torch.Tensor]:
    """Flattens layer -> Reservoir into safetensors names ``<layer>/<field>``."""
    return {
        f"{layer}/{field}": value.detach().cpu().contiguous()
        for layer, acc in sorted(reservoirs.items())
        for field, value in acc.state_dict().items()
    }


def write_run(
    run_dir: Path,
    manifest: dict[str, Any],
    *,
    moments: dict,
    histograms: dict,
    temporal: dict,
    reservoirs: dict,
    weights: dict,
    attention: dict | None = None,
    attention_histograms: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a complete run atomically: everything into ``<run>.partial/``, then a rename.

    Args:
        run_dir: the run directory to create.
        manifest: run metadata; ``format``, ``schema_version`` and ``files`` are added.
        moments, histograms, temporal, reservoirs, weights: the accumulators.
        attention: (module, tensor, timestep, branch) -> ChannelMoments of the attention
            matmul operands (``AttentionStats``); None writes no attention tables.
        attention_histograms: the same keys -> Histogram (with ``attention``).
        overwrite: replace an existing run at ``run_dir``.

    Returns:
        ``run_dir``.
    """
    run_dir = Path(run_dir)
    check_writable(run_dir, overwrite=overwrite)
    partial = partial_dir(run_dir)
    partial.mkdir(parents=True, exist_ok=True)
    roles = {layer["name"]: layer["role"] for layer in manifest["layers"]}
    files = {
        "channels": "channels.parquet",
        "histograms": "histograms.parquet",
        "temporal": "temporal.parquet",
        "weights": "weights.parquet",
        "reservoir": "reservoir.safetensors",
    }
    write_parquet(partial / files["channels"], channels_frame(moments, roles))
    write_parquet(partial / files["histograms"], histograms_frame(histograms, roles))
    write_parquet(partial / files["temporal"], temporal_frame(temporal))
    write_parquet(partial / files["weights"], weights_frame(weights, roles))
    tensors = reservoir_tensors(reservoirs)
    atomic_write(partial / files["reservoir"], lambda p: save_file(tensors, str(p)))
    if attention is not None:
        files["attention"] = "attention.parquet"
        files["attention_histograms"] = "attention_histograms.parquet"
        write_parquet(partial / files["attention"], attention_frame(attention))
        write_parquet(
            partial / files["attention_histograms"],
            attention_histograms_frame(attention_histograms or {}),
        )
    full = {"format": FORMAT, "schema_version": SCHEMA_VERSION, **manifest, "files": files}
    write_json(partial / MANIFEST, full)
    for leftover in (CHECKPOINT_TENSORS, CHECKPOINT_JSON):
        (partial / leftover).unlink(missing_ok=True)
    replace_directory(partial, run_dir)
    return run_dir


def partial_dir(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".partial")


def check_writable(run_dir: Path, *, overwrite: bool) -> None:
    """Fails early, before any work, if ``run_dir`` cannot be (re)written."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not overwrite:
        raise UserError(f"{run_dir} already exists; pass overwrite=True to replace it")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a directory")
    check_output_directory(run_dir.parent)


def check_output_directory(directory: str | Path) -> Path:
    """Creates ``directory`` (and its parents) and writes and removes a probe file in it.

    Every command that writes calls this before any work, so that an output that cannot
    be written fails at once rather than after the sampling. A probe, not a permission
    check: ``os.access`` says yes to root everywhere, even in ``/proc``.

    Returns:
        ``directory`` as a Path.

    Raises:
        UserError: the directory cannot be created or a file cannot be written in it.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or _one_line(error)
        raise UserError(
            f"cannot write to {directory}: not a writable directory ({reason})"
        ) from None
    return directory


def replace_directory(built: Path, target: Path) -> None:
    """Renames a finished directory over ``target``; a previous one is removed after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(built, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"


@dataclass(frozen=True)
class CheckpointState:
    """A copy of accumulator states, as ``checkpoint_state`` takes it.

    Attributes:
        tensors: "<group>/<i>/<field>" -> a CPU tensor of its own.
        index: group name -> the keys of its accumulators, in the order of ``i``.
    """

    tensors: dict[str, torch.Tensor]
    index: dict[str, list]


def checkpoint_state(groups: dict[str, dict]) -> CheckpointState:
    """Copies the states of accumulators, to be saved now or later.

    Args:
        groups: group name -> {key: accumulator}; keys are tuples or strings.
    """
    tensors, index = {}, {}
    for group, accumulators in groups.items():
        entries = []
        for i, (key, acc) in enumerate(accumulators.items()):
            for field, value in acc.state_dict().items():
                # A copy of its own: accumulators may share storage (layers reading one
                # tensor), which safetensors refuses to write; and they go on accumulating.
                tensors[f"{group}/{i}/{field}"] = value.detach().to("cpu", copy=True)
            entries.append(list(key) if isinstance(key, tuple) else key)
        index[group] = entries
    return CheckpointState(tensors, index)


def save_checkpoint(
    run_dir: Path, fingerprint: dict[str, Any], done: Iterable[int], state: CheckpointState
) -> None:
    """Saves accumulator states taken after a finished sample.

    Args:
        run_dir: the run being collected (the checkpoint lives in ``<run>.partial/``).
        fingerprint: what must match for a rerun to resume (the collect config).
        done: global ids of finished samples.
        state: the accumulators' states (``checkpoint_state``) when they were finished.
    """
    partial = partial_dir(Path(run_dir))
    # Tensors first: the JSON names the state, so a crash between the two leaves the old
    # JSON pointing at tensors it cannot match, which load_checkpoint rejects.
    atomic_write(partial / CHECKPOINT_TENSORS, lambda p: save_file(state.tensors, str(p)))
    record = {
        "fingerprint": fingerprint,
        "done": sorted(done),
        "index": state.index,
        "tensor_count": len(state.tensors),
    }
    write_json(partial / CHECKPOINT_JSON, record)


def load_checkpoint(
    run_dir: Path, fingerprint: dict[str, Any], factories: dict[str, Callable]
) -> tuple[set[int], dict[str, dict]] | None:
    """Loads a checkpoint saved by ``save_checkpoint`` if it matches ``fingerprint``.

    Args:
        factories: group name -> callable(state dict) -> accumulator.

    Returns:
        (done sample ids, group -> {key: accumulator}), or None when there is no usable
        checkpoint (missing, from another config, or torn).
    """
    partial = partial_dir(Path(run_dir))
    try:
        record = json.loads((partial / CHECKPOINT_JSON).read_text())
        tensors = load_file(str(partial / CHECKPOINT_TENSORS))
    except (OSError, ValueError, SafetensorError):
        return None
    # Compare as JSON sees it (tuples in the config come back as lists).
    expected = json.loads(json.dumps(fingerprint))
    if record.get("fingerprint") != expected or record.get("tensor_count") != len(tensors):
        return None
    groups: dict[str, dict] = {}
    for group, entries in record["index"].items():
        out = {}
        for i, key in enumerate(entries):
            prefix = f"{group}/{i}/"
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            out[tuple(key) if isinstance(key, list) else key] = factories[group](state)
        groups[group] = out
    return set(record["done"]), groups


# ----------------------------------------------------------------------------- loading


def split_layer_name(name: str, experts: Iterable[str]) -> tuple[str, str]:
    """(expert, name inside it) of a layer name; ("", name) for a single denoiser.

    With several denoisers (Wan 2.2's ``transformer`` and ``transformer_2``) a layer's
    name starts with its expert's pipeline attribute: ``transformer_2.blocks.0.attn1.to_q``.
    """
    head, _, rest = name.partition(".")
    if rest and head in experts and head:
        return head, rest
    return "", name


class StatsRun:
    """A stored statistics run, loaded lazily and checked on the way in.

    Args:
        path: the run directory.

    Raises:
        UserError: the directory is missing, not a qvd-bench run, of another schema
            version, or one of its files is unreadable.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            hint = (
                " (an interrupted collection; rerun it to resume)"
                if partial_dir(self.path).exists()
                else ""
            )
            raise UserError(f"no statistics run at {self.path}{hint}")
        manifest = read_json_document(
            manifest_path,
            format=FORMAT,
            what="statistics manifest",
            redo="recollect it with this version",
            missing=f"{self.path} is not a statistics run: {MANIFEST} is missing",
        )
        self.manifest: dict[str, Any] = manifest

    def _file(self, name: str) -> Path:
        path = self.path / self.manifest["files"][name]
        if not path.exists():
            raise UserError(f"{path} is missing from the statistics run")
        return path

    def _table(self, name: str) -> pd.DataFrame:
        if name in OPTIONAL_TABLES and name not in self.manifest["files"]:
            return _concat([], name)
        path = self._file(name)
        try:
            frame = pq.read_table(path).to_pandas()
        except (OSError, pa.ArrowException) as error:
            raise UserError(f"{path} is corrupt: {_one_line(error)}") from None
        missing = [c for c in TABLE_COLUMNS[name] if c not in frame.columns]
        if missing:
            raise UserError(f"{path} lacks columns {', '.join(missing)}; not a qvd-bench table")
        return frame

    @cached_property
    def layers(self) -> pd.DataFrame:
        """One row per hooked layer: name, role, decided_by, kind, in/out channels."""
        return pd.DataFrame(self.manifest["layers"])

    @cached_property
    def roles(self) -> dict[str, str]:
        """Hooked layer name -> role."""
        return {layer["name"]: layer["role"] for layer in self.manifest["layers"]}

    @property
    def experts(self) -> list[str]:
        """The experts of a multi-expert model (``["transformer", "transformer_2"]``),
        whose names prefix their layers' (``split_layer_name``); empty for one denoiser."""
        return list((self.manifest.get("model") or {}).get("experts") or {})

    @property
    def pipeline_kwargs(self) -> dict[str, Any]:
        """The further arguments of the pipeline call the run was collected with
        (``CollectConfig.extra["pipeline_kwargs"]``); empty when none were given."""
        extra = self.manifest["config"].get("extra") or {}
        return dict(extra.get("pipeline_kwargs") or {})

    @cached_property
    def histogram_edges(self):
        """The edges object of the histograms' grid (``edges()`` gives the boundaries)."""
        from qvd_bench.numerics.edges import edges_from_dict

        spec = self.manifest["histogram"]["edges"]
        if spec is None:
            raise UserError(f"{self.path} was collected without histograms")
        return edges_from_dict(spec)

    @cached_property
    def channels(self) -> pd.DataFrame:
        """Per (tensor, layer, timestep, branch, channel) sufficient moments."""
        return self._table("channels")

    @cached_property
    def histograms(self) -> pd.DataFrame:
        """Non-zero histogram bins per (layer, timestep, branch); edges in the manifest."""
        return self._table("histograms")

    @cached_property
    def temporal(self) -> pd.DataFrame:
        """Per (layer, timestep) input vector of each timestep-embedding layer."""
        return self._table("temporal")

    @cached_property
    def weights(self) -> pd.DataFrame:
        """Per (layer, output channel) weight statistics."""
        return self._table("weights")

    @cached_property
    def attention(self) -> pd.DataFrame:
        """Per (attention module, tensor, timestep, branch) moments of q, k, v and the
        softmax output; empty for a run collected without ``--attention``."""
        return self._table("attention")

    @cached_property
    def attention_histograms(self) -> pd.DataFrame:
        """Non-zero histogram bins of the attention tensors (edges in the manifest); empty
        without ``--attention`` or histograms."""
        return self._table("attention_histograms")

    def temporal_matrix(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """The temporal features of one layer as (timesteps (T,), vectors (T, D))."""
        rows = self.temporal[self.temporal["layer"] == layer].sort_values("timestep")
        if rows.empty:
            raise UserError(f"{self.path} has no temporal features for layer {layer!r}")
        return rows["timestep"].to_numpy(), np.stack(rows["vector"].to_numpy())

    @cached_property
    def reservoir(self) -> dict[str, dict[str, torch.Tensor]]:
        """layer -> reservoir state: ``rows`` (k, C) and per row ``keys``, ``sample_ids``,
        ``timesteps``, ``branches`` (indices into manifest["reservoir"]["branches"]) and
        ``row_indices``; ``config`` holds (capacity, channels, seed)."""
        path = self._file("reservoir")
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as error:
            raise UserError(f"{path} is corrupt: {_one_line(error)}") from None
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            layer, _, field = name.rpartition("/")
            out.setdefault(layer, {})[field] = value
        return out


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]
