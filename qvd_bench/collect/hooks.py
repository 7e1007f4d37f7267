"""Forward hooks that feed layer inputs into accumulators.

``StatsCollector.attach()`` puts a forward pre-hook (and optionally a forward hook for
outputs) on every selected leaf Linear/Conv. Each hook reads the current
``DenoiserCall`` from the ``CallTracker`` (timestep value, CFG branches, sample ids),
splits a batched [uncond, cond] input along dim 0 and updates the accumulators keyed by
(tensor, layer, timestep value, branch). Calls made while no sampling call is being
tracked (probe forwards) are ignored. In a call whose frames or tokens are at different
noise levels (an image-to-video conditioning frame, diffusion forcing), the rows at
another level than the step's are left out and counted in ``excluded_rows``: those of the
layers whose rows are the video tokens, the latent voxels (the patch embedding) or, for
time-embedding layers, the timestep's per-frame or per-token entries
(``sampling.other_level_rows``).

``capture_temporal_features`` runs the probe forwards that record the full input
vectors of timestep-embedding layers on a timestep grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qvd_bench.collect.accumulator import RowCount
from qvd_bench.collect.histogram import Histogram, count_into
from qvd_bench.collect.moments import ChannelMoments, fold_many
from qvd_bench.collect.reservoir import Reservoir
from qvd_bench.collect.temporal import TemporalFeatures
from qvd_bench.models.family import LoadedModel
from qvd_bench.models.sampling import ALL_BRANCHES, CallTracker, other_level_rows
from qvd_bench.numerics.edges import SignedLogEdges
from qvd_bench.numerics.moments import batch_moments

# Statistics keys: (tensor, layer, timestep value, branch), tensor in {"input", "output"}.
StatsKey = tuple[str, str, float, str]


@dataclass(frozen=True)
class LayerInfo:
    """A hooked layer: what it is and where its channels are.

    Attributes:
        name: qualified module name in the denoiser.
        role: its role (models/family.py ROLES).
        decided_by: how the role was decided ("table:<pattern>", "probe", "heuristic:...").
        kind: "linear", "conv1d", "conv2d" or "conv3d".
        in_channels: channels of its input (the quantized activation).
        out_channels: output channels (rows of the weight).
    """

    name: str
    role: str
    decided_by: str
    kind: str
    in_channels: int
    out_channels: int

    @property
    def channel_dim(self) -> int:
        """Axis of the channels in the input: last for Linear, 1 for Conv."""
        return -1 if self.kind == "linear" else 1


def describe_layer(name: str, module: nn.Module, role: str, decided_by: str) -> LayerInfo:
    """Builds the LayerInfo of a leaf Linear/Conv module."""
    if isinstance(module, nn.Linear):
        kind, cin, cout = "linear", module.in_features, module.out_features
    elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        kind = f"conv{module.weight.dim() - 2}d"
        cin, cout = module.in_channels, module.out_channels
    else:
        raise TypeError(f"{name} is a {type(module).__name__}, not a Linear or Conv")
    return LayerInfo(name, role, decided_by, kind, cin, cout)


def channel_last_rows(x: torch.Tensor, num_samples: int, channel_dim: int) -> torch.Tensor:
    """Rearranges a layer input into per-sample rows of channels.

    The batch stays outermost in every diffusers reshape (frames and tokens are folded in
    after it), so the leading axis of ``x`` splits into ``num_samples`` equal parts.

    Args:
        x: a layer input, channels on ``channel_dim``.
        num_samples: samples in this input.
        channel_dim: 1 (conv) or -1 (linear).

    Returns:
        (num_samples, R, C) rows.
    """
    if channel_dim != -1:
        x = x.movedim(channel_dim, -1)
    return x.reshape(num_samples, -1, x.shape[-1])


def channel_last_view(x: torch.Tensor, num_samples: int, channel_dim: int) -> torch.Tensor:
    """``channel_last_rows`` as a view, without the copy a conv input's rearrangement
    needs: (num_samples, ..., C), its middle axes (in order) the rows of a sample.

    Args:
        x: a layer input, channels on ``channel_dim``.
        num_samples: samples in this input.
        channel_dim: 1 (conv) or -1 (linear).

    Returns:
        (num_samples, B / num_samples, ..., C), a view of ``x``; flattening its middle
        axes gives ``channel_last_rows``.
    """
    if channel_dim != -1:
        x = x.movedim(channel_dim, -1)
    return x.reshape(num_samples, x.shape[0] // num_samples, *x.shape[1:])


def _rows_per_sample(x: torch.Tensor, num_samples: int, channel_dim: int) -> int:
    """Rows per sample of ``channel_last_rows(x, num_samples, channel_dim)``."""
    return x.numel() // (num_samples * x.shape[channel_dim]) if x.numel() else 0


class StatsCollector:
    """Hooks a set of layers and accumulates statistics of their inputs (and outputs).

    Args:
        layers: hooked layers by name, with the module of each.
        infos: the LayerInfo of each hooked layer.
        tracker: the CallTracker attached to the denoiser.
        outputs: also accumulate moments of the outputs.
        moments: accumulate per-channel moments (off only to time the other accumulators).
        histogram_edges: edges for per-tensor histograms, or None for no histograms.
        histogram_stride: count every k-th element of a tensor in its histogram.
        reservoir_capacity: rows kept per layer; 0 for no reservoir.
        seed: the sampling seed (the reservoir's row keys derive from it).
    """

    def __init__(
        self,
        layers: dict[str, nn.Module],
        infos: dict[str, LayerInfo],
        tracker: CallTracker,
        *,
        outputs: bool = False,
        moments: bool = True,
        histogram_edges: SignedLogEdges | None = None,
        histogram_stride: int = 1,
        reservoir_capacity: int = 0,
        seed: int = 0,
    ):
        self.layers = layers
        self.infos = infos
        self.tracker = tracker
        self.outputs = outputs
        self.collect_moments = moments
        self.histogram_edges = histogram_edges
        self.histogram_stride = histogram_stride
        self.reservoir_capacity = reservoir_capacity
        self.seed = seed
        self.moments: dict[StatsKey, ChannelMoments] = {}
        self.histograms: dict[StatsKey, Histogram] = {}
        self.reservoirs: dict[str, Reservoir] = {}
        # Input rows left out per layer: rows at another noise level than their call's
        # step (``sampling.other_level_rows``).
        self.excluded_rows: dict[str, RowCount] = {}
        self._handles: list = []
        # (tensor, version, channel_dim, branches, per-branch batch moments) of the last
        # observed tensor: consecutive layers often read the same one (the q/k/v
        # projections), and its moments are then computed once. Holding the tensor keeps
        # its identity unambiguous; the version catches in-place changes.
        self._last_moments: tuple | None = None
        # Moments batches waiting to be folded in with one merge (``fold_many``): those
        # of one denoiser call, each accumulator at most once. ``flush`` folds them.
        self._pending: dict[int, tuple[ChannelMoments, dict[str, torch.Tensor]]] = {}
        self._pending_call = None

    def attach(self) -> StatsCollector:
        for name, module in self.layers.items():
            self._handles.append(
                module.register_forward_pre_hook(self._input_hook(name), with_kwargs=True)
            )
            if self.outputs:
                self._handles.append(module.register_forward_hook(self._output_hook(name)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last_moments = None
        self.flush()

    def flush(self) -> None:
        """Folds the pending moments batches in; the statistics are then complete.

        Hooks defer the merges of a denoiser call; ``detach`` (and leaving the ``with``
        block) flushes, so only code reading ``moments`` while attached calls this.
        """
        fold_many(list(self._pending.values()))
        self._pending.clear()

    def __enter__(self) -> StatsCollector:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _input_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["input"]
            self._observe("input", name, x)

        return hook

    def _output_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._observe("output", name, output)

        return hook

    @torch.no_grad()
    def _observe(self, tensor: str, name: str, x: torch.Tensor) -> None:
        call = self.tracker.current
        if call is None:
            return
        source, x = x, x.detach()  # detach() makes a new object: the cache keys on source
        info = self.infos[name]
        channel_dim = info.channel_dim
        chunks = x.chunk(len(call.branches), dim=0) if len(call.branches) > 1 else (x,)
        num_samples = len(call.sample_ids)
        rows = _rows_per_sample(chunks[0], num_samples, channel_dim)
        other = other_level_rows(call, rows, role=info.role)
        if other is not None:
            # Rows at another noise level than the step's (a conditioning frame, a frame
            # that diffusion forcing denoises ahead or behind): left out, so that the
            # step's statistics hold only rows at its level.
            keep = ~other.to(chunks[0].device)
            chunks = tuple(channel_last_rows(c, num_samples, channel_dim)[keep] for c in chunks)
            channel_dim = -1
            if tensor == "input":
                excluded = int(other.sum()) * len(chunks)
                self.excluded_rows.setdefault(name, RowCount()).update(excluded)
            source = None  # the cached moments are of whole tensors
        batches = self._batch_moments(source, chunks, channel_dim) if self.collect_moments else ()
        if call is not self._pending_call:
            self.flush()
            self._pending_call = call
        for index, (branch, chunk) in enumerate(zip(call.branches, chunks)):
            key = (tensor, name, call.timestep, branch)
            if self.collect_moments:
                moments = self.moments.get(key)
                if moments is None:
                    moments = self.moments[key] = ChannelMoments(
                        chunk.shape[channel_dim], device=chunk.device
                    )
                if id(moments) in self._pending:  # a layer called twice in one call
                    self.flush()
                self._pending[id(moments)] = (moments, batches[index])
            if tensor != "input":
                continue
            if self.histogram_edges is not None:
                count_into(self.histograms, key, self.histogram_edges, chunk, self.histogram_stride)
            if self.reservoir_capacity:
                reservoir = self.reservoirs.get(name)
                if reservoir is None:
                    reservoir = self.reservoirs[name] = Reservoir(
                        self.reservoir_capacity,
                        info.in_channels,
                        seed=self.seed,
                        device=chunk.device,
                    )
                if other is None:
                    groups = [(channel_last_view(chunk, num_samples, channel_dim), call.sample_ids)]
                else:  # kept rows are sample-major; samples may keep different counts
                    counts = (~other).sum(dim=1).tolist()
                    groups = [
                        (rows.unsqueeze(0), (sample_id,))
                        for rows, sample_id in zip(chunk.split(counts), call.sample_ids)
                    ]
                branch_index = ALL_BRANCHES.index(branch)
                for rows, sample_ids in groups:
                    # The ids as host ints: the row keys are hashed from them on the host.
                    reservoir.update(rows, sample_ids, call.timestep, branch_index)

    def _batch_moments(
        self, x: torch.Tensor, chunks: Sequence[torch.Tensor], channel_dim: int
    ) -> list[dict[str, torch.Tensor]]:
        """``batch_moments`` of each chunk of ``x``, reused when ``x`` was just seen.

        Args:
            x: the tensor as the layer received it (its identity is the cache key), or
                None when ``chunks`` are not all of it (not cached).
            chunks: its per-branch chunks (detached views).
            channel_dim: the channel axis.

        Returns:
            One ``batch_moments`` dict per chunk.
        """
        last = self._last_moments
        if (
            x is not None
            and last is not None
            and last[0] is x
            and last[1] == x._version
            and last[2] == channel_dim
            and last[3] == len(chunks)
        ):
            return last[4]
        batches = [batch_moments(chunk, channel_dim) for chunk in chunks]
        if x is not None:
            self._last_moments = (x, x._version, channel_dim, len(chunks), batches)
        return batches


@torch.no_grad()
def capture_temporal_features(
    loaded: LoadedModel,
    layer_names: Sequence[str],
    timesteps: Sequence[float],
    *,
    chunk: int = 50,
    text_states: torch.Tensor | None = None,
) -> dict[str, TemporalFeatures]:
    """Records the input vectors of timestep-embedding layers on a timestep grid.

    Their inputs depend only on the timestep (and per-sample conditioning scalars), not
    on the latent, so probe forwards on the smallest valid latent give them exactly. A
    chunk of grid timesteps runs as one batch, one timestep per sample.

    Args:
        loaded: the model.
        layer_names: the timestep-embedding layers to record.
        timesteps: the grid of timestep values.
        chunk: grid timesteps per probe forward.
        text_states: (1, L, D) text states for the probe; zeros when None.

    Returns:
        layer name -> TemporalFeatures holding one (D,) vector per grid timestep, labelled
        by the timestep the denoiser received (the statistics' key; ``family.forward`` may
        convert the grid value, as Mochi's does to 1000 - t).
    """
    denoiser, family = loaded.denoiser, loaded.family
    modules = dict(denoiser.named_modules())
    parameter = next(denoiser.parameters())
    device, dtype = parameter.device, parameter.dtype
    features = {name: TemporalFeatures() for name in layer_names}
    current: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            current[name] = (args[0] if args else kwargs["input"]).detach()

        return hook

    received: list[torch.Tensor] = []

    def timestep_recorder(module: nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        received.append(torch.as_tensor(timestep).detach().reshape(-1).to("cpu", torch.float64))

    handles = [
        modules[name].register_forward_pre_hook(recorder(name), with_kwargs=True)
        for name in layer_names
    ]
    # Features are labelled by the timestep the denoiser receives, as the statistics are
    # keyed: a family's forward may convert it (Mochi counts time backwards, 1000 - t).
    handles.append(denoiser.register_forward_pre_hook(timestep_recorder, with_kwargs=True))
    frames, height, width = family.probe_size(denoiser)
    length, dim = family.text_embedding_shape(denoiser)
    grid = torch.as_tensor(list(timesteps), dtype=torch.float64)
    try:
        for start in range(0, len(grid), chunk):
            values = grid[start : start + chunk]
            batch = len(values)
            generator = torch.Generator(device="cpu").manual_seed(0)
            shape = family.latent_shape(denoiser, batch, frames, height, width)
            latents = torch.randn(shape, generator=generator).to(device, dtype)
            states = (
                text_states.expand(batch, -1, -1)
                if text_states is not None
                else torch.zeros(batch, length, dim)
            ).to(device, dtype)
            conditioning = {
                k: v.to(device)
                for k, v in family.conditioning(
                    denoiser, batch, frames, height, width, generator
                ).items()
            }
            current.clear()
            received.clear()
            family.forward(
                denoiser, latents, values.to(device, torch.float32), states, conditioning
            )
            labels = received[0] if len(received[0]) == batch else received[0].expand(batch)
            for name in layer_names:
                if name not in current:
                    raise RuntimeError(f"timestep-embedding layer {name} was not called")
                x = current[name]
                vectors = x.reshape(batch, -1, x.shape[-1])[:, 0]
                features[name].update(vectors.to(torch.float32), labels)
    finally:
        for handle in handles:
            handle.remove()
    return features
