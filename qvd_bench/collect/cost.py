"""What a collection will cost, from layer shapes, before it runs.

The accumulators' state is a fixed function of the hooked layers' channel counts and the
number of statistics keys, so it is computed exactly, not guessed:

- ``ChannelMoments``: 9 numbers of 8 bytes per channel per key (count, NaN and Inf counts
  int64; min, max, mean, M2, M3, M4 float64), for every (layer, timestep, branch) key
  (twice with outputs: once for the input, once for the output channels);
- ``Histogram``: one int64 count per bin of the shared grid per key, plus 48 bytes
  (grid parameters, NaN and Inf counts) — the stride thins the counting, not the bins;
- ``Reservoir``: per layer the rows it keeps, of float32 channels and 40 bytes of row
  ids: ``capacity``, or all the distinct rows the layer sees when they are fewer (a
  ``time_emb`` layer sees one row per sample and call in a DiT, a deep UNet block a few
  latent positions). The rows a layer sees in one call are found by one forward of the
  denoiser's twin on the meta device (``rows_per_call``: shapes only, no memory, no
  arithmetic), so the reservoirs are exact too; where that forward fails the estimate
  falls back to ``capacity`` rows (one per frame per call for ``time_emb`` layers), an
  upper bound, and says so (``reservoir_rows``);
- ``TemporalFeatures``: per ``time_emb`` layer one float64 vector per grid timestep;
- attention (``AttentionStats``): a one-channel ``ChannelMoments`` and a histogram per
  (module, tensor q/k/v/softmax, timestep, branch).

The store on disk is an estimate: parquet (zstd) compresses the tables by amounts that
depend on the data. The bytes per row below were measured on collections of the zoo's
presets: channels.parquet rows hold four full float64 moments that do not compress and
counts and keys that nearly vanish; a histogram key keeps only its non-zero bins, whose
number depends on the spread of the data and on how many values were counted; temporal
vectors take from 2.6 bytes a value (UNet3D, whose resnets read one embedding) to 5.6 (a
DiT's distinct vectors, where the parquet dictionary encoding bloats float columns), and
are counted at 4. The reservoir file (safetensors) is exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from qvd_bench.collect.attention import ATTENTION_TENSORS
from qvd_bench.collect.hooks import LayerInfo
from qvd_bench.models.family import LoadedModel, expert_layer_name
from qvd_bench.models.roles import leaf_layers
from qvd_bench.resources import format_bytes

# Accumulator state, bytes.
MOMENT_BYTES_PER_CHANNEL = 9 * 8
HISTOGRAM_FIXED_BYTES = 4 * 8 + 2 * 8  # edges_spec (4,) float64, nan_count, inf_count
RESERVOIR_ID_BYTES_PER_ROW = 5 * 8  # keys, sample_ids, timesteps, branches, row_indices
RESERVOIR_CONFIG_BYTES = 3 * 8
TEMPORAL_BYTES_PER_VALUE = 8  # vectors float64; + 8 per timestep

# Store, bytes per table row after zstd (measured; see the module docstring).
CHANNEL_ROW_BYTES = 36.0
HISTOGRAM_BIN_BYTES = 1.8
WEIGHT_ROW_BYTES = 52.0
ATTENTION_ROW_BYTES = 80.0
TEMPORAL_VALUE_BYTES = 4.0  # float32 list column (2.6-5.6 measured: see below)
# Fraction of a grid's bins that are non-zero in a histogram key (measured typical).
HISTOGRAM_OCCUPANCY = 0.35
SAFETENSORS_HEADER_BYTES_PER_TENSOR = 120
PARQUET_FILE_BYTES = 4096  # footer, schema, page headers of one small file
MANIFEST_BYTES = 4096
MANIFEST_BYTES_PER_LAYER = 250

GIB = 1 << 30
# Above this accumulator state, a collection should bound it (see ``advice``).
LARGE_STATE_BYTES = 8 * GIB


@dataclass(frozen=True)
class CostEstimate:
    """A collection's size, computed before it runs.

    Attributes:
        keys: (layer, timestep, branch) statistics keys of layer inputs.
        channels: input channels of the hooked layers, summed over layers.
        channel_rows: rows of channels.parquet (one per channel per key and tensor).
        accumulator_bytes: the accumulators' state at the end of the collection (the
            peak: state only grows), by accumulator in ``accumulator_parts``.
        store_bytes: estimated size of the run directory, by file in ``store_parts``.
        reservoir_rows: "probe" when the reservoirs' rows come from the rows each layer
            sees (exact), "bound" when they are counted at capacity (an upper bound).
        timestep_groups: statistics per this many timestep groups (``layer_timesteps``
            counts groups); 0: per timestep. The state at the end is the estimate's;
            while sampling, one step's keys more are in flight.
        grouped_by_default: the groups were chosen because per-timestep state would be
            above ``LARGE_STATE_BYTES``.
    """

    keys: int
    channels: int
    channel_rows: int
    accumulator_bytes: int
    store_bytes: int
    accumulator_parts: dict[str, int]
    store_parts: dict[str, int]
    reservoir_rows: str = "probe"
    timestep_groups: int = 0
    grouped_by_default: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_cost(
    layers: Sequence[LayerInfo],
    layer_timesteps: Mapping[str, int],
    *,
    branches: int,
    samples: int,
    frames: int = 1,
    outputs: bool = False,
    histogram_bins: int = 0,
    reservoir_capacity: int = 0,
    temporal_grid: int = 0,
    attention_timesteps: Sequence[int] = (),
    rows_per_call: Mapping[str, int] | None = None,
    timestep_groups: int = 0,
    grouped_by_default: bool = False,
) -> CostEstimate:
    """The accumulator state and store size of a collection, from layer shapes.

    Args:
        layers: the hooked layers (``LayerInfo``: role, in and out channels).
        layer_timesteps: layer name -> distinct timesteps at which the layer runs (the
            steps, or an expert's share of them).
        branches: CFG branches per timestep (2 with guidance, else 1).
        samples: prompts collected.
        frames: latent frames (bounds the rows a ``time_emb`` layer sees per call).
        outputs: output moments are collected too.
        histogram_bins: bins of the histogram grid; 0 when histograms are off.
        reservoir_capacity: rows kept per layer; 0 when off.
        temporal_grid: timesteps on the temporal-features grid; 0 when off.
        attention_timesteps: per observed attention module, the distinct timesteps at
            which it runs; empty when attention is off.
        rows_per_call: layer name -> distinct rows one sample's denoiser call shows it
            (``rows_per_call``); a layer at 0 is never called and holds nothing. None
            counts every layer as called and every reservoir full (an upper bound).
        timestep_groups, grouped_by_default: recorded in the estimate (``CostEstimate``).

    Returns:
        The estimate.
    """
    keys = channels = channel_rows = reservoir_count = 0
    moments = histograms = reservoirs = temporal = weights_rows = 0
    for info in layers:
        channels += info.in_channels
        weights_rows += info.out_channels
        if temporal_grid and info.role == "time_emb":
            temporal += temporal_grid * (info.in_channels + 1) * TEMPORAL_BYTES_PER_VALUE
        if rows_per_call is not None and not rows_per_call.get(info.name):
            continue  # never called: no statistics are made for it
        layer_keys = layer_timesteps[info.name] * branches
        keys += layer_keys
        rows = layer_keys * (info.in_channels + (info.out_channels if outputs else 0))
        channel_rows += rows
        moments += rows * MOMENT_BYTES_PER_CHANNEL
        if histogram_bins:
            histograms += layer_keys * (histogram_bins * 8 + HISTOGRAM_FIXED_BYTES)
        if reservoir_capacity:
            if rows_per_call is not None:  # the rows seen are distinct: kept up to capacity
                kept = min(reservoir_capacity, samples * layer_keys * rows_per_call[info.name])
            elif info.role == "time_emb":  # at most one row per frame per sample per call
                kept = min(reservoir_capacity, samples * layer_keys * frames)
            else:
                kept = reservoir_capacity
            reservoirs += RESERVOIR_CONFIG_BYTES + kept * (
                info.in_channels * 4 + RESERVOIR_ID_BYTES_PER_ROW
            )
            reservoir_count += 1
    attention_keys = len(ATTENTION_TENSORS) * sum(attention_timesteps) * branches
    attention = attention_keys * MOMENT_BYTES_PER_CHANNEL
    if histogram_bins:
        attention += attention_keys * (histogram_bins * 8 + HISTOGRAM_FIXED_BYTES)
    accumulator_parts = {
        "moments": moments,
        "histograms": histograms,
        "reservoirs": reservoirs,
        "temporal": temporal,
        "attention": attention,
    }
    occupied_bins = histogram_bins * HISTOGRAM_OCCUPANCY
    temporal_values = sum(
        temporal_grid * info.in_channels for info in layers if info.role == "time_emb"
    )
    store_parts = {
        "channels.parquet": CHANNEL_ROW_BYTES * channel_rows,
        "histograms.parquet": HISTOGRAM_BIN_BYTES * keys * occupied_bins,
        "temporal.parquet": TEMPORAL_VALUE_BYTES * temporal_values,
        "weights.parquet": WEIGHT_ROW_BYTES * weights_rows,
        # The state itself, 7 tensors a reservoir (config, rows, the 5 id fields).
        "reservoir.safetensors": reservoirs
        + SAFETENSORS_HEADER_BYTES_PER_TENSOR * 7 * reservoir_count,
    }
    store_parts["manifest.json"] = MANIFEST_BYTES + MANIFEST_BYTES_PER_LAYER * len(layers)
    if attention_timesteps:
        store_parts["attention.parquet"] = ATTENTION_ROW_BYTES * attention_keys
        store_parts["attention_histograms.parquet"] = (
            HISTOGRAM_BIN_BYTES * attention_keys * occupied_bins
        )
    store_parts = {
        name: int(size) + (PARQUET_FILE_BYTES if name.endswith(".parquet") else 0)
        for name, size in store_parts.items()
    }
    return CostEstimate(
        keys=keys,
        channels=channels,
        channel_rows=channel_rows,
        accumulator_bytes=sum(accumulator_parts.values()),
        store_bytes=sum(store_parts.values()),
        accumulator_parts=accumulator_parts,
        store_parts=store_parts,
        reservoir_rows="probe" if rows_per_call is not None else "bound",
        timestep_groups=timestep_groups,
        grouped_by_default=grouped_by_default,
    )


def advice(estimate: CostEstimate) -> str:
    """A line on how the collection was bounded, or on how to bound it when it is above
    ``LARGE_STATE_BYTES``; "" otherwise."""
    if estimate.grouped_by_default:
        return (
            f"per-timestep statistics would take more than {format_bytes(LARGE_STATE_BYTES)} "
            f"of state: collecting per {estimate.timestep_groups} timestep groups instead "
            "(timestep_groups=0 keeps every timestep)"
        )
    if estimate.accumulator_bytes <= LARGE_STATE_BYTES:
        return ""
    return (
        f"accumulator state {format_bytes(estimate.accumulator_bytes)} is above "
        f"{format_bytes(LARGE_STATE_BYTES)}: hook fewer layers (roles, include, exclude), "
        "use fewer steps, or turn histograms off (they cost "
        f"{format_bytes(estimate.accumulator_parts['histograms'])})"
    )


def state_bytes(accumulators: Mapping) -> int:
    """Bytes of the live state tensors of a dict of accumulators (what the estimate
    predicts)."""
    return sum(getattr(acc, name).nbytes for acc in accumulators.values() for name in acc.STATE)


def rows_per_call(
    loaded: LoadedModel, layers: Sequence[LayerInfo], frames: int, height: int, width: int
) -> dict[str, int] | None:
    """The distinct rows (tokens, positions) one sample's denoiser call shows each layer.

    Runs one forward of a twin of each expert built on the meta device from its config
    (shapes only: no memory, no arithmetic) on a (1, frames, height, width) latent, and
    records each hooked layer's input rows as the collection's hooks split them
    (``channel_last_rows``). A layer called more than once per call sees the same row
    indices again, which the reservoir counts once: its rows are the most of one call.

    Args:
        loaded: the model.
        layers: the hooked layers.
        frames, height, width: the latent size of the collection.

    Returns:
        Layer name -> rows (0 for a layer the forward does not call), or None when a
        twin cannot be built or run on the meta device.
    """
    wanted = {info.name: info for info in layers}
    rows = dict.fromkeys(wanted, 0)
    family = loaded.family
    for expert, denoiser in loaded.experts.items():
        try:
            with torch.device("meta"):
                twin = type(denoiser).from_config(denoiser.config)
            handles = []
            for inner, module in leaf_layers(twin).items():
                name = expert_layer_name(expert, inner)
                if name in wanted:
                    handles.append(
                        module.register_forward_pre_hook(
                            _row_counter(rows, name, wanted[name].channel_dim), with_kwargs=True
                        )
                    )
            generator = torch.Generator().manual_seed(0)
            conditioning = {
                key: value.to("meta") if isinstance(value, torch.Tensor) else value
                for key, value in family.conditioning(
                    twin, 1, frames, height, width, generator=generator
                ).items()
            }
            latents = torch.empty(
                family.latent_shape(twin, 1, frames, height, width), device="meta"
            )
            text = torch.empty((1, *family.text_embedding_shape(twin)), device="meta")
            timestep = torch.full((1,), 500.0, device="meta")
            try:
                with torch.no_grad():
                    family.forward(twin, latents, timestep, text, conditioning)
            finally:
                for handle in handles:
                    handle.remove()
        except Exception:  # noqa: BLE001 (any failure of the meta forward: fall back)
            return None
    return rows


def _row_counter(rows: dict[str, int], name: str, channel_dim: int):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["input"]
        rows[name] = max(rows[name], x.numel() // x.shape[channel_dim])

    return hook


# ------------------------------------------------------------- bounding the state


# Groups a collection defaults to when per-timestep state would exceed LARGE_STATE_BYTES.
DEFAULT_TIMESTEP_GROUPS = 8
# Per-key state (moments, histograms) kept on an accelerator between sampling steps; above
# it, the keys of finished steps go to host memory (they return when next updated).
DEVICE_STATE_BYTES = 2 * GIB


def group_of_step(step: int, steps: int, groups: int) -> int:
    """The contiguous group of sampling step ``step`` (0-based) of ``steps``."""
    return step * groups // steps


def grouped_timesteps(steps: Sequence[int], total_steps: int, groups: int) -> int:
    """How many groups the step indices ``steps`` (of ``total_steps``) fall into."""
    return len({group_of_step(step, total_steps, groups) for step in steps})


class StepFolder:
    """What a collection does after each sampling step to bound its state.

    With ``groups``, the statistics of the step just finished are merged into those of its
    timestep group (contiguous groups of the ``steps`` sampling steps, as quantizers'
    timestep groups are), stored at the group's first timestep; merges are exact, so a
    group's statistics are those of all its steps' inputs. The state then holds ``groups``
    keys per layer and branch, plus one step's in flight.

    With ``device_limit``, once the per-key state on an accelerator exceeds it, every key
    (all of finished steps) moves to host memory; a key returns to the device when it is
    next updated (accumulators follow their inputs), so the device holds at most the
    limit and one step's keys.

    Args:
        steps: sampling steps per prompt (``after_step`` counts them).
        groups: timestep groups; 0 keeps every timestep.
        device_limit: bytes of per-key state allowed on an accelerator; None: no limit.
    """

    def __init__(self, steps: int, groups: int = 0, device_limit: int | None = None):
        self.steps, self.groups, self.device_limit = steps, groups, device_limit
        self.calls = 0
        self.group_timestep: dict[int, float] = {}  # group -> the timestep it is stored at
        self.members: dict[float, list[float]] = {}  # that timestep -> the group's timesteps

    def after_step(self, accumulator_groups: Sequence[dict], timestep: float) -> None:
        """Folds and moves the keys of the step just finished.

        Args:
            accumulator_groups: dicts (tensor, layer, timestep, branch) -> accumulator
                (moments, histograms, attention), with every pending update folded in.
            timestep: the timestep of the step (every prompt samples the same schedule,
                so a step's group and the timestep it is stored at never change).
        """
        step = self.calls % self.steps
        self.calls += 1
        if self.groups:
            group = group_of_step(step, self.steps, self.groups)
            target = self.group_timestep.setdefault(group, timestep)
            members = self.members.setdefault(target, [])
            if timestep not in members:
                members.append(timestep)
            if target != timestep:
                for accumulators in accumulator_groups:
                    fold_into(accumulators, timestep, target)
        if self.device_limit is not None:
            on_device = [
                acc
                for accumulators in accumulator_groups
                for acc in accumulators.values()
                if acc.device.type != "cpu"
            ]
            if state_bytes(dict(enumerate(on_device))) > self.device_limit:
                for acc in on_device:
                    acc.to("cpu")


def fold_into(accumulators: dict, timestep: float, target: float) -> None:
    """Merges every key (..., ..., ``timestep``, branch) into (..., ..., ``target``, branch)
    and removes it (the key takes its place where ``target`` has none yet)."""
    for key in [k for k in accumulators if k[2] == timestep]:
        into = (key[0], key[1], target, *key[3:])
        acc = accumulators.pop(key)
        if into in accumulators:
            accumulators[into].merge(acc)
        else:
            accumulators[into] = acc
